#!/usr/bin/env bash
# Runs the Python client's tests against the real gateway binary: creates .venv if missing,
# installs the pinned dev requirements and the package (editable), runs pytest. Arguments are
# passed to pytest. DUPLEX_GATEWAY_BIN overrides the binary (default: target/debug/duplex-gateway).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

bin="${DUPLEX_GATEWAY_BIN:-$root/target/debug/duplex-gateway}"
case "$bin" in /*) ;; *) bin="$PWD/$bin" ;; esac
if [ ! -x "$bin" ]; then
    echo "error: the gateway binary is missing: $bin" >&2
    echo "       build it (cargo build) or set DUPLEX_GATEWAY_BIN" >&2
    exit 1
fi
export DUPLEX_GATEWAY_BIN="$bin"

cd "$here"

# A Python of 3.11 or later.
python=""
for candidate in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        python="$candidate"
        break
    fi
done
if [ -z "$python" ]; then
    echo "error: Python 3.11 or later is needed (set PYTHON)" >&2
    exit 1
fi

if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
    rm -rf .venv
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install -r requirements-dev.txt
"${pip[@]}" install --no-deps -e .

exec .venv/bin/python -m pytest "$@"
