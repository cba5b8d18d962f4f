#!/usr/bin/env python3
"""Inference latency with a fine-tune running beside it vs without: one daemon, one run.

    cargo build --release && python3 benches/train_interference.py [--rate 1000] [--seconds 15]

Its own mosquitto on a free loopback port; lathe serves the sample Shuttle MLP with labels and
[pipeline.train]. The store is first filled with 20,000 labeled real Shuttle rows. Then
telemetry flows at a steady --rate in alternating phases: "idle" (no training) and "training"
(lathe/{node}/cmd/train sent every 0.1 s, so the loop fine-tunes back to back on 20,000 rows;
the labels are partly flipped so the gate refuses every run: nothing is promoted and no model
swap is measured). The latency is lathe's own, from each prediction's latency_us (message received to
prediction handed to the client). Prints p50/p99 per phase kind, the ratio training/idle, and
the share of each training phase a run was actually in progress (from the events).
Needs: mosquitto, pip install "paho-mqtt>=2".
"""
import argparse, gzip, json, os, socket, subprocess, sys, tempfile, threading, time

import paho.mqtt.client as mqtt

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
ap = argparse.ArgumentParser()
ap.add_argument("--rate", type=int, default=1000, help="telemetry messages per second")
ap.add_argument("--seconds", type=int, default=15, help="length of each phase")
ap.add_argument("--rounds", type=int, default=2, help="idle/training pairs")
ap.add_argument("--lathe", default=os.path.join(root, "target", "release", "lathe"))
args = ap.parse_args()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


with gzip.open(os.path.join(root, "models", "data", "shuttle.csv.gz"), "rt") as f:
    lines = f.read().splitlines()[1:]
rows = [([float(v) for v in l.split(",")[:9]], int(l.split(",")[9])) for l in lines]

tmp = tempfile.mkdtemp(prefix="lathe-train-interference-")
port = free_port()
with open(f"{tmp}/mosquitto.conf", "w") as f:
    # A deep queue: the measuring subscriber must not lose predictions while Python catches up.
    f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 200000\n")
broker = subprocess.Popen(["mosquitto", "-c", f"{tmp}/mosquitto.conf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
config = f"""node = "bench"
state_dir = "{tmp}/state"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
[[pipeline]]
name = "shuttle"
model = "{root}/models/shuttle-mlp-1.lathe"
source = {{ topic = "plant/line1/+/telemetry", key = "/seq" }}
sink = {{ topic = "plant/line1/{{device}}/prediction" }}
labels = {{ topic = "plant/line1/+/label", key = "/seq", value = "/anomaly" }}
[pipeline.train]
trigger = []
min_rows = 1000
rows = 20000
epochs = 30
"""
with open(f"{tmp}/lathe.toml", "w") as f:
    f.write(config)
log = open(f"{tmp}/lathe.log", "w")
daemon = subprocess.Popen([args.lathe, "run", "--config", f"{tmp}/lathe.toml"], stderr=log, stdout=subprocess.DEVNULL)

lock = threading.Lock()
latency = {}  # seq -> latency_us
events = []  # (time, event)


def on_message(client, userdata, msg):
    doc = json.loads(msg.payload)
    with lock:
        if msg.topic.endswith("/prediction"):
            latency[doc["key"]] = doc["latency_us"]
        else:
            events.append((time.monotonic(), doc.get("event"), doc.get("message", "")))


sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub")
sub.on_message = on_message
sub.connect("127.0.0.1", port)
sub.subscribe([("plant/line1/+/prediction", 1), ("lathe/bench/events", 1)])
sub.loop_start()
pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub")
pub.max_inflight_messages_set(1000)
pub.connect("127.0.0.1", port)
pub.loop_start()
time.sleep(3)  # the daemon connects and subscribes

seq = 0


def send(n, rate=None, labels=True):
    """Publishes n rows (with their labels) at `rate` per second (None: as fast as possible).
    Every other label of an anomaly and one in five of a normal row are flipped: runs train
    the same amount, and the gate refuses them all (no promotion, no model swap measured)."""
    global seq
    start, first = time.monotonic(), seq
    for i in range(n):
        row, label = rows[seq % len(rows)]
        doc = {f"f{j + 1}": v for j, v in enumerate(row)}
        doc["seq"] = seq
        pub.publish(f"plant/line1/dev{seq % 4}/telemetry", json.dumps(doc), qos=1)
        if labels:
            flip = (label == 1 and seq % 2 == 0) or (label == 0 and seq % 5 == 0)
            label = 1 - label if flip else label
            pub.publish(f"plant/line1/dev{seq % 4}/label", json.dumps({"seq": seq, "anomaly": label}), qos=1)
        seq += 1
        if rate:
            ahead = start + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    return range(first, seq)


def wait_for(keys, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with lock:
            if all(k in latency for k in keys):
                return True
        time.sleep(0.1)
    return False


print("filling the store with 20,000 labeled rows ...", file=sys.stderr)
seed = send(20000, rate=4000)
assert wait_for(seed), f"the daemon answered {len(latency)} of {len(seed)} seed rows"
time.sleep(2)


def phase(training):
    stop = threading.Event()

    def commands():
        while not stop.is_set():
            pub.publish("lathe/bench/cmd/train", json.dumps({"pipeline": "shuttle"}), qos=1)
            stop.wait(0.1)

    t = threading.Thread(target=commands)
    began = time.monotonic()
    if training:
        t.start()
        time.sleep(1)  # the first run is under way
        began = time.monotonic()
    keys = send(args.rate * args.seconds, rate=args.rate)
    ended = time.monotonic()
    stop.set()
    if training:
        t.join()
    assert wait_for(keys), "missing predictions"
    with lock:
        lat = sorted(latency[k] for k in keys)
        # Share of the phase a run was in progress: started .. (refused|accepted|failed).
        busy, since = 0.0, None
        for at, ev, _ in events:
            if ev == "train.started":
                since = max(at, began)
            elif ev in ("train.refused", "train.accepted", "train.failed") and since is not None:
                busy += max(0.0, min(at, ended) - since)
                since = None
        if since is not None:
            busy += max(0.0, ended - since)
    time.sleep(2)  # let a run in progress finish before the next phase
    return lat, busy / (ended - began)


def pct(v, p):
    return v[min(len(v) - 1, int(len(v) * p))]


results = {"idle": [], "training": []}
duty = []
for r in range(args.rounds):
    for kind in ("idle", "training"):
        lat, busy = phase(kind == "training")
        results[kind] += lat
        if kind == "training":
            duty.append(busy)
        print(json.dumps({"round": r, "phase": kind, "rows": len(lat), "p50_us": pct(lat, 0.5),
                          "p99_us": pct(lat, 0.99), "training_busy": round(busy, 3)}))

with lock:
    runs = sum(1 for _, ev, _ in events if ev == "train.started")
    refused = sum(1 for _, ev, _ in events if ev == "train.refused")
summary = {}
for kind, lat in results.items():
    lat.sort()
    summary[kind] = {"rows": len(lat), "p50_us": pct(lat, 0.5), "p99_us": pct(lat, 0.99)}
summary["p99_ratio_training_over_idle"] = round(summary["training"]["p99_us"] / max(1, summary["idle"]["p99_us"]), 3)
summary["p50_ratio_training_over_idle"] = round(summary["training"]["p50_us"] / max(1, summary["idle"]["p50_us"]), 3)
summary["training_busy_share"] = round(sum(duty) / len(duty), 3)
summary["runs"] = runs
summary["refused"] = refused
summary["rate"] = args.rate
print(json.dumps(summary))
daemon.terminate()
daemon.wait(timeout=20)
broker.terminate()
