# Hostile ioctl/mmap arguments fail with errors, no oops; the module still works afterwards.
. /tests/lib.sh
load_lo probe_timeout_ms=500
lo-tool bad > /tmp/bad.log 2>&1; rc=$?
cat /tmp/bad.log
[ $rc = 0 ] || fail "$(grep '^BAD' /tmp/bad.log | head -3 | tr '\n' ';')"
bg_start /tmp/tool.log lo-tool serve --rng 1
wait_for 10 grep -q READY /tmp/tool.log || fail "ADDDEV after bad inputs: $(cat /tmp/tool.log)"
hwrng_check 16 /tmp/rnd || fail "hwrng after bad inputs"
kill -TERM $BGPID; wait $BGPID
pass
