# loopbackd serves virtio-gpio to the kernel's gpio-virtio driver, and the same device type uses a real kernel
# gpiochip as its host chip through libgpiod 1.6 (the v1 GPIO character-device ABI, on in Debian's 6.1 and 6.12):
#   A: loopbackd #1, gpio on the simulated chip (lines 0-3 wired to 4-7) -> /dev/gpiochip0 (gpio-virtio)
#   B: loopbackd #2, gpio with chip = /dev/gpiochip0 (libgpiod line requests and edge events on chip A)
#      -> /dev/gpiochip1 (gpio-virtio)
# gpiotool (v1 ioctls) on each chip: line names, an output driving its wired input, both-edge interrupts in order,
# the value read back. Through B every request crosses two virtio devices and libgpiod, every interrupt goes
# sim chip -> A's eventq -> gpio-virtio irq -> chip A line event fd -> B's loop -> B's eventq -> gpio-virtio irq ->
# gpiotool's event fd. B is a second process: its loop thread waits in libgpiod ioctls on chip A, which A's loop
# answers (in one process the loop would wait for itself). SIGKILL of B releases its line requests on chip A;
# A keeps working; SIGTERM of A removes chip 0.
#
# Harness: setup.sh builds gpio-virtio.ko per kernel out of tree from Debian's linux-source-SERIES (neither kernel
# sets CONFIG_GPIO_VIRTIO) with one fix this case's two chips need (scripts/image-lib.sh img_gpio_virtio: 6.1's and
# 6.12's driver share one static, mutable vgpio_irq_chip between instances; gpiolib hooks it per gpio_chip, so
# without a per-instance copy the second chip's first interrupt request oopses: RIP 0, request_threaded_irq from
# GPIO_GET_LINEEVENT_IOCTL) and Tests/guest/tools/gpiotool.c (static); run.sh copies both into the image
# (/lib/modules/gpio-virtio.ko, /bin/gpiotool). No gpio-sim: chip A's simulated lines are loopbackd's own.
. /tests/lib.sh
have_loopbackd
[ -f /lib/modules/gpio-virtio.ko ] || fail "no gpio-virtio.ko in the image (run Tests/guest/setup.sh)"
[ -x /bin/gpiotool ] || fail "no gpiotool in the image (run Tests/guest/setup.sh)"
load_lo
insmod /lib/modules/gpio-virtio.ko || fail "insmod gpio-virtio"
write_conf
cat >> /etc/loopbackd.conf <<'CONF'

[device.gpioa]
type = "gpio"
simulated = true
names = ["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7"]
CONF
loopbackd_start
wait_for 20 test -c /dev/gpiochip0 || lb_fail "no /dev/gpiochip0 (gpio-virtio not bound to A)"
gpiotool info /dev/gpiochip0 > /tmp/info0 2>&1 || fail "info chip 0: $(cat /tmp/info0)"
grep -q "lines 8" /tmp/info0 && grep -q "^5 a5" /tmp/info0 || fail "chip 0 lines/names: $(tr '\n' '|' < /tmp/info0)"
gpiotool loop /dev/gpiochip0 1 5 50 > /tmp/loop0 2>&1 || lb_fail "chip 0 loop: $(cat /tmp/loop0)"
info "chip A (simulated): $(cat /tmp/loop0)"

cat > /etc/b.conf <<'CONF'
[daemon]
transport = "virtio-lo"
device-node = "/dev/virtio-lo"

[device.gpiob]
type = "gpio"
chip = "/dev/gpiochip0"
lines = "0-7"
CONF
loopbackd -c /etc/b.conf > /tmp/b.log 2>&1 &
BPID=$!
bfail() { fail "$* -- B log: $(tail -n 5 /tmp/b.log | tr '\n' '|') -- A log: $(tail -n 3 /tmp/loopbackd.log | tr '\n' '|')"; }
wait_for 20 test -c /dev/gpiochip1 || bfail "no /dev/gpiochip1 (gpio-virtio not bound to B)"
gpiotool info /dev/gpiochip1 > /tmp/info1 2>&1 || bfail "info chip 1: $(cat /tmp/info1)"
grep -q "lines 8" /tmp/info1 && grep -q "^5 a5" /tmp/info1 || bfail "chip 1 names from the host chip: $(tr '\n' '|' < /tmp/info1)"
s=$(date +%s)
gpiotool loop /dev/gpiochip1 1 5 50 > /tmp/loop1 2>&1 || bfail "chip 1 loop: $(cat /tmp/loop1)"
info "chip B (libgpiod on chip A): $(cat /tmp/loop1) in $(( $(date +%s) - s ))s"
# The guest user released its lines: gpio-virtio set them to direction NONE, B released its requests on chip A.
wait_for 5 sh -c 'gpiotool info /dev/gpiochip0 > /tmp/info0b; ! grep -q " used" /tmp/info0b' ||
  bfail "chip 0 lines still requested after the user released chip 1's: $(tr '\n' '|' < /tmp/info0b)"
# B holds chip A lines while a user holds chip 1's (an output here: a user holding an interrupt line of a chip
# that goes away makes gpiolib warn about the irq it cannot free); SIGKILL of B releases them.
gpiotool hold /dev/gpiochip1 2 1 60000 > /dev/null 2>&1 &
WPID=$!
wait_for 10 sh -c 'gpiotool info /dev/gpiochip0 | grep -q "^2 a2 used out"' || bfail "B did not request chip 0 line 2 as an output"
kill -KILL $BPID; wait $BPID 2>/dev/null
wait_for 10 sh -c '! gpiotool info /dev/gpiochip0 | grep -q " used"' || fail "chip 0 lines still requested after SIGKILL of B"
kill $WPID 2>/dev/null; wait $WPID 2>/dev/null
gpiotool loop /dev/gpiochip0 2 6 10 > /tmp/loop0b 2>&1 || lb_fail "chip 0 after B was killed: $(cat /tmp/loop0b)"
loopbackd_stop TERM
wait_for 10 gone /dev/gpiochip0 || fail "chip 0 still there after SIGTERM of A"
pass
