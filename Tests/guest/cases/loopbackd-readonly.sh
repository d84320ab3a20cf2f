# A read-only blk device rejects writes with an error; reads work.
. /tests/lib.sh
have_loopbackd
load_lo
truncate -s 4M /tmp/ro.img
write_conf
cat >> /etc/loopbackd.conf <<'CONF'

[device.ro0]
type = "blk"
backend = "inproc"
path = "/tmp/ro.img"
readonly = true
CONF
loopbackd_start
wait_for 20 test -b /dev/vda || lb_fail "no /dev/vda"
odirect mustfail-write /dev/vda || lb_fail "write to read-only device succeeded"
dd if=/dev/vda of=/dev/null bs=64k 2>/dev/null || lb_fail "read of read-only device"
loopbackd_stop TERM
pass
