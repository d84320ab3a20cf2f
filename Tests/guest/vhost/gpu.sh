# vhost-user-gpu-pci (QEMU 10.0.2 from bookworm-backports with its display modules, unpacked by setup.sh; -vga none)
# in front of loopbackd's served gpu0 (one 800x600 scanout, file output too). The kernel's virtio-gpu DRM driver
# binds through QEMU; QEMU hands loopbackd the display socket (VHOST_USER_GPU_SET_SOCKET) at DRIVER_OK. gputool draws
# pattern(SEED) into a dumb buffer (SET_CRTC + DIRTYFB) with a 64x64 cursor, moved once, and holds it; the guest then
# prints "GUEST-GPU-SHOWN SEED" and waits for the host's verdict on its second serial port (/dev/ttyS1): the host
# (vhost-user.sh) takes QMP screendumps of QEMU's console until one equals pattern(SEED) pixel for pixel (and so does
# loopbackd's PPM), and writes "PASS ..." or "FAIL why". Twice: after a driver reload (QEMU closes the display
# socket when the device stops and sends a new one at the next DRIVER_OK) with another pattern.
. /tests/lib.sh
[ -x /bin/gputool ] || fail "no gputool in the image (Tests/guest/setup.sh builds it)"
[ -f /lib/modules/virtio-gpu.ko ] || fail "no virtio-gpu.ko in the image (vhost-user.sh stages it)"
for m in drm drm_kms_helper drm_shmem_helper virtio_dma_buf; do
  [ -f /lib/modules/$m.ko ] && { grep -q "^$m " /proc/modules || insmod /lib/modules/$m.ko || fail "insmod $m"; }
done
W=800 H=600
card() { for c in /dev/dri/card[0-9]*; do [ -c "$c" ] && { echo "$c"; return 0; }; done; return 1; }
no_card() { ! card; }
up() { # $1 = tag
  wait_for 30 card || fail "$1: no DRM card: $(dmesg | grep -iE 'virtio|drm' | tail -3 | tr '\n' '|')"
  CARD=$(card)
  wait_for 20 sh -c "gputool modes $CARD | grep -q 'connected ${W}x${H}'" || fail "$1: connector: $(gputool modes $CARD 2>&1 | tr '\n' '|')"
  info "$1: $CARD $(gputool modes $CARD | head -1)"
}
shown() { # $1 = seed: the pattern is on screen (gputool holds it), the host checks QEMU's console
  bg_start /tmp/draw$1.log gputool draw "$CARD" "$1" 120 100 50
  DRAW=$BGPID
  wait_for 20 grep -q READY /tmp/draw$1.log || fail "draw $1: $(cat /tmp/draw$1.log | tr '\n' '|')"
  grep -q "MODE $W $H" /tmp/draw$1.log || fail "draw $1: preferred mode $(head -1 /tmp/draw$1.log), want $W $H"
  echo "GUEST-GPU-SHOWN $1"
  verdict=
  read -t 60 verdict <&3
  verdict=$(echo "$verdict" | tr -d '\r')
  case "$verdict" in
    PASS*) info "pattern $1: ${verdict#PASS }" ;;
    *) fail "pattern $1: host: ${verdict:-no verdict within 60 s}" ;;
  esac
  kill $DRAW 2>/dev/null; wait $DRAW 2>/dev/null
}
# ttyS1 stays open for the whole case (bytes that reach a closed serial port are dropped)
exec 3< /dev/ttyS1 || fail "no /dev/ttyS1"
stty -F /dev/ttyS1 raw -echo 2>/dev/null
insmod /lib/modules/virtio-gpu.ko || fail "insmod virtio-gpu"
up start
shown 1
rmmod virtio-gpu 2>/dev/null || rmmod virtio_gpu || fail "rmmod virtio-gpu"
wait_for 10 no_card || fail "card still there after rmmod"
insmod /lib/modules/virtio-gpu.ko || fail "insmod virtio-gpu again"
up reload
shown 2
pass
