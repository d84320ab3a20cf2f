#!/usr/bin/env bash
# Debian's newest kernel (trixie-backports 7.x) against the module and the guest suite, by hand (not in CI: about
# 5 minutes and 250 MB of downloads). 7.x headers need a trixie userland (glibc 2.38), so the module is built in a
# debootstrap chroot; the kernel comes from linux-binary-KV/linux-modules-KV (7.x splits the image package) into a
# guest cache of its own, with the host-built static tools of .build-guest (kernel-independent) copied in.
#
#   sudo scripts/kernel7-check.sh [CASE...]      default: every case (cases needing drivers built out of tree for
#                                                7.x, i2c/gpio/can, fail: not prepared here)
#   K7_DIR=.build-k7 (chroot + cache)   K7_SUITE=trixie-backports
#
# Last run (2026-11-30, 7.3.4+deb13): the module builds without warnings (after the dma_map_ops map_phys change)
# and 23 of the 31 cases pass under seccomp kill, loopbackd-restricted included after its seg_max fix; 7 need drivers
# built for 7.x (i2c, gpio + libgpiod 2, can) or 7.x module lists (gpu cases); the VDUSE case skips (6.12 only).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
dir=$(mkdir -p "${K7_DIR:-$repo/.build-k7}" && cd "${K7_DIR:-$repo/.build-k7}" && pwd)
suite=${K7_SUITE:-trixie-backports}
root=$dir/root cache=$dir/cache
log() { echo "kernel7-check: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "run as root (debootstrap, chroot)"; exit 2; }
[ -x "$repo/.build-guest/lo-tool" ] || { log "run Tests/guest/setup.sh first (host-built guest tools)"; exit 2; }

if [ ! -x "$root/usr/bin/apt-get" ]; then
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
  log "debootstrap trixie into $root"
  debootstrap --variant=minbase trixie "$root" http://deb.debian.org/debian >/dev/null
  echo "deb http://deb.debian.org/debian $suite main" > "$root/etc/apt/sources.list.d/k7.list"
fi
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"   # objtool reads /proc
trap 'umount "$root/proc" 2>/dev/null || true' EXIT
chroot "$root" sh -c "apt-get update -qq 2>/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t $suite linux-headers-amd64 make gcc libc6-dev >/dev/null"
kv=$(ls "$root/usr/src" | sed -n 's/^linux-headers-\(7\..*-amd64\)$/\1/p' | sort -V | tail -1)
[ -n "$kv" ] || { log "no 7.x headers in $suite"; exit 1; }
log "kernel $kv"

# the module, built in the chroot
rm -rf "$root/build" && mkdir -p "$root/build/virtio-loopback/uapi"
cp kernel/virtio-loopback/Makefile kernel/virtio-loopback/*.c "$root/build/virtio-loopback/"
cp kernel/virtio-loopback/uapi/*.h "$root/build/virtio-loopback/uapi/"
chroot "$root" make -s -C "/usr/src/linux-headers-$kv" M=/build/virtio-loopback modules 2>&1 | tee "$dir/module-build.log" >&2
grep -qE "warning|error" "$dir/module-build.log" && { log "the module build warned or failed (see above)"; exit 1; }
mkdir -p "$cache/module-$kv" && cp "$root/build/virtio-loopback/virtio_loopback.ko" "$cache/module-$kv/"

# the kernel and its modules, laid out as Tests/guest/run.sh expects (lib/modules, boot/vmlinuz, vmlinux)
kroot=$cache/kernel-$kv
if [ ! -f "$kroot/lib/modules/$kv/modules.dep" ]; then
  (cd "$root/tmp" && rm -f ./*.deb && chroot "$root" sh -c "cd /tmp && apt-get download -qq linux-binary-$kv linux-modules-$kv")
  rm -rf "$kroot" && mkdir -p "$kroot/lib" "$kroot/boot"
  for d in "$root"/tmp/linux-binary-"$kv"_*.deb "$root"/tmp/linux-modules-"$kv"_*.deb; do dpkg -x "$d" "$kroot"; done
  ln -sfn ../usr/lib/modules "$kroot/lib/modules"
  ln -sfn "../usr/lib/modules/$kv/vmlinuz" "$kroot/boot/vmlinuz-$kv"
  # 7.x ships modules.builtin only in binary form: the built-in virtio core the suite's module lists name
  cfg=$root/usr/src/linux-headers-$kv/.config
  for m in VIRTIO:virtio/virtio VIRTIO:virtio/virtio_ring VIRTIO_PCI:virtio/virtio_pci VIRTIO_CONSOLE:char/virtio_console; do
    grep -q "^CONFIG_${m%%:*}=y" "$cfg" && echo "kernel/drivers/${m#*:}.ko"
  done > "$kroot/usr/lib/modules/$kv/modules.builtin"
  depmod -b "$kroot" "$kv" 2>/dev/null
fi
. scripts/image-lib.sh
if [ ! -s "$cache/vmlinux-$kv" ]; then   # (image-lib's functions expect no errexit: called where a failure is tested)
  img_extract_vmlinux "$kroot/boot/vmlinuz-$kv" "$cache/vmlinux-$kv" || { log "no vmlinux in vmlinuz-$kv"; exit 1; }
fi
echo "$kv" > "$cache/kver-7"
for f in "$repo"/.build-guest/*; do [ -f "$f" ] && [ -x "$f" ] && cp -p "$f" "$cache/"; done
GUEST_CACHE=$cache GUEST_KERNEL=7 GUEST_SECCOMP=${GUEST_SECCOMP:-kill} GUEST_TIMEOUT=${GUEST_TIMEOUT:-90} \
  Tests/guest/run.sh "${@:-all}"
