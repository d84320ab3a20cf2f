#!/usr/bin/env bash
# Guest test harness: boots Debian's kernel under QEMU (TCG) once per test case
# with a busybox initramfs, runs Tests/guest/cases/<case>.sh inside and judges
# the serial console.
#
#   Tests/guest/run.sh [SET|CASE]...     SET = module | loopbackd | all (default all)
#                                         CASE = a case file name without .sh
# Environment:
#   GUEST_KERNEL  6.1 (default) | 6.12: the kernel prepared by `setup.sh KERNEL`
#   GUEST_CACHE   cache dir made by setup.sh (default <repo>/.build-guest)
#   LOOPBACKD     static loopbackd binary (default <repo>/.build/release/loopbackd)
#   LOOPBACKD_CONF  optional file installed as /etc/loopbackd.conf
#   GUEST_TIMEOUT per-case timeout in seconds (default 150)
#   GUEST_KEEP=1  keep the work dir (logs, initramfs, disk images)
#   GUEST_SECCOMP kill | log: the cases' [daemon] section (lib.sh write_conf) sets seccomp to it, so the suite
#                 runs under the system call allow-list (Sources/CLinux/privdrop.c)
#   GUEST_CASES   the directory of the case files (default Tests/guest/cases)
# A case file may hold a line "# guest-host-binaries: PATH...": those host programs, their shared libraries
# (ldd) and the dynamic loader are copied into that case's initramfs only (e.g. qemu-storage-daemon);
# a line "# guest-smp: N": its guest gets N vCPUs (default 1), and a line
# "# guest-qemu: ARGS": extra QEMU arguments (e.g. a display device), and a line
# "# guest-kernels: K... -- REASON": on any other kernel it is not booted, a "SKIP case (kernel): REASON" line is
# printed, and it counts neither as passed nor as failed (a feature the other kernel does not have, e.g. VDUSE).
# A line "# guest-mem: ARGS" replaces QEMU's -m 512 (memory hot-plug slots).
# A case that prints "GUEST-SCREENDUMP TAG W H SEED|black" (or "GUEST-QMP TAG COMMAND JSON": tools/screendump.py runs
# that QMP command and answers "QMP TAG OK|FAIL" on ttyS1) gets a QMP socket and a second serial port (ttyS1):
# tools/screendump.py takes QEMU's screendump of its display, checks it and answers "SCREENDUMP TAG PASS|FAIL why"
# on ttyS1 (the case judges; the screendumps stay in the work dir with GUEST_KEEP=1).
# Output: one line per case, then exactly "N passed, N failed".  Exit status
# is non-zero on any failure, missing result, timeout, or kernel
# Oops/BUG/WARNING/hung task in the console log.
# The initramfs is built with the image builder's library (scripts/image-lib.sh, as scripts/mkimage.sh does):
# same tree, module resolver, /init and packing; the harness adds its tools and its runner (/etc/image/main).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${GUEST_CACHE:-$repo/.build-guest}
loopbackd=${LOOPBACKD:-$repo/.build/release/loopbackd}
timeout_s=${GUEST_TIMEOUT:-150}
gk=${GUEST_KERNEL:-6.1}
casedir=${GUEST_CASES:-$here/cases}
. "$repo/scripts/image-lib.sh"
IMG_CACHE=$cache IMG_LOG_PREFIX=run.sh

[ -f "$cache/kver-$gk" ] || { echo "run.sh: run Tests/guest/setup.sh $gk first" >&2; exit 2; }
kver=$(cat "$cache/kver-$gk")
vmlinux=$cache/vmlinux-$kver
ko=$cache/module-$kver/virtio_loopback.ko
lotool=$cache/lo-tool
[ -s "$vmlinux" ] && [ -f "$ko" ] && [ -x "$lotool" ] && [ -x "$cache/odirect" ] || { echo "run.sh: kernel/module/tools not prepared; run Tests/guest/setup.sh $gk" >&2; exit 2; }
echo "kernel $kver"

# ---- select cases
sel=("$@"); [ ${#sel[@]} -eq 0 ] && sel=(all)
cases=()
for s in "${sel[@]}"; do
  case "$s" in
    all) for f in "$casedir"/*.sh; do cases+=("$(basename "$f" .sh)"); done ;;
    module|loopbackd) for f in "$casedir"/"$s"-*.sh; do [ -e "$f" ] && cases+=("$(basename "$f" .sh)"); done ;;
    *) [ -f "$casedir/$s.sh" ] || { echo "run.sh: no case $s" >&2; exit 2; }; cases+=("$s") ;;
  esac
done
[ ${#cases[@]} -gt 0 ] || { echo "run.sh: no cases selected" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/guest.XXXXXX")
[ "${GUEST_KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT

# ---- base initramfs tree (shared by all cases)
root=$work/root
( img_tree_init "$root" && img_add_modules "$root" "$kver" virtio_ring virtio virtio-rng virtio_blk evdev uinput virtio_input virtio_console ahci sd_mod ) || exit 2
mkdir -p "$root/tests" "$root/etc/image"
cp "$ko" "$root/lib/modules/virtio_loopback.ko"
cp "$lotool" "$root/bin/lo-tool"
cp "$cache/odirect" "$root/bin/odirect"
[ -x "$cache/vdpactl" ] && cp "$cache/vdpactl" "$root/bin/vdpactl"
# inputtool (uinput/evdev, the input cases): built by setup.sh; a cache prepared before it existed lacks it and
# the cases that need it fail with a message naming it
if [ -x "$cache/inputtool" ]; then cp "$cache/inputtool" "$root/bin/inputtool"; fi
# i2c cases: i2c-dev and i2c-stub from the kernel, i2c-virtio built by setup.sh; the cases insmod them themselves
( img_stage_modules "$root" "$kver" i2c-dev i2c-stub ) || exit 2
[ -f "$cache/i2c-virtio-$kver/i2c-virtio.ko" ] && cp "$cache/i2c-virtio-$kver/i2c-virtio.ko" "$root/lib/modules/"
# can case: can, can-raw, can-dev and vcan from the kernel; virtio_can and cantool built by setup.sh (a cache
# prepared before them lacks them: the case says so)
( img_stage_modules "$root" "$kver" can can-raw can-dev vcan ) || exit 2
[ -f "$cache/virtio-can-$kver/virtio_can.ko" ] && cp "$cache/virtio-can-$kver/virtio_can.ko" "$root/lib/modules/"
[ -x "$cache/cantool" ] && cp "$cache/cantool" "$root/bin/cantool"
# gpio case: gpio-virtio and gpiotool built by setup.sh (a cache prepared before them lacks them: the case says so)
[ -f "$cache/gpio-virtio-$kver/gpio-virtio.ko" ] && cp "$cache/gpio-virtio-$kver/gpio-virtio.ko" "$root/lib/modules/"
[ -x "$cache/gpiotool" ] && cp "$cache/gpiotool" "$root/bin/gpiotool"
# sound cases: the ALSA core modules and snd-aloop, virtio_snd (the kernel's, or built by setup.sh for 6.1) and sndtool
( img_stage_modules "$root" "$kver" snd-pcm snd-aloop ) || exit 2
if img_kernel_has_module "$kver" virtio_snd; then ( img_stage_modules "$root" "$kver" virtio_snd ) || exit 2
elif [ -f "$cache/snd-virtio-$kver/virtio_snd.ko" ]; then cp "$cache/snd-virtio-$kver/virtio_snd.ko" "$root/lib/modules/"; fi
[ -x "$cache/sndtool" ] && cp "$cache/sndtool" "$root/bin/sndtool"
# vsock case: the kernel's virtio transport for AF_VSOCK (modules in Debian's kernels) and vsocktool (setup.sh)
( img_stage_modules "$root" "$kver" vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport ) || exit 2
[ -x "$cache/vsocktool" ] && cp "$cache/vsocktool" "$root/bin/vsocktool"
# VDUSE cases (6.12: vduse, vdpa, vhost_iotlb, virtio_vdpa; 6.1 has no VDUSE): staged, the cases insmod them
if img_kernel_has_module "$kver" vduse; then ( img_stage_modules "$root" "$kver" vduse virtio_vdpa ) || exit 2; fi
# gpu case: the kernel's virtio-gpu DRM driver with its DRM helpers (fbdev emulation built in), gputool (setup.sh)
( img_stage_modules "$root" "$kver" virtio-gpu ) || exit 2
# gpu-kms case: the bochs DRM driver (QEMU's bochs-display, the guest's "host" display) with drm_vram_helper, ttm
( img_stage_modules "$root" "$kver" bochs ) || exit 2
[ -x "$cache/gputool" ] && cp "$cache/gputool" "$root/bin/gputool"
if [ -x "$loopbackd" ]; then cp "$loopbackd" "$root/bin/loopbackd"; fi
if [ -n "${LOOPBACKD_CONF:-}" ]; then cp "$LOOPBACKD_CONF" "$root/etc/loopbackd.conf"; fi
cp "$here/lib.sh" "$root/tests/lib.sh"
if [ -n "${GUEST_SECCOMP:-}" ]; then echo "$GUEST_SECCOMP" > "$root/tests/seccomp"; fi
img_write_init "$root"
# the runner, sourced by /init after the modules of load.list (the cases insmod virtio_loopback.ko themselves)
cat > "$root/etc/image/main" <<'MAIN'
echo 20 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
echo 1 > /proc/sys/kernel/hung_task_panic 2>/dev/null
echo 1 > /proc/sys/kernel/panic_on_oops 2>/dev/null
echo GUEST-BOOTED
cd /tmp
sh /tests/case.sh
echo GUEST-CASE-EXIT $?
echo "GUEST-DMESG-BEGIN"
dmesg | grep -iE 'virtio|loopback|blk|vd[a-z]|hwrng|rng|gpio' | tail -n 60
echo "GUEST-DMESG-END"
MAIN

passed=0; failed=0; t0=$(date +%s)
results=()
for c in "${cases[@]}"; do
  only=$(sed -n 's/^# guest-kernels: *//p' "$casedir/$c.sh" | head -n 1)
  if [ -n "$only" ] && ! printf ' %s ' "${only%% --*}" | grep -q " $gk "; then
    echo "SKIP $c (kernel $gk): ${only#*-- }"; continue
  fi
  cdir=$work/$c; mkdir -p "$cdir"
  cp "$casedir/$c.sh" "$root/tests/case.sh"
  echo "$c" > "$root/tests/name"
  extra=$(sed -n 's/^# guest-host-binaries: *//p' "$casedir/$c.sh" | head -n 1)
  if [ -n "$extra" ]; then
    rm -rf "$work/root-extra"; cp -a "$root" "$work/root-extra"
    for b in $extra; do
      mkdir -p "$work/root-extra$(dirname "$b")"; cp "$b" "$work/root-extra$b"
      for l in $(ldd "$b" | grep -oE '/[^ ]+'); do mkdir -p "$work/root-extra$(dirname "$l")"; cp -L "$l" "$work/root-extra$l"; done
    done
    img_pack "$work/root-extra" "$cdir/initramfs.gz" 1
  else
    img_pack "$root" "$cdir/initramfs.gz" 1
  fi
  # A non-virtio disk (AHCI) the guest can copy images to; read back here.
  truncate -s 64M "$cdir/disk.img"
  log=$cdir/console.log
  # vCPUs: 1 unless the case asks for more with a "# guest-smp: N" line
  smp=$(sed -n 's/^# guest-smp: *\([0-9][0-9]*\).*/\1/p' "$casedir/$c.sh" | head -n 1)
  # extra QEMU arguments ("# guest-qemu: ARGS"); a screendump case's QMP socket, ttyS1 and host-side checker
  read -r -a qextra <<< "$(sed -n 's/^# guest-qemu: *//p' "$casedir/$c.sh" | head -n 1)"
  sdpid=""
  if grep -qE 'GUEST-SCREENDUMP|GUEST-QMP' "$casedir/$c.sh"; then
    qextra+=(-qmp unix:"$cdir/qmp.sock",server=on,wait=off -serial unix:"$cdir/ack.sock",server=on,wait=off)
    : > "$log"; python3 "$here/tools/screendump.py" "$cdir" "$cache/gputool" 2> "$cdir/screendump.log" & sdpid=$!
  fi
  s0=$(date +%s)
  # guest memory: 512 MiB unless the case asks otherwise ("# guest-mem: 512M,slots=2,maxmem=1G" for hot-plug)
  mem=$(sed -n 's/^# guest-mem: *\([^ ]*\).*/\1/p' "$casedir/$c.sh" | head -n 1)
  timeout -k 5 "$timeout_s" qemu-system-x86_64 -accel tcg -m "${mem:-512}" -smp "${smp:-1}" -nodefaults -nographic \
    -serial stdio -no-reboot -kernel "$vmlinux" -initrd "$cdir/initramfs.gz" \
    -append 'console=ttyS0 quiet panic=-1' \
    -drive if=none,id=d0,file="$cdir/disk.img",format=raw -device ahci,id=ahci0 -device ide-hd,drive=d0,bus=ahci0.0 \
    "${qextra[@]}" < /dev/null > "$log" 2>&1
  rc=$?
  [ -n "$sdpid" ] && { kill "$sdpid" 2>/dev/null; wait "$sdpid" 2>/dev/null; sed 's/^/  /' "$cdir/screendump.log"; }
  secs=$(( $(date +%s) - s0 ))
  tr -d '\r' < "$log" > "$log.txt"
  verdict=""; why=""
  res=$(grep -E "^GUEST-TEST $c (PASS|FAIL)" "$log.txt" | tail -1)
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then why="timeout after ${timeout_s}s"
  elif [ -z "$res" ]; then why="no result (qemu rc $rc)"
  elif [[ "$res" == *" FAIL"* ]]; then why=${res#GUEST-TEST $c FAIL}
  fi
  if grep -qE 'Oops|BUG:|WARNING:|INFO: task .* blocked|Kernel panic|general protection fault|kernel BUG|Call Trace' "$log.txt"; then
    why="${why:+$why; }kernel oops/BUG/WARNING/hang in console"
  fi
  # host-side check hook: a case may ask the host to verify the disk image
  if [ -z "$why" ]; then
    while read -r _ what off size seed; do
      case "$what" in
        disk-pattern)
          "$cache/odirect" checkb "$cdir/disk.img" "$off" "$size" "$seed" > /dev/null || why="host image check failed ($off $size $seed)" ;;
      esac
    done < <(grep -E '^GUEST-HOSTCHECK ' "$log.txt")
  fi
  if [ -z "$why" ]; then passed=$((passed+1)); echo "PASS $c (${secs}s)"
  else failed=$((failed+1)); echo "FAIL $c (${secs}s):$why"
    echo "----- console tail ($c) -----"; tail -n 40 "$log.txt"; echo "-----"
  fi
  [ "${GUEST_KEEP:-0}" = 1 ] && echo "  log: $log.txt"
done
echo "guest suite time ($kver): $(( $(date +%s) - t0 ))s"
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
