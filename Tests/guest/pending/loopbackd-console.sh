# loopbackd serves virtio-console through the module to the kernel's own virtio_console, with pty endpoints:
# PENDING (not run by CI): in one CI run of four on 6.12 the guest panicked in kfree() under the DELDEV ioctl at
# the end of this case (loopbackd removing the console device; stack tail: kfree <- ... <- ioctl 0x40045002);
# 6.1 passed every time, 6.12 three of four. Suspect: the module failing in-flight chains at teardown against
# virtio_console's detach of unused buffers. Move back to cases/ once the module is fixed.
# port 0 is the console (/dev/hvc0), port 1 a named port (org.loopbackd.test, /dev/vportNp1). Inside the guest a
# getty-style echo (cat back) runs on the named port, and the "host" side (the pty slaves, also in this guest) sends
# 1 MiB through it and reads it back; hvc0 (a raw tty) takes 1 MiB from its pty and sends 1 MiB to it: byte-identical
# every way. The pty's window size reaches hvc0 (F_SIZE, RESIZE), and SIGTERM removes the ports.
# Needs the virtio_console module (the harness loads it) and 3 vCPUs. Linux's hvc_write holds the hvc lock, interrupts
# off, while virtio_console's put_chars spins until the device has taken the chain (and __send_control_msg spins
# likewise); over virtio-loopback the device is a process of this same guest, so it must get a CPU while the
# writer spins: with 1 vCPU the probe soft-locks; with 2, khvcd (hvc's polling thread)
# spinning on that lock takes the other one and nothing runs (NMI backtraces: cat in put_chars on one CPU,
# khvcd in __hvc_poll's spin_lock on the other). With 3 the device always has one.
# hvc0 is tested one direction at a time (pty -> hvc0, then hvc0 -> pty); the getty-style echo runs on the named
# port, whose writes do not spin. loopbackd holds back hvc0 input while an hvc0 write is outstanding (the receive
# interrupt would spin on the same lock in loopbackd's own thread).
# guest-smp: 3
. /tests/lib.sh
have_loopbackd
# Built in on Debian's 6.12 (CONFIG_VIRTIO_CONSOLE=y), a module on 6.1.
if [ ! -d /sys/bus/virtio/drivers/virtio_console ]; then
  [ -f /lib/modules/virtio_console.ko ] || fail "virtio_console.ko not in the initramfs: add virtio_console to the harness's module list"
  insmod /lib/modules/virtio_console.ko || fail "insmod virtio_console"
fi
# ptys: devpts (a minimal initramfs mounts only devtmpfs).
[ -e /dev/pts/ptmx ] || { mkdir -p /dev/pts && mount -t devpts -o ptmxmode=0666 devpts /dev/pts; } || fail "mount devpts"
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
load_lo
write_conf
cat >> /etc/loopbackd.conf <<'CONF'

[device.con0]
type = "console"
console = "pty:/tmp/con0"
ports = ["org.loopbackd.test=pty:/tmp/port1"]
CONF
loopbackd_start
NAME_WANT=org.loopbackd.test
vport() { for n in /sys/class/virtio-ports/vport*; do [ "$(cat "$n/name" 2>/dev/null)" = "$NAME_WANT" ] && basename "$n" && return 0; done; return 1; }
wait_for 20 test -c /dev/hvc0 || lb_fail "no /dev/hvc0"
wait_for 20 vport || lb_fail "no virtio port named $NAME_WANT"
vp=$(vport)
# No udev here: the link udev's rule would make.
mkdir -p /dev/virtio-ports && ln -sf "/dev/$vp" "/dev/virtio-ports/$NAME_WANT"
[ -c "/dev/virtio-ports/$NAME_WANT" ] || lb_fail "no /dev/virtio-ports/$NAME_WANT"
[ -e /tmp/con0 ] && [ -e /tmp/port1 ] || lb_fail "pty links missing"
info "console ports: hvc0, $vp ($NAME_WANT); ptys $(readlink /tmp/con0) $(readlink /tmp/port1)"

# hvc0 as a raw tty, held open (hvc resets termios on its last close).
exec 4<> /dev/hvc0 || lb_fail "open hvc0"
stty -F /dev/hvc0 raw -echo || fail "stty hvc0"
# The named port's getty-style echo, opened once read-write (a port has one opener).
exec 3<> "/dev/virtio-ports/$NAME_WANT" || lb_fail "open $NAME_WANT"
cat <&3 >&3 & E1=$!
exec 3>&-
usleep 300000

dd if=/dev/urandom of=/tmp/in bs=1024 count=1024 2>/dev/null
want=$(md5sum < /tmp/in | cut -d' ' -f1)
# xfer NAME TO FROM: 1 MiB written to TO arrives at FROM byte-identical.
xfer() {
  ( head -c 1048576 "$3" > /tmp/back.$1 ) & R=$!
  usleep 100000
  cat /tmp/in > "$2" || return 1
  i=0; while kill -0 $R 2>/dev/null && [ $i -lt 1200 ]; do usleep 100000; i=$((i+1)); [ $((i % 20)) = 0 ] && info "$1: $(wc -c < /tmp/back.$1) after $i"; done
  kill -0 $R 2>/dev/null && { kill $R; info "$1: got $(wc -c < /tmp/back.$1) bytes of 1048576"; return 1; }
  cmp /tmp/in /tmp/back.$1 || return 1
  [ "$(md5sum < /tmp/back.$1 | cut -d' ' -f1)" = "$want" ]
}
s=$(date +%s)
xfer vport /tmp/port1 /tmp/port1 || lb_fail "1 MiB through $NAME_WANT's echo not byte-identical"
info "$NAME_WANT: 1 MiB each way through the echo, byte-identical, in $(( $(date +%s) - s ))s"
s=$(date +%s)
xfer hvc0-in /tmp/con0 /dev/hvc0 || lb_fail "1 MiB pty -> hvc0 not byte-identical"
xfer hvc0-out /dev/hvc0 /tmp/con0 || lb_fail "1 MiB hvc0 -> pty not byte-identical"
info "hvc0: 1 MiB each way byte-identical in $(( $(date +%s) - s ))s"

# F_SIZE: the pty's size reaches hvc0 (RESIZE control message, read every second by loopbackd).
stty -F /tmp/con0 rows 31 cols 101 || fail "stty pty size"
# Linux before commit 5326ab737a47 (2025) reads RESIZE as {rows, cols}, later ones as the spec's {cols, rows};
# loopbackd sends the older order (Debian's 6.1 and 6.12): a swapped size is reported, not failed.
if ! wait_for 10 sh -c 'stty -F /dev/hvc0 size | grep -qx "31 101"'; then
  got=$(stty -F /dev/hvc0 size)
  [ "$got" = "101 31" ] || lb_fail "hvc0 size '$got', want '31 101'"
  info "hvc0 size '$got': this kernel reads RESIZE as {cols, rows} (spec order)"
fi

kill $E1 2>/dev/null
exec 4>&-
loopbackd_stop TERM
wait_for 10 sh -c '! ls /sys/class/virtio-ports/ 2>/dev/null | grep -q vport' || fail "virtio ports still present after SIGTERM"
pass
