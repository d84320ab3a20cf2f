# virtio-snd with ALSA hardware endpoints: loopbackd's playback stream is hw:0,0 and its capture stream hw:0,0
# of snd-aloop (card 0, the Loopback cable), through the kernel's PCM ioctls (no alsa-lib). Playback: the guest
# plays a pattern through virtio_snd (card 1) while sndtool captures the cable's other end (hw:0,1): the samples
# come out equal after the leading silence. Capture: sndtool plays into hw:0,1 while the guest captures through
# virtio_snd: equal likewise. Then a busy blk device next to the stream: the guest plays through virtio_snd ->
# loopbackd -> hw:0,0 for STREAM_S seconds while 4 jobs of O_DIRECT 4 KiB random reads keep disk0 (a blk device of
# the same loopbackd, on the same event loop) busy; the player's xruns (EPIPE from WRITEI) and loopbackd's
# (`ctl stats` sound-xruns: the stream ran out of the driver's buffers, or the card underran) must both be 0.
# The margin, honestly: the player keeps 8 periods of 512 frames queued (85 ms at 48 kHz); loopbackd keeps the
# card about two periods (21 ms) ahead, so a stall of loopbackd's loop (or of the TCG vCPU it runs on) longer than
# that underruns the card, and a stall of the guest's player longer than 85 ms underruns virtio_snd. (Measured
# here: 0 xruns also at 256 x 4; at 64 x 2 frames both sides count xruns, so the check can fail.)
. /tests/lib.sh
have_loopbackd
[ -x /bin/sndtool ] || fail "no sndtool in the image (Tests/guest/setup.sh builds it)"
[ -f /lib/modules/virtio_snd.ko ] || fail "no virtio_snd.ko in the image (Tests/guest/setup.sh builds it for 6.1)"
[ -f /lib/modules/snd-aloop.ko ] || fail "no snd-aloop.ko in the image"
for m in soundcore snd snd-timer snd-pcm; do
  [ -f /lib/modules/$m.ko ] && { insmod /lib/modules/$m.ko || fail "insmod $m"; }
done
insmod /lib/modules/snd-aloop.ko index=0 pcm_substreams=2 || fail "insmod snd-aloop"
wait_for 5 test -c /dev/snd/pcmC0D0p || fail "no Loopback card"
insmod /lib/modules/virtio_snd.ko || fail "insmod virtio_snd"
load_lo
RATE=48000 CH=2 PERIOD=1024 PERIODS=16 FRAME=4
PLAY_BYTES=192000
sndtool pattern $PLAY_BYTES 3 /tmp/play.raw || fail "sndtool pattern"
write_conf
echo 'control = "/tmp/lb-ctl.sock"' >> /etc/loopbackd.conf
cat >> /etc/loopbackd.conf <<CONF

[device.disk0]
type = "blk"
path = "/tmp/disk0.img"
create-mib = 64

[device.snd0]
type = "sound"
playback = "hw:0,0"
capture = "hw:0,0"
CONF
loopbackd_start
pcms() { [ -c /dev/snd/pcmC1D0p ] && [ -c /dev/snd/pcmC1D0c ]; }
wait_for 20 test -b /dev/vda || lb_fail "no /dev/vda"
wait_for 20 pcms || lb_fail "no /dev/snd/pcmC1D0p and pcmC1D0c: $(ls /dev/snd 2>&1 | tr '\n' ' ')"
info "cards: $(cat /proc/asound/cards 2>/dev/null | grep '^ *[0-9]' | tr '\n' ' ')"

# playback: virtio_snd -> loopbackd -> hw:0,0 playback == hw:0,1 capture
BYTES=$((RATE * 4 * 5 / 2))
sndtool capture /dev/snd/pcmC0D1c $RATE $CH $PERIOD $PERIODS $BYTES /tmp/cable.out > /tmp/cable.log 2>&1 &
cpid=$!
usleep 300000
out=$(sndtool play /dev/snd/pcmC1D0p $RATE $CH $PERIOD $PERIODS /tmp/play.raw $((PERIOD * PERIODS * 4)) 2>&1) || lb_fail "play: $out"
info "virtio playback: $out"
wait $cpid || lb_fail "cable capture: $(cat /tmp/cable.log)"
info "cable: $(cat /tmp/cable.log)"
out=$(sndtool align /tmp/cable.out /tmp/play.raw $FRAME 2>&1) || lb_fail "playback through hw:0,0: $out"
info "playback through hw:0,0: $out"

# capture: hw:0,1 playback == hw:0,0 capture -> loopbackd -> virtio_snd
sndtool capture /dev/snd/pcmC1D0c $RATE $CH $PERIOD $PERIODS $BYTES /tmp/virtio.out > /tmp/virtio.log 2>&1 &
cpid=$!
usleep 300000
out=$(sndtool play /dev/snd/pcmC0D1p $RATE $CH $PERIOD $PERIODS /tmp/play.raw $((PERIOD * PERIODS * 4)) 2>&1) || lb_fail "cable play: $out"
info "cable playback: $out"
wait $cpid || lb_fail "virtio capture: $(cat /tmp/virtio.log)"
info "virtio capture: $(cat /tmp/virtio.log)"
out=$(sndtool align /tmp/virtio.out /tmp/play.raw $FRAME 2>&1) || lb_fail "capture through hw:0,0: $out"
info "capture through hw:0,0: $out"

# underruns next to a busy blk device
STREAM_S=6 SPERIOD=512 SPERIODS=8
sound_xruns() { loopbackd ctl -c /etc/loopbackd.conf stats 2>&1 | sed -n 's/^snd0 .*sound-xruns=\([0-9]*\).*/\1/p'; }
x0=$(sound_xruns)
[ -n "$x0" ] || lb_fail "no sound-xruns in ctl stats: $(loopbackd ctl -c /etc/loopbackd.conf stats 2>&1 | tr '\n' '|')"
odirect randread /dev/vda $((STREAM_S + 1)) 4 > /tmp/rr.log 2>&1 &
rpid=$!
usleep 300000
out=$(sndtool stream /dev/snd/pcmC1D0p $RATE $CH $SPERIOD $SPERIODS $STREAM_S 2>&1) || lb_fail "stream: $out"
wait $rpid || lb_fail "randread: $(cat /tmp/rr.log)"
x1=$(sound_xruns)
reads=$(sed -n 's/^randread \([0-9]*\) reads.*/\1/p' /tmp/rr.log)
pxr=$(echo "$out" | sed -n 's/.*xruns \([0-9]*\),.*/\1/p')
info "stream next to busy blk: $out; $(cat /tmp/rr.log); loopbackd sound-xruns $x0 -> $x1"
[ "${reads:-0}" -ge 1000 ] || lb_fail "the blk device was not busy: $(cat /tmp/rr.log)"
[ "$pxr" = 0 ] || lb_fail "player xruns next to a busy blk device: $out"
[ "$x1" = "$x0" ] || lb_fail "loopbackd counted $((x1 - x0)) xruns next to a busy blk device"

loopbackd_stop TERM
info "loopbackd log: $(grep -iE 'sound|hw:' /tmp/loopbackd.log | tr '\n' '|')"
grep -iE 'error' /tmp/loopbackd.log && fail "loopbackd logged an error"
pass
