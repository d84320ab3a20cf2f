# Synchronous config writes (extension SYNC_CONFIG) with the module alone, lo-tool as the device and the kernel's
# virtio_input as the driver (its probe writes select/subsel and reads the answer at once):
#  answer   a second thread answers every write (CFG_GET/CFG_ACK) while ADDDEV blocks: the input device gets
#           lo-tool's name; every write was acked;
#  silent   nobody answers, sync_config_timeout_ms = 10 s: ADDDEV fails at the probe timeout (3 s), well before
#           one write's timeout: the teardown ends the driver's wait;
#  kill     a process SIGKILLed in ADDDEV while the driver waits for an answer is gone at once;
#  timeout  nobody answers, sync_config_timeout_ms = 20: the driver goes on with the module's copy (ADDDEV
#           succeeds) and the timeout is logged once for the device.
. /tests/lib.sh
load_lo
grep -q '^virtio_input ' /proc/modules || fail "virtio_input not loaded (harness: img_add_modules ... virtio_input)"
P=/sys/module/virtio_loopback/parameters
[ "$(cat $P/sync_config_timeout_ms)" = 1000 ] || fail "default sync_config_timeout_ms $(cat $P/sync_config_timeout_ms)"
run() { # mode: lo-tool syncconf MODE, output shown, failure with its BAD lines
  lo-tool syncconf "$1" > /tmp/sc-$1.log 2>&1; rc=$?
  sed "s/^/  $1: /" /tmp/sc-$1.log
  [ $rc = 0 ] || fail "syncconf $1: $(grep -E '^BAD|rror' /tmp/sc-$1.log | head -3 | tr '\n' ';')"
}
run answer
echo 10000 > $P/sync_config_timeout_ms
run silent
t=$(sed -n 's/.* after \([0-9]*\)\.[0-9]*s$/\1/p' /tmp/sc-silent.log)
[ -n "$t" ] && [ "$t" -lt 6 ] || fail "ADDDEV without answers took ${t:-?}s (the teardown must end the driver's wait)"
run kill
before=$(dmesg | grep -c 'not acked by user space')
echo 20 > $P/sync_config_timeout_ms
run timeout
n=$(( $(dmesg | grep -c 'not acked by user space') - before ))
[ "$n" = 1 ] || fail "timeout logged $n times for one device (want once): $(dmesg | grep 'not acked' | tail -3 | tr '\n' ';')"
echo 1000 > $P/sync_config_timeout_ms
# the module still serves an ordinary device
bg_start /tmp/tool.log lo-tool serve --rng 1
wait_for 10 grep -q READY /tmp/tool.log || fail "ADDDEV after the sync cases: $(cat /tmp/tool.log)"
hwrng_check 16 /tmp/rnd || fail "hwrng after the sync cases"
kill -TERM $BGPID; wait $BGPID
no_d_state || fail "task in D state"
pass
