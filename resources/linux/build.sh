#!/usr/bin/env bash
# Installs Debian's stock kernel (the package linux-image-amd64 depends on) into ferry's
# cache, extracts the vmlinux ELF from its bzImage, and builds a busybox initramfs.
# Prints the directory holding vmlinuz, vmlinux and initramfs.cpio.gz. Cached by the
# kernel package version and this script's contents.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=$("$here/../../scripts/cache-dir.sh")

pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}' || true)
if [ -z "$pkg" ]; then
  apt-get update -qq >&2
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
version=$(apt-cache policy "$pkg" | awk '/Candidate:/{print $2}')
bbversion=$(apt-cache policy busybox-static | awk '/Candidate:/{print $2}')
key=$( (echo "$pkg $version $bbversion"; cat "$here/build.sh" "$here/initramfs.py" "$here/init") | sha256sum | cut -c1-12)
dir=$cache/linux/$pkg-$key
if [ -f "$dir/initramfs.cpio.gz" ]; then
  echo "$dir"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq "$pkg" busybox-static >&2 2>/dev/null)
dpkg-deb -x "$work/$pkg"_*.deb "$work/kernel"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
mkdir -p "$dir.tmp"
cp "$work/kernel/boot/vmlinuz-${pkg#linux-image-}" "$dir.tmp/vmlinuz"
python3 "$here/initramfs.py" extract-vmlinux "$dir.tmp/vmlinuz" "$dir.tmp/vmlinux"
python3 "$here/initramfs.py" initramfs "$work/busybox/bin/busybox" "$here/init" "$dir.tmp/initramfs.cpio.gz"
rm -rf "$dir"
mv "$dir.tmp" "$dir"
echo "$dir"
