#!/usr/bin/env bash
# The whole test suite: unit tests of both crates, integration tests that start the real gateway
# binary on free loopback ports, and doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo nextest run --workspace --no-fail-fast "$@"
# nextest does not run doc tests: the peer crate's README and examples in the docs.
cargo test --workspace --doc
# The API docs build without a warning (broken or private links).
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
