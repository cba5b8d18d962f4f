#!/usr/bin/env python3
"""Fine-tuning speed, lathe vs PyTorch, side by side in one run.

    pip install torch && python3 benches/train_compare.py [--seconds 3]
    python3 benches/train_compare.py --device cuda        # on a GPU machine: CPU and CUDA both

Same work on both: full-network Adam (lr 1e-3), softmax cross-entropy, ReLU MLPs
9-32-16-2 at batch 64 and 64-256-256-10 at batch 256, one CPU thread, 50 warm-up steps, then
as many steps as fit in the time. Prints a table and the ratios (lathe / PyTorch samples/s).

With --device cuda, PyTorch also runs on the GPU and lathe's CUDA backend beside its CPU one.
PyTorch's loop is the usual one: it never reads the loss, so its launches queue ahead, and the
clock stops after a final synchronize. lathe reads each step's loss (its trainer reports it).
--lathe-bench runs a train_speed binary built elsewhere (scripts/gpu-pack.sh) instead of
`cargo bench`; without torch, only lathe's rows are printed.
"""
import argparse, json, os, subprocess, sys, time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("--seconds", type=float, default=3.0)
ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
ap.add_argument("--lathe-bench", help="a built train_speed binary (else: cargo bench)")
args = ap.parse_args()
SHAPES = [([9, 32, 16, 2], 64), ([64, 256, 256, 10], 256)]

try:
    import torch
    from torch import nn
    torch.set_num_threads(1)
except ImportError:
    torch = None
    print("PyTorch is missing (pip install torch): lathe's side only", file=sys.stderr)


def pytorch(sizes, batch, device):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i + 2 < len(sizes):
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    lossf = nn.CrossEntropyLoss()
    rows = batch * 64
    x = (torch.rand(rows, sizes[0]) * 2 - 1).to(device)
    y = (torch.arange(rows) % sizes[-1]).to(device)
    def step(s):
        b = s % 64
        opt.zero_grad(set_to_none=True)
        loss = lossf(net(x[b * batch:(b + 1) * batch]), y[b * batch:(b + 1) * batch])
        loss.backward()
        opt.step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for s in range(50):
        step(s)
    sync()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        for _ in range(20):
            step(steps)
            steps += 1
        sync()
    elapsed = time.perf_counter() - start
    return steps * batch / elapsed


def lathe(backend):
    env = dict(os.environ, LATHE_BENCH_SECONDS=str(args.seconds), LATHE_BENCH_BACKEND=backend)
    if args.lathe_bench:
        cmd = [args.lathe_bench]
    else:
        print(f"building and running the lathe side (cargo bench --bench train_speed, {backend})...", file=sys.stderr)
        cmd = ["cargo", "bench", "--quiet", "--bench", "train_speed"]
    out = subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True).stdout
    return {(r["shape"], r["batch"]): r["samples_per_s"] for r in map(json.loads, filter(None, out.splitlines()))}


devices = ["cpu", "cuda"] if args.device == "cuda" else ["cpu"]
ours = {d: lathe(d) for d in devices}
theirs = {d: {} for d in devices}
if torch is not None:
    for d in devices:
        for sizes, batch in SHAPES:
            theirs[d][("-".join(map(str, sizes)), batch)] = pytorch(sizes, batch, d)
    gpu = f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"PyTorch {torch.__version__}, 1 CPU thread{gpu}\n")

cols = [(f"{who} {d.upper()}", table, d) for d in devices for who, table in (("PyTorch", theirs), ("lathe", ours))]
print("| model | batch | " + " | ".join(f"{name} samples/s" for name, _, _ in cols)
      + " | " + " | ".join(f"lathe / PyTorch {d.upper()}" for d in devices) + " |")
print("|---|---|" + "---|" * (len(cols) + len(devices)))
for sizes, batch in SHAPES:
    key = ("-".join(map(str, sizes)), batch)
    cells = [f"{table[d][key]:,.0f}" if key in table[d] else "–" for _, table, d in cols]
    ratios = [f"{ours[d][key] / theirs[d][key]:.2f}x" if key in theirs[d] else "–" for d in devices]
    print(f"| {key[0]} | {batch} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
