#!/usr/bin/env bash
# The package under a real systemd: a Debian bookworm container (systemd-nspawn) boots systemd,
# the .deb is installed as a user would (dpkg -i: account, conffile, unit enabled), and
# lathe.service runs the loop with the unit's whole sandbox, over mutual TLS (mqtts://, the CA,
# client certificate and key root-only in /etc/lathe/credentials, reaching the service only
# through LoadCredential=): 1,200 labelled rows of a faulty sensor, a `cmd/train`, the
# fine-tune accepted and v2 promoted, with NRestarts=0. Then an
# upgrade (the same package again) restarts the running service, and `lathe models list` run
# as root leaves the state folder to the service's account.
#
#   scripts/systemd_check.sh target/debian/lathe_0.1.0-1_amd64.deb
#   DEBUG_BIN=target/debug/lathe scripts/systemd_check.sh …   # and the watchdog, below
#
# With DEBUG_BIN (a debug build, which can stall a stage on request), the service then runs
# that binary with WatchdogSec=3, its inference is stalled for 10 s, and systemd must restart
# it (NRestarts goes up by one, the journal names the stuck stage).
#
# Needs root, debootstrap and systemd-container (installed if missing), and a Debian mirror
# (once: the container's root is kept in $ROOTFS, default /var/tmp/lathe-systemd-root). The
# container shares this machine's network: its mosquitto listens on 127.0.0.1:$PORT (plain: the
# rows are published from here with mosquitto_pub) and $PORT+1 (TLS, a client certificate
# required: lathe's). Takes about a minute once the root exists.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(realpath "${1:?usage: scripts/systemd_check.sh PACKAGE.deb}")
rootfs=${ROOTFS:-/var/tmp/lathe-systemd-root}
port=${PORT:-18830}
node=syscheck
fail() { echo "systemd_check: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root"
command -v systemd-nspawn >/dev/null || apt-get install -y -qq systemd-container >/dev/null
command -v mosquitto_pub >/dev/null || apt-get install -y -qq mosquitto-clients >/dev/null
if [ ! -x "$rootfs/lib/systemd/systemd" ]; then
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
  # This machine's own Debian mirror (deb822 sources, or the one-line list), unless MIRROR says.
  sources=$(cat /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null || true)
  mirror=${MIRROR:-$(sed -n 's/^URIs: *//p; s/^deb \(http[^ ]*\) .*/\1/p' <<< "$sources" | sed -n 1p)}
  [ -n "$mirror" ] || fail "no Debian mirror found in /etc/apt; set MIRROR"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,mosquitto,libseccomp2 \
    bookworm "$rootfs" "$mirror" >/dev/null
fi
# nspawn keeps its propagation folder under /run/systemd/nspawn and wants it on a tmpfs.
if [ "$(stat -f -c %T /run/systemd/nspawn 2>/dev/null)" != tmpfs ]; then
  mkdir -p /run/systemd/nspawn && mount -t tmpfs tmpfs /run/systemd/nspawn
fi

in_root() { systemd-nspawn -q -D "$rootfs" --register=no --keep-unit --pipe "$@"; }
# A fresh state each run: no account, package or state left from the last one.
in_root sh -c 'dpkg -P lathe >/dev/null 2>&1 || true; rm -rf /var/lib/lathe /var/lib/private/lathe /etc/systemd/system/lathe.service.d; userdel lathe 2>/dev/null || true'
# A CA, the broker's certificate (for 127.0.0.1) and lathe's client certificate.
certs=$(mktemp -d)
(
  cd "$certs"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=lathe check CA" -keyout ca.key -out ca.pem \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  for who in server client; do
    usage=$([ $who = server ] && echo serverAuth || echo clientAuth)
    openssl req -newkey rsa:2048 -nodes -subj "/CN=lathe-check-$who" -keyout $who.key -out $who.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' $usage > $who.ext
    openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile $who.ext -out $who.pem 2>/dev/null
  done
)
install -d "$rootfs/etc/mosquitto/certs"
install -m 644 "$certs/ca.pem" "$certs/server.pem" "$certs/server.key" "$rootfs/etc/mosquitto/certs/"
cat > "$rootfs/etc/mosquitto/conf.d/check.conf" <<MOSQUITTO
allow_anonymous true
listener $port 127.0.0.1
listener $((port + 1)) 127.0.0.1
cafile /etc/mosquitto/certs/ca.pem
certfile /etc/mosquitto/certs/server.pem
keyfile /etc/mosquitto/certs/server.key
require_certificate true
MOSQUITTO
cp "$deb" "$rootfs/var/tmp/lathe.deb"
in_root dpkg -i /var/tmp/lathe.deb >/dev/null
in_root id lathe >/dev/null || fail "the package made no account lathe"
[ -L "$rootfs/etc/systemd/system/multi-user.target.wants/lathe.service" ] || fail "lathe.service is not enabled"
[ "$(stat -c %a "$rootfs/etc/lathe/credentials")" = 700 ] || fail "/etc/lathe/credentials is not root-only"
install -m 600 "$certs/ca.pem" "$certs/client.pem" "$certs/client.key" "$rootfs/etc/lathe/credentials/"
cat > "$rootfs/etc/lathe/lathe.toml" <<CONFIG
node = "$node"
[mqtt]
url = "mqtts://127.0.0.1:$((port + 1))"
ca_file = "credential:ca.pem"
cert_file = "credential:client.pem"
key_file = "credential:client.key"
[[pipeline]]
name = "shuttle"
model = "/usr/share/lathe/models/shuttle-mlp-1.lathe"
source = { topic = "plant/line1/+/telemetry", key = "/seq" }
sink = { topic = "plant/line1/{device}/prediction" }
labels = { topic = "plant/line1/+/label", key = "/seq", value = "/anomaly" }
[pipeline.train]
trigger = []
min_rows = 800
rows = 1500
CONFIG

systemd-nspawn -q -D "$rootfs" --register=no --keep-unit -b --machine=lathe-check >/dev/null 2>&1 &
nspawn=$!
cleanup() { kill "$nspawn" 2>/dev/null || true; wait "$nspawn" 2>/dev/null || true; }
trap cleanup EXIT
leader=""
for _ in $(seq 100); do
  leader=$(pgrep -P "$nspawn" | head -n 1 || true)
  [ -n "$leader" ] && break
  sleep 0.1
done
[ -n "$leader" ] || fail "the container did not start"
inside() { nsenter -t "$leader" -a "$@"; }
show() { inside systemctl show lathe -p "$1" --value; }
for _ in $(seq 120); do
  [ "$(show ActiveState 2>/dev/null)" = active ] && break
  sleep 0.5
done
[ "$(show ActiveState)" = active ] || { inside journalctl -u lathe --no-pager | tail -n 30; fail "lathe.service is not active"; }
pid=$(show MainPID)
echo "systemd_check: lathe.service active (pid $pid) under systemd $(inside systemctl --version | head -n 1 | cut -d' ' -f2)"

rows=$(mktemp -d)
events="$rows/events.jsonl"
mosquitto_sub -p "$port" -t "lathe/$node/events" > "$events" &
sub=$!
trap 'kill $sub 2>/dev/null || true; cleanup' EXIT
sleep 0.5
python3 - "$rows" tests/fixtures/shuttle-unseen.csv.gz <<'ROWS'
import csv, gzip, json, sys
out, data = sys.argv[1], sys.argv[2]
rows = list(csv.reader(gzip.open(data, "rt")))[1:1201]
# The f1 sensor reads 20 high (the tests' fault), rows it would push out of range left out.
rows = [r for r in rows if float(r[0]) + 20 <= 126]
with open(f"{out}/telemetry", "w") as t, open(f"{out}/labels", "w") as l:
    for seq, r in enumerate(rows):
        f = {f"f{i + 1}": float(v) for i, v in enumerate(r[:9])}
        f["f1"] += 20
        t.write(json.dumps({**f, "seq": seq}) + "\n")
        l.write(json.dumps({"seq": seq, "anomaly": int(r[9])}) + "\n")
ROWS
mosquitto_pub -p "$port" -q 1 -t plant/line1/dev0/telemetry -l < "$rows/telemetry"
sleep 2
mosquitto_pub -p "$port" -q 1 -t plant/line1/dev0/label -l < "$rows/labels"
sleep 1
mosquitto_pub -p "$port" -q 1 -t "lathe/$node/cmd/train" -m '{"pipeline": "shuttle"}'
for _ in $(seq 240); do
  grep -q '"trial.started"\|"train.refused"\|"train.failed"' "$events" && break
  sleep 0.5
done
grep -q '"train.accepted"' "$events" || { inside journalctl -u lathe --no-pager | tail -n 30; fail "no train.accepted: $(cut -c1-300 "$events")"; }
grep -q '"trial.started"' "$events" || fail "v2 was not promoted"
[ "$(show NRestarts)" = 0 ] || fail "NRestarts=$(show NRestarts)"
[ "$(show MainPID)" = "$pid" ] || fail "the service was restarted during the loop"
[ "$(show ActiveState)" = active ] || fail "lathe.service is $(show ActiveState)"
echo "systemd_check: over mqtts:// with credentials from LoadCredential=: cmd/train accepted, v2 promoted, NRestarts=0"
inside journalctl -u lathe --no-pager | grep -i "sigsys\|seccomp\|operation not permitted" && fail "the journal shows a refused call"

# An operator's `lathe models list` as root, then the package upgraded in place.
inside lathe models list --state-dir /var/lib/lathe >/dev/null
[ -z "$(inside find /var/lib/lathe -user root)" ] || fail "root-owned files in /var/lib/lathe: $(inside find /var/lib/lathe -user root)"
inside dpkg -i /var/tmp/lathe.deb >/dev/null
for _ in $(seq 60); do
  [ "$(show ActiveState)" = active ] && [ "$(show MainPID)" != "$pid" ] && break
  sleep 0.5
done
[ "$(show MainPID)" != "$pid" ] && [ "$(show ActiveState)" = active ] || fail "the upgrade did not restart the service"
[ "$(inside systemctl is-active lathe-gpu)" != active ] || fail "the upgrade started lathe-gpu.service"
echo "systemd_check: upgrade restarted lathe.service (pid $(show MainPID)); ok"

[ -n "${DEBUG_BIN:-}" ] || exit 0
install -m 755 "$DEBUG_BIN" "$rootfs/usr/bin/lathe"
mkdir -p "$rootfs/etc/systemd/system/lathe.service.d"
printf '[Service]\nWatchdogSec=3\n' > "$rootfs/etc/systemd/system/lathe.service.d/watchdog.conf"
inside systemctl daemon-reload
inside systemctl restart lathe
for _ in $(seq 60); do [ "$(show ActiveState)" = active ] && break; sleep 0.5; done
before=$(show NRestarts)
mosquitto_pub -p "$port" -q 1 -t plant/line1/dev0/telemetry -m '{"__lathe_debug_stall": "inference", "ms": 10000}'
head -n 1 "$rows/telemetry" | mosquitto_pub -p "$port" -q 1 -t plant/line1/dev0/telemetry -l
for _ in $(seq 60); do [ "$(show NRestarts)" != "$before" ] && break; sleep 0.5; done
[ "$(show NRestarts)" = $((before + 1)) ] || fail "a stalled inference was not restarted by the watchdog (NRestarts $(show NRestarts))"
journal=$(inside journalctl -u lathe --no-pager)
grep -q "The inference of pipeline shuttle has been stuck" <<< "$journal" || fail "the journal does not name the stuck stage"
grep -qi "watchdog timeout" <<< "$journal" || fail "systemd did not log a watchdog timeout"
echo "systemd_check: a stalled inference stopped the watchdog; systemd restarted lathe (NRestarts=$(show NRestarts))"
