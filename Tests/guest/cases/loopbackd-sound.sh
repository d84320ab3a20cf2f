# virtio-snd through the module with the kernel's own virtio_snd driver (a module in 6.12, built out of tree for
# 6.1 by setup.sh). loopbackd serves one playback stream into a WAV file and one capture stream from a WAV file.
# The guest plays a known pattern through /dev/snd/pcmC0D0p with the PCM ioctls (sndtool, static) and the WAV
# loopbackd wrote holds exactly those bytes (then only the silence played after them); playing takes at least
# the data's duration (buffers complete on the stream clock, not on arrival). It captures from pcmC0D0c and gets
# exactly the source file's samples. Then a driver reload, a second playback (appended to the same WAV), SIGKILL
# and a restart (a new WAV), SIGTERM with a valid WAV header, and a SIGKILL while the guest plays.
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

# play RAW, then one buffer of silence; the WAV must hold RAW then zeros only
play() { # $1 = tag
  out=$(sndtool play /dev/snd/pcmC0D0p $RATE $CH $PERIOD $PERIODS /tmp/play.raw $SILENCE 2>&1) ||
    lb_fail "$1: play: $out"
  info "$1: $out"
  ms=$(echo "$out" | sed -n 's/.* in \([0-9]*\) ms/\1/p')
  # what was played (data + silence, whole periods) at 192 bytes per ms: the drain cannot end before that
  min=$(( $(echo "$out" | sed -n 's/played \([0-9]*\) bytes.*/\1/p') / 192 ))
  [ -n "$ms" ] && [ "$ms" -ge "$min" ] || lb_fail "$1: playback finished in ${ms} ms, before the data's duration ($min ms)"
}
play first
wait_for 5 test -s /tmp/out.wav || lb_fail "no /tmp/out.wav"
# the header is fixed up at STOP/RELEASE (the drain ends with both)
out=$(sndtool checkwav /tmp/out.wav $RATE $CH /tmp/play.raw 2>&1) || lb_fail "WAV sink: $out"
info "WAV sink: $out"

cap() { # $1 = tag
  out=$(sndtool capture /dev/snd/pcmC0D0c $RATE $CH $CAP_PERIOD $CAP_PERIODS $((CAP_BYTES + 7680)) /tmp/cap.out 2>&1) ||
    lb_fail "$1: capture: $out | $(dmesg | grep -iE 'virtio|snd' | tail -3 | tr '\n' '|')"
  info "$1: $out"
  ms=$(echo "$out" | sed -n 's/.* in \([0-9]*\) ms/\1/p')
  [ -n "$ms" ] && [ "$ms" -ge 520 ] || lb_fail "$1: capture of 0.54 s finished in ${ms} ms"
  out=$(sndtool checkcap /tmp/cap.out /tmp/cap.raw 2>&1) || lb_fail "$1: capture data: $out"
  info "$1: $out"
}
cap first

# driver reload: the card goes and comes back; a second session with the same parameters appends to the WAV
rmmod virtio_snd || fail "rmmod virtio_snd"
wait_for 10 no_pcms || fail "pcm nodes still there after rmmod"
insmod /lib/modules/virtio_snd.ko || fail "insmod virtio_snd again"
wait_for 20 pcms || lb_fail "no pcm nodes after the driver reload"
play reload
out=$(sndtool checkwav /tmp/out.wav $RATE $CH /tmp/play.raw /tmp/play.raw 2>&1) || lb_fail "reload: WAV with both sessions: $out"
info "WAV after the reload: $out"
cap reload

# SIGKILL (no stream open): the card goes away, a restarted loopbackd brings it back and its first PREPARE starts
# a new WAV. (SIGKILL while the guest plays: the last step.)
kill -9 "$LBPID"; wait "$LBPID" 2>/dev/null; LBPID=
wait_for 10 no_pcms || fail "pcm nodes still there after SIGKILL"
no_d_state || fail "task in D state after SIGKILL"
loopbackd_start
wait_for 20 pcms || lb_fail "no pcm nodes after the restart"
play restart
out=$(sndtool checkwav /tmp/out.wav $RATE $CH /tmp/play.raw 2>&1) || lb_fail "restart: WAV: $out"
info "WAV after SIGKILL + restart: $out"
cap restart

loopbackd_stop TERM
wait_for 10 no_pcms || fail "pcm nodes still there after SIGTERM"
# the WAV is still valid after exit (header sizes match the file)
out=$(sndtool checkwav /tmp/out.wav $RATE $CH /tmp/play.raw 2>&1) || fail "WAV after SIGTERM: $out"
grep -iE 'warning|error' /tmp/loopbackd.log && fail "loopbackd logged a warning or error"

# SIGKILL while the guest plays (5 s of pattern, killed 0.7 s in): the card goes, the player gets an error and exits,
# nothing freezes. virtio_snd resubmits every completed message from its completion callback; the module's failing
# mode used to fail the resubmission inside that same callback loop, interrupts off, for ever (6.1 froze).
loopbackd_start
wait_for 20 pcms || lb_fail "no pcm nodes after the second restart"
sndtool pattern 960000 1 /tmp/long.raw || fail "sndtool pattern"
( sndtool play /dev/snd/pcmC0D0p $RATE $CH $PERIOD $PERIODS /tmp/long.raw 0 > /tmp/p.out 2>&1; echo "rc=$?" >> /tmp/p.out ) & P=$!
usleep 700000
kill -9 "$LBPID"; wait "$LBPID" 2>/dev/null; LBPID=
i=0; while kill -0 $P 2>/dev/null && [ $i -lt 150 ]; do usleep 100000; i=$((i+1)); done
kill -0 $P 2>/dev/null && fail "player still running 15 s after SIGKILL: $(tr '\n' '|' < /tmp/p.out)"
info "SIGKILL while playing: player $(tail -2 /tmp/p.out | tr '\n' '|')"
wait_for 10 no_pcms || fail "pcm nodes still there after SIGKILL while playing"
no_d_state || fail "task in D state after SIGKILL while playing"
pass
