#!/usr/bin/env bash
# Real vhost-user back-ends that bookworm does not package, for the peer tests: fetched from Debian sid as .deb
# files (never installed into the system: unpacked under $PEERS, default /opt/loopbackd-peers), with a private apt
# state so bookworm's sources and pins stay untouched. Idempotent; a cached copy is reused.
#   vhost-device-vsock (rust-vmm; runs on bookworm's libc): Tests/RegistryTests/VsockPeerTests.swift
set -euo pipefail
PEERS=${PEERS:-/opt/loopbackd-peers}
want=(vhost-device-vsock)
missing=()
for p in "${want[@]}"; do [ -x "$PEERS/$p" ] || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then echo "install-peers: ok (cached in $PEERS)"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$PEERS"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" > "$work/sources.list"
apt_sid=(apt-get -q -o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
         -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o APT::Sandbox::User=root)
"${apt_sid[@]}" update -qq >/dev/null
for p in "${missing[@]}"; do
    (cd "$work" && "${apt_sid[@]}" download "$p" >/dev/null)
    dpkg -x "$work/${p}"_*.deb "$work/x-$p"
    install -m 0755 "$work/x-$p/usr/bin/$p" "$PEERS/$p"
    "$PEERS/$p" --version >/dev/null 2>&1 || { echo "install-peers: $p does not run here" >&2; exit 1; }
done
echo "install-peers: ok ($(cd "$PEERS" && ls | tr '\n' ' '))"
