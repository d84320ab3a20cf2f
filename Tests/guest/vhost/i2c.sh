# vhost-user-i2c-pci (QEMU 7.2 front-end) backed by loopbackd's i2c0 (simulated = true: register-file chips at
# 0x50-0x57): the kernel's i2c-virtio driver binds; byte, word and block transfers round-trip through QEMU and
# loopbackd, i2cdetect finds exactly the eight chips (zero-length quick writes and read-byte probes), an address
# without a chip NACKs, and after a driver reload (QEMU stops and restarts the back-end's ring) the chips kept
# their registers.
. /tests/lib.sh
[ -f /lib/modules/i2c-virtio.ko ] || fail "no i2c-virtio.ko in the image (Tests/guest/setup.sh builds it)"
insmod /lib/modules/i2c-dev.ko || fail "insmod i2c-dev"
insmod /lib/modules/i2c-virtio.ko || fail "insmod i2c-virtio"
vbus() { M=$(i2c_bus_of 'i2c_virtio*') && [ -c "/dev/i2c-$M" ]; }
no_vbus() { ! i2c_bus_of 'i2c_virtio*' > /dev/null; }
wait_for 20 vbus || fail "no i2c-virtio adapter: $(cat /sys/bus/i2c/devices/i2c-*/name 2>/dev/null | tr '\n' '|')"
vbus
info "virtio bus: /dev/i2c-$M ($(cat /sys/bus/i2c/devices/i2c-$M/name))"
expect() {
  what=$1; want=$2; shift 2
  got=$("$@" 2>&1) || fail "$what: '$*' failed: $got"
  [ "$got" = "$want" ] || fail "$what: '$*' printed '$got', want '$want'"
}
transfers() {
  r=$1
  i2cset -y "$M" 0x50 0x10 0xa5 || fail "$r: i2cset byte"
  expect "$r: byte" 0xa5 i2cget -y "$M" 0x50 0x10
  i2cset -y "$M" 0x57 0x20 0x1234 w || fail "$r: i2cset word"
  expect "$r: word" 0x1234 i2cget -y "$M" 0x57 0x20 w
  expect "$r: word low byte" 0x34 i2cget -y "$M" 0x57 0x20
  i2ctransfer -y "$M" w5@0x53 0x30 0x11 0x22 0x33 0x44 || fail "$r: i2ctransfer write"
  expect "$r: block read" "0x11 0x22 0x33 0x44" i2ctransfer -y "$M" w1@0x53 0x30 r4
  expect "$r: chips are separate" 0x00 i2cget -y "$M" 0x52 0x30
  i2cget -y "$M" 0x58 0x00 > /tmp/nack.out 2>&1 && fail "$r: 0x58 (no chip) answered: $(cat /tmp/nack.out)"
  expect "$r: i2cdetect -q" "50 51 52 53 54 55 56 57" i2c_detect "$M" -q
  expect "$r: i2cdetect -r" "50 51 52 53 54 55 56 57" i2c_detect "$M" -r
}
transfers first
rmmod i2c_virtio || fail "rmmod i2c_virtio"
wait_for 10 no_vbus || fail "virtio adapter still there after rmmod"
insmod /lib/modules/i2c-virtio.ko || fail "insmod i2c-virtio again"
wait_for 20 vbus || fail "no virtio adapter after driver reload"
vbus
expect "kept across reload" 0xa5 i2cget -y "$M" 0x50 0x10
transfers reload
info "byte, word, block, NACK, i2cdetect; driver reload ok"
pass
