# virtio-gpu through the module with the kernel's own virtio-gpu DRM driver (fbdev emulation and fbcon built in).
# The first client also sets a 64x64 cursor and moves it: loopbackd reports the moved position (cursor queue).
# loopbackd serves a gpu with one 800x600 scanout and a file output (/tmp/gpu-0.ppm, at most every 50 ms, the last
# flushed frame always). gputool (Tests/guest/tools/gputool.c, DRM ioctls only) makes a dumb buffer of the
# connector's preferred mode (the EDID's), XRGB8888 (virtio-gpu B8G8R8X8), fills it with a known pattern, SET_CRTC +
# DIRTYFB; the PPM loopbackd writes (RGB: bytes 2, 1, 0 of each pixel) must equal the pattern pixel for pixel.
# Then: a second pattern after the first client closed (fbcon's restore in between); hot-plug through
# `loopbackd ctl device gpu0 scanout 0 off|on` (the connector goes disconnected and comes back); a driver reload
# (rmmod/insmod virtio-gpu) and a third pattern; SIGKILL of loopbackd while the driver is bound and a client holds
# its buffer (nothing hangs: the client exits, no task in D state, the card goes), a restart and a fourth pattern;
# SIGTERM.
. /tests/lib.sh
have_loopbackd
[ -x /bin/gputool ] || fail "no gputool in the image (Tests/guest/setup.sh builds it)"
[ -f /lib/modules/virtio-gpu.ko ] || fail "no virtio-gpu.ko in the image (run.sh stages it)"
for m in drm drm_kms_helper drm_shmem_helper virtio_dma_buf; do
  [ -f /lib/modules/$m.ko ] && { grep -q "^$m " /proc/modules || insmod /lib/modules/$m.ko || fail "insmod $m"; }
done
insmod /lib/modules/virtio-gpu.ko || fail "insmod virtio-gpu"
load_lo
W=800 H=600
write_conf
cat >> /etc/loopbackd.conf <<CONF
control = "/tmp/ctl.sock"

[device.gpu0]
type = "gpu"
mode = "${W}x${H}"
output = "file:/tmp/gpu"
file-interval-ms = 50
CONF
loopbackd_start
# the DRM card under the module's root device (virtio-gpu registers its DRM device on the virtio device's parent)
card() { for c in /sys/class/drm/card[0-9]*; do case "$(readlink -f "$c")" in */virtio-lo/drm/card[0-9]*) [ -c "/dev/dri/${c##*/}" ] && { echo "/dev/dri/${c##*/}"; return 0; };; esac; done; return 1; }
no_card() { ! card; }
up() { # $1 = tag: the DRM card of the virtio device, its connector connected with the configured mode
  wait_for 30 card || lb_fail "$1: no DRM card of a virtio device: $(ls -l /sys/class/drm/ 2>&1 | tr '\n' '|') $(dmesg | grep -iE 'virtio|drm' | tail -3 | tr '\n' '|')"
  CARD=$(card)
  wait_for 10 test -c "$CARD" || fail "$1: $CARD not created"
  wait_for 10 sh -c "gputool modes $CARD | grep -q 'connected ${W}x${H}'" || lb_fail "$1: connector: $(gputool modes $CARD 2>&1 | tr '\n' '|')"
  info "$1: $CARD $(gputool modes $CARD | head -1)"
}
GPU_PPM=/tmp/gpu-0.ppm

up start
[ -c /dev/fb0 ] && info "fbdev emulation: /dev/fb0 ($(cat /sys/class/graphics/fb0/name 2>/dev/null))"
gpu_draw 1 100 50
# the cursor (the driver's cursor plane: UPDATE_CURSOR, then MOVE_CURSOR on the cursor queue) is at the moved position
cursor_at() { loopbackd ctl --socket /tmp/ctl.sock device gpu0 info 2>/dev/null | grep -q "^scanout 0 .* cursor=[1-9][0-9]*@$1,$2 "; }
wait_for 10 cursor_at 110 70 || lb_fail "cursor: $(loopbackd ctl --socket /tmp/ctl.sock device gpu0 info 2>&1 | tr '\n' '|')"
info "cursor: $(loopbackd ctl --socket /tmp/ctl.sock device gpu0 info | grep -o 'cursor=[^ ]*')"
gpu_undraw
# fbcon takes the scanout back when the DRM client closes; a new client draws again
gpu_draw 2

gpu_undraw
# hot-plug: the connector follows the scanout's enabled state (VIRTIO_GPU_EVENT_DISPLAY + config interrupt; the
# driver re-reads the display info). Its status is read after a forced probe (sysfs "detect"), as a compositor
# does on the hotplug uevent.
status() { for s in /sys/class/drm/card*-Virtual-*/status; do echo detect > "$s" 2>/dev/null; cat "$s"; return; done; echo none; }
plugged() { [ "$(status)" = "$1" ]; }
out=$(loopbackd ctl --socket /tmp/ctl.sock device gpu0 scanout 0 off 2>&1) || lb_fail "ctl scanout off: $out"
wait_for 10 plugged disconnected || lb_fail "unplug: status $(status); $(loopbackd ctl --socket /tmp/ctl.sock device gpu0 info 2>&1 | tr '\n' '|')"
info "unplugged: $(gputool modes $CARD | head -1)"
out=$(loopbackd ctl --socket /tmp/ctl.sock device gpu0 scanout 0 on 2>&1) || lb_fail "ctl scanout on: $out"
wait_for 10 plugged connected || lb_fail "replug: status $(status)"
wait_for 10 sh -c "gputool modes $CARD | grep -q 'connected ${W}x${H}'" || lb_fail "replug: $(gputool modes $CARD 2>&1 | tr '\n' '|')"
info "plugged in again: $(gputool modes $CARD | head -1)"

# driver reload
rmmod virtio-gpu 2>/dev/null || rmmod virtio_gpu || fail "rmmod virtio-gpu"
wait_for 10 no_card || fail "card still there after rmmod"
insmod /lib/modules/virtio-gpu.ko || fail "insmod virtio-gpu again"
up reload
gpu_draw 3

# SIGKILL while the driver is bound and a client holds its buffer: nothing hangs, the card goes
loopbackd_stop KILL
wait_for 20 no_card || fail "card still there after SIGKILL"
gpu_undraw
wait_for 10 no_d_state || fail "a task in D state after SIGKILL: $(grep -l '^State:.*D' /proc/[0-9]*/status 2>/dev/null | tr '\n' ' ')"
loopbackd_start
up restart
gpu_draw 4
gpu_undraw
loopbackd_stop TERM
wait_for 20 no_card || fail "card still there after SIGTERM"
pass
