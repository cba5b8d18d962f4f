#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the CUDA backend against the CPU, in a few minutes.
#   - every kernel against the CPU op (tests/cuda.rs, ignored elsewhere);
#   - a whole fine-tune on the GPU and the CPU: per-epoch losses and the gate's decision;
#   - wall time and samples/s of `lathe train` on each backend, on the same data.
# Needs libcuda (the driver) and libnvrtc.so.12 (the CUDA toolkit, or
# `pip install nvidia-cuda-nvrtc-cu12` and LATHE_NVRTC=…/libnvrtc.so.12).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader || true
if [ -n "${LATHE_NVRTC:-}" ]; then export LD_LIBRARY_PATH="$(dirname "$LATHE_NVRTC"):${LD_LIBRARY_PATH:-}"; fi
cargo build --release
cargo test --release --test cuda -- --include-ignored --nocapture
work="$(mktemp -d)"
python3 -c "import gzip, shutil, sys; shutil.copyfileobj(gzip.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
  tests/fixtures/shuttle-unseen.csv.gz "$work/unseen.csv"
for backend in cpu cuda; do
  target/release/lathe train --bundle models/shuttle-mlp-1.lathe --data "$work/unseen.csv" -o "$work/$backend.lathe" \
    --state-dir "$work/state" --backend "$backend" --json > "$work/$backend.json" || true
  python3 - "$work/$backend.json" "$backend" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
epochs = len(r["epochs"])
print(f"{sys.argv[2]:5} {r['backend']:40} {r['wall_seconds']:.2f} s  {r['train_rows'] * epochs / r['wall_seconds']:,.0f} samples/s  gate accepted: {r['gate']['accepted']}")
PY
done
