# virtio-i2c through the module with the kernel's own i2c-virtio driver; the host bus is i2c-stub (chips at 0x50
# and 0x1c, an SMBus-only adapter) through i2c-dev. loopbackd maps 0x50 -> stub 0x50 and 0x1d -> stub 0x1c.
# Byte, word and block transfers through the virtio adapter land in the stub's registers (checked on the stub's
# own /dev/i2c-N too), i2cdetect finds exactly the mapped addresses (zero-length probes and read-byte probes),
# unmapped addresses NACK; then driver reload (rmmod/insmod i2c-virtio), loopbackd SIGKILL during transfers and
# restart, and SIGTERM leave the adapter usable and the stub's registers intact.
. /tests/lib.sh
have_loopbackd
[ -f /lib/modules/i2c-virtio.ko ] || fail "no i2c-virtio.ko in the image (Tests/guest/setup.sh builds it)"
insmod /lib/modules/i2c-dev.ko || fail "insmod i2c-dev"
insmod /lib/modules/i2c-stub.ko chip_addr=0x50,0x1c || fail "insmod i2c-stub"
insmod /lib/modules/i2c-virtio.ko || fail "insmod i2c-virtio"
load_lo
bus_of() { i2c_bus_of "$@"; }
vbus() { M=$(bus_of 'i2c_virtio*') && [ -c "/dev/i2c-$M" ]; }
no_vbus() { ! bus_of 'i2c_virtio*' > /dev/null; }
N=$(bus_of '*stub*') || fail "no i2c-stub adapter: $(cat /sys/bus/i2c/devices/i2c-*/name 2>/dev/null | tr '\n' '|')"
wait_for 5 test -c "/dev/i2c-$N" || fail "no /dev/i2c-$N"
info "host bus: /dev/i2c-$N ($(cat /sys/bus/i2c/devices/i2c-$N/name))"
write_conf
cat >> /etc/loopbackd.conf <<CONF

[device.i2c0]
type = "i2c"
map = "0x50=/dev/i2c-$N, 0x1d=/dev/i2c-$N:0x1c"
CONF
loopbackd_start
wait_for 20 vbus || lb_fail "no i2c-virtio adapter"
vbus
info "virtio bus: /dev/i2c-$M ($(cat /sys/bus/i2c/devices/i2c-$M/name))"

# expect WHAT WANT COMMAND...: the command succeeds and prints WANT
expect() {
  what=$1; want=$2; shift 2
  got=$("$@" 2>&1) || lb_fail "$what: '$*' failed: $got"
  [ "$got" = "$want" ] || lb_fail "$what: '$*' printed '$got', want '$want'"
}
# nack WHAT COMMAND...: the command fails
nack() { what=$1; shift; "$@" > /tmp/nack.out 2>&1 && lb_fail "$what: '$*' succeeded: $(cat /tmp/nack.out)"; return 0; }
# detect ARGS...: the addresses i2cdetect finds on the virtio bus, space-separated
detect() { i2c_detect "$M" "$@"; }

# all transfers, with the values a round must find; $1 = a tag for messages
transfers() {
  r=$1
  # byte data through the virtio adapter; seen on the stub itself, and the other way round
  i2cset -y "$M" 0x50 0x10 0xa5 || lb_fail "$r: i2cset byte"
  expect "$r: byte via virtio" 0xa5 i2cget -y "$M" 0x50 0x10
  expect "$r: byte on the stub" 0xa5 i2cget -y "$N" 0x50 0x10
  i2cset -y "$N" 0x50 0x11 0x3c || fail "$r: i2cset on the stub"
  expect "$r: stub byte via virtio" 0x3c i2cget -y "$M" 0x50 0x11
  # word data (SMBus word: write 3 bytes / write 1 + read 2 with a repeated start)
  i2cset -y "$M" 0x50 0x20 0x1234 w || lb_fail "$r: i2cset word"
  expect "$r: word via virtio" 0x1234 i2cget -y "$M" 0x50 0x20 w
  expect "$r: word on the stub" 0x1234 i2cget -y "$N" 0x50 0x20 w
  # blocks: I2C block write (i2cset i) and raw transfers (I2C_RDWR on the virtio adapter)
  i2cset -y "$M" 0x50 0x30 0x11 0x22 0x33 0x44 i || lb_fail "$r: i2cset block"
  expect "$r: block on the stub" 0x33 i2cget -y "$N" 0x50 0x32
  expect "$r: block read" "0x11 0x22 0x33 0x44" i2ctransfer -y "$M" w1@0x50 0x30 r4
  i2ctransfer -y "$M" w9@0x50 0x40 1 2 3 4 5 6 7 8 || lb_fail "$r: i2ctransfer write 8"
  expect "$r: block 8 read" "0x01 0x02 0x03 0x04 0x05 0x06 0x07 0x08" i2ctransfer -y "$M" w1@0x50 0x40 r8
  expect "$r: block 8 on the stub" 0x08 i2cget -y "$N" 0x50 0x47
  # the remapped address: virtio 0x1d is the stub's 0x1c
  i2cset -y "$M" 0x1d 0x05 0x77 || lb_fail "$r: i2cset remapped"
  expect "$r: remapped on the stub" 0x77 i2cget -y "$N" 0x1c 0x05
  expect "$r: remapped via virtio" 0x77 i2cget -y "$M" 0x1d 0x05
  # unmapped addresses do not answer (0x1c exists on the stub but is only reachable as 0x1d)
  nack "$r: unmapped 0x51" i2cget -y "$M" 0x51 0x00
  nack "$r: unmapped 0x1c" i2cget -y "$M" 0x1c 0x05
  nack "$r: unmapped write" i2cset -y "$M" 0x52 0x00 0x01
  # a transfer with no SMBus form on the stub fails, and the bus still works after it
  # (busybox i2ctransfer exits 0 on a short transfer: it warns "only 0/1 messages sent")
  out=$(i2ctransfer -y "$M" r2@0x50 2>&1) && case "$out" in *"only 0/1"*) ;; *) lb_fail "$r: 2-byte read without a command: '$out'";; esac
  # probes: quick writes (zero-length requests) and read-byte probes find exactly the mapped addresses
  expect "$r: i2cdetect -q" "1d 50" detect -q
  expect "$r: i2cdetect -r" "1d 50" detect -r
}
transfers first
info "transfers: byte, word, block, remap, NACK, i2cdetect ok"

# driver reload: the adapter goes and comes back; the stub kept its registers
rmmod i2c_virtio || fail "rmmod i2c_virtio"
wait_for 10 no_vbus || fail "virtio adapter still there after rmmod"
insmod /lib/modules/i2c-virtio.ko || fail "insmod i2c-virtio again"
wait_for 20 vbus || lb_fail "no virtio adapter after driver reload"
vbus
expect "after reload" 0xa5 i2cget -y "$M" 0x50 0x10
transfers reload
info "driver reload ok (/dev/i2c-$M)"

# A transfer in flight when loopbackd dies fails (it must not read back as a zero byte): loopbackd stopped, an
# i2cget waits on the adapter, SIGKILL; the module completes the request itself with the status byte set to ERR.
kill -STOP "$LBPID"
i2cget -y "$M" 0x50 0x10 > /tmp/inflight.out 2>&1 &
ip=$!
usleep 500000
kill -0 $ip 2>/dev/null || fail "i2cget finished while loopbackd was stopped: $(cat /tmp/inflight.out)"
kill -9 "$LBPID"; wait "$LBPID" 2>/dev/null; LBPID=
i=0; while kill -0 $ip 2>/dev/null && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
kill -0 $ip 2>/dev/null && fail "in-flight i2cget still blocked 10 s after SIGKILL"
wait $ip && fail "in-flight i2cget succeeded after SIGKILL: '$(cat /tmp/inflight.out)'"
info "in-flight transfer at SIGKILL: failed ($(cat /tmp/inflight.out | tr '\n' ' '))"
wait_for 10 no_vbus || fail "virtio adapter still there after SIGKILL"
loopbackd_start
wait_for 20 vbus || lb_fail "no virtio adapter after restart"
vbus
expect "after in-flight SIGKILL" 0xa5 i2cget -y "$M" 0x50 0x10

# SIGKILL while a reader loops on the adapter: the adapter goes away, nothing hangs; a restarted loopbackd
# brings it back
( while [ ! -e /tmp/stop ]; do i2cget -y "$M" 0x50 0x10 > /dev/null 2>&1; i2cget -y "$M" 0x51 0 > /dev/null 2>&1; done ) &
rd=$!
usleep 500000
kill -9 "$LBPID"; wait "$LBPID" 2>/dev/null; LBPID=
wait_for 10 no_vbus || fail "virtio adapter still there after SIGKILL"
touch /tmp/stop
i=0; while kill -0 $rd 2>/dev/null && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
kill -0 $rd 2>/dev/null && fail "reader still blocked 10 s after SIGKILL"
no_d_state || fail "task in D state after SIGKILL"
expect "stub after SIGKILL" 0xa5 i2cget -y "$N" 0x50 0x10
loopbackd_start
wait_for 20 vbus || lb_fail "no virtio adapter after restart"
vbus
transfers restart
info "SIGKILL + restart ok (/dev/i2c-$M)"

loopbackd_stop TERM
wait_for 10 no_vbus || fail "virtio adapter still there after SIGTERM"
grep -iE 'warning|error' /tmp/loopbackd.log && fail "loopbackd logged a warning or error"
pass
