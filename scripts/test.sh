#!/usr/bin/env bash
# The whole test suite: unit tests of both crates, the JavaScript and Python client libraries'
# tests, integration tests that start the real gateway binary on free loopback ports (the
# libraries against each other and the browser example among them), and doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The gateway binary the client libraries are tested against.
cargo build --workspace --bins --examples
# The client libraries: each installs what it needs (npm ci; a virtual environment) and runs
# its own tests against that binary. They also build the JavaScript package the browser
# example imports, and the Python environment the cross-language tests run.
clients/js/run-tests.sh
clients/python/run-tests.sh
cargo nextest run --workspace --no-fail-fast "$@"
# nextest does not run doc tests: the peer crate's README and examples in the docs.
cargo test --workspace --doc
# The API docs build without a warning (broken or private links).
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
