# Same as rng-basic, but interrupts go through the irqfd extension.
. /tests/lib.sh
load_lo
bg_start /tmp/tool.log lo-tool serve --rng 1 --irqfd
wait_for 10 grep -q READY /tmp/tool.log || fail "ADDDEV: $(cat /tmp/tool.log)"
wait_for 10 is_virtio_rng || fail "rng_current is '$(rng_current)'"
hwrng_check 512 /tmp/rnd || fail "hwrng read via irqfd"
kill -TERM $BGPID; wait $BGPID
pass
