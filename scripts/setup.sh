#!/usr/bin/env bash
# Installs what building and testing duplex-gateway needs on a fresh Debian machine with Rust:
# cmake (Pingora's zlib-ng build uses it), curl (the README test), chromium (the browser test),
# nats-server (the cluster tests), prometheus (the dashboard's queries are checked against it)
# and cargo-nextest. Safe to run again; does nothing when all are there.
set -euo pipefail
MISSING=""
command -v cmake >/dev/null 2>&1 || MISSING="$MISSING cmake"
# The README walk-through test runs its curl commands as written.
command -v curl >/dev/null 2>&1 || MISSING="$MISSING curl"
# The browser example is tested in headless Chromium.
command -v chromium >/dev/null 2>&1 || MISSING="$MISSING chromium"
# The cluster tests start real NATS servers (Debian installs it as /usr/sbin/nats-server).
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || MISSING="$MISSING nats-server"
# The Grafana dashboard's queries run against a real Prometheus.
command -v prometheus >/dev/null 2>&1 || MISSING="$MISSING prometheus"
if [ -n "$MISSING" ]; then
  echo "setup: installing$MISSING" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $MISSING >/dev/null
  # Debian's package may start a Prometheus service of its own: the tests run their own.
  $SUDO pkill -x prometheus 2>/dev/null || true
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
