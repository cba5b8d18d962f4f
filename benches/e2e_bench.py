#!/usr/bin/env python3
"""Black-box end-to-end MQTT throughput: N telemetry rows in, N predictions out.

Starts its own mosquitto on a free loopback port, starts the daemon command under test
(with {port} substituted), publishes N real Shuttle rows from D device topics with
mosquitto_pub -l (one row a message, or --batch K rows a message as a JSON array, as
buffering gateways send; or --kepware, a message per scan holding every device's tags in
Kepware's IoT Gateway standard template, on one topic), and waits for N predictions.
Prints one JSON line; msgs_per_s counts predictions (rows).
"""
import argparse, gzip, json, os, socket, subprocess, sys, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("--cmd", required=True, help="daemon command; {port} and {dir} are substituted")
ap.add_argument("-n", type=int, default=20000)
ap.add_argument("--devices", type=int, default=4)
ap.add_argument("--qos", type=int, default=1)
ap.add_argument("--batch", type=int, default=1, help="rows per message (>1: a JSON array)")
ap.add_argument("--kepware", action="store_true", help="Kepware standard template, a message per scan")
ap.add_argument("--timeout", type=float, default=60)
ap.add_argument("--in-topic", default="plant/line1/{dev}/telemetry")
ap.add_argument("--out-filter", default="plant/line1/+/prediction")
args = ap.parse_args()

here = os.path.dirname(os.path.abspath(__file__))
rows = []
with gzip.open(os.path.join(here, "..", "models", "data", "shuttle.csv.gz"), "rt") as f:
    hdr = f.readline().strip().split(",")
    for line in f:
        v = line.strip().split(",")
        rows.append({k: float(x) for k, x in zip(hdr[:9], v[:9])})
        if len(rows) >= args.n: break
while len(rows) < args.n: rows += rows[: args.n - len(rows)]

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

tmp = tempfile.mkdtemp(prefix="e2e-")
port = free_port()
conf = os.path.join(tmp, "mosquitto.conf")
open(conf, "w").write(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\n")
procs = []
def spawn(cmd, **kw):
    # each in its own process group, so a shell pipeline is stopped whole
    p = subprocess.Popen(cmd, start_new_session=True, **kw); procs.append(p); return p
try:
    spawn(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    sub = spawn(["mosquitto_sub", "-p", str(port), "-q", str(args.qos), "-t", args.out_filter, "-C", str(args.n)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    daemon = spawn(args.cmd.format(port=port, dir=tmp), shell=True, stdout=subprocess.DEVNULL,
                   stderr=open(os.path.join(tmp, "daemon.log"), "w"))
    time.sleep(float(os.environ.get("E2E_WARM_S", "2")))
    files = []
    if args.kepware:
        # Row i is device i % D's scan i // D; its tags line1.dev{d}.f1..f9 carry t = i.
        fn = os.path.join(tmp, "kepware.jsonl")
        with open(fn, "w") as f:
            for start in range(0, args.n, args.devices):
                values = [{"id": f"line1.dev{i % args.devices}.{k}", "v": x, "q": True, "t": i}
                          for i in range(start, min(start + args.devices, args.n)) for k, x in rows[i].items()]
                f.write(json.dumps({"timestamp": start, "values": values}) + "\n")
        files.append(("kepware", fn))
    for d in range(args.devices if not args.kepware else 0):
        fn = os.path.join(tmp, f"dev{d}.jsonl")
        with open(fn, "w") as f:
            mine = [dict(rows[i], seq=i) for i in range(d, args.n, args.devices)]
            if args.batch == 1:
                f.writelines(json.dumps(r) + "\n" for r in mine)
            else:
                f.writelines(json.dumps(mine[i:i + args.batch]) + "\n" for i in range(0, len(mine), args.batch))
        files.append((f"dev{d}", fn))
    t0 = time.time()
    pubs = [spawn(["mosquitto_pub", "-p", str(port), "-q", str(args.qos), "-l",
                   "-t", args.in_topic.format(dev=d)], stdin=open(fn)) for d, fn in files]
    got = 0
    deadline = t0 + args.timeout
    import selectors
    sel = selectors.DefaultSelector(); sel.register(sub.stdout, selectors.EVENT_READ)
    buf = b""
    while got < args.n and time.time() < deadline:
        if sel.select(timeout=0.5):
            chunk = os.read(sub.stdout.fileno(), 1 << 16)
            if not chunk: break
            got += chunk.count(b"\n")
    t1 = time.time()
    hwm = None   # largest peak RSS among the service's processes (its process group)
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.getpgid(int(pid)) == daemon.pid:
                for l in open(f"/proc/{pid}/status"):
                    if l.startswith("VmHWM"): hwm = max(hwm or 0, int(l.split()[1]))
        except (OSError, ProcessLookupError): pass
    print(json.dumps({"sent": args.n, "received": got, "seconds": round(t1 - t0, 3),
                      "msgs_per_s": round(got / (t1 - t0), 1), "peak_rss_kib": hwm, "qos": args.qos,
                      "rows_per_message": args.devices if args.kepware else args.batch}))
finally:
    import signal
    for p in reversed(procs):
        try: os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError: pass
        p.wait()
