#!/usr/bin/env python3
"""How fast the closed loop adapts, against online learners, on the same stream in one run.

    cargo build --release && python3 benches/adapt.py [--rate 200] [--scenario offset ...]

Each scenario streams real Shuttle rows the sample model never saw
(tests/fixtures/shuttle-unseen.csv.gz) through the daemon over its own mosquitto, the label of
each row published right after it: 2,000 warm-up rows (served, stored, labeled; not scored),
3,000 clean rows ("before"), then 6,000 rows after a change ("after"; "last" is its final 2,000).

Scenarios (the change at row 0 of "after"):
  offset    sensor f1 reads 20 high from the change on, and stays so (a miscalibrated
            replacement; rows pushed past f1's range are left out, as ingest would reject them)
  gradual   f1's offset grows from 0 to 20 over 3,000 rows, then stays
  harmless  the plant runs at another operating point (only rows with f1 in its highest third,
            where most anomalies are, shuffled; the 3,665 of them come up to twice): the
            features drift, the concept does not; it should alarm and promote nothing
  noise     30 % of the labels are flipped from the change on, the features unchanged: the
            loss alarm fires; a model trained on those labels must not be promoted

Side by side, on the same rows in the same order, prequentially (predict, then learn the
label): river's ARFClassifier, HoeffdingAdaptiveTreeClassifier and LogisticRegression (after a
StandardScaler), each having learned the warm-up rows first; and the static model (the same
bundle served by a second pipeline of the same daemon, which never trains). lathe's F1 is that of
the predictions it published, from whichever version served each row.

F1 is of the anomaly class, against the true labels (in "noise" the learners saw flipped ones).
Reported per scenario and learner: F1 before, after, on the last part; for lathe the rows from
the change to the first prediction of a promoted version, the promotions, and the false ones:
any promotion in harmless/noise, elsewhere one whose version scored below the static model on
the rows it served. The daemon runs with `[pipeline.train]` as given by --train (default: empty,
every setting at its default) and `[pipeline.drift]` at its defaults.
Needs: mosquitto, pip install "paho-mqtt>=2" river.
"""
import argparse, gzip, json, os, random, socket, subprocess, sys, tempfile, threading, time

import paho.mqtt.client as mqtt

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
ap = argparse.ArgumentParser()
ap.add_argument("--rate", type=float, default=200, help="rows per second (each with its label)")
ap.add_argument("--scenario", action="append", help="offset, gradual, harmless, noise (default: all)")
ap.add_argument("--train", default="", help="TOML lines for [pipeline.train] (default: none, the defaults)")
ap.add_argument("--lathe", default=os.path.join(root, "target", "release", "lathe"))
ap.add_argument("--json", help="write the results here too")
args = ap.parse_args()
SCENARIOS = args.scenario or ["offset", "gradual", "harmless", "noise"]
WARM, BEFORE, AFTER, LAST = 2000, 3000, 6000, 2000
F1_MAX = 126.0  # the model's valid range for f1 (bundle.toml): rows pushed past it are rejected

with gzip.open(os.path.join(root, "tests", "fixtures", "shuttle-unseen.csv.gz"), "rt") as f:
    lines = f.read().splitlines()[1:]
pool = [([float(v) for v in l.split(",")[:9]], int(float(l.split(",")[9]))) for l in lines]


def scenario_rows(name):
    """(features, true label, label published) for warm-up + before + after."""
    rng = random.Random(7)
    clean = [(x, y, y) for x, y in pool[: WARM + BEFORE]]
    rest = pool[WARM + BEFORE :]
    after = []
    if name == "offset":
        after = [([x[0] + 20] + x[1:], y, y) for x, y in rest if x[0] + 20 <= F1_MAX]
    elif name == "gradual":
        for i, (x, y) in enumerate(rest):
            d = 20.0 * min(1.0, i / 3000)
            if x[0] + d <= F1_MAX:
                after.append(([x[0] + d] + x[1:], y, y))
    elif name == "harmless":
        cut = sorted(x[0] for x, _ in pool)[2 * len(pool) // 3]
        high = [(x, y) for x, y in pool if x[0] > cut]  # 3,665 rows, so some come twice
        rng.shuffle(high)
        after = [(x, y, y) for x, y in (high[i % len(high)] for i in range(AFTER))]
    elif name == "noise":
        after = [(x, y, 1 - y if rng.random() < 0.3 else y) for x, y in rest]
    else:
        sys.exit(f"unknown scenario {name}")
    return clean + after[:AFTER]


def f1(pairs):
    tp = sum(1 for p, y in pairs if p == 1 and y == 1)
    fp = sum(1 for p, y in pairs if p == 1 and y == 0)
    fn = sum(1 for p, y in pairs if p == 0 and y == 1)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def parts(predicted, rows):
    """F1 before, after, last, from {index: class} over the scored rows."""
    def score(lo, hi):
        return round(f1([(predicted[i], rows[i][1]) for i in range(lo, hi) if i in predicted]), 4)
    n = len(rows)
    return {"before": score(WARM, WARM + BEFORE), "after": score(WARM + BEFORE, n), "last": score(n - LAST, n)}


def river_learners(rows):
    from river import forest, linear_model, preprocessing, tree

    learners = {
        "river ARF": forest.ARFClassifier(seed=1),
        "river HAT": tree.HoeffdingAdaptiveTreeClassifier(seed=1),
        "river LogReg": preprocessing.StandardScaler() | linear_model.LogisticRegression(),
    }
    out = {}
    for name, model in learners.items():
        started, predicted = time.monotonic(), {}
        for i, (x, y, seen) in enumerate(rows):
            doc = {f"f{j + 1}": v for j, v in enumerate(x)}
            if i >= WARM:
                p = model.predict_one(doc)
                predicted[i] = int(p) if p is not None else 0
            model.learn_one(doc, seen)
        out[name] = {**parts(predicted, rows), "seconds": round(time.monotonic() - started, 1)}
    return out


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_daemon(name, node, sink, train):
    """A daemon serving the sample model to `sink`; with `train`, its [pipeline.train]."""
    tmp = tempfile.mkdtemp(prefix=f"lathe-adapt-{node}-")
    config = f"""node = "{node}"
state_dir = "{tmp}/state"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
[[pipeline]]
name = "shuttle"
model = "{root}/models/shuttle-mlp-1.lathe"
source = {{ topic = "plant/{name}/+/telemetry", key = "/seq" }}
sink = {{ topic = "plant/{name}/{{device}}/{sink}" }}
"""
    if train is not None:
        config += f"""labels = {{ topic = "plant/{name}/+/label", key = "/seq", value = "/anomaly" }}
[pipeline.train]
{train}
"""
    with open(f"{tmp}/lathe.toml", "w") as f:
        f.write(config)
    log = open(f"{tmp}/lathe.log", "w")
    daemon = subprocess.Popen([args.lathe, "run", "--config", f"{tmp}/lathe.toml"], stderr=log, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while "Drift monitor ready" not in open(f"{tmp}/lathe.log").read():
        if time.monotonic() > deadline or daemon.poll() is not None:
            sys.exit(f"{name}: the daemon did not start; log in {tmp}/lathe.log")
        time.sleep(0.2)
    return daemon, tmp


def run_lathe(name, rows, port):
    """lathe, and the static model: the same bundle served by a second daemon that never
    trains (one daemon's pipelines would all be swapped to a promoted version of the model)."""
    node = f"adapt-{name}"
    daemon, tmp = start_daemon(name, node, "prediction", args.train)
    reference, _ = start_daemon(name, f"{node}-static", "static", None)
    lock = threading.Lock()
    served, static, events = {}, {}, []

    def on_message(client, userdata, msg):
        doc = json.loads(msg.payload)
        with lock:
            if msg.topic.endswith("/prediction"):
                served[doc["key"]] = (doc["class"], doc["version"])
            elif msg.topic.endswith("/static"):
                static[doc["key"]] = doc["class"]
            else:
                events.append(doc)

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{node}-sub")
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe([(f"plant/{name}/+/prediction", 1), (f"plant/{name}/+/static", 1), (f"lathe/{node}/events", 1)])
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{node}-pub")
    pub.max_inflight_messages_set(1000)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    time.sleep(1)  # the daemons subscribe
    started = time.monotonic()
    for i, (x, _, seen) in enumerate(rows):
        doc = {f"f{j + 1}": v for j, v in enumerate(x)}
        doc["seq"] = i
        pub.publish(f"plant/{name}/dev{i % 4}/telemetry", json.dumps(doc), qos=1)
        pub.publish(f"plant/{name}/dev{i % 4}/label", json.dumps({"seq": i, "anomaly": seen}), qos=1)
        ahead = started + (i + 1) / args.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with lock:
            if len(served) >= len(rows) and len(static) >= len(rows):
                break
        time.sleep(0.2)
    time.sleep(1)
    for d in (daemon, reference):
        d.terminate()
        d.wait(timeout=30)
    sub.loop_stop()
    pub.loop_stop()
    with lock:
        if len(served) < len(rows):
            sys.exit(f"{name}: {len(served)} of {len(rows)} predictions; log in {tmp}/lathe.log")
        change = WARM + BEFORE
        lathe = parts({k: c for k, (c, _) in served.items()}, rows)
        promoted = [e for e in events if e.get("event") == "trial.started"]
        by_version = {}
        for k, (c, v) in served.items():
            by_version.setdefault(v, []).append(k)
        false = 0
        for e in promoted:
            keys = by_version.get(e["version"], [])
            if name in ("harmless", "noise"):
                false += 1
            elif keys and f1([(served[k][0], rows[k][1]) for k in keys]) < f1([(static[k], rows[k][1]) for k in keys]):
                false += 1
        first = min((k for k, (c, v) in served.items() if k >= change and v > 1), default=None)
        last_part = {}
        for k, (c, v) in served.items():
            if k >= len(rows) - LAST:
                last_part.setdefault(v, []).append(k)
        last_by_version = {
            f"v{v}": {"rows": len(keys), "f1": round(f1([(served[k][0], rows[k][1]) for k in keys]), 4),
                      "static f1": round(f1([(static[k], rows[k][1]) for k in keys]), 4)}
            for v, keys in sorted(last_part.items())
        }
        lathe.update(
            {
                "rows_to_promotion": None if first is None else first - change,
                "promotions": len(promoted),
                "false_promotions": false,
                "last_by_version": last_by_version,
                "runs": [
                    {"event": e["event"], "reason": e.get("reason") or e.get("detail", {}).get("reason"),
                     "message": e.get("message", "")[:160]}
                    for e in events
                    if e.get("event", "").startswith("train.")
                ],
            }
        )
        return lathe, parts(static, rows)


tmp = tempfile.mkdtemp(prefix="lathe-adapt-")
port = free_port()
with open(f"{tmp}/mosquitto.conf", "w") as f:
    f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 200000\n")
broker = subprocess.Popen(["mosquitto", "-c", f"{tmp}/mosquitto.conf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
results = {}
try:
    for name in SCENARIOS:
        rows = scenario_rows(name)
        print(f"{name}: {len(rows)} rows at {args.rate:g}/s ...", file=sys.stderr)
        lathe, static = run_lathe(name, rows, port)
        learners = river_learners(rows)
        results[name] = {"lathe": lathe, "static model": static, **learners}
        for e in lathe["runs"]:
            print(f"  {e['event']}: {e['message']}", file=sys.stderr)
        print(f"  last {LAST:,} rows by version: {lathe['last_by_version']}", file=sys.stderr)
        print(json.dumps({"scenario": name, **{k: {m: v for m, v in r.items() if m != "runs"} for k, r in results[name].items()}}))
finally:
    broker.terminate()

print("\n| scenario | learner | F1 before | F1 after | F1 last 2,000 | rows to promotion | promotions (false) |")
print("|---|---|---|---|---|---|---|")
for name, r in results.items():
    for learner, m in r.items():
        promo = f"{m['promotions']} ({m['false_promotions']})" if learner == "lathe" else ""
        rows = m.get("rows_to_promotion", "")
        rows = "none" if learner == "lathe" and rows is None else rows
        print(f"| {name} | {learner} | {m['before']:.3f} | {m['after']:.3f} | {m['last']:.3f} | {rows} | {promo} |")
best = {n: max(v["last"] for k, v in r.items() if k.startswith("river")) for n, r in results.items()}
verdict = all(r["lathe"]["last"] >= best[n] for n, r in results.items())
false = sum(r["lathe"]["false_promotions"] for r in results.values())
print(f"\nlathe >= the best river learner on the last part of every scenario: {verdict}; false promotions: {false}")
if args.json:
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
