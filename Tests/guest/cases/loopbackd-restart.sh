# SIGTERM then restart: devices come back and work, data persists, no module reload.
. /tests/lib.sh
have_loopbackd
load_lo
truncate -s 8M /tmp/disk0.img
write_conf
cat >> /etc/loopbackd.conf <<'CONF'

[device.rng0]
type = "rng"
backend = "inproc"

[device.disk0]
type = "blk"
backend = "inproc"
path = "/tmp/disk0.img"
CONF
loopbackd_start
wait_for 20 test -b /dev/vda || lb_fail "no /dev/vda"
odirect write /dev/vda 0 1M 41 || lb_fail "write"
for round in 1 2 3; do
  loopbackd_stop TERM
  wait_for 10 gone /dev/vda || fail "/dev/vda still present after SIGTERM ($round)"
  loopbackd_start
  wait_for 20 test -b /dev/vda || lb_fail "no /dev/vda after restart $round"
  wait_for 10 is_virtio_rng || lb_fail "rng not bound after restart $round"
  odirect check /dev/vda 0 1M 41 || lb_fail "data lost across restart $round"
  hwrng_check 64 /tmp/rnd || lb_fail "hwrng after restart $round"
done
loopbackd_stop TERM
lsmod | grep -q virtio_loopback || fail "module gone"
pass
