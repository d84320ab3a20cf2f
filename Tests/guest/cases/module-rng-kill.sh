# kill -9 the device while a reader blocks on /dev/hwrng, restart it, ADDDEV again (no reload).
. /tests/lib.sh
load_lo
bg_start /tmp/tool.log lo-tool serve --rng 1
wait_for 10 grep -q READY /tmp/tool.log || fail "ADDDEV: $(cat /tmp/tool.log)"
wait_for 10 is_virtio_rng || fail "not bound"
hwrng_check 16 /tmp/rnd || fail "hwrng before stall"
kill -USR1 $BGPID            # the device stops completing requests
dd if=/dev/hwrng of=/dev/null bs=1024 count=4096 2>/dev/null &
rd=$!
sleep 1
kill -0 $rd || fail "reader not blocked on the stalled device"
kill -9 $BGPID; wait $BGPID 2>/dev/null
i=0; while kill -0 $rd 2>/dev/null && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
kill -0 $rd 2>/dev/null && { kill -9 $rd; fail "hwrng reader still blocked 10s after owner death"; }
wait $rd; info "reader exit $?"
case "$(rng_current)" in virtio_rng*) fail "rng still bound after owner death";; esac
for round in 1 2 3; do
  bg_start /tmp/tool$round.log lo-tool serve --rng 1
  wait_for 10 grep -q READY /tmp/tool$round.log || fail "re-ADDDEV round $round: $(cat /tmp/tool$round.log)"
  wait_for 10 is_virtio_rng || fail "not bound after restart $round"
  hwrng_check 64 /tmp/rnd || fail "hwrng after restart $round"
  kill -9 $BGPID; wait $BGPID 2>/dev/null
done
lsmod | grep -q virtio_loopback || fail "module gone"
no_d_state || fail "task in D state"
pass
