#!/usr/bin/env python3
"""How fast lathe drains a backlog that waited at mosquitto (after an outage of lathe, or a
burst), with Nagle's algorithm on and off towards the broker, side by side in one run.

The broker holds lathe's persistent session while lathe is stopped; N telemetry messages are
queued for it; lathe is started and the time to N predictions is measured. mosquitto sends
at most `max_inflight_messages` (its default is 20) unacknowledged messages, so the drain is
paced by how soon lathe's PUBACKs reach it. Prints one JSON line per round and setting, then
the median drain rates and their ratio (no-delay / Nagle).

    python3 benches/backlog.py [--rounds 3] [-n 20000] [--window 20]
"""
import argparse, gzip, json, os, selectors, signal, socket, statistics, subprocess, tempfile, time

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("-n", type=int, default=20000)
ap.add_argument("--window", type=int, default=20, help="mosquitto max_inflight_messages")
ap.add_argument("--lathe", default=os.path.join(root, "target", "release", "lathe"))
ap.add_argument("--timeout", type=float, default=120)
args = ap.parse_args()

rows = []
with gzip.open(os.path.join(root, "models", "data", "shuttle.csv.gz"), "rt") as f:
    hdr = f.readline().strip().split(",")
    for line in f:
        rows.append(dict(zip(hdr[:9], map(float, line.strip().split(",")[:9]))))
        if len(rows) >= args.n:
            break


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def wait_port(port, timeout=5):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close(); return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def drain(no_delay):
    tmp = tempfile.mkdtemp(prefix="lathe-backlog-")
    port = free_port()
    conf = os.path.join(tmp, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
                f"max_inflight_messages {args.window}\n")
    config = os.path.join(tmp, "lathe.toml")
    with open(config, "w") as f:
        f.write(f'node = "backlog"\nstate_dir = "{tmp}/state"\n[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\n'
                f'tcp_nodelay = {"true" if no_delay else "false"}\n[[pipeline]]\nname = "shuttle"\n'
                f'model = "{root}/models/shuttle-mlp-1.lathe"\n'
                'source = { topic = "plant/line1/+/telemetry", key = "/seq" }\n'
                'sink = { topic = "plant/line1/{device}/prediction" }\n')
    procs = []

    def spawn(cmd, **kw):
        p = subprocess.Popen(cmd, start_new_session=True, **kw); procs.append(p); return p

    def start_lathe():
        p = spawn([args.lathe, "run", "--config", config], stdout=subprocess.DEVNULL,
                  stderr=open(os.path.join(tmp, "lathe.log"), "a"))
        # Online once its retained status says so.
        st = subprocess.run(["mosquitto_sub", "-p", str(port), "-t", "lathe/backlog/status", "-C", "1",
                             "-W", "20"], capture_output=True, text=True)
        deadline = time.time() + 20
        while '"online"' not in st.stdout and time.time() < deadline:
            time.sleep(0.2)
            st = subprocess.run(["mosquitto_sub", "-p", str(port), "-t", "lathe/backlog/status", "-C", "1",
                                 "-W", "5"], capture_output=True, text=True)
        return p

    try:
        spawn(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        # Once, so the broker knows lathe's persistent session and subscription.
        first = start_lathe()
        first.send_signal(signal.SIGTERM); first.wait(20)
        data = os.path.join(tmp, "telemetry.jsonl")
        with open(data, "w") as f:
            for i, r in enumerate(rows):
                f.write(json.dumps(dict(r, seq=i)) + "\n")
        subprocess.run(["mosquitto_pub", "-p", str(port), "-q", "1", "-l", "-t", "plant/line1/dev0/telemetry"],
                       stdin=open(data), check=True)
        sub = spawn(["mosquitto_sub", "-p", str(port), "-q", "1", "-t", "plant/line1/+/prediction",
                     "-C", str(args.n)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        t0 = time.time()
        start_lathe()
        got, first, sel = 0, None, selectors.DefaultSelector()
        sel.register(sub.stdout, selectors.EVENT_READ)
        while got < args.n and time.time() < t0 + args.timeout:
            if sel.select(timeout=0.5):
                chunk = os.read(sub.stdout.fileno(), 1 << 16)
                if not chunk:
                    break
                first = first or time.time()
                got += chunk.count(b"\n")
        # From the first prediction to the last: lathe's start-up is not the drain.
        seconds = time.time() - (first or t0)
        return {"tcp_nodelay": no_delay, "window": args.window, "queued": args.n, "received": got,
                "start_s": round((first or t0) - t0, 2), "drain_s": round(seconds, 2),
                "msgs_per_s": round(got / seconds, 1)}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


rates = {True: [], False: []}
for r in range(args.rounds):
    for no_delay in (False, True):
        result = drain(no_delay)
        print(json.dumps(dict(result, round=r)), flush=True)
        rates[no_delay].append(result["msgs_per_s"])
nagle, nodelay = statistics.median(rates[False]), statistics.median(rates[True])
print(json.dumps({"median_msgs_per_s": {"nagle": nagle, "no_delay": nodelay},
                  "ratio_no_delay_over_nagle": round(nodelay / nagle, 2)}))
