#!/usr/bin/env bash
# Builds the minimal loopbackd image: a Debian kernel (bzImage) plus one initramfs holding busybox-static, the
# kernel's virtio drivers, the project's module built against that kernel's headers, the static loopbackd binary
# (stripped) and its config. Boot it with scripts/run-image.sh. Needs root on first use (apt: headers, busybox).
#
#   scripts/mkimage.sh [--kernel 6.1|6.12] [--out DIR] [--config FILE] [--loopbackd BIN] [--no-vmlinux]
#   scripts/mkimage.sh --prepare [--kernel 6.1|6.12]...     fetch kernels and build the module only (guest suite)
#
#   --kernel     6.1 = Debian 12's kernel (default); 6.12 = bookworm-backports' (adds it to apt's sources)
#   --out        output dir (default <repo>/.build-image/<kernel>): vmlinuz + initramfs.cpio.gz = the image;
#                vmlinux = the same kernel uncompressed (boots twice as fast under TCG; not counted in the size)
#   --config     loopbackd config installed as /etc/loopbackd.conf (default: rng0 + a 16 MiB disk0 through the
#                module, transport "virtio-lo"); checked with `loopbackd --check` before packing
#   --loopbackd  static binary (default <repo>/.build/release/loopbackd, built if missing)
# Environment: IMG_CACHE (downloads, unpacked kernels, module builds; default <repo>/.build-guest, shared with the
# guest suite), SOURCE_DATE_EPOCH (archive timestamps). Same inputs give the same initramfs bytes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/image-lib.sh"
repo=$IMG_REPO
IMG_CACHE=${IMG_CACHE:-$repo/.build-guest}

flavors=(); out=""; conf=""; lbd=$repo/.build/release/loopbackd; prepare=0; vmlinux=1
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) flavors+=("$2"); shift 2 ;;
    --kernel=*) flavors+=("${1#*=}"); shift ;;
    --out) out=$2; shift 2 ;;
    --config) conf=$2; shift 2 ;;
    --loopbackd) lbd=$2; shift 2 ;;
    --prepare) prepare=1; shift ;;
    --no-vmlinux) vmlinux=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) img_die "unknown argument $1 (see --help)" ;;
  esac
done
[ ${#flavors[@]} -gt 0 ] || flavors=(6.1)
for f in "${flavors[@]}"; do img_check_flavor "$f"; done

if [ $prepare = 1 ]; then
  for f in "${flavors[@]}"; do img_prepare "$f"; done
  exit 0
fi
[ ${#flavors[@]} -eq 1 ] || img_die "one --kernel per image"
flavor=${flavors[0]}
out=${out:-$repo/.build-image/$flavor}

for t in busybox cpio gzip xz depmod make gcc strip; do
  command -v "$t" >/dev/null || img_die "$t missing: run scripts/install-deps.sh"
done
img_prepare "$flavor"

if [ ! -x "$lbd" ]; then
  img_log "building loopbackd (swift build -c release)"
  (cd "$repo" && PATH=/opt/swift/usr/bin:$PATH swift build -c release --product loopbackd >&2)
  lbd=$repo/.build/release/loopbackd
fi
case "$(LC_ALL=C ldd "$lbd" 2>&1 || true)" in *"not a dynamic"*) ;; *) img_die "$lbd is not a static executable";; esac

work=$(mktemp -d "${TMPDIR:-/tmp}/mkimage.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ -z "$conf" ]; then
  conf=$work/loopbackd.conf
  cat > "$conf" <<'CONF'
# loopbackd in the minimal image: the kernel's own virtio drivers through the virtio-loopback module.
[daemon]
transport = "virtio-lo"
device-node = "/dev/virtio-lo"
log-level = "info"

[device.rng0]
type = "rng"
backend = "inproc"

[device.disk0]
type = "blk"
backend = "inproc"
path = "/tmp/disk0.img"
create-mib = 16
queue-size = 64
CONF
fi
"$lbd" --check -c "$conf" >/dev/null || img_die "config $conf rejected by loopbackd --check"

root=$work/root
img_tree_init "$root"
img_add_modules "$root" "$IMG_KVER" virtio_ring virtio virtio-rng virtio_blk
strip --strip-debug -o "$root/lib/modules/virtio_loopback.ko" "$IMG_KO"
echo virtio_loopback.ko >> "$root/lib/modules/load.list"
strip -o "$root/bin/loopbackd" "$lbd"
cp "$conf" "$root/etc/loopbackd.conf"
chmod 600 "$root/etc/loopbackd.conf"
img_write_init "$root"

mkdir -p "$out"
img_pack "$root" "$out/initramfs.cpio.gz" 9
cp "$IMG_CACHE/kernel-$IMG_KVER/boot/vmlinuz-$IMG_KVER" "$out/vmlinuz"
rm -f "$out/vmlinux"
if [ $vmlinux = 1 ]; then ln "$IMG_VMLINUX" "$out/vmlinux" 2>/dev/null || cp "$IMG_VMLINUX" "$out/vmlinux"; fi
kz=$(stat -c %s "$out/vmlinuz"); iz=$(stat -c %s "$out/initramfs.cpio.gz")
{
  echo "kernel $IMG_KVER ($flavor)"
  echo "loopbackd $("$lbd" --version 2>/dev/null | head -1)"
  (cd "$out" && sha256sum vmlinuz initramfs.cpio.gz)
} > "$out/image.txt"
echo "image: $out (kernel $IMG_KVER)"
awk -v k="$kz" -v i="$iz" 'BEGIN { m = 1048576
  printf "size: vmlinuz %.1f MiB + initramfs.cpio.gz %.1f MiB = %.1f MiB (%d bytes)\n", k / m, i / m, (k + i) / m, k + i }'
echo "initramfs sha256: $(sha256sum "$out/initramfs.cpio.gz" | cut -d' ' -f1)"
