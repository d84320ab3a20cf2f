# One loopbackd serving rng + two blk devices.
. /tests/lib.sh
have_loopbackd
load_lo
truncate -s 8M /tmp/disk0.img
truncate -s 4M /tmp/disk1.img
write_conf
cat >> /etc/loopbackd.conf <<'CONF'

[device.rng0]
type = "rng"
backend = "inproc"

[device.disk0]
type = "blk"
backend = "inproc"
path = "/tmp/disk0.img"

[device.disk1]
type = "blk"
backend = "inproc"
path = "/tmp/disk1.img"
queues = 2
queue-size = 128
CONF
loopbackd_start
wait_for 20 test -b /dev/vdb || lb_fail "two blk devices did not appear"
wait_for 10 is_virtio_rng || lb_fail "virtio_rng not bound"
s="$(sectors vda) $(sectors vdb)"
case "$s" in "16384 8192"|"8192 16384") ;; *) lb_fail "sizes $s";; esac
hwrng_check 64 /tmp/rnd || lb_fail "hwrng"
odirect write /dev/vda 0 1M 31 && odirect check /dev/vda 0 1M 31 || lb_fail "vda I/O"
odirect write /dev/vdb 1M 1M 32 && odirect check /dev/vdb 1M 1M 32 || lb_fail "vdb I/O"
odirect check /dev/vda 0 1M 31 || lb_fail "vda changed by vdb writes"
loopbackd_stop TERM
wait_for 10 gone /dev/vda || fail "blk devices still present after SIGTERM"
pass
