# The guest reboots (reboot -f; QEMU runs without -no-reboot, the same initramfs boots twice). The first boot
# checks rng and blk, writes a pattern and a boot marker to /dev/vda, and reboots; the kernel and QEMU reset the
# devices (loopbackd sees GET_VRING_BASE, new rings). The second boot finds the marker and checks that rng and
# blk still work, including the data written before the reboot.
. /tests/lib.sh
nonce=$(vu_param nonce)
MARK=2048   # sector of the marker (1 MiB into the disk)
wait_for 20 test -b /dev/vda || fail "no /dev/vda"
wait_for 20 is_virtio_rng || fail "rng_current is '$(rng_current)', want virtio_rng*"
m=$(marker_read /dev/vda $MARK)
case "$m" in
  "boot2-$nonce") fail "third boot (the second one did not power off)" ;;
  "boot1-$nonce")
    info "second boot (marker $m)"
    marker_write /dev/vda $MARK "boot2-$nonce" || fail "boot 2: marker write"
    hwrng_check 256 /tmp/rng.bin || fail "boot 2: /dev/hwrng short or constant"
    hwrng_varies /tmp/rng.bin || fail "boot 2: /dev/hwrng repeats a 64 KiB block"
    odirect check /dev/vda 4M 1M 33 || fail "boot 2: data written before the reboot differs"
    odirect write /dev/vda 6M 1M 34 || fail "boot 2: O_DIRECT write"
    odirect check /dev/vda 6M 1M 34 || fail "boot 2: O_DIRECT read back differs"
    echo "GUEST-HOSTCHECK disk-pattern 4M 1M 33"
    echo "GUEST-HOSTCHECK disk-pattern 6M 1M 34"
    pass
    ;;
  *)
    info "first boot (marker '$m')"
    hwrng_check 256 /tmp/rng.bin || fail "boot 1: /dev/hwrng short or constant"
    odirect write /dev/vda 4M 1M 33 || fail "boot 1: O_DIRECT write"
    odirect check /dev/vda 4M 1M 33 || fail "boot 1: O_DIRECT read back differs"
    marker_write /dev/vda $MARK "boot1-$nonce" || fail "boot 1: marker write"
    [ "$(marker_read /dev/vda $MARK)" = "boot1-$nonce" ] || fail "boot 1: marker does not read back"
    echo "GUEST-REBOOTING"
    reboot -f
    sleep 30
    fail "reboot -f did not reboot"
    ;;
esac
