#!/usr/bin/env bash
# Peer benchmark (issue 11 item 5; README "Peer benchmark"): boots a 6.12 guest (QEMU TCG, 2 vCPUs: nested KVM on the development VM failed to boot it) and runs
# Tests/guest/bench/peer-blk.sh: O_DIRECT 4 KiB random reads at queue depth 1 and 16 on virtio_blk served by
# loopbackd through the module, loopbackd through VDUSE, and qemu-storage-daemon's vduse-blk export.
#   scripts/peer-bench.sh [SECONDS_PER_POINT]      (default 5; needs Tests/guest/setup.sh 6.12 and
#                                                  a release build; not part of scripts/test.sh: numbers, not checks)
# Prints one "GUEST-BENCH" line per server and depth.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-5}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# the seconds per point reach the guest as a case parameter file
mkdir -p "$out/cases"
sed "s/^SECS=.*/SECS=$secs/" "$repo/Tests/guest/bench/peer-blk.sh" > "$out/cases/peer-blk.sh"
GUEST_KEEP=1 GUEST_KERNEL=6.12 GUEST_CASES=$out/cases GUEST_TIMEOUT=$((secs * 6 + 120)) \
  bash "$repo/Tests/guest/run.sh" peer-blk | tee "$out/run.log"
log=$(sed -n 's/^  log: //p' "$out/run.log")
grep -a '^GUEST-BENCH' "$log" | tr -d '\r'
rm -rf "$(dirname "$(dirname "$log")")"
