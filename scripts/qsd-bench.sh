#!/usr/bin/env bash
# vhost-user-blk back-ends compared on one QEMU-guest workload (issue "near the floor", item 2; README
# "vhost-user-blk back-ends: loopbackd and qemu-storage-daemon"): QEMU 7.2 (TCG) runs Debian's kernel with its own
# virtio_blk on vhost-user-blk-pci; the back-end on the host is (a) loopbackd `serve` (io_uring), (b)
# qemu-storage-daemon with its default thread pool, (c) qemu-storage-daemon with aio=io_uring; all on the same 64 MiB
# image in the page cache. The guest runs O_DIRECT 4 KiB random reads (odirect randlat) at queue depth 1 and 16;
# the host samples the back-end's CPU time (utime+stime, /proc/PID/stat) when the guest starts and ends each point.
# Back-ends are interleaved: ROUNDS rounds of (a), (b), (c). Under TCG the guest is the bottleneck, so CPU per I/O
# is the fair figure and IOPS mostly measure the guest.
#   scripts/qsd-bench.sh [SECONDS_PER_POINT] [ROUNDS]    (default 8 s, 2 rounds; needs Tests/guest/setup.sh and a
#                                                        release build; numbers, not checks: not in scripts/test.sh)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-8}; rounds=${2:-2}
gk=${GUEST_KERNEL:-6.1}
cache=${GUEST_CACHE:-$repo/.build-guest}
loopbackd=${LOOPBACKD:-$repo/.build/release/loopbackd}
. "$repo/scripts/image-lib.sh"
IMG_CACHE=$cache IMG_LOG_PREFIX=qsd-bench.sh
kver=$(cat "$cache/kver-$gk"); vmlinux=$cache/vmlinux-$kver
command -v qemu-storage-daemon >/dev/null || { echo "qsd-bench.sh: qemu-storage-daemon missing (qemu-system-x86)" >&2; exit 2; }
work=$(mktemp -d); bpid=; echo "work $work"
trap '[ -n "$bpid" ] && kill -KILL $bpid 2>/dev/null; [ "${QSD_KEEP:-0}" = 1 ] || rm -rf "$work"' EXIT

root=$work/root
( img_tree_init "$root" && img_add_modules "$root" "$kver" virtio_ring virtio virtio_pci virtio_blk ) || exit 2
# built here from the tree (the cache may hold an older odirect without randlat)
gcc -static -O2 -Wall -pthread -o "$root/bin/odirect" "$repo/Tests/guest/tools/odirect.c"
img_write_init "$root"; mkdir -p "$root/etc/image"
cat > "$root/etc/image/main" <<MAIN
export -n SWIFT_ROOT
i=0; until [ -b /dev/vda ]; do i=\$((i+1)); [ \$i -gt 200 ] && echo "BENCH-ERROR no /dev/vda" && exit 1; usleep 100000; done
odirect randlat /dev/vda 64M 1 1 > /dev/null   # warm-up: the first reads of a fresh guest
for qd in 1 16; do
  echo "BENCH-BEGIN qd=\$qd"
  odirect randlat /dev/vda 64M $secs \$qd | sed 's/^/BENCH-RESULT /'
  echo "BENCH-END qd=\$qd"
done
MAIN
img_pack "$root" "$work/initramfs.gz" 1
img=$work/disk.img
dd if=/dev/urandom of="$img" bs=1M count=64 status=none
cat "$img" > /dev/null   # page cache
sock=$work/blk.sock

start_backend() {   # start_backend NAME: sets bpid, waits for the socket
  rm -f "$sock"
  case "$1" in
    loopbackd)
      cat > "$work/lb.conf" <<CONF
[daemon]
transport = "none"
control = "none"
log-level = "warning"
[device.disk0]
type = "blk"
path = "$img"
queues = 1
queue-size = 256
serve = "$sock"
CONF
      "$loopbackd" -c "$work/lb.conf" > "$work/backend.log" 2>&1 & bpid=$! ;;
    qsd-threads|qsd-io_uring)
      aio=threads; [ "$1" = qsd-io_uring ] && aio=io_uring
      qemu-storage-daemon --blockdev driver=file,node-name=file0,filename="$img",cache.direct=off,aio=$aio \
        --blockdev driver=raw,node-name=disk0,file=file0 \
        --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path="$sock",writable=on,num-queues=1 \
        > "$work/backend.log" 2>&1 & bpid=$! ;;
  esac
  for _ in $(seq 100); do [ -S "$sock" ] && return 0; sleep 0.05; done
  echo "qsd-bench.sh: $1 did not listen:"; cat "$work/backend.log"; exit 1
}

run_point() {   # run_point NAME ROUND: boots the guest against the running back-end; prints one line per depth
  local log=$work/console.log
  : > "$log"
  timeout -k 5 $((secs * 2 + 120)) qemu-system-x86_64 -accel tcg -m 512 -smp 1 -nodefaults -nographic -serial stdio -no-reboot \
    -kernel "$vmlinux" -initrd "$work/initramfs.gz" -append 'console=ttyS0 quiet panic=-1' \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -chardev socket,id=c1,path="$sock" -device vhost-user-blk-pci,chardev=c1,num-queues=1 \
    < /dev/null > "$log" 2>&1 &
  local qpid=$!
  # CPU time of the back-end at each BEGIN/END marker (clock ticks; the guest's point lasts seconds)
  python3 - "$log" "$bpid" "$qpid" "$1" "$2" <<'PY'
import os, re, sys, time
log, bpid, qpid, name, rnd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
hz = os.sysconf('SC_CLK_TCK')
def cpu():
    f = open(f'/proc/{bpid}/stat').read().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / hz
marks, seen = {}, 0
def alive(p):
    try: os.kill(p, 0); return True
    except OSError: return False
while alive(qpid):
    text = open(log, 'rb').read().decode('latin-1')
    for m in re.finditer(r'BENCH-(BEGIN|END) qd=(\d+)', text):
        k = (m.group(1), m.group(2))
        if k not in marks: marks[k] = cpu()
    if ('END', '16') in marks or 'BENCH-ERROR' in text: break
    time.sleep(0.01)
text = open(log, 'rb').read().decode('latin-1').replace('\r', '')
for m in re.finditer(r'BENCH-RESULT randlat qd=(\d+) ios=(\d+) iops=(\d+) p50_us=(\d+) p99_us=(\d+) errors=(\d+)', text):
    qd, ios, iops, p50, p99, err = m.groups()
    c = marks.get(('END', qd), 0) - marks.get(('BEGIN', qd), 0)
    print(f"{name:14s} round {rnd} qd {qd:>2s}: {int(iops):6d} IOPS  p50 {p50:>5s} us  p99 {p99:>6s} us  "
          f"back-end CPU {c:6.2f} s = {c * 1e6 / max(int(ios), 1):6.1f} us per I/O  errors {err}")
if ('END', '16') not in marks: print(f"{name} round {rnd}: no result; console tail: {text[-400:]!r}")
PY
  wait $qpid || true
}

echo "kernel $kver, QEMU $(qemu-system-x86_64 --version | head -1 | awk '{print $4}'), $secs s per point, $rounds rounds, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$rounds"); do
  for b in loopbackd qsd-threads qsd-io_uring; do
    start_backend $b
    run_point $b $r
    kill -TERM $bpid; wait $bpid 2>/dev/null || true; bpid=
  done
done
