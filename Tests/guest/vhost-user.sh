#!/usr/bin/env bash
# vhost-user end-to-end tests: QEMU is the vhost-user FRONT-END (vhost-user-rng-pci, vhost-user-blk-pci; the i2c
# case adds vhost-user-i2c-pci, the gpio case vhost-user-gpio-pci, the input case vhost-user-input-pci on QEMU 10,
# the gpu case vhost-user-gpu-pci on QEMU 10 with its display modules (QMP screendumps compared on the host),
# the vsock case vhost-user-vsock-pci with the host ends of its connections run by this script),
# loopbackd on the host is the BACK-END
# (transport "none", every device served on a Unix socket), and the guest is Debian's kernel with its own
# virtio_pci, virtio-rng, virtio_blk, virtio_input and (built by setup.sh) i2c-virtio and gpio-virtio drivers.
#
#   Tests/guest/vhost-user.sh [CASE]...     CASE = a file name in Tests/guest/vhost/ without .sh (default: all)
#
# One loopbackd runs for the whole suite; every case boots its own QEMU (TCG) against it, so each case after the
# first also tests that loopbackd takes the next front-end after the previous one disconnected.  A case prints
# "GUEST-TEST vhost-<case> PASS|FAIL"; "GUEST-HOSTCHECK disk-pattern OFF SIZE SEED" lines are checked against the
# host image after QEMU exited.  Case "reboot" runs QEMU without -no-reboot and must boot exactly twice.
# After the last case loopbackd gets SIGTERM and must exit 0 within 1 s with no error/warning in its log.
#
# Environment:
#   GUEST_KERNEL    6.1 (default) | 6.12: the kernel prepared by `setup.sh KERNEL`
#   GUEST_CACHE     cache dir made by setup.sh (default <repo>/.build-guest)
#   LOOPBACKD       loopbackd binary run on the host (default <repo>/.build/release/loopbackd)
#   VHOST_TIMEOUT   per-case QEMU timeout in seconds (default 90)
#   VHOST_LOG_LEVEL loopbackd log level (default debug: every vhost-user message is logged)
#   GUEST_KEEP=1    keep the work dir (console logs, loopbackd log, image)
#   VHOST_VERBOSE=1 print each case's guest kernel messages
# Output: one line per case, then exactly "N passed, N failed" (the loopbackd shutdown check counts as a test).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${GUEST_CACHE:-$repo/.build-guest}
loopbackd=${LOOPBACKD:-$repo/.build/release/loopbackd}
timeout_s=${VHOST_TIMEOUT:-90}
loglevel=${VHOST_LOG_LEVEL:-debug}
disk_mib=32

gk=${GUEST_KERNEL:-6.1}
. "$repo/scripts/image-lib.sh"
IMG_CACHE=$cache IMG_LOG_PREFIX=vhost-user.sh
[ -f "$cache/kver-$gk" ] && [ -x "$cache/odirect" ] || { echo "vhost-user.sh: run Tests/guest/setup.sh $gk first" >&2; exit 2; }
kver=$(cat "$cache/kver-$gk")
vmlinux=$cache/vmlinux-$kver
[ -s "$vmlinux" ] || { echo "vhost-user.sh: no $vmlinux; run Tests/guest/setup.sh $gk" >&2; exit 2; }
[ -x "$loopbackd" ] || { echo "vhost-user.sh: no loopbackd at $loopbackd (swift build -c release --product loopbackd)" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "vhost-user.sh: qemu-system-x86_64 missing" >&2; exit 2; }
echo "kernel $kver"

# ---- select cases
sel=("$@"); [ ${#sel[@]} -eq 0 ] && sel=(all)
cases=()
for s in "${sel[@]}"; do
  case "$s" in
    all) for f in "$here"/vhost/*.sh; do cases+=("$(basename "$f" .sh)"); done ;;
    *) s=${s#vhost-}; [ -f "$here/vhost/$s.sh" ] || { echo "vhost-user.sh: no case $s" >&2; exit 2; }; cases+=("$s") ;;
  esac
done
[ ${#cases[@]} -gt 0 ] || { echo "vhost-user.sh: no cases selected" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vhost.XXXXXX")
lbpid=
cleanup() {
  [ -n "$lbpid" ] && kill -0 "$lbpid" 2>/dev/null && kill -KILL "$lbpid" 2>/dev/null
  [ "${GUEST_KEEP:-0}" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT
t0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# ---- initramfs tree (the image builder's library, scripts/image-lib.sh): busybox, odirect, lib.sh,
# virtio_pci + virtio-rng + virtio_blk with their dependencies (6.12 has virtio_pci built in)
root=$work/root
( img_tree_init "$root" && img_add_modules "$root" "$kver" virtio_ring virtio virtio_pci virtio-rng virtio_blk ) || exit 2
mkdir -p "$root/tests/param" "$root/etc/image"
cp "$cache/odirect" "$root/bin/odirect"
# the i2c case: i2c-dev from the kernel, i2c-virtio built by setup.sh; the case insmods them
( img_stage_modules "$root" "$kver" i2c-dev ) || exit 2
[ -f "$cache/i2c-virtio-$kver/i2c-virtio.ko" ] && cp "$cache/i2c-virtio-$kver/i2c-virtio.ko" "$root/lib/modules/"
# the gpio case: gpio-virtio and gpiotool built by setup.sh; the case insmods the driver
[ -f "$cache/gpio-virtio-$kver/gpio-virtio.ko" ] && cp "$cache/gpio-virtio-$kver/gpio-virtio.ko" "$root/lib/modules/"
[ -x "$cache/gpiotool" ] && cp "$cache/gpiotool" "$root/bin/gpiotool"
# the input case: evdev and virtio_input from the kernel (the case insmods them), inputtool built by setup.sh
( img_stage_modules "$root" "$kver" evdev virtio_input ) || exit 2
[ -x "$cache/inputtool" ] && cp "$cache/inputtool" "$root/bin/inputtool"
# the sound case: the ALSA core modules and virtio_snd (the kernel's, or built by setup.sh for 6.1), sndtool
( img_stage_modules "$root" "$kver" snd-pcm ) || exit 2
if img_kernel_has_module "$kver" virtio_snd; then ( img_stage_modules "$root" "$kver" virtio_snd ) || exit 2
elif [ -f "$cache/snd-virtio-$kver/virtio_snd.ko" ]; then cp "$cache/snd-virtio-$kver/virtio_snd.ko" "$root/lib/modules/"; fi
[ -x "$cache/sndtool" ] && cp "$cache/sndtool" "$root/bin/sndtool"
# the vsock case: the kernel's AF_VSOCK virtio transport (the case insmods it) and vsocktool (setup.sh)
( img_stage_modules "$root" "$kver" vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport ) || exit 2
[ -x "$cache/vsocktool" ] && cp "$cache/vsocktool" "$root/bin/vsocktool"
# the gpu case: the kernel's virtio-gpu DRM driver with its DRM helpers (the case insmods them), gputool (setup.sh)
( img_stage_modules "$root" "$kver" virtio-gpu ) || exit 2
[ -x "$cache/gputool" ] && cp "$cache/gputool" "$root/bin/gputool"
cp "$here/lib.sh" "$root/tests/lib.sh"
img_write_init "$root"
# The same runner runs on every boot (also after the reboot case's reboot -f); /init sources it after the modules.
cat > "$root/etc/image/main" <<'MAIN'
export -n SWIFT_ROOT
echo 20 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
echo 1 > /proc/sys/kernel/hung_task_panic 2>/dev/null
echo 1 > /proc/sys/kernel/panic_on_oops 2>/dev/null
echo; echo GUEST-BOOTED
cd /tmp
sh /tests/case.sh
echo GUEST-CASE-EXIT $?
echo "GUEST-DMESG-BEGIN"
dmesg | grep -iE 'virtio|vhost|blk|vd[a-z]|hwrng|rng|pci.*0000:00:0[2-9]|error|fail|warn' | tail -n 60
echo "GUEST-DMESG-END"
MAIN

# ---- host side: image, loopbackd (transport none, both devices served)
img=$work/disk0.img
truncate -s ${disk_mib}M "$img"
rng_sock=$work/rng.sock
blk_sock=$work/blk.sock
i2c_sock=$work/i2c.sock
gpio_sock=$work/gpio.sock
input_sock=$work/input.sock
snd_sock=$work/snd.sock
snd_out=$work/snd-out.wav
snd_in=$work/snd-in.wav
# the sound case captures this file (S16 stereo 48 kHz, 0.5 s of pattern 2) and plays into snd_out
"$cache/sndtool" mkwav 48000 2 96000 2 "$snd_in" || { echo "vhost-user.sh: no sndtool (Tests/guest/setup.sh builds it)" >&2; exit 2; }
vsock_sock=$work/vsock.sock
vsock_uds=$work/v.sock
gpu_sock=$work/gpu.sock
ctl_sock=$work/ctl.sock
conf=$work/loopbackd.conf
cat > "$conf" <<CONF
[daemon]
transport = "none"
log-level = "$loglevel"
control = "$ctl_sock"

[device.rng0]
type = "rng"
serve = "$rng_sock"

[device.disk0]
type = "blk"
path = "$img"
readonly = false
queues = 1
queue-size = 256
serve = "$blk_sock"

[device.i2c0]
type = "i2c"
simulated = true
serve = "$i2c_sock"

[device.gpio0]
type = "gpio"
simulated = true
names = ["v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7"]
queue-size = 256
serve = "$gpio_sock"

[device.kbd0]
type = "input"
simulated = true
simulated-replay = true
serve = "$input_sock"

[device.snd0]
type = "sound"
playback = "wav:$snd_out"
capture = "wav:$snd_in"
serve = "$snd_sock"

[device.vsock0]
type = "vsock"
guest-cid = 3
uds-path = "$vsock_uds"
serve = "$vsock_sock"

[device.gpu0]
type = "gpu"
mode = "800x600"
output = "file:$work/gpu"
file-interval-ms = 50
serve = "$gpu_sock"
CONF
lblog=$work/loopbackd.log
"$loopbackd" -c "$conf" > "$lblog" 2>&1 &
lbpid=$!
for _ in $(seq 50); do [ -S "$rng_sock" ] && [ -S "$blk_sock" ] && [ -S "$i2c_sock" ] && [ -S "$gpio_sock" ] && [ -S "$input_sock" ] && [ -S "$vsock_sock" ] && [ -S "$snd_sock" ] && [ -S "$gpu_sock" ] && break; kill -0 $lbpid 2>/dev/null || break; sleep 0.1; done
if ! [ -S "$rng_sock" ] || ! [ -S "$blk_sock" ] || ! [ -S "$i2c_sock" ] || ! [ -S "$gpio_sock" ] || ! [ -S "$input_sock" ] || ! [ -S "$vsock_sock" ] || ! [ -S "$snd_sock" ] || ! [ -S "$gpu_sock" ]; then
  echo "vhost-user.sh: loopbackd did not create its sockets:"; cat "$lblog"; echo "0 passed, 1 failed"; exit 1
fi

# qmp_pause_cycles QMP_SOCKET CONSOLE_LOG: once the guest printed GUEST-PAUSE-READY, pause and resume the VM
# (QMP stop, 0.3 s, cont, 0.4 s) until the guest printed its result; prints the number of completed cycles.
qmp_pause_cycles() {
  python3 - "$1" "$2" "$timeout_s" <<'PY'
import json, socket, sys, time
path, log, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.time() + limit
def console():
    try:
        with open(log, 'rb') as f: return f.read().decode('latin-1')
    except OSError: return ''
while 'GUEST-PAUSE-READY' not in console():
    if time.time() > end or 'GUEST-TEST' in console(): print(0); sys.exit()
    time.sleep(0.1)
s = socket.socket(socket.AF_UNIX); s.connect(path); f = s.makefile('rw')
def cmd(c):
    f.write(json.dumps({'execute': c}) + '\n'); f.flush()
    while True:
        r = json.loads(f.readline())
        if 'return' in r: return
        if 'error' in r: raise SystemExit('qmp %s: %s' % (c, r['error']))
json.loads(f.readline()); cmd('qmp_capabilities')
n = 0
while 'GUEST-TEST' not in console() and time.time() < end:
    cmd('stop'); time.sleep(0.3); cmd('cont'); n += 1; time.sleep(0.4)
print(n)
PY
}
# gpu_host_check QMP_SOCKET ACK_SOCKET CONSOLE_LOG W H: for each "GUEST-GPU-SHOWN SEED" the guest prints, QMP
# screendumps of QEMU's console until one equals gputool's pattern(SEED) pixel for pixel (20 s at most), loopbackd's
# PPM too, and the display link reports cursor messages; then "PASS <what>" or "FAIL <why>" to the guest's ttyS1.
# Prints one line per round.
gpu_host_check() {
  python3 - "$1" "$2" "$3" "$4" "$5" "$timeout_s" "$cache/gputool" "$work/gpu-0.ppm" "$loopbackd" "$ctl_sock" <<'PY'
import json, os, socket, subprocess, sys, time
qmp, ack, log, w, h, limit, tool, lbppm, lb, ctl = sys.argv[1:]
end = time.time() + float(limit)
def console():
    try:
        with open(log, 'rb') as f: return f.read().decode('latin-1')
    except OSError: return ''
def connect(path):
    while time.time() < end:
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(path); return s
        except OSError: time.sleep(0.1)
    raise SystemExit('cannot connect to ' + path)
q = connect(qmp); f = q.makefile('rw')
def cmd(c, **a):
    f.write(json.dumps({'execute': c, 'arguments': a}) + '\n'); f.flush()
    while True:
        r = json.loads(f.readline())
        if 'return' in r: return r['return']
        if 'error' in r: return r['error']
json.loads(f.readline()); cmd('qmp_capabilities')
a = connect(ack)
shot = os.path.join(os.path.dirname(qmp), 'screendump.ppm')
def check(path, seed):
    r = subprocess.run([tool, 'check', path, w, h, seed], capture_output=True, text=True)
    return r.returncode == 0, (r.stdout + r.stderr).strip()
rounds = 0
while time.time() < end:
    lines = [l for l in console().splitlines() if l.startswith('GUEST-GPU-SHOWN ')]
    if 'GUEST-TEST' in console(): break
    if len(lines) <= rounds: time.sleep(0.1); continue
    seed = lines[rounds].split()[1]; rounds += 1
    t0 = time.time(); ok = False; why = ''; n = 0
    while time.time() - t0 < 20:
        n += 1
        r = cmd('screendump', filename=shot)
        if isinstance(r, dict) and r: why = 'screendump: %s' % r.get('desc', r)
        else:
            ok, why = check(shot, seed)
            if ok: break
        time.sleep(0.2)
    took = time.time() - t0
    if ok:
        ok2, why2 = check(lbppm, seed)
        if not ok2: ok, why = False, "loopbackd's PPM: " + why2
    info = subprocess.run([lb, 'ctl', '--socket', ctl, 'device', 'gpu0', 'info'], capture_output=True, text=True).stdout
    disp = ([l for l in info.splitlines() if l.startswith('display=')] or ['no display line'])[0]
    cm = [int(x.split('=')[1]) for x in disp.split() if x.startswith('cursor-msgs=')]
    if ok and (not cm or cm[0] < 2): ok, why = False, 'cursor: ' + disp
    verdict = ('PASS screendump %sx%s equals pattern %s after %.1f s (%d screendumps), loopbackd PPM too; %s' % (w, h, seed, took, n, disp)) if ok \
        else 'FAIL pattern %s: %s' % (seed, why)
    print(verdict, flush=True)
    a.sendall((verdict + '\n').encode())
PY
}
echo ${VHOST_PAUSE_ITERATIONS:-120} > "$root/tests/param/pause_iterations"   # long enough for 3 QMP stop/cont cycles on a busy host

passed=0; failed=0
for c in "${cases[@]}"; do
  name=vhost-$c
  cdir=$work/$c; mkdir -p "$cdir"
  cp "$here/vhost/$c.sh" "$root/tests/case.sh"
  echo "$name" > "$root/tests/name"
  echo $(( $(stat -c %s "$img") / 512 )) > "$root/tests/param/sectors"
  echo "$c-$$-$RANDOM$RANDOM" > "$root/tests/param/nonce"
  img_pack "$root" "$cdir/initramfs.gz" 1
  reboot_opt=(-no-reboot); want_boots=1
  [ "$c" = reboot ] && { reboot_opt=(); want_boots=2; }
  lbmark=$(wc -l < "$lblog")
  log=$cdir/console.log
  s0=$(date +%s.%N)
  qmp_opt=(); [ "$c" = pause ] && qmp_opt=(-qmp unix:"$cdir/qmp.sock",server=on,wait=off)
  # the i2c case adds QEMU's vhost-user-i2c-pci in front of loopbackd's i2c0
  i2c_opt=(); [ "$c" = i2c ] && i2c_opt=(-chardev socket,id=c2,path="$i2c_sock" -device vhost-user-i2c-pci,chardev=c2)
  # the gpio case adds QEMU's vhost-user-gpio-pci in front of loopbackd's gpio0
  [ "$c" = gpio ] && i2c_opt=(-chardev socket,id=c3,path="$gpio_sock" -device vhost-user-gpio-pci,chardev=c3)
  # the vsock case: vhost-user-vsock-pci in front of loopbackd's vsock0; the host ends of its connections run here
  hostpids=()
  if [ "$c" = vsock ]; then
    i2c_opt=(-chardev socket,id=c5,path="$vsock_sock" -device vhost-user-vsock-pci,chardev=c5)
    "$cache/vsocktool" serve-unix "${vsock_uds}_1234" 1 > "$cdir/host-1234.out" 2>&1 & hostpids+=($!)
    "$cache/vsocktool" serve-unix "${vsock_uds}_1235" 8 > "$cdir/host-1235.out" 2>&1 & hostpids+=($!)
    # CONNECT 5000 once the guest listens (a connect before that is refused by the guest: retried)
    ( for _ in $(seq $((timeout_s * 10))); do grep -q GUEST-VSOCK-LISTEN "$cdir/console.log" 2>/dev/null && break; sleep 0.1; done
      for _ in $(seq 20); do "$cache/vsocktool" connect-unix "$vsock_uds" 5000 4194304 && exit 0; sleep 0.5; done; exit 1
    ) > "$cdir/host-5000.out" 2>&1 & hostpids+=($!)
  fi
  # the input case: QEMU 10 (setup.sh unpacks it from bookworm-backports; 7.2's vhost-user-input needs KVM) with
  # vhost-user-input-pci in front of loopbackd's kbd0
  qemu=(qemu-system-x86_64)
  if [ "$c" = input ]; then
    qemu=("$cache/qemu10/usr/bin/qemu-system-x86_64")
    i2c_opt=(-chardev socket,id=c4,path="$input_sock" -device vhost-user-input-pci,chardev=c4)
    [ -x "${qemu[0]}" ] || echo "vhost-user.sh: no QEMU 10 at ${qemu[0]} (Tests/guest/setup.sh unpacks it)" >&2
  fi
  # the gpu case: QEMU 10 with its display modules (setup.sh) and vhost-user-gpu-pci in front of loopbackd's gpu0; QMP
  # for screendumps and a second serial port (the guest's ttyS1) for the host's verdict
  if [ "$c" = gpu ]; then
    qemu=(env QEMU_MODULE_DIR="$cache/qemu10/usr/lib/x86_64-linux-gnu/qemu" "$cache/qemu10/usr/bin/qemu-system-x86_64")
    i2c_opt=(-vga none -chardev socket,id=c7,path="$gpu_sock" -device vhost-user-gpu-pci,chardev=c7
             -qmp unix:"$cdir/qmp.sock",server=on,wait=off
             -chardev socket,id=ack,path="$cdir/ack.sock",server=on,wait=off -serial chardev:ack)
  fi
  # the sound case: QEMU 10's vhost-user-snd-pci in front of loopbackd's snd0 (7.2 has no sound front-end)
  if [ "$c" = sound ]; then
    qemu=("$cache/qemu10/usr/bin/qemu-system-x86_64")
    i2c_opt=(-chardev socket,id=c6,path="$snd_sock" -device vhost-user-snd-pci,chardev=c6)
  fi
  timeout -k 5 "$timeout_s" "${qemu[@]}" -accel tcg -m 512 -smp 1 -nodefaults -nographic \
    -serial stdio "${reboot_opt[@]}" "${qmp_opt[@]}" -kernel "$vmlinux" -initrd "$cdir/initramfs.gz" \
    -append 'console=ttyS0 quiet panic=-1' \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -chardev socket,id=c0,path="$rng_sock" -device vhost-user-rng-pci,chardev=c0 \
    -chardev socket,id=c1,path="$blk_sock" -device vhost-user-blk-pci,chardev=c1,num-queues=1 "${i2c_opt[@]}" \
    < /dev/null > "$log" 2>&1 &
  qpid=$!
  pause_why=""
  if [ "$c" = pause ]; then
    cycles=$(qmp_pause_cycles "$cdir/qmp.sock" "$log")
    info_cycles="  host: $cycles QMP stop/cont cycles during guest I/O"
    [ "${cycles:-0}" -ge 3 ] 2>/dev/null || pause_why="only '${cycles}' stop/cont cycles before the guest finished (want >= 3)"
  fi
  if [ "$c" = gpu ]; then
    gpu_host_check "$cdir/qmp.sock" "$cdir/ack.sock" "$log" 800 600 > "$cdir/host-gpu.txt" 2>&1
    info_cycles=$(sed 's/^/  host: /' "$cdir/host-gpu.txt")
    [ "$(grep -c '^PASS' "$cdir/host-gpu.txt")" -eq 2 ] || pause_why="host gpu check: $(grep -v '^PASS' "$cdir/host-gpu.txt" | head -2 | tr '\n' '|')"
  fi
  wait $qpid; rc=$?
  hostbad=
  for p in "${hostpids[@]}"; do
    for _ in $(seq 50); do kill -0 $p 2>/dev/null || break; sleep 0.1; done
    kill $p 2>/dev/null
    wait $p || hostbad=1
  done
  secs=$(elapsed "$s0")
  tr -d '\r' < "$log" > "$log.txt"
  why=""
  res=$(grep -E "^GUEST-TEST $name (PASS|FAIL)" "$log.txt" | tail -1)
  boots=$(grep -o 'GUEST-BOOTED' "$log.txt" | wc -l)
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then why="timeout after ${timeout_s}s"
  elif [ -z "$res" ]; then why="no result (qemu rc $rc)"
  elif [[ "$res" == *" FAIL"* ]]; then why=${res#GUEST-TEST $name FAIL}
  elif [ $rc -ne 0 ]; then why="qemu exit status $rc"
  fi
  [ "$boots" -eq "$want_boots" ] || why="${why:+$why; }$boots boot(s), want $want_boots"
  [ -n "$pause_why" ] && why="${why:+$why; }$pause_why"
  [ -n "$hostbad" ] && why="${why:+$why; }host side: $(cat "$cdir"/host-*.out 2>/dev/null | grep -v '^ok' | head -3 | tr '\n' '|')"
  if grep -qE 'Oops|BUG:|WARNING:|INFO: task .* blocked|Kernel panic|general protection fault|kernel BUG|Call Trace' "$log.txt"; then
    why="${why:+$why; }kernel oops/BUG/WARNING/hang in console"
  fi
  # QEMU's own complaints about the back-end (vhost-user errors and warnings print as "qemu-system-x86_64: ...").
  notes=
  qerr=$(grep -E '^qemu-system-x86_64: ' "$log.txt")
  [ -n "$qerr" ] && why="${why:+$why; }qemu: $(echo "$qerr" | head -3 | tr '\n' '|')"
  kill -0 $lbpid 2>/dev/null || why="${why:+$why; }loopbackd died"
  # the image on the host holds what the guest wrote (QEMU has exited; loopbackd keeps the file open)
  if [ -z "$why" ]; then
    while read -r _ what off size seed; do
      case "$what" in
        disk-pattern)
          "$cache/odirect" checkb "$img" "$off" "$size" "$seed" > /dev/null || why="host image check failed ($off $size $seed)" ;;
        snd-wav)   # the WAV loopbackd wrote holds pattern SIZE (a seed) of OFF bytes, then silence only
          "$cache/sndtool" pattern "$off" "$size" "$cdir/snd-play.raw" &&
            "$cache/sndtool" checkwav "$snd_out" 48000 2 "$cdir/snd-play.raw" > "$cdir/snd-check.out" 2>&1 ||
            why="host WAV check failed: $(cat "$cdir/snd-check.out" 2>/dev/null)" ;;
      esac
    done < <(grep -E '^GUEST-HOSTCHECK ' "$log.txt")
  fi
  tail -n +$((lbmark + 1)) "$lblog" > "$cdir/loopbackd.log"
  if [ -z "$why" ]; then passed=$((passed+1)); echo "PASS $name (${secs}s)"
  else failed=$((failed+1)); echo "FAIL $name (${secs}s):$why"
    echo "----- console tail ($name) -----"; tail -n 40 "$log.txt"
    echo "----- loopbackd log during $name -----"; grep -vE 'debug: vhost-user: [a-z0-9]+: (SET|GET)_' "$cdir/loopbackd.log" | tail -n 20; echo "-----"
  fi
  grep -E '^GUEST-INFO' "$log.txt" | sed 's/^/  /'
  [ "$c" = pause ] || [ "$c" = gpu ] && echo "$info_cycles"
  [ -n "$notes" ] && echo "$notes" | sed 's/^/  note (known): /'
  if [ "${VHOST_VERBOSE:-0}" = 1 ]; then
    sed -n '/^GUEST-DMESG-BEGIN/,/^GUEST-DMESG-END/p' "$log.txt" | grep -vE '^GUEST-DMESG' | sed 's/^/  dmesg: /'
  fi
  [ "${GUEST_KEEP:-0}" = 1 ] && echo "  log: $log.txt"
done

# ---- loopbackd: still running, exits 0 within 1 s of SIGTERM, nothing logged at error/warning level
why=""
if ! kill -0 $lbpid 2>/dev/null; then
  why="loopbackd was not running at the end"
else
  kill -TERM $lbpid
  s0=$(date +%s.%N)
  for _ in $(seq 100); do kill -0 $lbpid 2>/dev/null || break; sleep 0.01; done
  if kill -0 $lbpid 2>/dev/null; then
    why="loopbackd still running 1 s after SIGTERM"; kill -KILL $lbpid
  fi
  wait $lbpid; lbrc=$?
  [ -z "$why" ] && [ $lbrc -ne 0 ] && why="loopbackd exit status $lbrc after SIGTERM"
  stop_s=$(elapsed "$s0")
fi
lbpid=
bad=$(grep -iE '(^|: )(error|warning|fatal)|Fatal error|panic|backtrace|crash' "$lblog" | head -5)
[ -n "$bad" ] && why="${why:+$why; }loopbackd log: $(echo "$bad" | tr '\n' '|')"
conns=$(grep -c 'front-end connected' "$lblog")
if [ -z "$why" ]; then passed=$((passed+1)); echo "PASS vhost-loopbackd-shutdown (exit 0 ${stop_s}s after SIGTERM; $conns front-end connections served)"
else failed=$((failed+1)); echo "FAIL vhost-loopbackd-shutdown: $why"; echo "----- loopbackd log tail -----"; tail -n 20 "$lblog"; echo "-----"
fi
[ "${GUEST_KEEP:-0}" = 1 ] && echo "  work dir: $work"
echo "vhost-user suite time ($kver): $(elapsed "$t0")s"
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
