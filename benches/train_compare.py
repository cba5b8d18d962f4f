#!/usr/bin/env python3
"""Fine-tuning speed, lathe's CPU backend vs PyTorch CPU, side by side in one run.

    pip install torch && python3 benches/train_compare.py [--seconds 3]

Same work on both: full-network Adam (lr 1e-3), softmax cross-entropy, ReLU MLPs
9-32-16-2 at batch 64 and 64-256-256-10 at batch 256, one thread, 50 warm-up steps, then as
many steps as fit in the time. Prints a table and the ratio (lathe / PyTorch samples/s).
"""
import argparse, json, os, subprocess, sys, time

import torch
from torch import nn

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("--seconds", type=float, default=3.0)
args = ap.parse_args()
torch.set_num_threads(1)


def pytorch(sizes, batch):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i + 2 < len(sizes):
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    lossf = nn.CrossEntropyLoss()
    rows = batch * 64
    x = torch.rand(rows, sizes[0]) * 2 - 1
    y = torch.arange(rows) % sizes[-1]
    def step(s):
        b = s % 64
        opt.zero_grad(set_to_none=True)
        loss = lossf(net(x[b * batch:(b + 1) * batch]), y[b * batch:(b + 1) * batch])
        loss.backward()
        opt.step()
    for s in range(50):
        step(s)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        for _ in range(20):
            step(steps)
            steps += 1
    elapsed = time.perf_counter() - start
    return steps * batch / elapsed


env = dict(os.environ, LATHE_BENCH_SECONDS=str(args.seconds))
print("building and running the lathe side (cargo bench --bench train_speed)...", file=sys.stderr)
out = subprocess.run(["cargo", "bench", "--quiet", "--bench", "train_speed"], cwd=root, env=env,
                     check=True, capture_output=True, text=True).stdout
ours = {(r["shape"], r["batch"]): r for r in map(json.loads, filter(None, out.splitlines()))}

print(f"PyTorch {torch.__version__}, 1 thread\n")
print("| model | batch | PyTorch samples/s | lathe samples/s | lathe / PyTorch |")
print("|---|---|---|---|---|")
for sizes, batch in [([9, 32, 16, 2], 64), ([64, 256, 256, 10], 256)]:
    shape = "-".join(map(str, sizes))
    theirs = pytorch(sizes, batch)
    mine = ours[(shape, batch)]["samples_per_s"]
    print(f"| {shape} | {batch} | {theirs:,.0f} | {mine:,.0f} | {mine / theirs:.2f}x |")
