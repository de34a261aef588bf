#!/usr/bin/env bash
# Installs what building duplex-gateway needs on a fresh Debian machine with Rust: cmake (Pingora's
# zlib-ng build uses it) and cargo-nextest. Safe to run again; does nothing when both are there.
set -euo pipefail
if ! command -v cmake >/dev/null 2>&1; then
  echo "setup: installing cmake" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
