# SIGKILL of loopbackd while the guest plays through virtio_snd (through the module): the card goes away, the
# player gets an error and exits, nothing freezes. virtio_snd resubmits every completed I/O message from its
# completion callback; the module's failing mode used to fail the resubmitted message inside that same callback
# loop (interrupts off), which never ended: the 6.1 guest froze (this case timed out on 6.1 before the fix).
. /tests/lib.sh
have_loopbackd
[ -x /bin/sndtool ] || fail "no sndtool in the image (Tests/guest/setup.sh builds it)"
[ -f /lib/modules/virtio_snd.ko ] || fail "no virtio_snd.ko in the image (Tests/guest/setup.sh builds it for 6.1)"
for m in soundcore snd snd-timer snd-pcm; do
  [ -f /lib/modules/$m.ko ] && { insmod /lib/modules/$m.ko || fail "insmod $m"; }
done
insmod /lib/modules/virtio_snd.ko || fail "insmod virtio_snd"
load_lo
# 16 periods of 21 ms: a TCG guest stalls for tens of ms at times, and a driver that queues only what the
# application wrote (6.12) underruns when it stalls longer than the buffer
RATE=48000 CH=2 PERIOD=1024 PERIODS=16
SILENCE=$((PERIOD * PERIODS * 4))
# the capture stream offers only the source file's format (S16 stereo 48 kHz), so Linux allows at most 160 ms of
# buffer: 16 periods of 10 ms
CAP_PERIOD=480 CAP_PERIODS=16
# 1 s of S16 stereo to play; 0.5 s in the capture source
PLAY_BYTES=192000 CAP_BYTES=96000
sndtool pattern $PLAY_BYTES 1 /tmp/play.raw || fail "sndtool pattern"
sndtool pattern $CAP_BYTES 2 /tmp/cap.raw || fail "sndtool pattern"
sndtool mkwav $RATE $CH $CAP_BYTES 2 /tmp/in.wav || fail "sndtool mkwav"
write_conf
cat >> /etc/loopbackd.conf <<CONF

[device.snd0]
type = "sound"
playback = "wav:/tmp/out.wav"
capture = "wav:/tmp/in.wav"
CONF
loopbackd_start
pcms() { [ -c /dev/snd/pcmC0D0p ] && [ -c /dev/snd/pcmC0D0c ]; }
no_pcms() { ! test -e /dev/snd/pcmC0D0p; }
wait_for 20 pcms || lb_fail "no /dev/snd/pcmC0D0p and pcmC0D0c: $(ls /dev/snd 2>&1 | tr '\n' ' ') $(dmesg | grep -i virtio_snd | tail -3 | tr '\n' '|')"
info "card: $(cat /proc/asound/cards 2>/dev/null | head -2 | tr '\n' ' ')"

# 5 s of pattern; SIGKILL 0.7 s in
sndtool pattern 960000 1 /tmp/long.raw || fail "pattern"
( sndtool play /dev/snd/pcmC0D0p $RATE $CH $PERIOD $PERIODS /tmp/long.raw 0 > /tmp/p.out 2>&1; echo "rc=$?" >> /tmp/p.out ) & P=$!
usleep 700000
kill -9 "$LBPID"; wait "$LBPID" 2>/dev/null; LBPID=
info "killed during play"
i=0; while kill -0 $P 2>/dev/null && [ $i -lt 150 ]; do usleep 100000; i=$((i+1)); done
kill -0 $P 2>/dev/null && fail "player still running 15 s after SIGKILL: $(cat /tmp/p.out | tr '\n' '|')"
info "player: $(tail -2 /tmp/p.out | tr '\n' '|')"
wait_for 10 no_pcms || fail "pcm nodes still there after SIGKILL"
no_d_state || fail "task in D state after SIGKILL"
pass
