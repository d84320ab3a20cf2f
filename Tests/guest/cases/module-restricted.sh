# Restricted memory in the module (lo-tool restricted): a restricted rng device's rings and posted buffers are pool
# addresses, zeroed; its pool maps and nothing past it; after VIRTIO_LO_RESTRICT mmap of RAM, GET_RAM and an
# unrestricted ADDDEV fail with EPERM. Then an unrestricted lo-tool device still serves /dev/hwrng; with the module
# parameter restricted_only=1 it is refused (EPERM).
. /tests/lib.sh
load_lo probe_timeout_ms=2000
lo-tool restricted > /tmp/r.log 2>&1; rc=$?
while read -r l; do info "$l"; done < /tmp/r.log
[ $rc = 0 ] || fail "$(grep -E '^BAD|lo-tool:' /tmp/r.log | head -3 | tr '\n' ';')"
grep -q '^restricted ok' /tmp/r.log || fail "no verdict from lo-tool restricted"
bg_start /tmp/tool.log lo-tool serve --rng 1
wait_for 10 grep -q READY /tmp/tool.log || fail "ADDDEV after the restricted checks: $(cat /tmp/tool.log)"
hwrng_check 16 /tmp/rnd || fail "hwrng after the restricted checks"
kill -TERM $BGPID; wait $BGPID
# restricted_only=1: every open file starts restricted, so lo-tool's unrestricted device cannot map RAM
rmmod virtio_loopback || fail "rmmod"
load_lo restricted_only=1
lo-tool serve --rng 1 > /tmp/ro.log 2>&1 && fail "restricted_only: an unrestricted device was served"
grep -q "Operation not permitted" /tmp/ro.log || fail "restricted_only: $(head -c 200 /tmp/ro.log)"
info "restricted_only: $(head -n 1 /tmp/ro.log)"
pass
