#!/usr/bin/env bash
# Runs every fuzz target from the committed corpus (fuzz/corpus/<target>): a fixed number of
# inputs from a fixed seed, so a run that passes here passes in CI (about 20 s a target on a
# 2-core machine), capped at `seconds` per target. `scripts/fuzz.sh 600 long` runs each target
# for the full 600 s instead. What CI runs: `scripts/fuzz.sh 60`. Needs cargo-fuzz
# (`cargo install cargo-fuzz --locked`); works on the stable toolchain (no sanitizer:
# the code is safe Rust, so what is looked for is panics, hangs and memory blow-ups).
#
# Limits per input, so a finding is a finding: 2 GiB RSS, 10 s, 1 MiB inputs.
# New inputs go to fuzz/corpus-new/<target> (ignored by git); crashes to fuzz/artifacts/.
set -euo pipefail
seconds=${1:-60}
long=${2:-}
# Inputs per target in the short run.
declare -A runs=([payload]=500000 [sparkplug]=400000 [config]=300000 [bundle]=100000 [offer]=150000 [onnx]=4000)
cd "$(dirname "$0")/../fuzz"
targets=(payload sparkplug config bundle offer onnx)
cargo fuzz build --sanitizer none -O
for t in "${targets[@]}"; do
    rm -rf "corpus-new/$t" && mkdir -p "corpus-new/$t"
    count=(-runs="${runs[$t]}")
    [ -n "$long" ] && count=()
    echo "== fuzz $t: ${count[*]:-for ${seconds}s}"
    status=0
    cargo fuzz run --sanitizer none -O "$t" "corpus-new/$t" "corpus/$t" -- \
        "${count[@]}" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=1048576 -seed=1 \
        -print_final_stats=1 > "corpus-new/$t.log" 2>&1 || status=$?
    grep -E "^stat::(number_of_executed_units|peak_rss_mb)|ERROR|panicked|SUMMARY|Test unit written" "corpus-new/$t.log" || true
    if [ "$status" -ne 0 ]; then
        tail -40 "corpus-new/$t.log" >&2
        echo "fuzz target $t failed: see fuzz/artifacts/$t" >&2
        exit 1
    fi
done
echo "fuzz: ${#targets[@]} targets, no crash, hang or out-of-memory"
