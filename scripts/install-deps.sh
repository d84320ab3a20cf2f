#!/usr/bin/env bash
# Installs what building and testing loopbackd needs on a fresh Debian 12 (as root): liburing for io_uring,
# and for the guest and vhost-user tests QEMU (qemu-system-x86 brings qemu-storage-daemon), busybox-static,
# the kernel headers matching Debian's kernel image, and the tools to build the module and the initramfs.
set -euo pipefail
pkgs=(liburing-dev pkg-config qemu-system-x86 qemu-utils busybox-static cpio xz-utils gcc make kmod libc6-dev linux-headers-amd64
      dkms systemd man-db groff-base)   # packaging checks: DKMS build, systemd-analyze verify, man pages
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "install-deps: ok"
