# virtio-blk with requests in flight when the owner is SIGKILLed: the writer fails,
# no hang/oops, a new owner can ADDDEV again.  Then a read-only disk rejects writes.
. /tests/lib.sh
load_lo
bg_start /tmp/tool.log lo-tool serve --blk 16
wait_for 20 grep -q READY /tmp/tool.log || fail "ADDDEV: $(cat /tmp/tool.log)"
wait_for 10 test -b /dev/vda || fail "no /dev/vda"
odirect write /dev/vda 0 1M 3 || fail "write before stall"
kill -USR1 $BGPID            # the device stops completing requests
odirect write /dev/vda 0 4M 3 > /tmp/dd.log 2>&1 &
wr=$!
dd if=/dev/vda of=/dev/null bs=4k count=16 iflag=direct 2>/dev/null &
rd=$!
sleep 2
kill -0 $wr || fail "writer finished although the device is stalled"
kill -9 $BGPID; wait $BGPID 2>/dev/null
i=0; while { kill -0 $wr || kill -0 $rd; } 2>/dev/null && [ $i -lt 150 ]; do usleep 100000; i=$((i+1)); done
kill -0 $wr 2>/dev/null && fail "writer still blocked 15s after owner death"
kill -0 $rd 2>/dev/null && fail "reader still blocked 15s after owner death"
wait $wr; rc=$?; info "writer exit $rc: $(cat /tmp/dd.log)"
[ $rc != 0 ] || fail "writer succeeded although its requests were never served"
wait $rd; info "reader exit $?"
wait_for 10 sh -c '! test -e /dev/vda' || fail "/dev/vda still present"
no_d_state || fail "task in D state"
bg_start /tmp/tool2.log lo-tool serve --blk 16
wait_for 20 grep -q READY /tmp/tool2.log || fail "re-ADDDEV: $(cat /tmp/tool2.log)"
wait_for 10 test -b /dev/vda || fail "no /dev/vda after restart"
odirect write /dev/vda 0 1M 5 && odirect check /dev/vda 0 1M 5 || fail "I/O after restart"
kill -9 $BGPID; wait $BGPID 2>/dev/null
wait_for 10 sh -c '! test -e /dev/vda' || fail "/dev/vda still present (2)"
bg_start /tmp/tool3.log lo-tool serve --blk 4 --ro
wait_for 20 grep -q READY /tmp/tool3.log || fail "ADDDEV ro: $(cat /tmp/tool3.log)"
wait_for 10 test -b /dev/vda || fail "no ro /dev/vda"
odirect mustfail-write /dev/vda || fail "write to read-only disk succeeded"
dd if=/dev/vda of=/dev/null bs=64k 2>/dev/null || fail "read of ro disk"
kill -TERM $BGPID; wait $BGPID
pass
