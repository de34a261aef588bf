#!/usr/bin/env bash
# The whole test suite: unit tests, and integration tests that start the real gateway binary on
# free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo nextest run --no-fail-fast "$@"
