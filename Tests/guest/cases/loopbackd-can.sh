# Passed 20 runs in a row on 6.1 and 21 on 6.12 (one of them under GUEST_SECCOMP=kill, as CI runs 6.12); one earlier 6.12 run, on
# a loaded machine, ended 6 s after boot with a kernel panic marker and no result, and its console log was not kept:
# not explained. If it shows up in CI, keep that run's console log.
# virtio-can through the module with the kernel's own virtio_can driver (mainline 7.x, built out of tree by
# setup.sh); the host interface is a vcan (vcan0) in the same guest. Frames both ways with cantool (numbered frames,
# each checked in order: none lost, none reordered, payload intact): classic, FD and RTR frames, then 10,000 mixed
# frames each way; controller down/up (a stopped controller passes nothing, stale frames do not arrive after the
# up); bus-off when vcan0 goes down (the virtio interface loses its carrier, sending fails) and recovery with a
# down/up; driver reload; loopbackd SIGKILL and restart; SIGTERM.
. /tests/lib.sh
have_loopbackd
[ -x /bin/cantool ] || fail "no cantool in the image (Tests/guest/setup.sh builds it)"
[ -f /lib/modules/virtio_can.ko ] || fail "no virtio_can.ko in the image (Tests/guest/setup.sh builds it)"
for m in can can-raw can-dev vcan; do insmod /lib/modules/$m.ko || fail "insmod $m"; done
insmod /lib/modules/virtio_can.ko || fail "insmod virtio_can"
ip link add vcan0 type vcan || fail "ip link add vcan0 type vcan"
ip link set vcan0 up || fail "vcan0 up"
load_lo
write_conf
cat >> /etc/loopbackd.conf <<CONF

[device.can0]
type = "can"
interface = "vcan0"
CONF

# the virtio-can network interface (its device's driver is virtio_can)
vcan_if() {
  for n in /sys/class/net/*; do
    case "$(readlink "$n/device/driver" 2>/dev/null)" in *virtio_can) echo "${n##*/}"; return 0;; esac
  done
  return 1
}
has_if() { C=$(vcan_if); }
no_if() { ! vcan_if > /dev/null; }
carrier() { cat /sys/class/net/$C/carrier 2>/dev/null; }
carrier_off() { [ "$(carrier)" = 0 ]; }
carrier_on() { [ "$(carrier)" = 1 ]; }
up() {
  echo 1000 > /sys/class/net/$C/tx_queue_len
  ip link set "$C" up || lb_fail "ip link set $C up"
}

# run_pair RXIF TXIF N MODE [BURST PAUSE]: a receiver on RXIF, then N frames sent on TXIF; both must succeed
run_pair() {
  rm -f /tmp/ready
  READY=/tmp/ready cantool recv "$1" "$3" "$4" 30 > /tmp/recv.out 2>&1 &
  rp=$!
  wait_for 5 test -e /tmp/ready || fail "receiver on $1 not ready"
  cantool send "$2" "$3" "$4" ${5:-} ${6:-} > /tmp/send.out 2>&1 || lb_fail "send $3 $4 on $2: $(cat /tmp/send.out)"
  wait $rp || lb_fail "$3 $4 frames $2 -> $1: $(cat /tmp/recv.out | tr '\n' ' ')"
  info "$3 $4 frames $2 -> $1: $(cat /tmp/recv.out) ($(cat /tmp/send.out))"
}
# both directions, a few frames of each kind
traffic() {
  for mode in classic fd mixed; do
    run_pair vcan0 "$C" 300 $mode
    run_pair "$C" vcan0 300 $mode
  done
}

loopbackd_start
wait_for 20 has_if || lb_fail "no virtio_can network interface"
has_if
info "virtio_can interface: $C (mtu $(cat /sys/class/net/$C/mtu))"
[ "$(cat /sys/class/net/$C/mtu)" = 72 ] || fail "$C: MTU $(cat /sys/class/net/$C/mtu), want 72 (CAN FD negotiated)"
up
traffic
info "classic, FD, RTR both ways ok"

# 10,000 mixed frames each way, in order, none lost. A vcan has no bus rate: its sender's frames go through the
# kernel's receive backlog (netdev_max_backlog, 1000), which overflowed when cantool sent 500 at a time on this
# 1-vCPU guest (2,435 of 10,000 dropped there, counted in /proc/net/softnet_stat, before loopbackd's socket saw
# them). So the backlog is raised, the vcan0 sender pauses 2 ms every 100 frames, and the drop counter must not move.
echo 20000 > /proc/sys/net/core/netdev_max_backlog
drops() { s=0; while read -r _ b _; do s=$((s + 0x$b)); done < /proc/net/softnet_stat; echo $s; }
d0=$(drops)
run_pair vcan0 "$C" 10000 mixed
run_pair "$C" vcan0 10000 mixed 100 2000
[ "$(drops)" = "$d0" ] || fail "the kernel's receive backlog dropped frames ($d0 -> $(drops)): the test's pacing, not loopbackd"

# controller down/up: frames sent on vcan0 while the controller is stopped never arrive, not even after the up
# (a receiver bound to the down interface watches through the up)
ip link set "$C" down || fail "ip link set $C down"
cantool send vcan0 50 classic > /dev/null || fail "send on vcan0 while $C is down"
rm -f /tmp/ready
READY=/tmp/ready cantool none "$C" 2000 > /tmp/none.out 2>&1 &
np=$!
wait_for 5 test -e /tmp/ready || fail "watcher on $C not ready"
up
wait $np || lb_fail "a frame sent while the controller was stopped arrived after the up: $(cat /tmp/none.out | tr '\n' ' ')"
traffic
info "controller down/up ok"

# bus-off: vcan0 goes down under loopbackd; the driver hears bus-off (its interface loses the carrier)
ip link set vcan0 down || fail "vcan0 down"
wait_for 10 carrier_off || lb_fail "$C still has a carrier after vcan0 went down (no bus-off)"
info "bus-off seen: carrier $(carrier)"
ip link set vcan0 up || fail "vcan0 up"
ip link set "$C" down || fail "$C down after bus-off"
up
wait_for 5 carrier_on || lb_fail "$C: no carrier after the restart"
traffic
info "bus-off and restart ok"

# driver reload
ip link set "$C" down
rmmod virtio_can || fail "rmmod virtio_can"
wait_for 10 no_if || fail "virtio_can interface still there after rmmod"
insmod /lib/modules/virtio_can.ko || fail "insmod virtio_can again"
wait_for 20 has_if || lb_fail "no virtio_can interface after driver reload"
has_if
up
traffic
info "driver reload ok ($C)"

# SIGKILL while frames flow, then a restarted loopbackd serves again
( cantool send "$C" 100000 classic > /dev/null 2>&1 ) &
sp=$!
usleep 300000
kill -9 "$LBPID"; wait "$LBPID" 2>/dev/null; LBPID=
wait_for 10 no_if || fail "virtio_can interface still there after SIGKILL"
i=0; while kill -0 $sp 2>/dev/null && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
kill -0 $sp 2>/dev/null && fail "sender still blocked 10 s after SIGKILL"
no_d_state || fail "task in D state after SIGKILL"
loopbackd_start
wait_for 20 has_if || lb_fail "no virtio_can interface after restart"
has_if
up
traffic
info "SIGKILL + restart ok ($C)"

loopbackd_stop TERM
wait_for 10 no_if || fail "virtio_can interface still there after SIGTERM"
grep -iE 'warning|error' /tmp/loopbackd.log && fail "loopbackd logged a warning or error"
pass
