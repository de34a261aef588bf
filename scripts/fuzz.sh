#!/usr/bin/env bash
# Fuzzes the message parser, the handshake parser and the request classifier with cargo-fuzz
# (libFuzzer). Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]  (default 60 s, all three,
# run side by side). Crashes land in fuzz/artifacts/<target>/; turn each into a regression test.
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP lets the stable toolchain provide them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then targets=(message handshake request); fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
cd fuzz
cargo fuzz build -O
pids=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$seconds" -print_final_stats=1 \
    > "../target/fuzz-$t.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "fuzz ${targets[$i]}: ok, $(grep -E '^stat::number_of_executed_units' "../target/fuzz-${targets[$i]}.log" | awk '{print $2}') runs in ${seconds}s"
  else
    echo "fuzz ${targets[$i]}: FAILED, see target/fuzz-${targets[$i]}.log and fuzz/artifacts/${targets[$i]}/"
    status=1
  fi
done
exit $status
