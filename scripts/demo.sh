#!/usr/bin/env bash
# Installs what ferry needs, builds it, and boots the bundled test guest in a microVM,
# showing its console. The guest verifies 5 passes over 64 MiB of its memory, then
# reboots, which ends ferry with exit code 0. Extra arguments go to the guest's command
# line, e.g.  scripts/demo.sh workload=dirty size=32M passes=1000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --quiet --bin ferry
guest=$(scripts/build-guest.sh)
args=${*:-workload=verify size=64M passes=5}
config=$(mktemp --suffix=.json)
trap 'rm -f "$config"' EXIT
cat > "$config" <<JSON
{
  "boot-source": { "kernel_image_path": "$guest", "boot_args": "console=ttyS0 $args" },
  "machine-config": { "vcpu_count": 2, "mem_size_mib": 256 }
}
JSON
echo "+ target/release/ferry --config-file $config --no-api" >&2
target/release/ferry --config-file "$config" --no-api
