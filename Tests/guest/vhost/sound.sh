# vhost-user-snd-pci (QEMU 10.0.2 from bookworm-backports, unpacked by setup.sh; QEMU 7.2 has no sound front-end)
# backed by loopbackd's snd0 on the host: playback into a WAV file, capture from a WAV file. The kernel's
# virtio_snd binds over virtio-pci; the guest plays 1 s of a pattern (the host checks the WAV byte for byte after
# QEMU exits: GUEST-HOSTCHECK snd-wav), and captures the source file's 0.5 s byte-exact, each at least as long as
# the data lasts (completions on loopbackd's stream clock).
. /tests/lib.sh
[ -x /bin/sndtool ] || fail "no sndtool in the image (Tests/guest/setup.sh builds it)"
[ -f /lib/modules/virtio_snd.ko ] || fail "no virtio_snd.ko in the image (Tests/guest/setup.sh builds it for 6.1)"
for m in soundcore snd snd-timer snd-pcm; do
  [ -f /lib/modules/$m.ko ] && { insmod /lib/modules/$m.ko || fail "insmod $m"; }
done
insmod /lib/modules/virtio_snd.ko || fail "insmod virtio_snd"
pcms() { [ -c /dev/snd/pcmC0D0p ] && [ -c /dev/snd/pcmC0D0c ]; }
wait_for 20 pcms || fail "no /dev/snd/pcmC0D0p and pcmC0D0c: $(ls /dev/snd 2>&1 | tr '\n' ' ') $(dmesg | grep -i virtio | tail -3 | tr '\n' '|')"
info "card: $(head -1 /proc/asound/cards)"
RATE=48000 CH=2
sndtool pattern 192000 1 /tmp/play.raw || fail "sndtool pattern"
sndtool pattern 96000 2 /tmp/cap.raw || fail "sndtool pattern"
out=$(sndtool play /dev/snd/pcmC0D0p $RATE $CH 1024 16 /tmp/play.raw 65536 2>&1) || fail "play: $out"
info "$out"
ms=$(echo "$out" | sed -n 's/.* in \([0-9]*\) ms/\1/p')
min=$(( $(echo "$out" | sed -n 's/played \([0-9]*\) bytes.*/\1/p') / 192 ))
[ -n "$ms" ] && [ "$ms" -ge "$min" ] || fail "playback finished in ${ms} ms, before the data's duration ($min ms)"
out=$(sndtool capture /dev/snd/pcmC0D0c $RATE $CH 480 16 103680 /tmp/cap.out 2>&1) || fail "capture: $out"
info "$out"
out=$(sndtool checkcap /tmp/cap.out /tmp/cap.raw 2>&1) || fail "capture data: $out"
info "$out"
echo "GUEST-HOSTCHECK snd-wav 192000 1 0"
pass
