# loopbackd serves virtio-rng: the driver binds, /dev/hwrng gives >= 1 MiB of non-constant data.
. /tests/lib.sh
have_loopbackd
load_lo
write_conf
cat >> /etc/loopbackd.conf <<'CONF'

[device.rng0]
type = "rng"
backend = "inproc"
CONF
loopbackd_start
wait_for 20 is_virtio_rng || lb_fail "virtio_rng not bound (rng_current '$(rng_current)')"
s=$(date +%s)
hwrng_check 1024 /tmp/rnd || lb_fail "hwrng read"
info "1 MiB from /dev/hwrng in $(( $(date +%s) - s ))s"
loopbackd_stop TERM
wait_for 10 not_virtio_rng || fail "rng still bound after SIGTERM"
pass
