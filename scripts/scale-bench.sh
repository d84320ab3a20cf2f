#!/usr/bin/env bash
# 16 devices on one core (issue "near the floor", item 4; README "16 devices on one loop"): writes a config of 16
# in-process devices and runs `loopbackd bench --concurrent` on it: all 16 on one event loop pinned to one CPU, one
# simulated driver thread per device; every host endpoint simulated or in memory. MIX:
#   all (default): every device type: 3 rng, 4 blk on 16 MiB files in the page cache, 2 console echo, 1 each of i2c,
#                  can, gpio, sound, input, vsock (host echo) and gpu (1280x800 frames, output none);
#   small:         the first mix measured: 4 rng, 4 blk, 2 console, 2 i2c, 2 can, 1 gpio, 1 sound.
#   scripts/scale-bench.sh [SECONDS] [BINARY] [MIX]     (default 5 s, .build/release/loopbackd, all)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}; bin=${2:-.build/release/loopbackd}; mix=${3:-all}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
case $mix in all) nrng=3 ni2c=1 ncan=1 ;; small) nrng=4 ni2c=2 ncan=2 ;; *) echo "mix: all or small" >&2; exit 2 ;; esac
{
  printf '[daemon]\ntransport = "sim"\ncontrol = "none"\nlog-level = "warning"\n'
  for i in $(seq 0 $((nrng - 1))); do printf '[device.rng%d]\ntype = "rng"\n' $i; done
  for i in 0 1 2 3; do printf '[device.disk%d]\ntype = "blk"\npath = "%s/disk%d.img"\ncreate-mib = 16\n' $i "$tmp" $i; done
  for i in 0 1; do printf '[device.con%d]\ntype = "console"\nconsole = "echo"\n' $i; done
  for i in $(seq 0 $((ni2c - 1))); do printf '[device.i2c%d]\ntype = "i2c"\nsimulated = true\n' $i; done
  for i in $(seq 0 $((ncan - 1))); do printf '[device.can%d]\ntype = "can"\nsimulated = true\n' $i; done
  printf '[device.gpio0]\ntype = "gpio"\nsimulated = true\n'
  printf '[device.snd0]\ntype = "sound"\nplayback = "null"\ncapture = "null"\n'
  if [ "$mix" = all ]; then
    printf '[device.kbd0]\ntype = "input"\nsimulated = true\n'
    printf '[device.vsock0]\ntype = "vsock"\nguest-cid = 3\nuds-path = "%s/v.sock"\n' "$tmp"
    printf '[device.gpu0]\ntype = "gpu"\noutput = "none"\n'
  fi
} > "$tmp/scale.conf"
"$bin" --check -c "$tmp/scale.conf" > /dev/null
echo "load average $(cut -d' ' -f1-3 /proc/loadavg)"
"$bin" bench --concurrent -c "$tmp/scale.conf" --seconds "$secs"
