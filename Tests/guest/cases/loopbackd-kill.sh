# SIGKILL loopbackd during a dd on /dev/vda: dd fails or completes, no oops/hang,
# a restarted loopbackd re-adds the device and it works.
. /tests/lib.sh
have_loopbackd
load_lo
truncate -s 32M /tmp/disk0.img
write_conf
cat >> /etc/loopbackd.conf <<'CONF'

[device.disk0]
type = "blk"
backend = "inproc"
path = "/tmp/disk0.img"
CONF
loopbackd_start
wait_for 20 test -b /dev/vda || lb_fail "no /dev/vda"
dd if=/dev/zero of=/dev/vda bs=64k count=512 oflag=direct > /tmp/dd.log 2>&1 &
dd=$!
usleep 500000
kill -9 $LBPID; wait $LBPID 2>/dev/null
i=0; while kill -0 $dd 2>/dev/null && [ $i -lt 150 ]; do usleep 100000; i=$((i+1)); done
kill -0 $dd 2>/dev/null && fail "dd still blocked 15s after SIGKILL"
wait $dd; info "dd exit $?: $(tail -n 2 /tmp/dd.log | tr '\n' ' ')"
wait_for 10 gone /dev/vda || fail "/dev/vda still present after SIGKILL"
no_d_state || fail "task in D state"
loopbackd_start
wait_for 20 test -b /dev/vda || lb_fail "no /dev/vda after restart"
odirect write /dev/vda 4M 1M 51 && odirect check /dev/vda 4M 1M 51 || lb_fail "I/O after restart"
loopbackd_stop TERM
pass
