# lo-tool serves one virtio-rng: driver binds, /dev/hwrng gives 1 MiB of non-constant data.
. /tests/lib.sh
load_lo
lo-tool ext || fail "GETEXT"
bg_start /tmp/tool.log lo-tool serve --rng 1
wait_for 10 grep -q READY /tmp/tool.log || fail "ADDDEV: $(cat /tmp/tool.log)"
wait_for 10 is_virtio_rng || fail "rng_current is '$(rng_current)'"
info "rng_current=$(rng_current)"
s=$(date +%s)
hwrng_check 1024 /tmp/rnd || fail "hwrng read"
info "1 MiB from /dev/hwrng in $(( $(date +%s) - s ))s"
kill -TERM $BGPID; wait $BGPID
wait_for 10 not_virtio_rng
case "$(rng_current)" in virtio_rng*) fail "rng still bound after close";; esac
pass
