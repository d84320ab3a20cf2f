#!/usr/bin/env bash
# Boots an image made by scripts/mkimage.sh under QEMU (TCG, -nographic, the console on this terminal).
#
#   scripts/run-image.sh [--kernel 6.1|6.12 | --image DIR] [--bzimage] [--timeout S] [-- COMMAND...]
#
# Without COMMAND: a shell on the console (loopbackd already runs; `poweroff -f` or exit the shell to stop;
# Ctrl-A X quits QEMU). With COMMAND: it runs in the guest's sh after loopbackd started, then the guest powers
# off; the exit status is the command's ("IMAGE-CMD-EXIT N" on the console).
#   --image DIR  default <repo>/.build-image/<kernel> (kernel default 6.1)
#   --bzimage    boot the compressed vmlinuz (what a target boots) instead of the uncompressed vmlinux (faster under TCG)
#   --timeout S  kill QEMU after S seconds (default: none for a shell, 120 with a command)
# Extra QEMU options: RUN_IMAGE_QEMU_OPTS (e.g. "-m 1024").
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
flavor=6.1; img=""; bz=0; tmo=""; cmd=()
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) flavor=$2; shift 2 ;;
    --image) img=$2; shift 2 ;;
    --bzimage) bz=1; shift ;;
    --timeout) tmo=$2; shift 2 ;;
    --) shift; cmd=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
img=${img:-$repo/.build-image/$flavor}
[ -f "$img/initramfs.cpio.gz" ] || { echo "run-image: no image in $img (scripts/mkimage.sh --kernel $flavor)" >&2; exit 2; }
kernel=$img/vmlinux
{ [ $bz = 1 ] || [ ! -s "$kernel" ]; } && kernel=$img/vmlinuz
append='console=ttyS0 quiet panic=-1'
if [ ${#cmd[@]} -gt 0 ]; then
  b64=$(printf '%s' "${cmd[*]}" | base64 -w0)
  [ ${#b64} -lt 1800 ] || { echo "run-image: command too long for the kernel command line" >&2; exit 2; }
  append="$append lbcmd=$b64"
  tmo=${tmo:-120}
fi
qemu=(qemu-system-x86_64 -accel tcg -m 512 -smp 1 -nodefaults -nographic -serial mon:stdio -no-reboot
      -kernel "$kernel" -initrd "$img/initramfs.cpio.gz" -append "$append")
# shellcheck disable=SC2206
qemu+=(${RUN_IMAGE_QEMU_OPTS:-})
if [ ${#cmd[@]} -eq 0 ]; then
  if [ -n "$tmo" ]; then exec timeout -k 5 "$tmo" "${qemu[@]}"; else exec "${qemu[@]}"; fi
fi
log=$(mktemp "${TMPDIR:-/tmp}/run-image.XXXXXX")
trap 'rm -f "$log"' EXIT
rc=0
timeout -k 5 "$tmo" "${qemu[@]}" < /dev/null 2>&1 | tee "$log" || rc=$?
[ "$rc" = 124 ] || [ "$rc" = 137 ] && { echo "run-image: timeout after ${tmo}s" >&2; exit 124; }
st=$(tr -d '\r' < "$log" | sed -n 's/^IMAGE-CMD-EXIT \([0-9]*\).*/\1/p' | tail -1)
[ -n "$st" ] || { echo "run-image: the guest never finished the command (qemu status $rc)" >&2; exit 1; }
exit "$st"
