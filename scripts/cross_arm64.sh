#!/usr/bin/env bash
# Builds target/debian/lathe_VERSION-1_arm64.deb (Jetson, other aarch64 boards) on an amd64
# Debian or Ubuntu machine, as root, without rustup, and checks it.
# Run once per release (too long for every CI run):
#
#   sudo scripts/cross_arm64.sh      # 15 min on 2 cores; the chroot and build take 3 GB
#
# Why this way:
# - Debian packages Rust's standard library for aarch64 (libstd-rust-dev:arm64), so a Debian
#   chroot has a cross toolchain from the distribution's mirror alone. Unstable ("sid") is used
#   because it is the suite whose rustc is new enough (we need >= 1.91; trixie has 1.85).
# - The binary is linked against Debian bullseye's glibc 2.31, not the chroot's own: a binary
#   linked against a new glibc asks for its newest symbols (sid's libm gives log10f@GLIBC_2.43)
#   and will not start on a Jetson. 2.31 is Ubuntu 20.04, which is JetPack 5 (the newest that
#   Xavier gets); JetPack 6 is Ubuntu 22.04. build_deb.sh writes the floor into Depends, and
#   this script fails if the floor is above 2.31 or the binary is not aarch64 code.
#
# Steps: debootstrap the chroot (once; kept in $CHROOT for the next build); install rustc, cargo,
# gcc-aarch64-linux-gnu and libstd-rust-dev:arm64 in it; unpack bullseye's arm64 libc6,
# libc6-dev, linux-libc-dev and libgcc-s1 as the link sysroot; bind-mount this checkout and the
# cargo registry; cargo build --release --locked for aarch64; then build_deb.sh (cargo deb
# --no-build) on that binary, and the checks at the end.
#
# Settings (environment): CHROOT (/var/tmp/lathe-arm64), MIRROR (http://deb.debian.org/debian),
# SYSROOT_SUITE (bullseye; use http://archive.debian.org/debian as MIRROR once it is archived).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
chroot_dir=${CHROOT:-/var/tmp/lathe-arm64}
mirror=${MIRROR:-http://deb.debian.org/debian}
sysroot_suite=${SYSROOT_SUITE:-bullseye}
registry=${CARGO_HOME:-$HOME/.cargo}/registry
[ "$(id -u)" = 0 ] || { echo "cross_arm64: run as root (debootstrap, chroot, mounts)" >&2; exit 1; }
command -v debootstrap >/dev/null || apt-get install -y debootstrap

if [ ! -x "$chroot_dir/usr/bin/apt-get" ]; then
  debootstrap --variant=minbase --include=ca-certificates sid "$chroot_dir" "$mirror"
fi
# The chroot's apt may see a mirror snapshot whose Release files have expired; that is not an
# error for a build machine.
apt_in="apt-get -o Acquire::Check-Valid-Until=false"
printf 'deb %s sid main\ndeb %s %s main\n' "$mirror" "$mirror" "$sysroot_suite" \
  > "$chroot_dir/etc/apt/sources.list"
cp /etc/resolv.conf "$chroot_dir/etc/resolv.conf" 2>/dev/null || true
chroot "$chroot_dir" bash -euc "
  dpkg --add-architecture arm64
  $apt_in update -q
  DEBIAN_FRONTEND=noninteractive $apt_in install -y -q --no-install-recommends \
    rustc cargo gcc-aarch64-linux-gnu libc6-dev-arm64-cross libstd-rust-dev:arm64
  rustc --version
  rm -rf /sysroot /tmp/sysroot-debs && mkdir -p /sysroot /tmp/sysroot-debs && cd /tmp/sysroot-debs
  $apt_in download libc6:arm64/$sysroot_suite libc6-dev:arm64/$sysroot_suite \
    linux-libc-dev:arm64/$sysroot_suite libgcc-s1:arm64/$sysroot_suite
  for deb in *.deb; do dpkg-deb -x \"\$deb\" /sysroot; done
  # Absolute links (libm.so -> /lib/...) would reach the chroot's own glibc: keep them inside.
  find /sysroot -type l -lname '/*' | while read -r link; do
    ln -sfn \"/sysroot\$(readlink \"\$link\")\" \"\$link\"
  done
"
# The linker: the cross gcc, with the old glibc searched before its own.
cat > "$chroot_dir/usr/local/bin/aarch64-sysroot-gcc" <<'LINKER'
#!/bin/sh
exec aarch64-linux-gnu-gcc --sysroot=/sysroot -B/sysroot/usr/lib/aarch64-linux-gnu \
  -L/sysroot/usr/lib/aarch64-linux-gnu -L/sysroot/lib/aarch64-linux-gnu \
  -Wl,-rpath-link,/sysroot/lib/aarch64-linux-gnu "$@"
LINKER
chmod 755 "$chroot_dir/usr/local/bin/aarch64-sysroot-gcc"

mkdir -p "$chroot_dir/src" "$chroot_dir/root/.cargo/registry" "$chroot_dir/build-target" "$chroot_dir/proc"
cleanup() {
  for m in src root/.cargo/registry proc; do umount "$chroot_dir/$m" 2>/dev/null || true; done
}
trap cleanup EXIT
mount --bind "$repo" "$chroot_dir/src"
[ -d "$registry" ] && mount --bind "$registry" "$chroot_dir/root/.cargo/registry"
mount -t proc proc "$chroot_dir/proc"
chroot "$chroot_dir" env \
  CARGO_TARGET_DIR=/build-target \
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-sysroot-gcc \
  CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
  bash -euc 'cd /src && cargo build --release --locked --target aarch64-unknown-linux-gnu'
# Where cargo deb --target looks for the binary.
mkdir -p target/aarch64-unknown-linux-gnu/release
cp "$chroot_dir/build-target/aarch64-unknown-linux-gnu/release/lathe" target/aarch64-unknown-linux-gnu/release/lathe
header=$(readelf -h target/aarch64-unknown-linux-gnu/release/lathe)
grep -q "Machine:.*AArch64" <<< "$header" || { echo "cross_arm64: the binary is not aarch64 code" >&2; exit 1; }
deb=$(scripts/build_deb.sh --target aarch64-unknown-linux-gnu --no-build --no-strip)
[ "$(dpkg-deb -f "$deb" Architecture)" = arm64 ] || { echo "cross_arm64: $deb is not an arm64 package" >&2; exit 1; }
floor=$(dpkg-deb -f "$deb" Depends | sed -n 's/.*libc6 (>= \([0-9.]*\)).*/\1/p')
[ "$(printf '%s\n2.31\n' "$floor" | sort -V | tail -n 1)" = 2.31 ] \
  || { echo "cross_arm64: $deb needs glibc $floor, above JetPack 5's 2.31" >&2; exit 1; }
echo "$deb"
