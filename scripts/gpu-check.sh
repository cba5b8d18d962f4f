#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the CUDA backend against the CPU, in a few minutes.
#   1. every kernel against the CPU op, PyTorch's recorded training steps, a net trained on
#      both backends, and a whole fine-tune (tests/cuda.rs, ignored elsewhere);
#   2. `lathe train` on the same data on each backend: wall time, samples/s, the gate;
#   3. samples/s of lathe CPU, lathe CUDA, PyTorch CPU and PyTorch CUDA on the same shapes
#      (benches/train_compare.py; the PyTorch columns need torch);
#   4. where the toolkit has compute-sanitizer, the kernel checks under memcheck, racecheck
#      and synccheck (at most a minute each).
#
# With .gpu/ present (scripts/gpu-pack.sh, run where Rust is) it runs those prebuilt binaries
# and needs no toolchain or network; else it builds with cargo. .gpu/ is git-ignored: the
# device tool takes it with `carry: [".gpu"]`, and then `bash scripts/gpu-check.sh` is the
# whole command (~2 minutes on the emulated GPU; less on a real one). Needs the driver (libcuda) and
# NVRTC: LATHE_NVRTC=/path/to/libnvrtc.so.*, else the first found in the CUDA toolkit or a pip
# package (CUDA 12's or 13's; 13 cannot compile Xavier's sm_72, which the test allows for).
# Each step runs even if one before it failed; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
step() {
  echo; echo "=== $1"; shift
  "$@" || failed+=("$*")
}
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader || true

# NVRTC: cudarc opens libnvrtc.so.12, or libnvrtc.so; CUDA 13 ships libnvrtc.so.13, so a link
# named libnvrtc.so goes on the library path, next to the real file's folder (its builtins).
if [ -z "${LATHE_NVRTC:-}" ]; then
  LATHE_NVRTC=$( (ls /usr/local/cuda/lib64/libnvrtc.so* /usr/local/cuda/targets/*/lib/libnvrtc.so* 2>/dev/null;
                 python3 -c 'import nvidia, os; [print(os.path.join(r, f)) for p in nvidia.__path__ for r, _, fs in os.walk(p) for f in fs]' 2>/dev/null) \
                 | grep -E '/libnvrtc\.so(\.[0-9]+)?$' | sort -V | tail -1)
fi
if [ -n "${LATHE_NVRTC:-}" ]; then
  real=$(readlink -f "$LATHE_NVRTC")
  links=$(mktemp -d)
  ln -s "$real" "$links/libnvrtc.so"
  export LATHE_NVRTC="$links/libnvrtc.so"
  export LD_LIBRARY_PATH="$links:$(dirname "$real"):${LD_LIBRARY_PATH:-}"
  echo "NVRTC: $real"
else
  echo "NVRTC: none found (set LATHE_NVRTC); the CUDA backend cannot compile its kernels"
fi

if [ -x .gpu/lathe ]; then
  echo "prebuilt: .gpu/ from commit $(cat .gpu/commit)"
  # The test binary looks for fixtures and target/release/lathe under the path it was built in.
  built_in=$(cat .gpu/built-in)
  # Linked only where nothing is (or a link was): an existing checkout there is left alone.
  if [ ! -e "$built_in" ] || [ -L "$built_in" ]; then
    mkdir -p "$(dirname "$built_in")" && ln -sfn "$(pwd -P)" "$built_in"
  fi
  mkdir -p target/release && cp .gpu/lathe target/release/lathe
  lathe=.gpu/lathe
  tests=(.gpu/cuda-tests)
  bench=(--lathe-bench "$(pwd -P)/.gpu/train_speed")
else
  cargo build --release || exit 1
  lathe=target/release/lathe
  tests=(cargo test --release --test cuda --)
  bench=()
fi

step "tests/cuda.rs on the GPU" "${tests[@]}" --include-ignored --nocapture --test-threads=1

fine_tune() {
  local work; work="$(mktemp -d)"
  python3 -c "import gzip, shutil, sys; shutil.copyfileobj(gzip.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    tests/fixtures/shuttle-unseen.csv.gz "$work/unseen.csv" || return 1
  for backend in cpu cuda; do
    "$lathe" train --bundle models/shuttle-mlp-1.lathe --data "$work/unseen.csv" -o "$work/$backend.lathe" \
      --state-dir "$work/state" --backend "$backend" --json > "$work/$backend.json" || return 1
    python3 - "$work/$backend.json" "$backend" <<'PY' || return 1
import json, sys
r = json.load(open(sys.argv[1]))
epochs = len(r["epochs"])
losses = ", ".join(f"{e['train_loss']:.6f}" for e in r["epochs"])
print(f"{sys.argv[2]:5} {r['backend']:40} {r['wall_seconds']:.2f} s  {r['train_rows'] * epochs / r['wall_seconds']:,.0f} samples/s"
      f"  gate accepted: {r['gate']['accepted']}  epoch losses: {losses}")
PY
  done
}
step "lathe train, CPU then CUDA, same data" fine_tune
step "samples/s: lathe and PyTorch, CPU and CUDA" python3 benches/train_compare.py --device cuda "${bench[@]}"

# Last, as it is the slowest and the numbers above matter more: what the emulator cannot see,
# since its threads never run at once. compute-sanitizer (in the CUDA toolkit) runs the kernel
# checks for out-of-bounds accesses, shared-memory races and barrier misuse; a minute each.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$sanitizer" ]; then
  for tool in memcheck racecheck synccheck; do
    step "compute-sanitizer --tool $tool: each kernel against the CPU op" \
      timeout 60 "$sanitizer" --tool "$tool" --error-exitcode 9 \
      "${tests[@]}" each_kernel_matches_the_cpu_op --include-ignored --test-threads=1
  done
else
  echo; echo "=== compute-sanitizer: not found (no CUDA toolkit); memcheck, racecheck and synccheck skipped"
fi

echo
if [ ${#failed[@]} -eq 0 ]; then echo "gpu-check: all passed"; else printf 'gpu-check: FAILED: %s\n' "${failed[@]}"; exit 1; fi
