#!/usr/bin/env bash
# DKMS check (root, about 15 s): the module source as scripts/install.sh lays it out goes through
# `dkms add`, `dkms build` and `dkms install` against the installed Debian kernel headers (the kernel the guest
# tests boot, not necessarily the running one: this machine cannot load modules, so build + install is the check),
# then `dkms remove` and the source directory are cleaned up, leaving the machine as it was. "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
passed=0; failed=0
ok() { echo "ok: $*"; passed=$((passed + 1)); }
bad() { echo "FAIL: $*"; failed=$((failed + 1)); }
command -v dkms >/dev/null || { bad "dkms not installed (scripts/install-deps.sh)"; echo "$passed passed, $failed failed"; exit 1; }
hdr=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | tr ',' '\n' | grep -o 'linux-headers-[0-9][^ ]*-amd64' | head -1)
kver=${hdr#linux-headers-}
[ -d "/lib/modules/$kver/build" ] || { bad "no headers for $kver"; echo "$passed passed, $failed failed"; exit 1; }
version=$(sed -n 's/^PACKAGE_VERSION="\(.*\)"$/\1/p' kernel/virtio-loopback/dkms.conf)
name=virtio-loopback
src=/usr/src/$name-$version
if [ -e "$src" ] || dkms status "$name/$version" 2>/dev/null | grep -q .; then
    bad "$name/$version already present in /usr/src or DKMS: not touching it"; echo "$passed passed, $failed failed"; exit 1
fi
tmp=$(mktemp -d)
cleanup() {
    dkms remove "$name/$version" --all >/dev/null 2>&1 || true
    rm -rf "$src" "$tmp"
}
trap cleanup EXIT
# The source directory exactly as install.sh installs it (SRCDIR=/usr/src), nothing else.
BINARY=/bin/true DESTDIR=$tmp/root bash scripts/install.sh > /dev/null
cp -r "$tmp/root/usr/src/$name-$version" "$src"
run() { local what=$1; shift; if "$@" > "$tmp/out" 2>&1; then ok "$what"; else bad "$what"; tail -30 "$tmp/out"; find /var/lib/dkms/$name -name make.log -exec tail -30 {} \; 2>/dev/null; fi; }
run "dkms add $name/$version" dkms add "$name/$version"
run "dkms build $name/$version -k $kver" dkms build "$name/$version" -k "$kver"
run "dkms install $name/$version -k $kver" dkms install --force "$name/$version" -k "$kver"
ko=$(find "/lib/modules/$kver/updates" -name 'virtio_loopback.ko*' 2>/dev/null | head -1)
if [ -n "$ko" ] && modinfo -F vermagic "$ko" | grep -q "^$kver "; then ok "installed $ko (vermagic $kver)"; else bad "no installed virtio_loopback.ko for $kver"; fi
if dkms status "$name/$version" -k "$kver" | grep -q installed; then ok "dkms status: installed"; else bad "dkms status"; fi
run "dkms remove $name/$version --all" dkms remove "$name/$version" --all
ko=$(find "/lib/modules/$kver/updates" -name 'virtio_loopback.ko*' 2>/dev/null | head -1)
if [ -z "$ko" ]; then ok "module removed again"; else bad "$ko left behind"; fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
