#!/usr/bin/env bash
# Runs the gateway on the built-in config (127.0.0.1:8080, metrics on 127.0.0.1:9100), or with the
# arguments given (e.g. --config conf/production.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release --bin duplex-gateway -- "$@"
