#!/usr/bin/env bash
# Runs every fuzz target for a while from the committed corpus (fuzz/corpus/<target>).
# What CI runs: `scripts/fuzz.sh 20` (seconds per target). Needs cargo-fuzz
# (`cargo install cargo-fuzz --locked`); works on the stable toolchain (no sanitizer:
# the code is safe Rust, so what is looked for is panics, hangs and memory blow-ups).
#
# Limits per input, so a finding is a finding: 2 GiB RSS, 10 s, 1 MiB inputs.
# New inputs go to fuzz/corpus-new/<target> (ignored by git); crashes to fuzz/artifacts/.
set -euo pipefail
seconds=${1:-60}
cd "$(dirname "$0")/../fuzz"
targets=(payload sparkplug config bundle offer onnx)
cargo fuzz build --sanitizer none -O
for t in "${targets[@]}"; do
    mkdir -p "corpus-new/$t"
    echo "== fuzz $t for ${seconds}s"
    status=0
    cargo fuzz run --sanitizer none -O "$t" "corpus-new/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=1048576 -seed=1 \
        -print_final_stats=1 > "corpus-new/$t.log" 2>&1 || status=$?
    grep -E "^stat::(number_of_executed_units|peak_rss_mb)|ERROR|panicked|SUMMARY|Test unit written" "corpus-new/$t.log" || true
    if [ "$status" -ne 0 ]; then
        tail -40 "corpus-new/$t.log" >&2
        echo "fuzz target $t failed: see fuzz/artifacts/$t" >&2
        exit 1
    fi
done
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, no crash, hang or out-of-memory"
