# loopbackd serves virtio-blk from a file: capacity, O_DIRECT write+read back,
# and the backing file holds the bytes (checked in the guest and on the host).
. /tests/lib.sh
have_loopbackd
load_lo
truncate -s 16M /tmp/disk0.img
write_conf
cat >> /etc/loopbackd.conf <<'CONF'

[device.disk0]
type = "blk"
backend = "inproc"
path = "/tmp/disk0.img"
readonly = false
queues = 1
queue-size = 64
CONF
loopbackd_start
wait_for 20 test -b /dev/vda || lb_fail "no /dev/vda"
[ "$(sectors vda)" = 32768 ] || lb_fail "vda has $(sectors vda) sectors, want 32768"
odirect write /dev/vda 2M 1M 21 || lb_fail "O_DIRECT write"
odirect check /dev/vda 2M 1M 21 || lb_fail "O_DIRECT read back"
dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null || lb_fail "full read"
grep -q "not restricted" /tmp/loopbackd.log && lb_fail "io_uring ring not restricted"
loopbackd_stop TERM
wait_for 10 gone /dev/vda || fail "/dev/vda still present after SIGTERM"
odirect checkb /tmp/disk0.img 2M 1M 21 || fail "backing file does not hold the data"
to_host_disk /tmp/disk0.img
echo "GUEST-HOSTCHECK disk-pattern 2M 1M 21"
pass
