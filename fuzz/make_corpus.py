"""Writes the seed corpus in fuzz/corpus/: valid inputs of each kind, so the fuzzers start
from what the daemon really reads. Run from the repository root: python3 fuzz/make_corpus.py
(needs pysparkplug for the Sparkplug seeds; the rest are copied from the repository)."""
import json, pathlib, shutil

root = pathlib.Path(__file__).resolve().parent.parent
corpus = root / "fuzz" / "corpus"

def put(target, name, data):
    path = corpus / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())

# Telemetry payloads: good, nested, escaped names, edge cases of JSON numbers.
put("payload", "good.json", json.dumps({"seq": 1, "ts": "2026-01-01T00:00:00Z", "temperature": 21.5,
                                        "readings": [{"co2": 455}], "a~1b~0c": 3}))
put("payload", "bignum.json", '{"temperature": 1e308, "readings": [{"co2": -0.0}], "a~1b~0c": 1E-400}')
put("payload", "strings.json", '{"temperature": "21", "readings": [], "a~1b~0c": null}')
put("payload", "deep.json", "[" * 200 + "]" * 200)
put("payload", "kepware.json", json.dumps({"timestamp": 1764745200000, "values": [
    {"id": "L1.P7.temperature", "v": 21.5, "q": True, "t": 1764745199000},
    {"id": "L1.P7.Air.CO2", "v": "455", "q": 192, "t": 1764745199001},
    {"id": "L1.P8.a/b~c", "v": True, "q": False}, {"id": "_System._Time", "v": "12:00"}]}))

# Configs: the shipped example and the test-style one.
put("config", "lathe.toml", (root / "systemd" / "lathe.toml").read_text())
put("config", "small.toml", """[mqtt]
url = "mqtt://127.0.0.1:1883"
[[pipeline]]
name = "shuttle"
bundle = "models/shuttle-mlp-1.lathe"
source = { topic = "plant/+/shuttle", format = "json" }
sink = { topic = "plant/{device}/prediction" }
window = { size = 4 }
[pipeline.train]
trigger = ["drift"]
[update]
trusted_keys = ["keys/central.pub"]
""")

# Bundles: the shipped one.
put("bundle", "shuttle-mlp-1.lathe", (root / "models" / "shuttle-mlp-1.lathe").read_bytes())
put("bundle", "validation.csv", (root / "models" / "shuttle-validation.csv").read_text()[:4000])

# Offers: the inner offer text (the target signs it) and an envelope.
offer = {"name": "shuttle", "version": 2, "sha256": "ab" * 32, "length": 4096, "expires_unix": 4102444800,
         "min_daemon_version": "0.1.0", "compatible": "jetson-orin", "chunks": 2}
put("offer", "offer.json", json.dumps(offer))
put("offer", "envelope.json", json.dumps({"offer": json.dumps(offer), "key": "00" * 32, "signature": "00" * 64}))

# ONNX: the conformance zoo (its small models: the big forests only slow each run) and the
# hostile models.
for f in [f for f in sorted((root / "tests" / "fixtures" / "zoo").glob("*.onnx")) if f.stat().st_size <= 16384] + \
         sorted((root / "tests" / "fixtures" / "hostile").glob("*.onnx")) + [root / "models" / "shuttle-mlp.onnx"]:
    shutil.copy(f, corpus / "onnx" / f.name)

# Sparkplug: a birth, data by alias, a device death, joined as the target splits them.
import pysparkplug as spb
from pysparkplug import DataType, Metric
ts = 1_700_000_000_000
msgs = [
    (0, spb.NBirth(ts, 0, (Metric(ts, "bdSeq", DataType.INT64, value=0),
                          Metric(ts, "Node Control/Rebirth", DataType.BOOLEAN, value=False))).encode()),
    (3, spb.DBirth(ts, 1, (Metric(ts, "temperature", DataType.DOUBLE, value=20.0, alias=1),
                          Metric(ts, "pressure", DataType.FLOAT, value=1.0, alias=2),
                          Metric(ts, "count", DataType.INT32, value=-5, alias=3))).encode()),
    (4, spb.DData(ts, 2, (Metric(ts, None, DataType.DOUBLE, value=21.0, alias=1),)).encode(include_dtypes=False)),
    (4, spb.DData(ts, 3, (Metric(ts, "temperature", DataType.DOUBLE, value=22.0),)).encode()),
    (5, spb.DDeath(ts, 4).encode()),
    (2, spb.NDeath(ts, Metric(ts, "bdSeq", DataType.INT64, value=0)).encode()),
]
put("sparkplug", "session.bin", b"SPB|".join(bytes([k]) + p for k, p in msgs))
put("sparkplug", "birth-data.bin", b"SPB|".join(bytes([k]) + p for k, p in msgs[:3]))
