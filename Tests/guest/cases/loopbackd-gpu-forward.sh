# A gpu forwarded to QEMU's vhost-user-gpu (Debian's 7.2, 2D) with the kernel's own virtio-gpu DRM driver through
# the module: loopbackd is the vhost-user front-end (it sends VHOST_USER_GPU_SET_SOCKET) and the display
# (GpuDisplayServer: GET_DISPLAY_INFO, SCANOUT, UPDATE, cursor), presenting scanout 0 on a file output. The back-end
# runs in the guest next to loopbackd (the binary and its ldd libraries are copied into this case's initramfs). It
# is started before any DRM card exists: at start-up it opens the first /dev/dri/renderD* it finds, and with none
# (and no /dev/udmabuf in these kernels) it keeps its resources in memory and sends SCANOUT + UPDATE. gputool
# draws a known pattern into a dumb buffer (SET_CRTC + DIRTYFB) and sets a cursor (it must come back as
# CURSOR_UPDATE: loopbackd logs the first image per connection); the PPM loopbackd writes from
# the back-end's UPDATEs must equal the pattern pixel for pixel; a second client draws again; a driver reload
# (rmmod/insmod virtio-gpu) and a third pattern; SIGTERM.
# guest-host-binaries: /opt/loopbackd-peers/vhost-user-gpu
. /tests/lib.sh
have_loopbackd
VUG=/opt/loopbackd-peers/vhost-user-gpu
[ -x $VUG ] || fail "no $VUG in the image (scripts/install-deps.sh unpacks it on the host)"
[ -x /bin/gputool ] || fail "no gputool in the image (Tests/guest/setup.sh builds it)"
[ -f /lib/modules/virtio-gpu.ko ] || fail "no virtio-gpu.ko in the image (run.sh stages it)"
for m in drm drm_kms_helper drm_shmem_helper virtio_dma_buf; do
  [ -f /lib/modules/$m.ko ] && { grep -q "^$m " /proc/modules || insmod /lib/modules/$m.ko || fail "insmod $m"; }
done
insmod /lib/modules/virtio-gpu.ko || fail "insmod virtio-gpu"
# mmap_ram_only=0: the 7.2 back-end's libvhost-user maps every memory region from file offset 0 up to its end
# (mmap(0, mmap_offset + size, ..., fd, 0); later QEMU maps at the region's offset), so through the module's node it
# maps physical 0 up to the end of RAM, the legacy hole below 1 MiB included, which the module refuses by default
# ("region mmap error: Operation not permitted"). A back-end that maps at the offset (rust-vmm's) needs no change.
load_lo mmap_ram_only=0
ls /dev/dri/renderD* >/dev/null 2>&1 && fail "a render node exists before the back-end starts: $(ls /dev/dri)"
export XDG_RUNTIME_DIR=/tmp
bg_start /tmp/vug.log $VUG --socket-path /tmp/gpu.sock
VUGPID=$BGPID
wait_for 10 test -S /tmp/gpu.sock || fail "vhost-user-gpu: no socket: $(cat /tmp/vug.log | tr '\n' '|')"
W=800 H=600
write_conf
cat >> /etc/loopbackd.conf <<CONF

[device.gpu0]
type = "gpu"
backend = "vhost-user:/tmp/gpu.sock"
mode = "${W}x${H}"
output = "file:/tmp/gpu"
file-interval-ms = 50
CONF
loopbackd_start
card() { for c in /sys/class/drm/card[0-9]*; do case "$(readlink -f "$c")" in */virtio-lo/drm/card[0-9]*) [ -c "/dev/dri/${c##*/}" ] && { echo "/dev/dri/${c##*/}"; return 0; };; esac; done; return 1; }
wait_for 30 card || lb_fail "no DRM card of a virtio device: $(ls -l /sys/class/drm/ 2>&1 | tr '\n' '|') $(dmesg | grep -iE 'virtio|drm' | tail -3 | tr '\n' '|') -- vug: $(tail -3 /tmp/vug.log | tr '\n' '|')"
CARD=$(card)
wait_for 10 test -c "$CARD" || fail "$CARD not created"
# display info comes from loopbackd's GET_DISPLAY_INFO answer, through the back-end (7.2 has no GET_EDID)
wait_for 10 sh -c "gputool modes $CARD | grep -q 'connected ${W}x${H}'" || lb_fail "connector: $(gputool modes $CARD 2>&1 | tr '\n' '|')"
info "$CARD $(gputool modes $CARD | head -1)"
GPU_PPM=/tmp/gpu-0.ppm
vug_tail() { echo "vug: $(tail -3 /tmp/vug.log | tr '\n' '|')"; }
GPU_DIAG=vug_tail
gpu_draw 1 100 50
# the cursor gputool set (the driver's cursor plane: UPDATE_CURSOR on the cursor queue) came back as CURSOR_UPDATE
wait_for 10 grep -q "scanout 0 cursor image set" /tmp/loopbackd.log || lb_fail "no CURSOR_UPDATE from the back-end"
info "cursor: $(grep -o 'scanout 0 cursor image set.*' /tmp/loopbackd.log | head -1)"
gpu_undraw
gpu_draw 2
gpu_undraw
kill -0 $VUGPID 2>/dev/null || lb_fail "vhost-user-gpu died: $(tail -5 /tmp/vug.log | tr '\n' '|')"
# driver reload (a virtio reset): the same back-end keeps its display socket (7.2 ignores a second SET_SOCKET),
# the new driver gets the configured mode again and draws
no_card() { ! card; }
rmmod virtio-gpu 2>/dev/null || rmmod virtio_gpu || fail "rmmod virtio-gpu"
wait_for 10 no_card || fail "card still there after rmmod"
insmod /lib/modules/virtio-gpu.ko || fail "insmod virtio-gpu again"
wait_for 30 card || lb_fail "no DRM card after the reload"
CARD=$(card)
wait_for 10 sh -c "gputool modes $CARD | grep -q 'connected ${W}x${H}'" || lb_fail "connector after reload: $(gputool modes $CARD 2>&1 | tr '\n' '|')"
gpu_draw 3
gpu_undraw
kill -0 $VUGPID 2>/dev/null || lb_fail "vhost-user-gpu died: $(tail -5 /tmp/vug.log | tr '\n' '|')"
grep -q "closing the display connection" /tmp/loopbackd.log && lb_fail "display connection closed"
loopbackd_stop TERM
kill $VUGPID 2>/dev/null
pass
