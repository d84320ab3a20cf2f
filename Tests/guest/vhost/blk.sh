# vhost-user-blk-pci (QEMU front-end) backed by loopbackd's disk0: /dev/vda has the image's capacity, an O_DIRECT
# write + read back is identical; after QEMU exits the runner checks the pattern in the host image.
. /tests/lib.sh
want=$(vu_param sectors)
wait_for 20 test -b /dev/vda || fail "no /dev/vda"
[ "$(sectors vda)" = "$want" ] || fail "vda has $(sectors vda) sectors, want $want"
info "vda: $(sectors vda) sectors, ro=$(cat /sys/block/vda/ro) queues=$(ls /sys/block/vda/mq | wc -l)"
odirect write /dev/vda 2M 1M 21 || fail "O_DIRECT write"
odirect check /dev/vda 2M 1M 21 || fail "O_DIRECT read back differs"
# a second pattern at the very end of the device (last 64 KiB)
end=$(( want * 512 / 1024 - 64 ))K
odirect write /dev/vda "$end" 64K 22 || fail "O_DIRECT write at the end"
odirect check /dev/vda "$end" 64K 22 || fail "O_DIRECT read back at the end"
dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null || fail "full read of /dev/vda"
echo "GUEST-HOSTCHECK disk-pattern 2M 1M 21"
echo "GUEST-HOSTCHECK disk-pattern $end 64K 22"
pass
