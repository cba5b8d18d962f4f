#!/usr/bin/env bash
# Builds dist/lathe_VERSION_ARCH.deb from a release binary, with dpkg-deb (no extra tools).
#
#   scripts/build_deb.sh                      # this machine's architecture, target/release/lathe
#   LATHE_BIN=target/aarch64-unknown-linux-gnu/release/lathe ARCH=arm64 scripts/build_deb.sh
#
# Contents: /usr/bin/lathe; /lib/systemd/system/lathe.service (CPU-only, exposure 1.0) and
# lathe-gpu.service (reaches the NVIDIA/Jetson device nodes, 1.2); /etc/lathe/lathe.toml (a
# conffile: upgrades keep your edits); the sample bundle in /usr/share/lathe/models/. The unit
# uses DynamicUser, StateDirectory and friends, so there is no account to create.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p;T;q' Cargo.toml)  # the first match, no pipe to break
arch=${ARCH:-$(dpkg --print-architecture)}
bin=${LATHE_BIN:-target/release/lathe}
[ -x "$bin" ] || { echo "build_deb: $bin not found; run cargo build --release first" >&2; exit 1; }
root=$(mktemp -d)
chmod 755 "$root"
trap 'rm -rf "$root"' EXIT
install -D -m 755 "$bin" "$root/usr/bin/lathe"
install -D -m 644 systemd/lathe-cpu.service "$root/lib/systemd/system/lathe.service"
install -D -m 644 systemd/lathe.service "$root/lib/systemd/system/lathe-gpu.service"
install -D -m 644 systemd/lathe.toml "$root/etc/lathe/lathe.toml"
install -D -m 644 models/shuttle-mlp-1.lathe "$root/usr/share/lathe/models/shuttle-mlp-1.lathe"
install -D -m 644 README.md "$root/usr/share/doc/lathe/README.md"
install -D -m 644 models/README.md "$root/usr/share/doc/lathe/models-README.md"
mkdir -p "$root/DEBIAN"
for s in postinst prerm postrm; do install -m 755 "packaging/deb/$s" "$root/DEBIAN/$s"; done
echo /etc/lathe/lathe.toml > "$root/DEBIAN/conffiles"
size=$(du -sk "$root" | cut -f1)
# The oldest glibc the binary can start on: the newest GLIBC_x.y symbol version it asks for
# (readelf reads any architecture's ELF). dpkg then refuses a too-old system up front.
glibc=$(readelf -V -W "$bin" | grep -o 'Name: GLIBC_[0-9.]*' | sed 's/.*GLIBC_//' | sort -V | tail -n 1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: lathe
Version: $version
Architecture: $arch
Maintainer: lathe developers <lathe@localhost>
Installed-Size: $size
Depends: libc6${glibc:+ (>= $glibc)}
Recommends: systemd
Section: misc
Priority: optional
Homepage: https://localhost/lathe
Description: closes the ML model loop on factory edge devices
 MQTT telemetry in, ONNX inference, predictions out; drift monitoring against each
 model's own baseline; on-device fine-tuning with a holdout gate. One static-ish binary,
 a hardened systemd unit, an example config and a sample model.
CONTROL
mkdir -p dist
out="dist/lathe_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$out" >/dev/null
echo "$out"
