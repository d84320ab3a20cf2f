# Against the upstream unified-hmi virtio-lo ABI (the module with upstream_abi=1: every extension ioctl fails
# with EINVAL, as upstream's does; DELDEV is counted in deldev_calls): loopbackd serves rng end to end, then on
# SIGTERM exits promptly with status 0 WITHOUT calling DELDEV (upstream removes the device under a spinlock
# there: "scheduling while atomic", then a hang), and closing the node removes the device.
. /tests/lib.sh
have_loopbackd
load_lo upstream_abi=1
P=/sys/module/virtio_loopback/parameters
[ "$(cat $P/upstream_abi)" = Y ] || fail "upstream_abi not set: $(cat $P/upstream_abi)"
[ "$(cat $P/deldev_calls)" = 0 ] || fail "deldev_calls $(cat $P/deldev_calls) at load"
lo-tool upstream > /tmp/up.log 2>&1 || fail "ABI surface: $(grep '^BAD' /tmp/up.log | head -3 | tr '\n' ';')"
write_conf
cat >> /etc/loopbackd.conf <<'CONF'

[device.rng0]
type = "rng"
backend = "inproc"
CONF
loopbackd_start
wait_for 20 is_virtio_rng || lb_fail "virtio_rng not bound (rng_current '$(rng_current)')"
# loopbackd saw upstream: the extension probe failed with EINVAL
grep -q 'no extensions.*Invalid argument' /tmp/loopbackd.log || lb_fail "upstream not detected"
hwrng_check 256 /tmp/rnd || lb_fail "hwrng read"
ls /sys/bus/virtio/devices/ | grep -q . || fail "no virtio device while serving"
s=$(date +%s)
kill -TERM $LBPID
i=0; while kill -0 $LBPID 2>/dev/null && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
kill -0 $LBPID 2>/dev/null && fail "loopbackd did not exit within 10s of SIGTERM (deldev_calls $(cat $P/deldev_calls))"
wait $LBPID; rc=$?
LBPID=
info "loopbackd exited with $rc in $(( $(date +%s) - s ))s"
[ $rc = 0 ] || lb_fail "exit status $rc after SIGTERM"
n=$(cat $P/deldev_calls)
[ "$n" = 0 ] || lb_fail "loopbackd called DELDEV $n time(s) on upstream virtio-lo"
wait_for 10 not_virtio_rng || fail "rng still bound after SIGTERM"
no_virtio() { ! ls /sys/bus/virtio/devices/ | grep -q .; }
wait_for 10 no_virtio || fail "virtio devices left after SIGTERM: $(ls /sys/bus/virtio/devices/)"
grep -q 'closed (upstream virtio-lo' /tmp/loopbackd.log || lb_fail "no close-path log line"
no_d_state || fail "task in D state"
pass
