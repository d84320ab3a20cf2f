# Peer benchmark (issue 11 item 5): the same O_DIRECT 4 KiB random-read workload on the kernel's virtio_blk
# served by (a) loopbackd through the project's module, (b) loopbackd through VDUSE, (c) qemu-storage-daemon's
# vduse-blk export; queue depth 1 and 16 (threads, one read in flight each); IOPS, p50/p99, and the device
# process's CPU time (utime + stime of /proc/PID/stat, all its threads) per I/O. One 64 MiB image in guest RAM
# (filled first), one request queue of 256 for every server. Run by scripts/peer-bench.sh (KVM, 2 vCPUs).
# guest-kernels: 6.12 -- VDUSE needs 6.12 (Debian's 6.1 has no CONFIG_VDPA_USER)
# guest-smp: 2
# guest-host-binaries: /usr/bin/qemu-storage-daemon
. /tests/lib.sh
have_loopbackd
SECS=${BENCH_SECONDS:-$(cat /tests/bench-seconds 2>/dev/null || echo 5)}
for m in vhost_iotlb vdpa vduse virtio_vdpa; do insmod /lib/modules/$m.ko || fail "insmod $m"; done
load_lo
dd if=/dev/urandom of=/tmp/disk.img bs=1M count=64 2>/dev/null || fail "image"
hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
cputicks() { awk '{print $14 + $15}' /proc/$1/stat; }
measure() { # LABEL PID
  for qd in 1 16; do
    t0=$(cputicks $2)
    r=$(odirect randlat /dev/vda 64M $SECS $qd) || fail "$1 qd$qd: $r"
    t1=$(cputicks $2)
    ios=$(echo "$r" | sed 's/.* ios=\([0-9]*\).*/\1/')
    cpu=$(awk -v t=$((t1 - t0)) -v hz=$hz -v n=$ios 'BEGIN { printf "%.2f", t * 1e6 / hz / n }')
    echo "GUEST-BENCH $1 $r cpu_us_per_io=$cpu"
  done
}
conf() { # TRANSPORT
  cat > /etc/loopbackd.conf <<CONF
[daemon]
transport = "$1"
device-node = "/dev/virtio-lo"

[device.disk0]
type = "blk"
path = "/tmp/disk.img"
queues = 1
queue-size = 256
CONF
}
for tr in virtio-lo vduse; do
  conf $tr
  loopbackd_start
  wait_for 20 test -b /dev/vda || lb_fail "$tr: no /dev/vda"
  measure "loopbackd-$tr" $LBPID
  loopbackd_stop TERM
  wait_for 10 gone /dev/vda || fail "$tr: /dev/vda still present"
done
qemu-storage-daemon --blockdev driver=file,node-name=file0,filename=/tmp/disk.img,aio=io_uring \
  --export type=vduse-blk,id=e0,node-name=file0,name=qsd0,writable=on,num-queues=1,queue-size=256 \
  > /tmp/qsd.log 2>&1 & QSD=$!
wait_for 10 test -c /dev/vduse/qsd0 || fail "qemu-storage-daemon: no /dev/vduse/qsd0: $(cat /tmp/qsd.log)"
vdpactl add qsd0 || fail "vdpactl add qsd0"
wait_for 20 test -b /dev/vda || fail "qsd: no /dev/vda"
measure "qemu-storage-daemon-vduse" $QSD
vdpactl del qsd0 || fail "vdpactl del qsd0"
kill $QSD; wait $QSD
pass
