#!/usr/bin/env bash
# Prepare everything the guest test harness needs (idempotent):
#   - Debian packages: qemu, busybox-static, cpio, xz, gcc, make, kmod, linux headers
#   - Debian's kernel image matching the installed headers, unpacked into the cache dir
#   - an uncompressed vmlinux (fast PVH boot under TCG)
#   - kernel/virtio-loopback/virtio_loopback.ko built against those headers
#   - static helper tools (lo-rng, lo-tool, odirect)
# Cache dir: $GUEST_CACHE, default <repo>/.build-guest
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${GUEST_CACHE:-$repo/.build-guest}
mkdir -p "$cache"

log() { echo "setup: $*" >&2; }

need_pkgs=()
for p in qemu-system-x86 busybox-static cpio xz-utils gcc make kmod libc6-dev linux-headers-amd64; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || true
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi

# Resolve the kernel ABI version from the installed headers metapackage.
hdr_pkg=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | tr ',' '\n' | grep -o 'linux-headers-[0-9][^ ]*-amd64' | head -1)
kver=${hdr_pkg#linux-headers-}
[ -n "$kver" ] || { log "cannot resolve kernel version"; exit 1; }
kdir=/lib/modules/$kver/build
[ -d "$kdir" ] || { log "headers missing at $kdir"; exit 1; }
echo "$kver" > "$cache/kver"
log "kernel $kver"

kroot=$cache/kernel-$kver
if [ ! -f "$kroot/boot/vmlinuz-$kver" ]; then
  log "downloading linux-image-$kver"
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download "linux-image-$kver" >&2)
  rm -rf "$kroot.tmp" && mkdir -p "$kroot.tmp"
  dpkg -x "$tmp"/linux-image-"$kver"_*.deb "$kroot.tmp"
  rm -rf "$tmp" "$kroot"
  mv "$kroot.tmp" "$kroot"
fi
if [ ! -f "$kroot/lib/modules/$kver/modules.dep" ]; then
  depmod -b "$kroot" "$kver"
fi

# Extract an uncompressed ELF vmlinux from the bzImage: find the xz stream magic
# (FD 37 7A 58 5A 00) and decompress from there (trailing garbage is ignored).
vmlinux=$cache/vmlinux-$kver
if [ ! -s "$vmlinux" ]; then
  log "extracting vmlinux"
  bz=$kroot/boot/vmlinuz-$kver
  ok=
  for off in $(LC_ALL=C grep -aboP '\xfd7zXZ\x00' "$bz" | cut -d: -f1); do
    if tail -c +$((off + 1)) "$bz" | xz -dc 2>/dev/null > "$vmlinux.tmp"; [ -s "$vmlinux.tmp" ] && \
       head -c 4 "$vmlinux.tmp" | grep -q 'ELF'; then ok=1; break; fi
  done
  [ -n "$ok" ] || { log "could not extract vmlinux"; rm -f "$vmlinux.tmp"; exit 1; }
  mv "$vmlinux.tmp" "$vmlinux"
fi
ln -sf "vmlinux-$kver" "$cache/vmlinux"

# Build the module against the headers.
log "building virtio_loopback.ko"
make -s -C "$repo/kernel/virtio-loopback" KDIR="$kdir" >&2
# Static tools.
make -s -C "$repo/kernel/virtio-loopback/tools" >&2
gcc -static -O2 -Wall -o "$cache/odirect" "$here/tools/odirect.c"
log "done"
