#!/usr/bin/env bash
# Packaging checks (no root needed, about 2 s): scripts/install.sh into a temporary DESTDIR installs exactly the
# expected files with their modes, keeps an existing config, rewrites ExecStart= for another PREFIX;
# `systemd-analyze verify` accepts the installed unit with nothing to say (it needs ExecStart='s binary to exist:
# the check verifies a copy of the installed unit whose ExecStart= points at the binary installed in DESTDIR, and
# MANPATH points at the installed man pages so Documentation= is checked too); the man pages render with man(1)
# and groff -ww without a warning; dkms.conf's version is the binary's. Ends with "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${BINARY:-.build/release/loopbackd}
passed=0; failed=0
ok() { echo "ok: $*"; passed=$((passed + 1)); }
bad() { echo "FAIL: $*"; failed=$((failed + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. install into an empty DESTDIR: the file list, exactly, with modes.
d=$tmp/root
if BINARY=$bin DESTDIR=$d bash scripts/install.sh > "$tmp/install.log" 2>&1; then ok "install.sh into DESTDIR"; else bad "install.sh into DESTDIR"; cat "$tmp/install.log"; fi
version=$(sed -n 's/^PACKAGE_VERSION="\(.*\)"$/\1/p' kernel/virtio-loopback/dkms.conf)
cat > "$tmp/expected" <<LIST
644 etc/loopbackd.conf
644 usr/lib/modules-load.d/loopbackd.conf
644 usr/lib/systemd/system/loopbackd.service
644 usr/lib/udev/rules.d/60-virtio-lo.rules
644 usr/share/man/man5/loopbackd.conf.5
644 usr/share/man/man8/loopbackd.8
644 usr/src/virtio-loopback-$version/Makefile
644 usr/src/virtio-loopback-$version/dkms.conf
644 usr/src/virtio-loopback-$version/uapi/virtio_lo.h
644 usr/src/virtio-loopback-$version/virtio_loopback.c
755 usr/sbin/loopbackd
LIST
(cd "$d" && find . -type f -printf '%m %P\n' | LC_ALL=C sort) > "$tmp/got"
if diff -u "$tmp/expected" "$tmp/got"; then ok "installed file list and modes"; else bad "installed file list and modes"; fi
check "installed binary is the build" cmp -s "$bin" "$d/usr/sbin/loopbackd"
check "unit ExecStart= is the installed binary" grep -qx 'ExecStart=/usr/sbin/loopbackd -c /etc/loopbackd.conf' "$d/usr/lib/systemd/system/loopbackd.service"

# 2. an existing config is kept.
echo "# site config" > "$d/etc/loopbackd.conf"
BINARY=$bin DESTDIR=$d bash scripts/install.sh > "$tmp/install2.log" 2>&1
check "existing /etc/loopbackd.conf kept" grep -qx "# site config" "$d/etc/loopbackd.conf"

# 3. another PREFIX: the unit follows the binary.
BINARY=$bin DESTDIR=$tmp/local PREFIX=/usr/local bash scripts/install.sh > "$tmp/install3.log" 2>&1
check "PREFIX=/usr/local: binary in /usr/local/sbin" test -x "$tmp/local/usr/local/sbin/loopbackd"
check "PREFIX=/usr/local: ExecStart= follows" grep -qx 'ExecStart=/usr/local/sbin/loopbackd -c /etc/loopbackd.conf' "$tmp/local/usr/local/lib/systemd/system/loopbackd.service"

# 4. systemd-analyze verify: exit 0 and no message at all (unknown or malformed directives only warn).
sed "s|^ExecStart=/usr/sbin/loopbackd |ExecStart=$d/usr/sbin/loopbackd |" "$d/usr/lib/systemd/system/loopbackd.service" > "$tmp/loopbackd.service"
MANPATH=$d/usr/share/man systemd-analyze verify "$tmp/loopbackd.service" > "$tmp/verify.log" 2>&1
rc=$?
if [ "$rc" -eq 0 ] && [ ! -s "$tmp/verify.log" ]; then ok "systemd-analyze verify loopbackd.service"; else bad "systemd-analyze verify (rc $rc)"; cat "$tmp/verify.log"; fi
score=$(timeout 30 systemd-analyze security --offline=yes "$tmp/loopbackd.service" 2>/dev/null | grep -o 'exposure level for loopbackd.service: .*')
echo "info: $score"

# 4b. every address family the daemon opens a socket of is allowed by RestrictAddressFamilies= (else socket()
# fails with EAFNOSUPPORT under systemd only): AF_UNIX (clinux.c, Notify.swift) and AF_CAN (SocketCAN.swift,
# which spells it as its number, 29).
families=$(sed -n 's/^RestrictAddressFamilies=//p' packaging/systemd/loopbackd.service)
for f in AF_UNIX AF_CAN; do
    check "RestrictAddressFamilies= has $f" sh -c "echo ' $families ' | grep -q ' $f '"
done
check "SocketCAN still opens AF_CAN (29), the family checked above" grep -q 'afCAN: Int32 = 29' Sources/Registry/CAN/SocketCAN.swift

# 5. man pages: man(1) renders them; groff -ww says nothing.
for m in man/loopbackd.8 man/loopbackd.conf.5; do
    check "man -l $m" sh -c "man -l '$m' > /dev/null"
    w=$(groff -man -Tutf8 -ww -z "$m" 2>&1)
    if [ -z "$w" ]; then ok "groff -ww $m: no warnings"; else bad "groff -ww $m"; echo "$w"; fi
done

# 6. one version: dkms.conf, the installed source directory, the binary.
check "dkms.conf version = loopbackd --version" test "loopbackd $version" = "$("$bin" --version)"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
