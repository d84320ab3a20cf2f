# Many devices per open: 4 rng + 2 blk on one fd; DELDEV on SIGTERM; ADDDEV/DELDEV loop.
. /tests/lib.sh
load_lo
bg_start /tmp/tool.log lo-tool serve --rng 4 --blk 8 --blk 4 --deldev-on-term
wait_for 20 grep -q READY /tmp/tool.log || fail "ADDDEV: $(cat /tmp/tool.log)"
info "$(cat /tmp/tool.log)"
wait_for 10 test -b /dev/vdb || fail "no /dev/vda + /dev/vdb"
[ "$(cat /sys/block/vda/size)" = 16384 ] || fail "vda size $(cat /sys/block/vda/size)"
[ "$(cat /sys/block/vdb/size)" = 8192 ] || fail "vdb size $(cat /sys/block/vdb/size)"
n=$(ls /sys/bus/virtio/drivers/virtio_rng/ | grep -c virtio)
[ "$n" = 4 ] || fail "$n virtio_rng devices bound"
hwrng_check 64 /tmp/rnd || fail "hwrng"
odirect write /dev/vda 1M 2M 7 || fail "odirect write vda"
odirect check /dev/vda 1M 2M 7 || fail "odirect readback vda"
odirect write /dev/vdb 0 1M 9 || fail "odirect write vdb"
odirect check /dev/vdb 0 1M 9 || fail "odirect readback vdb"
odirect check /dev/vda 1M 2M 7 || fail "vda changed by vdb writes"
kill -TERM $BGPID; wait $BGPID
grep -q DELETED /tmp/tool.log || fail "DELDEV: $(cat /tmp/tool.log)"
[ -e /dev/vda ] && fail "vda still there after DELDEV"
lo-tool adddel 20 || fail "adddel loop"
# harness plumbing: the host reads the AHCI disk back after poweroff
odirect write /dev/sda 0 1M 11 || fail "write /dev/sda"
echo "GUEST-HOSTCHECK disk-pattern 0 1M 11"
pass
