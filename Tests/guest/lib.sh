# Helpers sourced by guest test cases (busybox sh).
NAME=$(cat /tests/name)
pass() { echo "GUEST-TEST $NAME PASS"; exit 0; }
fail() { echo "GUEST-TEST $NAME FAIL $*"; exit 1; }
info() { echo "GUEST-INFO $*"; }
# wait_for SECONDS COMMAND...: poll until the command succeeds
wait_for() {
  t=$1; shift
  i=0
  while [ $i -lt $((t * 10)) ]; do
    "$@" >/dev/null 2>&1 && return 0
    # a loopbackd case: stop waiting once the daemon is gone
    [ -n "${LBPID:-}" ] && ! kill -0 "$LBPID" 2>/dev/null && return 1
    usleep 100000; i=$((i + 1))
  done
  return 1
}
load_lo() { insmod /lib/modules/virtio_loopback.ko "$@" || fail "insmod virtio_loopback"; [ -c /dev/virtio-lo ] || fail "no /dev/virtio-lo"; }
rng_current() { cat /sys/class/misc/hw_random/rng_current 2>/dev/null; }
is_virtio_rng() { case "$(rng_current)" in virtio_rng*) return 0;; esac; return 1; }
not_virtio_rng() { ! is_virtio_rng; }
# read N KiB from /dev/hwrng into FILE, check size and that it is not constant
hwrng_check() {
  kib=$1; out=$2
  dd if=/dev/hwrng of="$out" bs=1024 count="$kib" 2>/dev/null || return 1
  [ "$(wc -c < "$out")" -eq $((kib * 1024)) ] || return 1
  # not constant: more than a few distinct bytes in the first 4 KiB
  n=$(head -c 4096 "$out" | od -An -v -tx1 | tr -s ' ' '\n' | sort -u | wc -l)
  [ "$n" -gt 200 ] || return 1
  return 0
}
# start a background command with its output in a file; sets BGPID
bg_start() { out=$1; shift; "$@" > "$out" 2>&1 & BGPID=$!; }
no_d_state() { ! grep -l '^State:.*D' /proc/[0-9]*/status 2>/dev/null | grep -q .; }

# ---- loopbackd helpers
# How loopbackd is started; adjust here if its command line changes.
LOOPBACKD_ARGS=${LOOPBACKD_ARGS:---config /etc/loopbackd.conf}
have_loopbackd() { [ -x /bin/loopbackd ] || fail "no loopbackd binary in the image (build .build/release/loopbackd)"; }
# write_conf: the [daemon] section, then whatever the case appends. GUEST_SECCOMP=kill (run.sh) adds
# seccomp = "kill": every loopbackd of the suite under the system call allow-list
write_conf() {
  cat > /etc/loopbackd.conf <<CONF
[daemon]
transport = "virtio-lo"
device-node = "/dev/virtio-lo"
CONF
  if [ -s /tests/seccomp ]; then echo "seccomp = \"$(cat /tests/seccomp)\"" >> /etc/loopbackd.conf; fi
}
loopbackd_start() { loopbackd $LOOPBACKD_ARGS > /tmp/loopbackd.log 2>&1 & LBPID=$!; }
loopbackd_stop() { # $1 = signal (default TERM)
  kill -0 $LBPID 2>/dev/null || lb_fail "loopbackd died before SIG${1:-TERM}"
  kill -"${1:-TERM}" $LBPID 2>/dev/null
  i=0; while kill -0 $LBPID 2>/dev/null && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
  kill -0 $LBPID 2>/dev/null && fail "loopbackd did not exit on SIG${1:-TERM}"
  wait $LBPID 2>/dev/null
  LBPID=
}
lb_fail() { fail "$* -- loopbackd log: $(tail -n 5 /tmp/loopbackd.log 2>/dev/null | tr '\n' '|')"; }
# sectors DEV: size in 512-byte sectors
sectors() { cat /sys/block/$1/size 2>/dev/null; }
# copy a file to the AHCI disk so the host can read it after poweroff
to_host_disk() { dd if="$1" of=/dev/sda bs=1M conv=fsync 2>/dev/null || fail "copy $1 to /dev/sda"; }
gone() { ! test -e "$1"; }

# ---- vhost-user cases (Tests/guest/vhost-user.sh; QEMU is the front-end, loopbackd on the host the back-end)
# vu_param NAME: a value the runner put into the initramfs (/tests/param/NAME)
vu_param() { cat "/tests/param/$1" 2>/dev/null; }
# hwrng_varies FILE: the file is not constant anywhere: every 64 KiB block differs from the first one
hwrng_varies() {
  f=$1; n=$(( $(wc -c < "$f") / 65536 )); k=1
  [ "$n" -ge 2 ] || return 1
  head -c 65536 "$f" > /tmp/.blk0
  while [ $k -lt "$n" ]; do
    dd if="$f" bs=65536 skip=$k count=1 2>/dev/null | cmp -s - /tmp/.blk0 && return 1
    k=$((k + 1))
  done
  return 0
}
# marker_read DEV SECTOR: the text stored in that 512-byte sector (NULs stripped)
marker_read() { dd if="$1" bs=512 skip="$2" count=1 2>/dev/null | tr -d '\000' | head -c 200; }
# marker_write DEV SECTOR TEXT: write it (NUL padded) and flush it to the device
marker_write() {
  { printf '%s' "$3"; head -c 512 /dev/zero; } | head -c 512 > /tmp/.marker
  dd if=/tmp/.marker of="$1" bs=512 seek="$2" count=1 conv=notrunc,fsync 2>/dev/null
}

# ---- loopbackd ab (driver side = the kernel module)
# ab_run DEVICE ARGS...: runs `loopbackd ab --json`; sets AB_JSON (the JSON line) and AB_RC
ab_run() {
  d=$1; shift
  loopbackd ab -c /etc/loopbackd.conf --device "$d" --json "$@" > /tmp/ab.out 2> /tmp/ab.err; AB_RC=$?
  AB_JSON=$(grep '^{' /tmp/ab.out | tail -1)
}
# ab_check JSON: driver virtio-lo, both paths with rps > 0, errors 0 (and exit status 0); sets AB_WHY
ab_check() {
  AB_WHY=
  case "$1" in *'"driver": "virtio-lo"'*) ;; *) AB_WHY="driver is not virtio-lo"; return 1;; esac
  case "$1" in *'"errors": 0}'*) ;; *) AB_WHY="errors"; return 1;; esac
  for p in inproc socket; do
    r=$(echo "$1" | sed -n "s/.*\"$p\": {[^}]*\"rps\": \([0-9]*\)}.*/\1/p")
    [ -n "$r" ] && [ "$r" -gt 0 ] || { AB_WHY="path $p rps '$r'"; return 1; }
  done
  [ "${AB_RC:-1}" = 0 ] || { AB_WHY="exit status $AB_RC"; return 1; }
  return 0
}

# ---- i2c cases
# i2c_bus_of PATTERN: N of the adapter i2c-N whose name matches the shell pattern (i2c-stub: '*stub*', the
# kernel's i2c-virtio driver: 'i2c_virtio*')
i2c_bus_of() {
  for d in /sys/bus/i2c/devices/i2c-*; do
    [ -f "$d/name" ] || continue
    case "$(cat "$d/name")" in $1) echo "${d##*/i2c-}"; return 0;; esac
  done
  return 1
}
# i2c_detect BUS ARGS...: the addresses i2cdetect finds on BUS, space-separated
i2c_detect() { b=$1; shift; i2cdetect -y "$@" "$b" | tail -n +2 | cut -c5- | tr ' ' '\n' | grep -E '^[0-9a-f]{2}$' | tr '\n' ' ' | sed 's/ $//'; }

# ---- gpu cases
# gpu_draw SEED [X Y]: gputool holds pattern SEED on $CARD in the connector's preferred mode, which must be $W x $H
# (cursor at X,Y if given), then the gpu's file output $GPU_PPM must equal it; $GPU_DIAG (a command) adds context to
# a failure. gpu_undraw ends the holder (the driver keeps the last frame on screen).
gpu_draw() {
  bg_start /tmp/draw$1.log gputool draw "$CARD" "$1" 600 ${2:+$2 $3}
  DRAW=$BGPID
  wait_for 20 grep -q READY /tmp/draw$1.log ||
    lb_fail "draw $1: $(tr '\n' '|' < /tmp/draw$1.log)${GPU_DIAG:+ -- $($GPU_DIAG)}"
  grep -q "MODE $W $H" /tmp/draw$1.log || fail "draw $1: preferred mode $(head -1 /tmp/draw$1.log), want $W $H"
  wait_for 10 gputool check "$GPU_PPM" $W $H "$1" ||
    lb_fail "draw $1: $(gputool check "$GPU_PPM" $W $H "$1" 2>&1)${GPU_DIAG:+ -- $($GPU_DIAG)}"
  info "pattern $1: $GPU_PPM equals it (${W}x${H})"
}
gpu_undraw() { kill $DRAW 2>/dev/null; wait $DRAW 2>/dev/null; DRAW=; }
