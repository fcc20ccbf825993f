#!/usr/bin/env bash
# Installs the Debian packages ferry's build and tests need, once per machine.
set -euo pipefail
packages=(python3 xz-utils libclang-dev iproute2)
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
if [ ! -r /dev/kvm ]; then
  echo "error: /dev/kvm is not available; ferry needs KVM" >&2
  exit 1
fi
