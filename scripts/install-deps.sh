#!/usr/bin/env bash
# Installs what building and testing loopbackd needs on a fresh Debian 12 (as root): liburing for io_uring,
# and for the guest and vhost-user tests QEMU (qemu-system-x86 brings qemu-storage-daemon), busybox-static,
# the tools to build the module and the initramfs, and the headers of both guest kernels: Debian 12's 6.1
# (linux-headers-amd64) and bookworm-backports' 6.12 (the suite is added to apt's sources; that headers package
# pulls in its image package, installed with INITRD=No so the host gets no initramfs). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/image-lib.sh
IMG_LOG_PREFIX=install-deps
pkgs=(liburing-dev pkg-config qemu-system-x86 qemu-utils busybox-static cpio xz-utils zstd gcc make kmod libc6-dev linux-headers-amd64
      dkms systemd man-db groff-base)   # packaging checks: DKMS build, systemd-analyze verify, man pages
pkgs+=(libgpiod-dev)   # gpio: libgpiod 1.6, static libgpiod.a (the kernel's v1 GPIO chardev ABI)
pkgs+=(libvirglrenderer1)   # the one library QEMU's vhost-user-gpu needs beyond qemu-system-x86's (ldd)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    INITRD=No apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
img_install_headers 6.12
# Real vhost-user back-ends bookworm does not package (vhost-device-vsock from sid), unpacked, not installed.
bash scripts/install-peers.sh
# QEMU's vhost-user-gpu (gpu forwarding peer): only that binary out of bookworm's qemu-system-gui (the package
# itself pulls GTK/SDL), to $PEERS; its libraries come with qemu-system-x86 and libvirglrenderer1. About 1 s.
peers=${PEERS:-/opt/loopbackd-peers}
if [ ! -x "$peers/vhost-user-gpu" ]; then
    vug=$(mktemp -d)
    (cd "$vug" && apt-get download -q qemu-system-gui >/dev/null 2>&1) || { apt-get update -qq; (cd "$vug" && apt-get download -q qemu-system-gui >/dev/null); }
    dpkg -x "$vug"/qemu-system-gui_*.deb "$vug/x"
    mkdir -p "$peers"
    install -m 0755 "$vug/x/usr/lib/qemu/vhost-user-gpu" "$peers/vhost-user-gpu"
    rm -rf "$vug"
fi
"$peers/vhost-user-gpu" --print-capabilities >/dev/null || { echo "install-deps: vhost-user-gpu does not run here" >&2; exit 1; }
echo "install-deps: ok (kernel headers: $(img_kver 6.1), $(img_kver 6.12))"
