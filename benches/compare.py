#!/usr/bin/env python3
"""Side-by-side end-to-end benchmark: lathe vs the no-work C relay vs the Python service.

    cargo build --release && python3 benches/compare.py [--rounds 3] [-n 20000]

Each round runs every service once through e2e_bench.py (its own mosquitto on a free loopback
port, QoS 1, 4 publishing devices, real Shuttle rows, the sample MLP), alternating so machine
noise hits all of them alike. Prints one JSON line per run, then medians and the ratios
lathe/relay, lathe/python and lathe/lathe-nodrift (the cost of drift monitoring). With
--batch K, lathe also serves the same rows sent K to a message (JSON arrays), and
lathe-batchK/lathe is the ratio of rows per second. With --mqtt311, lathe also speaks MQTT
3.1.1 to the broker (`protocol = "3.1.1"`), and lathe-mqtt311/lathe is that ratio. With --kepware, lathe also reads the
same rows from Kepware's IoT Gateway standard template (a message per scan holding the 4
devices' tags, `format = "kepware"`), and lathe-kepware/lathe is that ratio. The Python service needs `pip install "paho-mqtt>=2"
onnxruntime numpy`; without them it is left out.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("-n", type=int, default=20000)
ap.add_argument("--lathe", default=os.path.join(root, "target", "release", "lathe"))
ap.add_argument("--batch", type=int, default=0, help="also run lathe on K rows a message")
ap.add_argument("--kepware", action="store_true", help="also run lathe on Kepware's standard template")
ap.add_argument("--mqtt311", action="store_true", help="also run lathe speaking MQTT 3.1.1 to the broker")
args = ap.parse_args()

config = """node = "bench"
state_dir = "DIR/state"
[mqtt]
url = "mqtt://127.0.0.1:PORT"
[[pipeline]]
name = "shuttle"
model = "%s"
source = { topic = "plant/line1/+/telemetry", key = "/seq" }
sink = { topic = "plant/line1/{device}/prediction" }
""" % os.path.join(root, "models", "shuttle-mlp-1.lathe")
template = os.path.join(tempfile.mkdtemp(prefix="lathe-bench-"), "lathe.toml.in")
with open(template, "w") as f:
    f.write(config)
# The same service with drift monitoring off: the ratio is what monitoring costs end to end.
template_nodrift = template.replace(".toml.in", "-nodrift.toml.in")
with open(template_nodrift, "w") as f:
    f.write(config + "[pipeline.drift]\nenabled = false\n")
# The same model fed by a Kepware agent on one topic; the device comes from each tag's id.
template_kepware = template.replace(".toml.in", "-kepware.toml.in")
with open(template_kepware, "w") as f:
    f.write(config.replace('topic = "plant/line1/+/telemetry", key = "/seq"', 'topic = "iotgateway", format = "kepware"'))

services = {
    "relay": "mosquitto_sub -p {port} -q 1 -t 'plant/line1/+/telemetry' | "
             "mosquitto_pub -p {port} -q 1 -l -t plant/line1/relay/prediction",
    # exec keeps lathe itself the measured process.
    "lathe": f"sed -e s/PORT/{{port}}/ -e 's|DIR|{{dir}}|' {template} > {{dir}}/lathe.toml && "
             f"exec {args.lathe} run --config {{dir}}/lathe.toml",
    "lathe-nodrift": f"sed -e s/PORT/{{port}}/ -e 's|DIR|{{dir}}|' {template_nodrift} > {{dir}}/lathe.toml && "
                     f"exec {args.lathe} run --config {{dir}}/lathe.toml",
}
# e2e_bench.py options per service beyond -n and --cmd.
bench_args = {}
if args.kepware:
    services["lathe-kepware"] = services["lathe"].replace(template, template_kepware)
    bench_args["lathe-kepware"] = ["--kepware", "--in-topic", "iotgateway"]
if args.mqtt311:
    template_311 = template.replace(".toml.in", "-311.toml.in")
    with open(template_311, "w") as f:
        f.write(config.replace("[mqtt]\n", '[mqtt]\nprotocol = "3.1.1"\n'))
    services["lathe-mqtt311"] = services["lathe"].replace(template, template_311)
if args.batch > 1:
    services[f"lathe-batch{args.batch}"] = services["lathe"]
    bench_args[f"lathe-batch{args.batch}"] = ["--batch", str(args.batch)]
try:
    import paho.mqtt.client, onnxruntime, numpy  # noqa: F401
    if not hasattr(paho.mqtt.client, "CallbackAPIVersion"):  # py_daemon.py uses paho's 2.x API
        raise ImportError
    services["python"] = (f"exec {sys.executable} {os.path.join(here, 'py_daemon.py')} --port {{port}} "
                          f"--model {os.path.join(root, 'models', 'shuttle-mlp.onnx')} --batch 64")
except ImportError:
    print("python reference skipped: pip install 'paho-mqtt>=2' onnxruntime numpy", file=sys.stderr)

results = {name: [] for name in services}
for r in range(args.rounds):
    for name, cmd in services.items():
        bench = [sys.executable, os.path.join(here, "e2e_bench.py"), "-n", str(args.n), "--cmd", cmd]
        out = subprocess.run(bench + bench_args.get(name, []), capture_output=True, text=True, timeout=300)
        line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "{}"
        res = json.loads(line)
        res["service"], res["round"] = name, r
        print(json.dumps(res), flush=True)
        if res.get("received") == args.n:
            results[name].append(res)

def median(name, key):
    vals = [x[key] for x in results[name] if x.get(key) is not None]
    return statistics.median(vals) if vals else None

summary = {name: {"msgs_per_s": median(name, "msgs_per_s"), "peak_rss_mib": (median(name, "peak_rss_kib") or 0) / 1024,
                  "complete_runs": len(results[name])} for name in services}
lathe = summary["lathe"]["msgs_per_s"]
for ref in ("relay", "python", "lathe-nodrift"):
    if ref in summary and lathe and summary[ref]["msgs_per_s"]:
        summary[f"lathe/{ref}"] = round(lathe / summary[ref]["msgs_per_s"], 2)
batched = summary.get(f"lathe-batch{args.batch}", {}).get("msgs_per_s")
if batched and lathe:
    summary[f"lathe-batch{args.batch}/lathe"] = round(batched / lathe, 2)
mqtt311 = summary.get("lathe-mqtt311", {}).get("msgs_per_s")
if mqtt311 and lathe:
    summary["lathe-mqtt311/lathe"] = round(mqtt311 / lathe, 2)
kepware = summary.get("lathe-kepware", {}).get("msgs_per_s")
if kepware and lathe:
    summary["lathe-kepware/lathe"] = round(kepware / lathe, 2)
print(json.dumps(summary, indent=1))
