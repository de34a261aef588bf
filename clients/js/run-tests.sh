#!/usr/bin/env bash
# Runs the tests of the JavaScript/TypeScript client library (clients/js) against the real
# gateway binary: `npm ci` when node_modules is missing, then `npm test` (tsc, then node --test).
#
# The gateway binary is target/debug/duplex-gateway of this repository, or $DUPLEX_GATEWAY_BIN.
# A missing binary fails the run (it is never skipped). Needs Node.js 20+ and npm.
set -euo pipefail
cd "$(dirname "$0")"

bin="${DUPLEX_GATEWAY_BIN:-../../target/debug/duplex-gateway}"
if [ ! -x "$bin" ]; then
  echo "run-tests.sh: the gateway binary is missing: $bin (build it with cargo build, or set DUPLEX_GATEWAY_BIN)" >&2
  exit 1
fi
DUPLEX_GATEWAY_BIN="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
export DUPLEX_GATEWAY_BIN

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "run-tests.sh: node and npm are needed (Node.js 20 or later)" >&2
  exit 1
fi
major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$major" -lt 20 ]; then
  echo "run-tests.sh: Node.js 20 or later is needed (this is $(node --version))" >&2
  exit 1
fi

if [ ! -d node_modules ]; then
  timeout 300 npm ci --no-audit --no-fund
fi

# Every test has its own bounded waits; this bounds the whole run as well.
timeout 110 npm test
