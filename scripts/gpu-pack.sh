#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs, for a GPU machine that has no Rust toolchain and no
# network (a lent test machine): the release `lathe`, the tests/cuda.rs test binary and the
# train_speed bench, stripped, in .gpu/ (ignored by git). Copy or carry .gpu/ with the working
# tree; gpu-check.sh uses it when it is there. Building needs no CUDA: cudarc loads the driver
# and NVRTC at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
# The last executable a cargo command built for `target`, from its JSON messages.
built() {
  python3 -c '
import json, sys
paths = [m["executable"] for m in map(json.loads, sys.stdin)
         if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]]
print(paths[-1])' "$1"
}
cargo build --release
tests=$(cargo test --release --test cuda --no-run --message-format=json | built cuda)
bench=$(cargo bench --bench train_speed --no-run --message-format=json | built train_speed)
rm -rf .gpu && mkdir .gpu
cp target/release/lathe .gpu/lathe
cp "$tests" .gpu/cuda-tests
cp "$bench" .gpu/train_speed
strip .gpu/cuda-tests .gpu/train_speed
# The test and bench binaries hold this checkout's path (fixtures, target/release/lathe):
# gpu-check.sh links it to wherever the tree lands.
pwd > .gpu/built-in
git rev-parse HEAD > .gpu/commit
du -sh .gpu
