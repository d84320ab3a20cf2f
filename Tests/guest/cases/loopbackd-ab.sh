# loopbackd ab with the kernel module as the driver side: rng and blk, each in-process and through a
# vhost-user socket (child ab-serve), driven from user space through the kernel's own drivers.
. /tests/lib.sh
have_loopbackd
load_lo
truncate -s 16M /tmp/disk0.img
write_conf
cat >> /etc/loopbackd.conf <<'CONF'

[device.rng0]
type = "rng"
backend = "inproc"

[device.disk0]
type = "blk"
backend = "inproc"
path = "/tmp/disk0.img"
readonly = true
queues = 1
queue-size = 64
CONF
for dev in rng0 disk0; do
  ab_run $dev --requests 2000 --rounds 4
  info "ab $dev: $AB_JSON"
  ab_check "$AB_JSON" || fail "ab $dev: $AB_WHY -- $(tail -n 5 /tmp/ab.err | tr '\n' '|')"
  grep -iE 'warn|error' /tmp/ab.err | head -n 5 | while read -r l; do info "ab $dev stderr: $l"; done
done
# interrupts straight from the backend to the module (irqfd), too
ab_run disk0 --requests 400 --rounds 2 --direct
info "ab disk0 --direct: $AB_JSON"
ab_check "$AB_JSON" || fail "ab disk0 --direct: $AB_WHY -- $(tail -n 5 /tmp/ab.err | tr '\n' '|')"
# the table form, once, so the figures are readable in the log
loopbackd ab -c /etc/loopbackd.conf --device rng0 --requests 400 --rounds 2 > /tmp/ab.txt 2>/tmp/ab.err || fail "ab rng0 (table)"
while read -r l; do info "ab table: $l"; done < /tmp/ab.txt
# the kernel devices are gone again
[ -z "$(ls /sys/devices/virtio-lo 2>/dev/null | grep '^virtio')" ] || fail "virtio-lo devices left: $(ls /sys/devices/virtio-lo)"
gone /dev/vda || fail "/dev/vda left behind"
pass
