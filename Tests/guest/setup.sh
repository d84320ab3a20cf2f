#!/usr/bin/env bash
# Prepare everything the guest test harness needs (idempotent):
#
#   Tests/guest/setup.sh [KERNEL]...      KERNEL = 6.1 (Debian 12, default) | 6.12 (bookworm-backports)
#
# For each kernel, through the image builder (scripts/mkimage.sh --prepare, scripts/image-lib.sh): its headers
# (installed if missing, as root), Debian's kernel package downloaded once and unpacked into the cache dir, an
# uncompressed vmlinux (fast PVH boot under TCG), kernel/virtio-loopback built against those headers in
# <cache>/module-<kver>/ (<cache>/kver-<kernel> names the version). Then the static helper tools (lo-tool, odirect,
# inputtool, gpiotool), the kernel's i2c-virtio and gpio-virtio drivers built out of tree.
# Cache dir: $GUEST_CACHE, default <repo>/.build-guest. Run the suites on a kernel with GUEST_KERNEL=<kernel>.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${GUEST_CACHE:-$repo/.build-guest}
mkdir -p "$cache"
log() { echo "setup: $*" >&2; }

kernels=("$@"); [ ${#kernels[@]} -gt 0 ] || kernels=(${GUEST_KERNELS:-6.1})

need_pkgs=()
for p in qemu-system-x86 busybox-static cpio xz-utils zstd gcc make kmod libc6-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || true
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi

args=(); for k in "${kernels[@]}"; do args+=(--kernel "$k"); done
IMG_CACHE=$cache IMG_LOG_PREFIX=setup bash "$repo/scripts/mkimage.sh" --prepare "${args[@]}"
# the 6.1 kernel also under the names older callers used ($cache/kver, $cache/vmlinux)
if [ -f "$cache/kver-6.1" ]; then
  cp "$cache/kver-6.1" "$cache/kver"
  ln -sfn "vmlinux-$(cat "$cache/kver-6.1")" "$cache/vmlinux"
fi

# The kernel's i2c-virtio driver (not built in Debian's kernels), per kernel: scripts/image-lib.sh img_i2c_virtio.
. "$repo/scripts/image-lib.sh"
# A failed download or build costs the i2c cases only (they say what is missing), not the rest of the set-up.
for k in "${kernels[@]}"; do
  ( IMG_CACHE=$cache IMG_LOG_PREFIX=setup img_i2c_virtio "$(cat "$cache/kver-$k")" > /dev/null ) ||
    log "i2c-virtio.ko for $k not built: the i2c cases will fail"
done
# gpio-virtio likewise, with a fix for two chips in one guest (scripts/image-lib.sh img_gpio_virtio); the one
# linux-source download per kernel serves both.
for k in "${kernels[@]}"; do
  ( IMG_CACHE=$cache IMG_LOG_PREFIX=setup img_gpio_virtio "$(cat "$cache/kver-$k")" > /dev/null ) ||
    log "gpio-virtio.ko for $k not built: the gpio cases will fail"
done
# virtio_snd likewise where the kernel does not ship it (6.1; scripts/image-lib.sh img_snd_virtio)
for k in "${kernels[@]}"; do
  ( IMG_CACHE=$cache IMG_LOG_PREFIX=setup img_snd_virtio "$(cat "$cache/kver-$k")" > /dev/null ) ||
    log "virtio_snd.ko for $k not built: the sound case will fail"
done

# virtio_can likewise: mainline 7.x only, so from Debian's linux-source-7.3 (trixie-backports, through a private
# apt configuration in the cache) with a compat header for 6.1 and 6.12 (scripts/image-lib.sh img_virtio_can); and
# cantool, numbered CAN frames through SocketCAN. A failed download or build costs the can case only.
for k in "${kernels[@]}"; do
  ( IMG_CACHE=$cache IMG_LOG_PREFIX=setup img_virtio_can "$(cat "$cache/kver-$k")" > /dev/null ) ||
    log "virtio_can.ko for $k not built: the can case will fail"
done
gcc -static -O2 -Wall -o "$cache/cantool" "$here/tools/cantool.c" || log "cantool not built: the can case will fail"

# Static tools (kernel-independent): lo-tool speaks the module's ioctls, odirect does O_DIRECT I/O and checks,
# inputtool drives uinput and reads evdev nodes (the input cases).
gcc -static -O2 -Wall -I"$repo/kernel/virtio-loopback" -o "$cache/lo-tool" "$repo/kernel/virtio-loopback/tools/lo-tool.c" -lpthread
gcc -static -O2 -Wall -o "$cache/odirect" "$here/tools/odirect.c"
# vdpactl: vdpa dev add/del through loopbackd's own netlink code (the VDUSE peer benchmark: qemu-storage-daemon)
gcc -static -O2 -Wall -I"$repo/Sources/CLinux/include" -o "$cache/vdpactl" "$here/tools/vdpactl.c" "$repo/Sources/CLinux/vduse.c"
gcc -static -O2 -Wall -o "$cache/inputtool" "$here/tools/inputtool.c"
# gpiotool: the v1 GPIO character-device ioctls (the gpio case)
gcc -static -O2 -Wall -o "$cache/gpiotool" "$here/tools/gpiotool.c"
# sndtool: the PCM ioctls on /dev/snd/pcmC*D*[pc], WAV files and byte checks (the sound case)
gcc -static -O2 -Wall -o "$cache/sndtool" "$here/tools/sndtool.c"
# vsocktool: AF_VSOCK and unix-socket ends of the vsock case (patterned data both ways, many connections, CONNECT P)
gcc -static -O2 -Wall -o "$cache/vsocktool" "$here/tools/vsocktool.c" -lpthread
# gputool: DRM dumb buffer + SET_CRTC + DIRTYFB with a known pattern, and the PPM check (the gpu case)
gcc -static -O2 -Wall -I "$here/../../Sources/CLinux" -o "$cache/gputool" "$here/tools/gputool.c"
# QEMU 10 from bookworm-backports for the vhost-input case (Debian 12's QEMU 7.2 refuses vhost-user-input without
# KVM): qemu-system-x86 only, downloaded and unpacked into <cache>/qemu10, never installed (every other case runs
# 7.2). Its libraries are all in bookworm (ldd) and it uses 7.2's firmware under /usr/share/qemu; a guest run
# loads no module (only `-device help` tries 7.2's modules and aborts). About 1.5 s, once.
if [ ! -x "$cache/qemu10/usr/bin/qemu-system-x86_64" ]; then
  mkdir -p "$cache/debs" && rm -rf "$cache/qemu10.tmp" &&
  ( cd "$cache/debs" && rm -f qemu-system-x86_*bpo12* && apt-get download -qq qemu-system-x86/bookworm-backports 2>/dev/null ) &&
  dpkg -x "$cache"/debs/qemu-system-x86_*bpo12*.deb "$cache/qemu10.tmp" &&
  "$cache/qemu10.tmp/usr/bin/qemu-system-x86_64" --version | grep -q 'version 1[0-9]\.' &&
  mv "$cache/qemu10.tmp" "$cache/qemu10" ||
    log "QEMU 10 (bookworm-backports qemu-system-x86) not unpacked: the vhost-input case will fail"
fi
# Its virtio-gpu devices (vhost-user-gpu-pci for the vhost-gpu case) are modules, in bookworm-backports'
# qemu-system-common: only its hw-display-*.so are unpacked into <cache>/qemu10/usr/lib/x86_64-linux-gnu/qemu (7.2's
# modules fail to load into 10: "undefined symbol"); the case points QEMU_MODULE_DIR there. Once.
q10mods=$cache/qemu10/usr/lib/x86_64-linux-gnu/qemu
if [ -x "$cache/qemu10/usr/bin/qemu-system-x86_64" ] && [ ! -f "$q10mods/hw-display-virtio-gpu-pci.so" ]; then
  rm -rf "$cache/qemu10-common.tmp" &&
  ( cd "$cache/debs" && rm -f qemu-system-common_*bpo12* && apt-get download -qq qemu-system-common/bookworm-backports 2>/dev/null ) &&
  dpkg -x "$cache"/debs/qemu-system-common_*bpo12*.deb "$cache/qemu10-common.tmp" &&
  mkdir -p "$q10mods" && cp "$cache"/qemu10-common.tmp/usr/lib/x86_64-linux-gnu/qemu/hw-display-*.so "$q10mods/" &&
  QEMU_MODULE_DIR=$q10mods "$cache/qemu10/usr/bin/qemu-system-x86_64" -device vhost-user-gpu-pci,help 2>/dev/null | grep -q chardev ||
    log "QEMU 10's display modules (bookworm-backports qemu-system-common) not unpacked: the vhost-gpu case will fail"
  rm -rf "$cache/qemu10-common.tmp"
fi
log "done (${kernels[*]})"
