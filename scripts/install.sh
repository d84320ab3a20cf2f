#!/usr/bin/env bash
# Installs loopbackd for a system (or into an image's root with DESTDIR=/path/to/rootfs):
#   $BINDIR/loopbackd                            the static binary (built first: swift build -c release)
#   /etc/loopbackd.conf                          the shipped config, only if none is there (never overwritten)
#   $UNITDIR/loopbackd.service                   systemd unit, ExecStart= pointing at $BINDIR/loopbackd
#   $UDEVDIR/60-virtio-lo.rules                  /dev/virtio-lo mode 0600
#   $MODLOADDIR/loopbackd.conf                   load virtio_loopback at boot
#   $MANDIR/man8/loopbackd.8, man5/loopbackd.conf.5
#   $SRCDIR/virtio-loopback-VERSION/             the module's source with dkms.conf, for
#                                                `dkms install virtio-loopback/VERSION` (not run here)
# Variables: DESTDIR (staging root, default none), PREFIX (default /usr), BINDIR ($PREFIX/sbin), SYSCONFDIR (/etc),
# UNITDIR ($PREFIX/lib/systemd/system), UDEVDIR ($PREFIX/lib/udev/rules.d), MODLOADDIR ($PREFIX/lib/modules-load.d),
# MANDIR ($PREFIX/share/man), SRCDIR ($PREFIX/src), BINARY (default .build/release/loopbackd).
# udev reads rules only from /usr/lib, /lib and /etc: with another PREFIX set UDEVDIR=/etc/udev/rules.d.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr}
BINDIR=${BINDIR:-$PREFIX/sbin}
SYSCONFDIR=${SYSCONFDIR:-/etc}
UNITDIR=${UNITDIR:-$PREFIX/lib/systemd/system}
UDEVDIR=${UDEVDIR:-$PREFIX/lib/udev/rules.d}
MODLOADDIR=${MODLOADDIR:-$PREFIX/lib/modules-load.d}
MANDIR=${MANDIR:-$PREFIX/share/man}
SRCDIR=${SRCDIR:-$PREFIX/src}
BINARY=${BINARY:-$repo/.build/release/loopbackd}

[ -x "$BINARY" ] || { echo "install.sh: $BINARY not found: build it first (swift build -c release --product loopbackd)" >&2; exit 1; }
version=$(sed -n 's/^PACKAGE_VERSION="\(.*\)"$/\1/p' "$repo/kernel/virtio-loopback/dkms.conf")
[ -n "$version" ] || { echo "install.sh: no PACKAGE_VERSION in kernel/virtio-loopback/dkms.conf" >&2; exit 1; }

say() { echo "install: $*"; }
put() {   # put MODE SRC DEST
    install -D -m "$1" "$2" "$DESTDIR$3"
    say "$3"
}

put 0755 "$BINARY" "$BINDIR/loopbackd"
if [ -e "$DESTDIR$SYSCONFDIR/loopbackd.conf" ]; then
    say "$SYSCONFDIR/loopbackd.conf exists: kept"
else
    put 0644 "$repo/etc/loopbackd.conf" "$SYSCONFDIR/loopbackd.conf"
fi
unit=$(mktemp)
trap 'rm -f "$unit"' EXIT
sed -e "s|^ExecStart=/usr/sbin/loopbackd |ExecStart=$BINDIR/loopbackd |" \
    -e "s| -c /etc/loopbackd.conf$| -c $SYSCONFDIR/loopbackd.conf|" "$repo/packaging/systemd/loopbackd.service" > "$unit"
put 0644 "$unit" "$UNITDIR/loopbackd.service"
put 0644 "$repo/packaging/udev/60-virtio-lo.rules" "$UDEVDIR/60-virtio-lo.rules"
put 0644 "$repo/packaging/modules-load.d/loopbackd.conf" "$MODLOADDIR/loopbackd.conf"
put 0644 "$repo/man/loopbackd.8" "$MANDIR/man8/loopbackd.8"
put 0644 "$repo/man/loopbackd.conf.5" "$MANDIR/man5/loopbackd.conf.5"
# The module's source only (no build products), as DKMS expects it.
src=$SRCDIR/virtio-loopback-$version
for f in Makefile virtio_loopback.c dkms.conf uapi/virtio_lo.h; do
    put 0644 "$repo/kernel/virtio-loopback/$f" "$src/$f"
done
say "done (DKMS: dkms install virtio-loopback/$version; then systemctl daemon-reload && systemctl enable --now loopbackd)"
