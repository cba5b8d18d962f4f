#!/usr/bin/env bash
# Builds the Debian package with cargo-deb (installed if missing), checks it, and prints its path.
#
#   scripts/build_deb.sh                     # amd64: cargo deb builds the release binary
#   scripts/build_deb.sh --target aarch64-unknown-linux-gnu --no-build --no-strip
#                                            # arm64, from target/aarch64-unknown-linux-gnu/release/lathe
#                                            # (scripts/cross_arm64.sh does this)
#
# What goes in is `[package.metadata.deb]` in Cargo.toml: /usr/bin/lathe; lathe.service
# (CPU-only, exposure 1.0; enabled and started at install, restarted on upgrade) and
# lathe-gpu.service (reaches the NVIDIA/Jetson device nodes, 1.2; they conflict); the account
# (sysusers.d/lathe.conf); /etc/lathe/lathe.toml (a conffile: upgrades keep your edits); the
# sample bundle in /usr/share/lathe/models/; the copyright file.
#
# The checks below fail the script when the package lacks a file, a conffile, the systemd
# steps in its maintainer scripts, or a glibc floor in Depends: what a release must have.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null 2>&1 || cargo install -q --locked cargo-deb@3.8.0 >&2
# cargo deb prints the package's path last.
out=$(cargo deb "$@")
deb=${out##*$'\n'}
[ -f "$deb" ] || { echo "build_deb: cargo deb made no package: $out" >&2; exit 1; }

fail() { echo "build_deb: $deb: $*" >&2; exit 1; }
control=$(mktemp -d)
trap 'rm -rf "$control"' EXIT

# A cross-built package (arm64 from an amd64 machine): dpkg-shlibdeps finds no libc6 of that
# architecture installed and cargo-deb leaves Depends without it. Then the floor is read from
# the binary as dpkg-shlibdeps reads it for glibc, its newest GLIBC_x.y symbol version (readelf
# reads any architecture's ELF), so dpkg refuses a too-old system up front.
depends=$(dpkg-deb -f "$deb" Depends)
if ! grep -q "libc6 (>=" <<< "$depends"; then
  dpkg-deb -R "$deb" "$control/root"
  versions=$(readelf -V -W "$control/root/usr/bin/lathe")
  glibc=$(grep -o 'Name: GLIBC_[0-9.]*' <<< "$versions" | sed 's/.*GLIBC_//' | sort -V | tail -n 1)
  [ -n "$glibc" ] || fail "the binary names no GLIBC_ symbol version"
  depends="libc6 (>= $glibc)${depends:+, $depends}"
  sed -i "/^Depends:/d" "$control/root/DEBIAN/control"
  sed -i "/^Architecture:/a Depends: $depends" "$control/root/DEBIAN/control"
  dpkg-deb --root-owner-group --build "$control/root" "$deb" >/dev/null
  rm -rf "$control/root"
fi
# Read whole before matching: `grep -q` at the end of a pipe under pipefail can fail with
# SIGPIPE (exit 141).
contents=$(dpkg-deb --contents "$deb")
for f in ./usr/bin/lathe ./usr/lib/systemd/system/lathe.service ./usr/lib/systemd/system/lathe-gpu.service \
         ./usr/lib/sysusers.d/lathe.conf ./etc/lathe/lathe.toml ./usr/share/lathe/models/shuttle-mlp-1.lathe \
         ./usr/share/doc/lathe/copyright; do
  grep -q " $f\$" <<< "$contents" || fail "lacks $f"
done
dpkg-deb --control "$deb" "$control"
grep -qx /etc/lathe/lathe.toml "$control/conffiles" || fail "/etc/lathe/lathe.toml is not a conffile"
grep -q "systemd-sysusers" "$control/postinst" || fail "postinst does not create the account"
grep -q "deb-systemd-helper enable lathe.service" "$control/postinst" || fail "postinst does not enable lathe.service"
grep -q "_dh_action=restart" "$control/postinst" || fail "postinst does not restart the service on upgrade"
depends=$(dpkg-deb -f "$deb" Depends)
grep -q "libc6 (>= 2\." <<< "$depends" || fail "no glibc floor in Depends: $depends"
echo "$deb"
