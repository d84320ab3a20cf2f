# The VM is paused and resumed (QMP stop/cont, driven by the runner) while the guest does I/O on both devices:
# QEMU stops the vhost devices (GET_VRING_BASE) and restarts them on the SAME rings from the returned base, so
# loopbackd must report each ring's true position and carry on without losing or repeating requests.
. /tests/lib.sh
wait_for 20 test -b /dev/vda || fail "no /dev/vda"
wait_for 20 is_virtio_rng || fail "rng_current is '$(rng_current)', want virtio_rng*"
# rng reader in the background, blk write/check loop in the foreground
( j=0; while [ ! -e /tmp/stop ]; do
    dd if=/dev/hwrng of=/tmp/r bs=1024 count=16 2>/dev/null
    [ "$(wc -c < /tmp/r)" -eq 16384 ] || { echo bad > /tmp/rngfail; break; }
    j=$((j + 1)); echo $j > /tmp/rngcount
  done ) &
rpid=$!
echo GUEST-PAUSE-READY
n=$(vu_param pause_iterations); i=0
while [ $i -lt "$n" ]; do
  odirect write /dev/vda 8M 256K $((100 + i)) || fail "iteration $i: O_DIRECT write"
  odirect check /dev/vda 8M 256K $((100 + i)) || fail "iteration $i: O_DIRECT read back differs"
  i=$((i + 1))
done
touch /tmp/stop
wait $rpid
[ -e /tmp/rngfail ] && fail "short read from /dev/hwrng"
info "$n blk iterations, $(cat /tmp/rngcount) rng reads of 16 KiB"
echo "GUEST-HOSTCHECK disk-pattern 8M 256K $((100 + n - 1))"
pass
