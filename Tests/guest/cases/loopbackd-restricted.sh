# loopbackd with restricted memory (restricted-memory = true in [daemon]): rng and blk bounce through the module's
# per-device pools; loopbackd maps those pools only (it RESTRICTs the node: no System RAM) and serves /dev/hwrng
# (1 MiB, not constant) and /dev/vda (pattern written and read back with O_DIRECT, the backing file holds it) as
# with full mapping. The drivers negotiated ACCESS_PLATFORM. Then a loopbackd with one unrestricted device next to
# a restricted one still maps RAM (mixed configuration).
. /tests/lib.sh
have_loopbackd
load_lo
truncate -s 16M /tmp/disk0.img
write_conf
cat >> /etc/loopbackd.conf <<'CONF'
restricted-memory = true

[device.rng0]
type = "rng"

[device.disk0]
type = "blk"
path = "/tmp/disk0.img"
queue-size = 64
pool-kib = 2048
CONF
LOOPBACKD_ARGS="--log-level debug" loopbackd_start
wait_for 20 is_virtio_rng || lb_fail "virtio_rng not bound (rng_current '$(rng_current)')"
wait_for 20 test -b /dev/vda || lb_fail "no /dev/vda"
grep -q 'restricted: only device pools' /tmp/loopbackd.log || lb_fail "the node was not restricted"
[ "$(grep -c 'restricted memory: pool of' /tmp/loopbackd.log)" = 2 ] || lb_fail "not two pools"
grep -q 'mapped .* RAM range' /tmp/loopbackd.log && lb_fail "System RAM mapped although every device is restricted"
# bit 33 (VIRTIO_F_ACCESS_PLATFORM) in the drivers' features (sysfs: one character per bit from bit 0)
for d in /sys/bus/virtio/devices/*; do
  f=$(cat $d/features); [ "$(echo "$f" | cut -c34)" = 1 ] || fail "$(basename $d): ACCESS_PLATFORM not negotiated ($f)"
done
s=$(date +%s)
hwrng_check 1024 /tmp/rnd || lb_fail "hwrng read"
info "1 MiB from /dev/hwrng in $(( $(date +%s) - s ))s (restricted)"
[ "$(sectors vda)" = 32768 ] || lb_fail "vda has $(sectors vda) sectors, want 32768"
odirect write /dev/vda 2M 1M 23 || lb_fail "O_DIRECT write"
odirect check /dev/vda 2M 1M 23 || lb_fail "O_DIRECT read back"
dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null || lb_fail "full read"
# buffered I/O in large requests (up to the block layer's limit): bounced in pieces of at most 256 KiB each
dd if=/dev/vda of=/tmp/big bs=4M count=4 2>/dev/null || lb_fail "4 MiB reads"
# requests as large as Linux 7.x builds them (max_sectors_kb 4096, read-ahead 8 MiB): loopbackd lowered seg_max so
# that one request fits in half the pool (2 MiB pool: 4 segments of at most 256 KiB); before, a 4 MiB read-ahead
# request could never be mapped and the reader hung (found on Debian's 7.3)
[ "$(cat /sys/block/vda/queue/max_segments)" = 4 ] || lb_fail "max_segments $(cat /sys/block/vda/queue/max_segments), want 4"
echo 4096 > /sys/block/vda/queue/max_sectors_kb && echo 8192 > /sys/block/vda/queue/read_ahead_kb || fail "queue limits"
echo 3 > /proc/sys/vm/drop_caches
timeout 20 dd if=/dev/vda of=/tmp/big bs=4M count=4 2>/dev/null || lb_fail "reads with 4 MiB requests"
timeout 20 odirect write /dev/vda 4M 4M 29 && timeout 20 odirect check /dev/vda 4M 4M 29 || lb_fail "4 MiB O_DIRECT"
loopbackd_stop TERM
wait_for 10 gone /dev/vda || fail "/dev/vda still present after SIGTERM"
odirect checkb /tmp/disk0.img 2M 1M 23 || fail "backing file does not hold the data"
odirect checkb /tmp/disk0.img 4M 4M 29 || fail "backing file does not hold the 4 MiB pattern"
# mixed: rng restricted, disk0 with full mapping (the node is not restricted then)
write_conf
cat >> /etc/loopbackd.conf <<'CONF'

[device.rng0]
type = "rng"
restricted-memory = true

[device.disk0]
type = "blk"
path = "/tmp/disk0.img"
queue-size = 64
CONF
loopbackd_start
wait_for 20 is_virtio_rng || lb_fail "mixed: virtio_rng not bound"
wait_for 20 test -b /dev/vda || lb_fail "mixed: no /dev/vda"
grep -q 'restricted: only device pools' /tmp/loopbackd.log && lb_fail "mixed: node restricted"
hwrng_check 64 /tmp/rnd || lb_fail "mixed: hwrng read"
odirect check /dev/vda 2M 1M 23 || lb_fail "mixed: O_DIRECT read back"
loopbackd_stop TERM
# ab --restricted: the same body with full mapping and with restricted memory, through the kernel's drivers
# (the README's cost table comes from this with more requests: AB_REQUESTS/AB_ROUNDS)
for dev in rng0 disk0; do
  ab_run $dev --driver virtio-lo --restricted --requests ${AB_REQUESTS:-400} --rounds ${AB_ROUNDS:-2}
  info "ab --restricted $dev: $AB_JSON"
  [ "$AB_RC" = 0 ] || fail "ab --restricted $dev: exit $AB_RC -- $(tail -n 3 /tmp/ab.err | tr '\n' '|')"
  case "$AB_JSON" in *'"errors": 0}'*) ;; *) fail "ab --restricted $dev: errors: $AB_JSON";; esac
  for p in full restricted; do
    r=$(echo "$AB_JSON" | sed -n "s/.*\"$p\": {[^}]*\"rps\": \([0-9]*\)}.*/\1/p")
    [ -n "$r" ] && [ "$r" -gt 0 ] || fail "ab --restricted $dev: path $p rps '$r'"
  done
done
[ -z "$(ls /sys/devices/virtio-lo 2>/dev/null | grep -E '^(virtio|pool)')" ] || fail "virtio-lo devices left: $(ls /sys/devices/virtio-lo)"
pass
