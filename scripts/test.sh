#!/usr/bin/env bash
# Runs ferry's whole test suite on this machine: installs what it needs, builds the test
# guest and fetches Debian's kernel (both cached outside the clone), checks formatting
# and lints, then runs every unit and end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
FERRY_GUEST=$(scripts/build-guest.sh)
FERRY_LINUX_DIR=$(resources/linux/build.sh)
export FERRY_GUEST FERRY_LINUX_DIR
echo "test guest: $FERRY_GUEST"
echo "linux:      $FERRY_LINUX_DIR"

cargo fmt --all -- --check
(cd resources/guest && cargo fmt -- --check)
cargo clippy --workspace --all-targets --release --quiet -- -D warnings
guest_target="$PWD/target/guest" # as scripts/build-guest.sh builds it
(cd resources/guest && CARGO_TARGET_DIR="$guest_target" cargo clippy --release --quiet -- -D warnings)
# ferryctl's tests run the binary next to ferry's.
cargo build --workspace --bins --release --quiet
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# A test that hangs (a lost wake-up, say) fails the suite here, with its name among the
# "running for over 60 seconds" lines, instead of running into CI's own limit. The whole
# suite takes about 15 minutes on two cores.
limit() {
    timeout --kill-after=30 "$@"
    local rc=$?
    [ "$rc" -ne 124 ] || echo "ferry: the tests did not finish within $1 s; see the tests running for over 60 seconds above" >&2
    return "$rc"
}
limit 2700 cargo test --workspace --release --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The unit tests and fuzzers of the library crates again, with overflow checks and
# debug assertions (the release profile has neither).
limit 900 cargo test --profile checked --no-fail-fast -p memory -p devices -p api --lib 2>&1 | tee -a "$log"
checked=${PIPESTATUS[0]}
[ "$status" -ne 0 ] || status=$checked
set -e
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "ferry: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
