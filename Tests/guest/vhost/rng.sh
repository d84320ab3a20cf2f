# vhost-user-rng-pci (QEMU front-end) backed by loopbackd's rng0: the kernel's virtio_rng binds and becomes the
# current hwrng, and 1 MiB read from /dev/hwrng is not constant.
. /tests/lib.sh
wait_for 20 is_virtio_rng || fail "rng_current is '$(rng_current)', want virtio_rng*"
info "rng_current=$(rng_current) available=$(cat /sys/class/misc/hw_random/rng_available)"
s0=$(date +%s)
hwrng_check 1024 /tmp/rng.bin || fail "1 MiB from /dev/hwrng: short or constant ($(wc -c < /tmp/rng.bin) bytes)"
hwrng_varies /tmp/rng.bin || fail "1 MiB from /dev/hwrng repeats a 64 KiB block"
info "read 1 MiB from /dev/hwrng in $(( $(date +%s) - s0 ))s"
pass
