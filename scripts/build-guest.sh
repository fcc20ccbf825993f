#!/usr/bin/env bash
# Builds the test guest (resources/guest) and prints the path of the ELF. The result is
# cached outside the clone, keyed by a hash of the guest's sources and the toolchain.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
src=$top/resources/guest
cache=$("$top/scripts/cache-dir.sh")
key=$( (cd "$src" && find . -path ./target -prune -o -type f -print0 | sort -z | xargs -0 sha256sum; rustc --version) | sha256sum | cut -c1-16)
out=$cache/guest/$key/ferry-guest
if [ ! -f "$out" ]; then
  # Built in this clone's target directory: build.rs names the linker script by its
  # absolute path, and a build directory shared between clones kept another clone's.
  (cd "$src" && CARGO_TARGET_DIR=$top/target/guest cargo build --release --quiet)
  mkdir -p "$(dirname "$out")"
  cp "$top/target/guest/x86_64-unknown-linux-gnu/release/ferry-guest" "$out.tmp"
  mv "$out.tmp" "$out"
fi
echo "$out"
