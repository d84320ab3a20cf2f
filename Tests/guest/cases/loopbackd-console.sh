# loopbackd serves virtio-console through the module to the kernel's own virtio_console, with pty endpoints:
# (Was pending: one 6.12 run in four panicked in kfree() under DELDEV: virtio_console's remove() freed a control
# message still outstanding as its own buffer; the module now fails requests before remove() starts.)
# port 0 is the console (/dev/hvc0), port 1 a named port (org.loopbackd.test, /dev/vportNp1). Inside the guest a
# getty-style echo (cat back) runs on the named port, and the "host" side (the pty slaves, also in this guest) sends
# 1 MiB through it and reads it back; hvc0 (a raw tty) takes 1 MiB from its pty and sends 1 MiB to it: byte-identical
# every way. The pty's window size reaches hvc0 (F_SIZE, RESIZE); SIGKILL + restart brings the ports back;
# SIGTERM removes them.
# Needs the virtio_console module (the harness loads it) and 3 or more vCPUs (4 here). Linux's hvc_write holds the hvc lock, interrupts
# off, while virtio_console's put_chars spins until the device has taken the chain (and __send_control_msg spins
# likewise); over virtio-loopback the device is a process of this same guest, so it must get a CPU while the
# writer spins: with 1 vCPU the probe soft-locks; with 2, khvcd (hvc's polling thread)
# spinning on that lock takes the other one and nothing runs (NMI backtraces: cat in put_chars on one CPU,
# khvcd in __hvc_poll's spin_lock on the other). With 3 the device usually has one (see the hvc0 output step).
# hvc0 is tested one direction at a time (pty -> hvc0, then hvc0 -> pty); the getty-style echo runs on the named
# port, whose writes do not spin. loopbackd holds back hvc0 input while an hvc0 write is outstanding, and raises the
# console's interrupts through the module's irqfd (a kernel worker), not the KICK ioctl: the receive interrupt takes
# the hvc lock, and in loopbackd's own thread it spun there while the writer holding it waited for loopbackd (a
# soft lockup in one run of six before).
# guest-smp: 4
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
sed -i '/^\[daemon\]/a control = "/run/lb-control.sock"' /etc/loopbackd.conf   # ctl status on a stall
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
head -c 4096 /tmp/in > /tmp/in4k
# xfer NAME TO FROM [FILE]: FILE (default /tmp/in, 1 MiB) written to TO arrives at FROM byte-identical. Both ends run in the background with a
# 60 s bound: a stall fails the case with the device's queue state (loopbackd ctl -c /etc/loopbackd.conf status) instead of a timeout.
xfer() {
  src=${4:-/tmp/in}; n=$(wc -c < "$src")
  ( head -c "$n" "$3" > /tmp/back.$1 ) & R=$!
  usleep 100000
  cat "$src" > "$2" & W=$!
  i=0; while { kill -0 $R || kill -0 $W; } 2>/dev/null && [ $i -lt 600 ]; do usleep 100000; i=$((i+1)); [ $((i % 50)) = 0 ] && info "$1: $(wc -c < /tmp/back.$1) after $i"; done
  if kill -0 $R 2>/dev/null || kill -0 $W 2>/dev/null; then
    info "$1: got $(wc -c < /tmp/back.$1) bytes of $n in 60 s; writer $(kill -0 $W 2>/dev/null && echo blocked || echo done)"
    loopbackd ctl -c /etc/loopbackd.conf status 2>&1 | while read -r l; do info "ctl: $l"; done
    for p in $R $W; do [ -r /proc/$p/stack ] && info "stack $p: $(tr '\n' ' ' < /proc/$p/stack)"; done
    kill $R $W 2>/dev/null
    return 1
  fi
  wait $W || return 1
  cmp "$src" /tmp/back.$1
}
s=$(date +%s)
xfer vport /tmp/port1 /tmp/port1 || lb_fail "1 MiB through $NAME_WANT's echo not byte-identical"
info "$NAME_WANT: 1 MiB each way through the echo, byte-identical, in $(( $(date +%s) - s ))s"
s=$(date +%s)
xfer hvc0-in /tmp/con0 /dev/hvc0 || lb_fail "1 MiB pty -> hvc0 not byte-identical"
# hvc0 output: 4 KiB (a login prompt's worth). Every hvc write spins, interrupts off, until loopbackd has taken the
# chain, so loopbackd must be woken onto another CPU and run there; the wake-up can land on the spinning CPU's run
# queue, where it never runs (no idle CPU balances it away while the others spin: the writer, khvcd on the hvc lock,
# a fork waiting for a TLB-flush IPI). With 1 MiB (3 vCPUs) 1 run in 6 on 6.12 deadlocked like that, with 64 KiB
# 1 in 4 (NMI backtraces: cat in put_chars, khvcd in the lock, the other CPU idle). A limit of hvc over any device
# in user space on the same kernel: bulk data belongs on named ports, whose writes sleep instead of spinning.
xfer hvc0-out /dev/hvc0 /tmp/con0 /tmp/in4k || lb_fail "4 KiB hvc0 -> pty not byte-identical"
info "hvc0: 1 MiB in, 4 KiB out, byte-identical, in $(( $(date +%s) - s ))s"

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

no_ports() { ! ls /sys/class/virtio-ports/ 2>/dev/null | grep -q vport; }
# port_back WHEN: the named port is back (re-linked) and carries the line WHEN from its pty to a reader here.
port_back() {
  wait_for 20 vport || lb_fail "no port named $NAME_WANT $1"
  vp=$(vport); ln -sf "/dev/$vp" "/dev/virtio-ports/$NAME_WANT"
  ( head -c $(( ${#1} + 1 )) "/dev/virtio-ports/$NAME_WANT" > /tmp/again ) & R=$!
  usleep 300000
  printf '%s\n' "$1" > /tmp/port1 || lb_fail "write to the port's pty $1"
  wait_for 10 sh -c "[ \"\$(cat /tmp/again)\" = '$1' ]" || { kill $R 2>/dev/null; lb_fail "port $1: got '$(cat /tmp/again)'"; }
  wait $R 2>/dev/null
  info "$1: ports back ($vp), data through $NAME_WANT"
}
# SIGKILL: the module removes the device (the ports go), a restarted loopbackd brings them back and data flows.
kill -9 "$LBPID"; wait "$LBPID" 2>/dev/null; LBPID=
wait_for 10 no_ports || fail "ports still present after SIGKILL"
no_d_state || fail "task in D state after SIGKILL"
loopbackd_start
port_back after-sigkill-and-restart
# Driver reload where virtio_console is a module (Debian's 6.1; built in on 6.12): the ports go and come back.
if [ -f /lib/modules/virtio_console.ko ] && grep -q "^virtio_console " /proc/modules; then
  rmmod virtio_console || fail "rmmod virtio_console"
  wait_for 10 no_ports || fail "ports still present after rmmod"
  insmod /lib/modules/virtio_console.ko || fail "insmod virtio_console again"
  port_back after-driver-reload
fi
loopbackd_stop TERM
wait_for 10 no_ports || fail "virtio ports still present after SIGTERM"
pass
