# vhost-user-gpio-pci (QEMU 7.2 front-end) backed by loopbackd's gpio0 (simulated = true: 8 lines, 0-3 wired to
# 4-7, named v0..v7; queue-size 256, QEMU's fixed ring size): the kernel's gpio-virtio driver (built by setup.sh)
# binds; the line count comes from loopbackd's config space (GET_CONFIG), the names from GET_NAMES, and an output
# drives its wired input, read back (requestq round trips through QEMU and loopbackd); after a driver reload (QEMU
# stops and restarts the back-end's rings) the chip works again.
# No interrupts: QEMU's vhost-user-gpio (7.2, still 8.x) never offers VIRTIO_GPIO_F_IRQ to the driver (its
# host_features lack the bit; rust-vmm/vhost-device#613), so an edge request must fail with ENODEV; the
# interrupt path (eventq) is covered by the loopbackd-gpio case through virtio-loopback.
. /tests/lib.sh
[ -f /lib/modules/gpio-virtio.ko ] || fail "no gpio-virtio.ko in the image (Tests/guest/setup.sh builds it)"
[ -x /bin/gpiotool ] || fail "no gpiotool in the image (Tests/guest/setup.sh builds it)"
insmod /lib/modules/gpio-virtio.ko || fail "insmod gpio-virtio"
wait_for 20 test -c /dev/gpiochip0 || fail "no /dev/gpiochip0 (gpio-virtio not bound)"
gpiotool info /dev/gpiochip0 > /tmp/info 2>&1 || fail "info: $(cat /tmp/info)"
grep -q "lines 8" /tmp/info && grep -q "^5 v5" /tmp/info || fail "lines/names: $(tr '\n' '|' < /tmp/info)"
gpiotool toggle /dev/gpiochip0 1 5 50 > /tmp/t 2>&1 || fail "toggle: $(cat /tmp/t)"
info "first: $(cat /tmp/t)"
gpiotool wait /dev/gpiochip0 4 RISING 100 > /tmp/w 2>&1
grep -q "No such device" /tmp/w || fail "edge request without VIRTIO_GPIO_F_IRQ: $(cat /tmp/w) (want ENODEV)"
rmmod gpio_virtio || fail "rmmod gpio_virtio"
wait_for 10 sh -c '! test -e /dev/gpiochip0' || fail "/dev/gpiochip0 still there after rmmod"
insmod /lib/modules/gpio-virtio.ko || fail "insmod gpio-virtio again"
wait_for 20 test -c /dev/gpiochip0 || fail "no /dev/gpiochip0 after driver reload"
gpiotool toggle /dev/gpiochip0 2 6 50 > /tmp/t 2>&1 || fail "toggle after reload: $(cat /tmp/t)"
info "after reload: $(cat /tmp/t)"
pass
