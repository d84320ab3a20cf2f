# shellcheck shell=bash
# Image building blocks shared by scripts/mkimage.sh (the minimal image), scripts/install-deps.sh (kernel headers)
# and the guest test suites (Tests/guest/setup.sh, run.sh, vhost-user.sh): one copy of "which Debian kernel",
# "fetch and unpack it", "build the module against its headers", "put modules in an initramfs in load order" and
# "pack a reproducible cpio".  Source it from bash; nothing runs at source time.
#
# Kernel flavors: 6.1  = Debian 12's kernel (bookworm)
#                 6.12 = bookworm-backports' kernel (its headers install on bookworm, built with gcc-12)
# Cache layout (IMG_CACHE): debs/ (downloaded .deb), kernel-KV/ (unpacked package + modules.dep),
# vmlinux-KV (uncompressed ELF for fast PVH boots under TCG), module-KV/virtio_loopback.ko, kver-FLAVOR.

IMG_REPO=${IMG_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
IMG_FLAVORS="6.1 6.12"
IMG_BACKPORTS_LIST=/etc/apt/sources.list.d/bookworm-backports.sources
: "${SOURCE_DATE_EPOCH:=1700000000}"   # fixed timestamps in the cpio archive (reproducible images)

img_log() { echo "${IMG_LOG_PREFIX:-mkimage}: $*" >&2; }
img_die() { img_log "$*"; exit 1; }

img_check_flavor() { case " $IMG_FLAVORS " in *" $1 "*) ;; *) img_die "unknown kernel '$1' (one of: $IMG_FLAVORS)";; esac; }

# img_backports_source: bookworm-backports in apt's sources (idempotent). Returns 0 if it added the file.
img_backports_source() {
  grep -qsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    /etc/apt/sources.list.d/*.sources && return 1
  cat > "$IMG_BACKPORTS_LIST" <<'EOF'
# added by loopbackd's scripts/install-deps.sh: the 6.12 kernel's headers and image for the guest tests
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  return 0
}

# img_kver FLAVOR: the kernel version (uname -r) whose headers are installed for FLAVOR, newest first; empty if none.
img_kver() {
  local pat=${1//./\\.}
  dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' 'linux-headers-*-amd64' 2>/dev/null |
    awk '$1 == "ii" { print $2 }' | sed -n "s/^linux-headers-\(${pat}\.[0-9].*-amd64\)$/\1/p" |
    while read -r kv; do [ -e "/lib/modules/$kv/build/Makefile" ] && echo "$kv"; done | sort -V | tail -1
}

# img_headers_pkg FLAVOR: the linux-headers-KV-amd64 package apt offers for FLAVOR (from the metapackage's versions).
img_headers_pkg() {
  local pat=${1//./\\.}
  apt-cache show linux-headers-amd64 2>/dev/null | sed -n 's/^Depends: //p' | tr ',' '\n' |
    grep -oE "linux-headers-${pat}\.[^ ]*-amd64" | sort -V | tail -1
}

# img_install_headers FLAVOR: installs that kernel's headers if missing (root). For 6.12 adds bookworm-backports.
# The 6.12 headers package depends on its image package: INITRD=No skips the host initramfs (about 50 s).
img_install_headers() {
  local flavor=$1 pkg
  [ -n "$(img_kver "$flavor")" ] && return 0
  [ "$(id -u)" = 0 ] || img_die "kernel $flavor headers missing: run scripts/install-deps.sh as root"
  export DEBIAN_FRONTEND=noninteractive
  if [ "$flavor" = 6.1 ]; then
    pkg=linux-headers-amd64
    apt-get update -qq
  else
    img_backports_source || true
    apt-get update -qq
    pkg=$(img_headers_pkg "$flavor")
    [ -n "$pkg" ] || img_die "no linux-headers package for $flavor in apt's sources"
  fi
  img_log "installing $pkg"
  INITRD=No apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
  [ -n "$(img_kver "$flavor")" ] || img_die "headers for $flavor still missing after installing $pkg"
}

# img_extract_vmlinux BZIMAGE OUT: the uncompressed ELF inside a bzImage (xz in 6.1/6.12, zstd from 7.x).
# PVH boots it under TCG in about 2 s instead of 5 s (no in-guest decompression).
img_extract_vmlinux() {
  local bz=$1 out=$2 off
  for off in $(LC_ALL=C grep -aboP '\xfd7zXZ\x00' "$bz" | cut -d: -f1); do
    tail -c +$((off + 1)) "$bz" | xz -dc 2>/dev/null > "$out.tmp"
    [ -s "$out.tmp" ] && head -c 4 "$out.tmp" | grep -q ELF && { mv "$out.tmp" "$out"; return 0; }
  done
  for off in $(LC_ALL=C grep -aboP '\x28\xb5\x2f\xfd' "$bz" | cut -d: -f1); do
    tail -c +$((off + 1)) "$bz" | zstd -dcq 2>/dev/null > "$out.tmp"
    [ -s "$out.tmp" ] && head -c 4 "$out.tmp" | grep -q ELF && { mv "$out.tmp" "$out"; return 0; }
  done
  rm -f "$out.tmp"
  return 1
}

# img_kernel_fetch KV: Debian's linux-image-KV package downloaded once into IMG_CACHE/debs, unpacked into
# IMG_CACHE/kernel-KV (with modules.dep), and its vmlinux extracted to IMG_CACHE/vmlinux-KV.
img_kernel_fetch() {
  local kv=$1 kroot=$IMG_CACHE/kernel-$1 deb
  mkdir -p "$IMG_CACHE/debs"
  if [ ! -f "$kroot/boot/vmlinuz-$kv" ]; then
    deb=$(ls "$IMG_CACHE"/debs/linux-image-"$kv"_*.deb 2>/dev/null | head -1 || true)
    if [ -z "$deb" ]; then
      img_log "downloading linux-image-$kv"
      (cd "$IMG_CACHE/debs" && apt-get download -qq -o APT::Sandbox::User=root "linux-image-$kv" >&2) || img_die "apt-get download linux-image-$kv failed"
      deb=$(ls "$IMG_CACHE"/debs/linux-image-"$kv"_*.deb | head -1)
    fi
    rm -rf "$kroot.tmp" "$kroot" && mkdir -p "$kroot.tmp"
    dpkg -x "$deb" "$kroot.tmp"
    mv "$kroot.tmp" "$kroot"
  fi
  [ -f "$kroot/lib/modules/$kv/modules.dep" ] || depmod -b "$kroot" "$kv"
  if [ ! -s "$IMG_CACHE/vmlinux-$kv" ]; then
    img_log "extracting vmlinux-$kv"
    img_extract_vmlinux "$kroot/boot/vmlinuz-$kv" "$IMG_CACHE/vmlinux-$kv" || img_die "could not extract vmlinux from vmlinuz-$kv"
  fi
}

# img_module_build KV: kernel/virtio-loopback built against /lib/modules/KV/build in IMG_CACHE/module-KV (a copy of
# the sources, so two kernels and the source tree never share objects). Prints the .ko path.
img_module_build() {
  local kv=$1 src=$IMG_REPO/kernel/virtio-loopback dir=$IMG_CACHE/module-$1
  mkdir -p "$dir/uapi"
  cp -p "$src"/Makefile "$src"/*.c "$dir/"
  ls "$src"/*.h >/dev/null 2>&1 && cp -p "$src"/*.h "$dir/"
  cp -p "$src"/uapi/*.h "$dir/uapi/"
  img_log "building virtio_loopback.ko for $kv"
  # the build dir's path stays out of the object (debug info, __FILE__): the same .ko from any checkout
  make -s -C "/lib/modules/$kv/build" M="$dir" KCFLAGS="-ffile-prefix-map=$dir/=" modules >&2 ||
    img_die "module build failed for $kv"
  echo "$dir/virtio_loopback.ko"
}

# img_linux_sources KV: the driver sources the guest suites build out of tree for KV (Debian's 6.1 and 6.12 kernels
# leave CONFIG_I2C_VIRTIO and CONFIG_GPIO_VIRTIO unset), extracted from Debian's linux-source-SERIES package of the
# headers' version (the archive's current one if that is gone) into IMG_CACHE/i2c-virtio-KV/i2c-virtio.c and
# IMG_CACHE/gpio-virtio-KV/gpio-virtio.c.orig. Only the missing files are extracted, all in one pass of one
# download (tar stops at the last one: about 5 s); the package (140-150 MB) is deleted once read.
img_linux_sources() {
  local kv=$1 series pkg ver tmp deb f d out want=() have
  local -A dest=([drivers/i2c/busses/i2c-virtio.c]=$IMG_CACHE/i2c-virtio-$1/i2c-virtio.c
                 [drivers/gpio/gpio-virtio.c]=$IMG_CACHE/gpio-virtio-$1/gpio-virtio.c.orig)
  # virtio_snd's sources only for a kernel that does not ship the module (6.1; 6.12 has it)
  if ! img_kernel_has_module "$kv" virtio_snd; then
    for f in virtio_card.c virtio_card.h virtio_chmap.c virtio_ctl_msg.c virtio_ctl_msg.h virtio_jack.c virtio_pcm.c \
             virtio_pcm.h virtio_pcm_msg.c virtio_pcm_ops.c; do
      dest[sound/virtio/$f]=$IMG_CACHE/snd-virtio-$1/$f
    done
  fi
  for f in "${!dest[@]}"; do [ -f "${dest[$f]}" ] || want+=("$f"); done
  [ ${#want[@]} -gt 0 ] || return 0
  series=$(echo "$kv" | grep -oE '^[0-9]+\.[0-9]+')
  pkg=linux-source-$series
  ver=$(dpkg-query -W -f='${Version}' "linux-headers-$kv" 2>/dev/null || true)
  tmp=$(mktemp -d "$IMG_CACHE/.src.XXXXXX")
  img_log "downloading $pkg${ver:+=$ver} for ${want[*]##*/}"
  (cd "$tmp" && { apt-get download -qq -o APT::Sandbox::User=root "$pkg${ver:+=$ver}" ||
    apt-get download -qq -o APT::Sandbox::User=root "$pkg"; } >&2) || { rm -rf "$tmp"; img_die "apt-get download $pkg failed"; }
  deb=$(ls "$tmp"/*.deb | head -1)
  # the pipe's writers die of SIGPIPE once tar has its files: judge by the files, not the status
  (dpkg-deb --fsys-tarfile "$deb" | tar -xO --wildcards "./usr/src/$pkg.tar.xz" | xz -dc |
    tar -x -C "$tmp" --occurrence=1 "${want[@]/#/$pkg/}") 2>/dev/null || true
  for f in "${want[@]}"; do
    [ -s "$tmp/$pkg/$f" ] || { rm -rf "$tmp"; img_die "$f not found in $pkg"; }
    out=${dest[$f]}; mkdir -p "${out%/*}"
    mv "$tmp/$pkg/$f" "$out.tmp" && mv "$out.tmp" "$out"
  done
  rm -rf "$tmp"
}

# img_i2c_virtio KV: the kernel's i2c-virtio driver built out of tree against KV's headers in
# IMG_CACHE/i2c-virtio-KV/ (source: img_linux_sources), unless the module is newer than its source (about 1.5 s).
# Prints the .ko path.
img_i2c_virtio() {
  local kv=$1 dir=$IMG_CACHE/i2c-virtio-$1
  img_linux_sources "$kv"
  if [ ! "$dir/i2c-virtio.ko" -nt "$dir/i2c-virtio.c" ]; then
    echo 'obj-m := i2c-virtio.o' > "$dir/Kbuild"
    img_log "building i2c-virtio.ko for $kv"
    make -s -C "/lib/modules/$kv/build" M="$dir" KCFLAGS="-ffile-prefix-map=$dir/=" modules >&2 ||
      img_die "i2c-virtio build failed for $kv"
    strip --strip-debug "$dir/i2c-virtio.ko"
  fi
  echo "$dir/i2c-virtio.ko"
}

# img_gpio_virtio KV: the kernel's gpio-virtio driver built out of tree against KV's headers in
# IMG_CACHE/gpio-virtio-KV/ (source: img_linux_sources), with one change: 6.1's and 6.12's driver give every
# instance the same static, writable vgpio_irq_chip, which gpiolib hooks per gpio_chip (irq_enable/irq_disable
# saved and replaced), so with two virtio-gpio chips the second chip's first interrupt request calls a NULL
# irq_enable (oops in request_threaded_irq from GPIO_GET_LINEEVENT_IOCTL). Each instance gets its own copy
# (devm_kmemdup). Built unless the module is newer than its source (about 1.6 s). Prints the .ko path.
img_gpio_virtio() {
  local kv=$1 dir=$IMG_CACHE/gpio-virtio-$1
  img_linux_sources "$kv"
  if [ ! "$dir/gpio-virtio.c" -nt "$dir/gpio-virtio.c.orig" ]; then
    grep -q '^\s*vgpio->gc\.irq\.chip\s*=\s*&vgpio_irq_chip;$' "$dir/gpio-virtio.c.orig" ||
      img_die "gpio-virtio.c ($kv): the irq_chip assignment to patch is not there"
    sed 's/^\(\s*\)vgpio->gc\.irq\.chip\s*=\s*&vgpio_irq_chip;$/\1\/* one irq_chip per instance: gpiolib hooks the chip it is given (loopbackd guest suites) *\/\
\1vgpio->gc.irq.chip = devm_kmemdup(dev, \&vgpio_irq_chip, sizeof(vgpio_irq_chip), GFP_KERNEL);\
\1if (!vgpio->gc.irq.chip)\
\1\treturn -ENOMEM;/' "$dir/gpio-virtio.c.orig" > "$dir/gpio-virtio.c.tmp" && mv "$dir/gpio-virtio.c.tmp" "$dir/gpio-virtio.c"
  fi
  if [ ! "$dir/gpio-virtio.ko" -nt "$dir/gpio-virtio.c" ]; then
    echo 'obj-m := gpio-virtio.o' > "$dir/Kbuild"
    img_log "building gpio-virtio.ko for $kv"
    make -s -C "/lib/modules/$kv/build" M="$dir" KCFLAGS="-ffile-prefix-map=$dir/=" modules >&2 ||
      img_die "gpio-virtio build failed for $kv"
    strip --strip-debug "$dir/gpio-virtio.ko"
  fi
  echo "$dir/gpio-virtio.ko"
}

# img_kernel_has_module KV NAME: the unpacked kernel KV ships module NAME (modules.dep of IMG_CACHE/kernel-KV).
img_kernel_has_module() {
  grep -qE "(^|/)$2\.ko(\.xz|\.zst)?:" "$IMG_CACHE/kernel-$1/lib/modules/$1/modules.dep" 2>/dev/null
}

# img_snd_virtio KV: the kernel's virtio_snd driver for KV: nothing to build when the kernel ships it (6.12: the
# runner stages it with its dependencies); otherwise (6.1, CONFIG_SND_VIRTIO unset) built out of tree from
# linux-source's sound/virtio/ (img_linux_sources) in IMG_CACHE/snd-virtio-KV/ (about 4 s), unless the module is
# newer than its sources. Prints the .ko path, or "kernel" when the kernel has the module.
img_snd_virtio() {
  local kv=$1 dir=$IMG_CACHE/snd-virtio-$1
  if img_kernel_has_module "$kv" virtio_snd; then echo kernel; return 0; fi
  img_linux_sources "$kv"
  if [ ! "$dir/virtio_snd.ko" -nt "$dir/virtio_pcm_ops.c" ]; then
    printf 'obj-m := virtio_snd.o\nvirtio_snd-objs := virtio_card.o virtio_chmap.o virtio_ctl_msg.o virtio_jack.o virtio_pcm_msg.o virtio_pcm.o virtio_pcm_ops.o\n' > "$dir/Kbuild"
    img_log "building virtio_snd.ko for $kv"
    make -s -C "/lib/modules/$kv/build" M="$dir" KCFLAGS="-ffile-prefix-map=$dir/=" modules >&2 ||
      img_die "virtio_snd build failed for $kv"
    strip --strip-debug "$dir/virtio_snd.ko"
  fi
  echo "$dir/virtio_snd.ko"
}

# img_stage_modules ROOT KV NAME...: the named modules (and their dependencies) copied into ROOT/lib/modules
# like img_add_modules, but not loaded at boot (load.list unchanged): a test insmods and rmmods them itself.
img_stage_modules() {
  local list=$1/lib/modules/load.list
  cp "$list" "$list.keep"
  img_add_modules "$@"
  mv "$list.keep" "$list"
}

# img_virtio_can KV: the kernel's virtio_can driver (drivers/net/can/virtio_can.c, mainline since 7.x) built out of
# tree against KV's headers in IMG_CACHE/virtio-can-KV/. No Debian kernel builds it (CONFIG_CAN_VIRTIO_CAN unset in
# 7.2 and 7.3) and 6.1/6.12's sources lack it, so it comes from Debian's linux-source-7.3 (trixie-backports, through
# a private apt configuration under IMG_CACHE/apt-trixie-backports: the system's sources are not touched), read
# once into IMG_CACHE/virtio-can-src/ (the package, about 170 MB, is deleted once read). A compat header makes it
# build for 6.1 and 6.12: struct virtqueue_info and the older virtio_find_vqs() (before 6.11), __counted_by_le
# (before 6.10); `can.fd.data_bittiming` is `can.data_bittiming` before 7.x. Built unless the module is newer than
# its sources (about 2 s). Prints the .ko path.
img_virtio_can() {
  local kv=$1 dir=$IMG_CACHE/virtio-can-$1 src=$IMG_CACHE/virtio-can-src apt=$IMG_CACHE/apt-trixie-backports tmp deb
  local -a o
  if [ ! -s "$src/virtio_can.c" ] || [ ! -s "$src/virtio_can.h" ]; then
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$src"
    echo 'deb http://deb.debian.org/debian trixie-backports main' > "$apt/sources.list"
    o=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$apt/lists"
       -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root -qq)
    apt-get "${o[@]}" update >&2 || img_die "apt-get update (trixie-backports) failed"
    tmp=$(mktemp -d "$IMG_CACHE/.can-src.XXXXXX")
    img_log "downloading linux-source-7.3 (trixie-backports) for virtio_can.c"
    (cd "$tmp" && apt-get "${o[@]}" download linux-source-7.3 >&2) || { rm -rf "$tmp"; img_die "apt-get download linux-source-7.3 failed"; }
    deb=$(ls "$tmp"/*.deb | head -1)
    (dpkg-deb --fsys-tarfile "$deb" | tar -xO --wildcards './usr/src/linux-source-7.3.tar.*' | xz -dc |
      tar -x -C "$tmp" linux-source-7.3/drivers/net/can/virtio_can.c linux-source-7.3/include/uapi/linux/virtio_can.h) 2>/dev/null || true
    [ -s "$tmp/linux-source-7.3/drivers/net/can/virtio_can.c" ] && [ -s "$tmp/linux-source-7.3/include/uapi/linux/virtio_can.h" ] ||
      { rm -rf "$tmp"; img_die "virtio_can sources not found in linux-source-7.3"; }
    mv "$tmp/linux-source-7.3/include/uapi/linux/virtio_can.h" "$src/virtio_can.h"
    mv "$tmp/linux-source-7.3/drivers/net/can/virtio_can.c" "$src/virtio_can.c"
    rm -rf "$tmp"
  fi
  if [ ! "$dir/virtio_can.ko" -nt "$src/virtio_can.c" ]; then
    mkdir -p "$dir/include/linux"
    cp "$src/virtio_can.h" "$dir/include/linux/virtio_can.h"
    if grep -q 'struct data_bittiming_params' "/lib/modules/$kv/build/include/linux/can/dev.h" \
         "/lib/modules/$kv/build/include/linux/can/bittiming.h" 2>/dev/null ||
       grep -q 'struct data_bittiming_params' /usr/src/linux-headers-"${kv%-*}"-common/include/linux/can/*.h 2>/dev/null; then
      cp "$src/virtio_can.c" "$dir/virtio_can.c"
    else
      sed 's/can\.fd\.data_bittiming/can.data_bittiming/g' "$src/virtio_can.c" > "$dir/virtio_can.c"
    fi
    cat > "$dir/virtio_can_compat.h" <<'COMPAT'
/* loopbackd guest suites: mainline virtio_can.c (7.x) on older kernels. */
#include <linux/version.h>
#include <linux/virtio_config.h>
#ifndef __counted_by_le
#define __counted_by_le(member)
#endif
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 11, 0)
struct virtqueue_info { const char *name; vq_callback_t *callback; bool ctx; };
static inline int lb_virtio_find_vqs_info(struct virtio_device *vdev, unsigned int nvqs, struct virtqueue *vqs[],
                                          struct virtqueue_info *info, struct irq_affinity *desc)
{
	vq_callback_t *callbacks[8];
	const char *names[8];
	unsigned int i;

	if (nvqs > 8)
		return -EINVAL;
	for (i = 0; i < nvqs; i++) {
		callbacks[i] = info[i].callback;
		names[i] = info[i].name;
	}
	return virtio_find_vqs(vdev, nvqs, vqs, callbacks, names, desc);
}
#define virtio_find_vqs lb_virtio_find_vqs_info
#endif
COMPAT
    printf 'obj-m := virtio_can.o\nccflags-y := -I$(src)/include -include $(src)/virtio_can_compat.h\n' > "$dir/Kbuild"
    img_log "building virtio_can.ko for $kv"
    make -s -C "/lib/modules/$kv/build" M="$dir" KCFLAGS="-ffile-prefix-map=$dir/=" modules >&2 ||
      img_die "virtio_can build failed for $kv"
    strip --strip-debug "$dir/virtio_can.ko"
  fi
  echo "$dir/virtio_can.ko"
}

# img_prepare FLAVOR: headers installed (if root), kernel fetched, module built; writes IMG_CACHE/kver-FLAVOR and
# sets IMG_KVER, IMG_VMLINUX, IMG_KO.
img_prepare() {
  img_check_flavor "$1"
  mkdir -p "$IMG_CACHE"
  img_install_headers "$1"
  IMG_KVER=$(img_kver "$1")
  img_log "kernel $1: $IMG_KVER"
  img_kernel_fetch "$IMG_KVER"
  IMG_KO=$(img_module_build "$IMG_KVER") && [ -f "$IMG_KO" ] || exit 1
  IMG_VMLINUX=$IMG_CACHE/vmlinux-$IMG_KVER
  echo "$IMG_KVER" > "$IMG_CACHE/kver-$1"
}

# img_tree_init ROOT: an initramfs tree with busybox-static (applets installed by /init) and the usual dirs.
img_tree_init() {
  local root=$1 bb
  bb=$(command -v busybox) || img_die "busybox missing (apt-get install busybox-static)"
  case "$(LC_ALL=C ldd "$bb" 2>&1 || true)" in *"not a dynamic"*) ;; *) img_die "$bb is not static (apt-get install busybox-static)";; esac
  mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,var/log,lib/modules,usr/bin,usr/sbin,mnt}
  cp "$bb" "$root/bin/busybox"
  ln -sfn busybox "$root/bin/sh"
  : > "$root/lib/modules/load.list"
}

# img_add_modules ROOT KV NAME...: the named modules of the unpacked kernel and their dependencies, copied
# (decompressed: 6.12 ships .ko.xz) into ROOT/lib/modules and appended to load.list in load order.
# Modules built into that kernel (6.12: virtio, virtio_ring, virtio_pci) are skipped.
img_add_modules() {
  local root=$1 kv=$2; shift 2
  local base=$IMG_CACHE/kernel-$kv/lib/modules/$kv
  local -A seen=()
  local order=() m p f
  _img_resolve() {
    local path deps d n
    path=$(grep -E "(^|/)$1\.ko(\.xz|\.zst)?:" "$base/modules.dep" | head -1 | cut -d: -f1 || true)
    if [ -z "$path" ]; then
      n=${1//-/_}
      grep -qE "/(${1}|${n})\.ko$" "$base/modules.builtin" 2>/dev/null && return 0
      img_die "module $1 not found in $kv"
    fi
    [ -n "${seen[$path]:-}" ] && return 0
    seen[$path]=1
    deps=$(grep -E "^$path:" "$base/modules.dep" | cut -d: -f2)
    for d in $deps; do d=$(basename "$d"); _img_resolve "${d%%.ko*}"; done
    order+=("$path")
  }
  for m in "$@"; do _img_resolve "$m"; done
  for p in "${order[@]}"; do
    f=$(basename "$p"); f=${f%%.ko*}.ko
    case "$p" in
      *.ko.xz) xz -dc "$base/$p" > "$root/lib/modules/$f" ;;
      *.ko.zst) zstd -dcq "$base/$p" > "$root/lib/modules/$f" ;;
      *) cp "$base/$p" "$root/lib/modules/$f" ;;
    esac
    echo "$f" >> "$root/lib/modules/load.list"
  done
}

# img_write_init ROOT: the image's /init. Common part: busybox applets, /proc /sys /dev /tmp, the modules of
# load.list. Then /etc/image/main if the tree has one (the guest test suites' runner, sourced), else the image's
# own flow: start loopbackd on /etc/loopbackd.conf, then run the command passed as lbcmd=BASE64 on the kernel
# command line and power off, or give a shell on the console (power off when it exits).
img_write_init() {
  cat > "$1/init" <<'INIT'
#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin SWIFT_ROOT=/ HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /lib/modules/load.list); do insmod /lib/modules/$m || echo "GUEST-INFO insmod $m failed"; done
if [ -f /etc/image/main ]; then . /etc/image/main; sync; poweroff -f; fi
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
hostname loopbackd
LBPID=
if [ -x /bin/loopbackd ] && [ -f /etc/loopbackd.conf ]; then
  loopbackd -c /etc/loopbackd.conf > /var/log/loopbackd.log 2>&1 &
  LBPID=$!
  echo "image: loopbackd started (pid $LBPID, log /var/log/loopbackd.log)"
fi
cmd=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^lbcmd=//p' | head -1)
if [ -n "$cmd" ]; then
  echo "$cmd" | base64 -d > /tmp/.cmd 2>/dev/null || echo "image: bad lbcmd"
  cd /tmp; sh /tmp/.cmd; echo "IMAGE-CMD-EXIT $?"
else
  echo "image: $(uname -r), shell on the console; exit or poweroff -f to stop"
  setsid cttyhack sh -l
fi
if [ -n "$LBPID" ] && kill -TERM "$LBPID" 2>/dev/null; then
  i=0; while kill -0 "$LBPID" 2>/dev/null && [ $i -lt 50 ]; do usleep 100000; i=$((i + 1)); done
fi
sync
poweroff -f
INIT
  chmod 755 "$1/init"
}

# img_pack ROOT OUT [GZIP_LEVEL]: a reproducible newc cpio (sorted names, fixed mtimes, no inode numbers, gzip -n).
img_pack() {
  local root=$1 out=$2 level=${3:-1}
  find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  (cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio -o -H newc --null --reproducible --owner=0:0 --quiet | gzip -n -"$level") > "$out.tmp" && mv "$out.tmp" "$out"
}
