#!/usr/bin/env python3
"""Train the sample Shuttle anomaly MLP and export it to ONNX.

    python3 models/train_shuttle_mlp.py        # needs numpy and onnx (pip install numpy onnx)

Writes models/shuttle-mlp.onnx and models/shuttle-validation.csv; then
`lathe bundle create` (see models/README.md) turns them into models/shuttle-mlp-1.lathe.

The model is a plain numpy MLP (9 -> 32 -> 16 -> 2, ReLU, softmax) trained with Adam on a
seeded 70 % split of the NASA Shuttle rows; input standardisation is folded into the graph so
the model takes raw sensor values. The held-out validation split (3000 rows, never trained on)
becomes the bundle's validation set and baseline.
"""
import gzip, os
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED, HIDDEN, LR, EPOCHS, BATCH = 7, (32, 16), 3e-3, 12, 128
here = os.path.dirname(os.path.abspath(__file__))

with gzip.open(os.path.join(here, "data", "shuttle.csv.gz"), "rt") as f:
    header = f.readline().strip().split(",")
    rows = np.array([[float(v) for v in l.strip().split(",")] for l in f], dtype=np.float32)
x_all, y_all = rows[:, :9], rows[:, 9].astype(np.int64)

rng = np.random.default_rng(SEED)
order = rng.permutation(len(rows))
n_train = int(0.7 * len(rows))
train, valid = order[:n_train], order[n_train:n_train + 3000]
x, y = x_all[train], y_all[train]
mean, std = x.mean(0), x.std(0) + 1e-6
xs = (x - mean) / std

sizes = (9,) + HIDDEN + (2,)
params = []
for a, b in zip(sizes[:-1], sizes[1:]):
    params += [rng.normal(0, np.sqrt(2 / a), (a, b)).astype(np.float32), np.zeros(b, np.float32)]
m = [np.zeros_like(p) for p in params]
v = [np.zeros_like(p) for p in params]
step = 0

def forward(xb):
    acts = [xb]
    h = xb
    for i in range(0, len(params), 2):
        h = h @ params[i] + params[i + 1]
        if i + 2 < len(params):
            h = np.maximum(h, 0)
        acts.append(h)
    return acts

for epoch in range(EPOCHS):
    perm = rng.permutation(len(xs))
    for s in range(0, len(xs), BATCH):
        idx = perm[s:s + BATCH]
        acts = forward(xs[idx])
        logits = acts[-1]
        p = np.exp(logits - logits.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
        g = p.copy(); g[np.arange(len(idx)), y[idx]] -= 1; g /= len(idx)
        grads = [None] * len(params)
        for li in range(len(params) // 2 - 1, -1, -1):
            grads[2 * li] = acts[li].T @ g
            grads[2 * li + 1] = g.sum(0)
            if li > 0:
                g = (g @ params[2 * li].T) * (acts[li] > 0)
        step += 1
        for i, (pp, gg) in enumerate(zip(params, grads)):
            m[i] = 0.9 * m[i] + 0.1 * gg
            v[i] = 0.999 * v[i] + 0.001 * gg * gg
            mh, vh = m[i] / (1 - 0.9 ** step), v[i] / (1 - 0.999 ** step)
            params[i] = (pp - LR * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
    acc = (forward((x_all[valid] - mean) / std)[-1].argmax(1) == y_all[valid]).mean()
    print(f"epoch {epoch + 1}: validation accuracy {acc:.4f}")

inits = [numpy_helper.from_array(mean.astype(np.float32), "mean"),
         numpy_helper.from_array(std.astype(np.float32), "std")]
nodes = [helper.make_node("Sub", ["x", "mean"], ["centered"]),
         helper.make_node("Div", ["centered", "std"], ["h0"])]
for li in range(len(params) // 2):
    inits += [numpy_helper.from_array(params[2 * li], f"w{li}"),
              numpy_helper.from_array(params[2 * li + 1], f"b{li}")]
    nodes.append(helper.make_node("MatMul", [f"h{li}", f"w{li}"], [f"mm{li}"]))
    last = li == len(params) // 2 - 1
    nodes.append(helper.make_node("Add", [f"mm{li}", f"b{li}"], ["logits" if last else f"pre{li}"]))
    if not last:
        nodes.append(helper.make_node("Relu", [f"pre{li}"], [f"h{li + 1}"]))
nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
graph = helper.make_graph(
    nodes, "shuttle_mlp",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 9])],
    [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])], inits)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="lathe-sample")
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, os.path.join(here, "shuttle-mlp.onnx"))

with open(os.path.join(here, "shuttle-validation.csv"), "w") as f:
    f.write(",".join(header) + "\n")
    for i in valid:
        f.write(",".join(f"{v:g}" for v in x_all[i]) + f",{y_all[i]}\n")
print("wrote shuttle-mlp.onnx and shuttle-validation.csv")
