#!/usr/bin/env bash
# Installs the Debian packages ferry's build and tests need, once per machine, and checks
# that KVM and the tap driver are there: libclang for userfaultfd-sys's bindgen, QEMU to
# boot the test guest through its PVH note, iproute2 to make taps for the virtio-net
# tests, curl for the API tests.
set -euo pipefail
packages=(python3 ca-certificates curl qemu-system-x86 libclang-dev iproute2)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
if [ ! -w /dev/kvm ]; then
  echo "error: /dev/kvm is missing or not writable; ferry needs KVM" >&2
  exit 1
fi
if [ ! -c /dev/net/tun ]; then
  echo "error: /dev/net/tun is missing; virtio-net needs the tun/tap driver" >&2
  exit 1
fi
