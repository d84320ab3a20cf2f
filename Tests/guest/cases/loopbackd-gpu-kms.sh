# guest-qemu: -device bochs-display,xres=1024,yres=768
# virtio-gpu through the module, presented on a real DRM/KMS display with `output = "kms:…"`: QEMU gives the guest a
# bochs-display (the guest's bochs DRM driver: /dev/dri/card0, connector Virtual-1, preferred mode 1024x768), the
# "host" display loopbackd drives as DRM master; the virtio-gpu card the module's device gives comes second.
# loopbackd serves a gpu with one 1024x768 scanout and output "kms:/dev/dri/card0:Virtual-1+file:/tmp/lb/gpu" (the
# same scanout on the bochs display and in /tmp/lb/gpu-0.ppm). gputool draws pattern(SEED) into the virtio-gpu card
# (XRGB8888 dumb buffer = virtio-gpu B8G8R8X8, copied row by row into bochs' XRGB8888 buffers); the host takes
# QEMU's QMP screendump of the bochs display (tools/screendump.py: the surface as 8-bit RGB) and it must equal the
# pattern pixel for pixel, as must the PPM of the file output. Then a second pattern (a new client: SET_SCANOUT
# again, page flips), hot-unplug of the scanout (`ctl … scanout 0 off`: the display goes black), replug and a third
# pattern, SIGTERM (loopbackd drops master; fbcon takes bochs back); a restart with a 1000x700 scanout, which the
# connector does not offer: its preferred 1024x768, the pattern centred at (12, 34), black around it; last, a second
# loopbackd whose kms output is the first one's virtio-gpu card (a driver with a cursor plane): picture and cursor. loopbackd runs as an unprivileged user after
# start-up ([daemon] user; the card node stays root-only 0600): the card is opened, and master taken, before the drop.
. /tests/lib.sh
have_loopbackd
[ -x /bin/gputool ] || fail "no gputool in the image (Tests/guest/setup.sh builds it)"
for m in drm drm_kms_helper ttm drm_ttm_helper drm_vram_helper bochs drm_shmem_helper virtio_dma_buf virtio-gpu; do
  [ -f /lib/modules/$m.ko ] || { case $m in bochs|virtio-gpu) fail "no $m.ko in the image (run.sh stages it)";; esac; continue; }
  grep -q "^$(echo $m | tr - _) " /proc/modules || insmod /lib/modules/$m.ko || fail "insmod $m"
done
# the answers of the host's screendump checker come on ttyS1 (opened now: the UART drops what came while closed)
stty -F /dev/ttyS1 raw -echo 2>/dev/null
exec 3< /dev/ttyS1 || fail "no /dev/ttyS1"
screendump() { # TAG W H SEED|black: the host's verdict on QEMU's screendump of the bochs display
  echo "GUEST-SCREENDUMP $*"
  while read -r -t 60 l <&3; do
    case "$l" in "SCREENDUMP $1 PASS"*) info "$l"; return 0;; "SCREENDUMP $1 "*) lb_fail "$l";; esac
  done
  lb_fail "screendump $1: no answer from the host on ttyS1"
}
bochs() { for c in /sys/class/drm/card[0-9]*; do case "$(readlink -f "$c/device/driver")" in */bochs*) [ -c "/dev/dri/${c##*/}" ] && { echo "/dev/dri/${c##*/}"; return 0; };; esac; done; return 1; }
wait_for 20 bochs || fail "no bochs DRM card: $(ls -l /sys/class/drm/ 2>&1 | tr '\n' '|') $(dmesg | grep -iE 'bochs|drm' | tail -3 | tr '\n' '|')"
BOCHS=$(bochs)
info "bochs: $BOCHS $(gputool modes $BOCHS | head -1 | cut -c1-80)"
load_lo
W=1024 H=768
# the unprivileged account (the initramfs has none) and its directory for the file output
echo 'root:x:0:0:root:/:/bin/sh' >> /etc/passwd
echo 'lbuser:x:1000:1000:loopbackd:/nonexistent:/bin/false' >> /etc/passwd
echo 'lbuser:x:1000:' >> /etc/group
mkdir -p /tmp/lb && chown 1000:1000 /tmp/lb
chown 0:0 "$BOCHS" && chmod 600 "$BOCHS"
write_conf
cat >> /etc/loopbackd.conf <<CONF
control = "/tmp/ctl.sock"
user = "lbuser"

[device.gpu0]
type = "gpu"
mode = "${W}x${H}"
output = "kms:$BOCHS:Virtual-1+file:/tmp/lb/gpu"
file-interval-ms = 50
CONF
loopbackd_start
wait_for 20 grep -q "kms:$BOCHS: connector Virtual-1, mode ${W}x${H}" /tmp/loopbackd.log || lb_fail "kms output not up"
info "$(grep -o "kms:$BOCHS: connector.*" /tmp/loopbackd.log | head -1)"
wait_for 10 grep -q "running as lbuser" /tmp/loopbackd.log || lb_fail "no privilege drop"
# loopbackd shows black until the driver shows something (fbcon of the virtio card may come first)
card() { for c in /sys/class/drm/card[0-9]*; do case "$(readlink -f "$c")" in */virtio-lo/drm/card[0-9]*) [ -c "/dev/dri/${c##*/}" ] && { echo "/dev/dri/${c##*/}"; return 0; };; esac; done; return 1; }
wait_for 30 card || lb_fail "no DRM card of the virtio device: $(ls -l /sys/class/drm/ 2>&1 | tr '\n' '|')"
CARD=$(card)
wait_for 10 sh -c "gputool modes $CARD | grep -q 'connected ${W}x${H}'" || lb_fail "connector: $(gputool modes $CARD 2>&1 | tr '\n' '|')"
info "virtio-gpu: $CARD"
GPU_PPM=/tmp/lb/gpu-0.ppm
draw() { gpu_draw "$@"; screendump p$1 $W $H $1; }   # on screen; the PPM (lib.sh) and QEMU's screendump equal it
draw 1 100 50
info "$(loopbackd ctl --socket /tmp/ctl.sock device gpu0 snapshot 2>&1 | tr '\n' ' ')"
gpu_undraw
draw 2
# hot-unplug: the scanout shows nothing, the display goes black; back, and a third pattern
out=$(loopbackd ctl --socket /tmp/ctl.sock device gpu0 scanout 0 off 2>&1) || lb_fail "ctl scanout off: $out"
screendump off $W $H black
out=$(loopbackd ctl --socket /tmp/ctl.sock device gpu0 scanout 0 on 2>&1) || lb_fail "ctl scanout on: $out"
gpu_undraw
wait_for 10 sh -c "gputool modes $CARD | grep -q 'connected ${W}x${H}'" || lb_fail "replug: $(gputool modes $CARD 2>&1 | tr '\n' '|')"
draw 3
info "$(loopbackd ctl --socket /tmp/ctl.sock device gpu0 snapshot 2>&1 | tr '\n' ' ')"
gpu_undraw
grep -q "further failures" /tmp/loopbackd.log && lb_fail "a kms call failed: $(grep 'kms' /tmp/loopbackd.log | tail -3 | tr '\n' '|')"
loopbackd_stop TERM
wait_for 20 sh -c '! card' || fail "virtio card still there after SIGTERM"
# a scanout size the bochs connector does not offer (1000x700): its preferred 1024x768, the picture centred at
# (12, 34) with a black border; the card is taken again after fbcon had it back
sed -i "s/^mode = .*/mode = \"1000x700\"/" /etc/loopbackd.conf
loopbackd_start
wait_for 20 grep -q "kms:$BOCHS: connector Virtual-1, mode 1024x768.*no 1000x700" /tmp/loopbackd.log || lb_fail "kms output (1000x700) not up"
wait_for 30 card || lb_fail "no DRM card of the virtio device after the restart"
CARD=$(card)
W=1000 H=700
wait_for 10 sh -c "gputool modes $CARD | grep -q 'connected ${W}x${H}'" || lb_fail "connector: $(gputool modes $CARD 2>&1 | tr '\n' '|')"
bg_start /tmp/draw4.log gputool draw "$CARD" 4 600
DRAW=$BGPID
wait_for 20 grep -q READY /tmp/draw4.log || lb_fail "draw 4: $(cat /tmp/draw4.log | tr '\n' '|')"
wait_for 10 gputool check /tmp/lb/gpu-0.ppm $W $H 4 || lb_fail "draw 4: file output: $(gputool check /tmp/lb/gpu-0.ppm $W $H 4 2>&1)"
screendump p4 1024 768 4 $W $H 12 34
gpu_undraw
# a driver with a cursor plane: a second loopbackd (B, as root) serves gpu1 (640x480) with its kms output on the
# virtio-gpu card of the first (card1, whose connector offers only the EDID's 1000x700: B centres its picture at
# (180, 110)); B's own virtio card is a third. gputool's pattern and cursor on it reach B, B's kms output flips them
# onto card1 and sets the cursor there (CURSOR2: the virtio-gpu driver's cursor plane); the first loopbackd hears
# the cursor (UPDATE_CURSOR at 110 + 180, 70 + 110) and shows card1's picture on bochs at (12, 34): the pattern at
# (192, 144), black around.
cat > /etc/b.conf <<CONF
[daemon]
transport = "virtio-lo"
device-node = "/dev/virtio-lo"
control = "/tmp/ctl2.sock"
$( [ -s /tests/seccomp ] && echo "seccomp = \"$(cat /tests/seccomp)\"" )

[device.gpu1]
type = "gpu"
mode = "640x480"
output = "kms:$CARD"
CONF
loopbackd -c /etc/b.conf > /tmp/b.log 2>&1 &
BPID=$!
wait_for 20 grep -q "kms:$CARD: connector Virtual-[0-9]*, mode 1000x700.*no 640x480" /tmp/b.log || fail "B: kms on $CARD not up: $(grep -v seccomp /tmp/b.log | head -5 | tr '\n' '|')"
card2() { for c in /sys/class/drm/card[0-9]*; do [ "/dev/dri/${c##*/}" = "$CARD" ] && continue; case "$(readlink -f "$c")" in */virtio-lo/drm/card[0-9]*) [ -c "/dev/dri/${c##*/}" ] && { echo "/dev/dri/${c##*/}"; return 0; };; esac; done; return 1; }
wait_for 30 card2 || fail "B: no second virtio DRM card: $(ls /sys/class/drm | tr '\n' ' ')"
CARD2=$(card2)
wait_for 10 sh -c "gputool modes $CARD2 | grep -q 'connected 640x480'" || fail "B: connector: $(gputool modes $CARD2 2>&1 | tr '\n' '|')"
bg_start /tmp/draw5.log gputool draw "$CARD2" 5 600 100 50
DRAW=$BGPID
wait_for 20 grep -q READY /tmp/draw5.log || fail "draw 5: $(cat /tmp/draw5.log | tr '\n' '|')"
screendump p5 1024 768 5 640 480 192 144
a_cursor() { loopbackd ctl --socket /tmp/ctl.sock device gpu0 info 2>/dev/null | grep -q "^scanout 0 .* cursor=[1-9][0-9]*@290,180 "; }
wait_for 10 a_cursor || fail "cursor through B's kms output: $(loopbackd ctl --socket /tmp/ctl.sock device gpu0 info 2>&1 | grep -o 'cursor=[^ ]*'); B: $(loopbackd ctl --socket /tmp/ctl2.sock device gpu1 snapshot 2>&1)"
info "cursor at 110,70 on B's card is at 290,180 on the first loopbackd's scanout: $(loopbackd ctl --socket /tmp/ctl.sock device gpu0 info | grep -o 'cursor=[^ ]*')"
info "B: $(loopbackd ctl --socket /tmp/ctl2.sock device gpu1 snapshot 2>&1)"
grep -q "takes no cursor" /tmp/b.log && fail "B: no cursor on virtio-gpu: $(grep cursor /tmp/b.log)"
gpu_undraw
kill -TERM $BPID; wait $BPID
loopbackd_stop TERM
pass
