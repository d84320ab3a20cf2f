# Least privilege after start-up ([daemon] user, seccomp = "kill"): one loopbackd serves rng, blk (a root-only
# 0600 image, opened before the drop), i2c (i2c-stub through i2c-dev), gpio (simulated chip) and input (a uinput
# device, exclusive grab, synchronous config) through the module, then runs as lbuser with no capabilities,
# no_new_privs and the seccomp allow-list. Checks: /proc/PID/status (ids, groups, CapEff/CapPrm/CapBnd 0,
# NoNewPrivs 1, Seccomp 2); every device byte-for-byte or value-for-value under the filter; SIGHUP reload adds a
# blk device on an image lbuser can open (ADDDEV after the drop) and the log names the root-only image a
# `ctl add` cannot open; `ctl remove` (DELDEV); SIGTERM exits 0 with the devices removed. Then the test hook
# (LOOPBACKD_TEST_SECCOMP_VIOLATION=1: the loop thread calls syslog(2), outside the list): one log line names the
# call, the process dies of SIGSYS (status 159), the kernel drops its devices, and a restarted loopbackd serves the
# same image with its data. A missing system call on any of these paths kills loopbackd here (the log says which).
. /tests/lib.sh
have_loopbackd
[ -f /lib/modules/i2c-virtio.ko ] || fail "no i2c-virtio.ko in the image (Tests/guest/setup.sh builds it)"
[ -f /lib/modules/gpio-virtio.ko ] || fail "no gpio-virtio.ko in the image (Tests/guest/setup.sh builds it)"
[ -x /bin/gpiotool ] && [ -x /bin/inputtool ] || fail "no gpiotool/inputtool in the image (Tests/guest/setup.sh)"
for m in evdev uinput virtio_input; do
  grep -q "^$m " /proc/modules && continue
  if [ -f /lib/modules/$m.ko ]; then insmod /lib/modules/$m.ko || fail "insmod $m"
  elif [ ! -d /sys/module/$m ]; then fail "module $m not in the image"; fi
done
insmod /lib/modules/i2c-dev.ko || fail "insmod i2c-dev"
insmod /lib/modules/i2c-stub.ko chip_addr=0x50 || fail "insmod i2c-stub"
insmod /lib/modules/i2c-virtio.ko || fail "insmod i2c-virtio"
insmod /lib/modules/gpio-virtio.ko || fail "insmod gpio-virtio"
load_lo

# The unprivileged account (the initramfs has no users): uid 1000, primary group 1000, supplementary 1001.
echo 'root:x:0:0:root:/:/bin/sh' >> /etc/passwd
echo 'lbuser:x:1000:1000:loopbackd:/nonexistent:/bin/false' >> /etc/passwd
echo 'root:x:0:' >> /etc/group
echo 'lbuser:x:1000:' >> /etc/group
echo 'lbextra:x:1001:lbuser' >> /etc/group

N=$(i2c_bus_of '*stub*') || fail "no i2c-stub adapter"
wait_for 5 test -c "/dev/i2c-$N" || fail "no /dev/i2c-$N"
DEV=lb-privdrop-kbd
bg_start /tmp/uinput.log inputtool uinput "$DEV" /tmp/go
UPID=$BGPID
wait_for 10 grep -q READY /tmp/uinput.log || fail "uinput device not created: $(cat /tmp/uinput.log)"
HOST=$(inputtool find "$DEV") || fail "no evdev node for $DEV"

truncate -s 8M /tmp/disk0.img; chmod 600 /tmp/disk0.img            # root's only: opened before the drop
mkdir -p /tmp/lb; truncate -s 4M /tmp/lb/disk1.img; chown -R 1000:1000 /tmp/lb   # lbuser's: opened at reload
truncate -s 4M /tmp/rootonly.img; chmod 600 /tmp/rootonly.img
cat > /etc/loopbackd.conf <<CONF
[daemon]
transport = "virtio-lo"
device-node = "/dev/virtio-lo"
user = "lbuser"
seccomp = "kill"
control = "/tmp/ctl.sock"

[device.rng0]
type = "rng"

[device.disk0]
type = "blk"
path = "/tmp/disk0.img"

[device.i2c0]
type = "i2c"
map = "0x50=/dev/i2c-$N"

[device.gpio0]
type = "gpio"
simulated = true

[device.kbd0]
type = "input"
name = "$DEV"
grab = true
CONF
cp /etc/loopbackd.conf /tmp/base.conf
loopbackd_start
wait_for 30 test -b /dev/vda || lb_fail "no /dev/vda"
wait_for 10 is_virtio_rng || lb_fail "virtio_rng not bound"
vi2c() { M=$(i2c_bus_of 'i2c_virtio*') && [ -c "/dev/i2c-$M" ]; }
wait_for 10 vi2c || lb_fail "no i2c-virtio adapter"; vi2c
wait_for 10 test -c /dev/gpiochip0 || lb_fail "no /dev/gpiochip0"
vnode() { for e in /sys/devices/virtio-lo/virtio*/input/input*/event*; do [ -e "$e" ] && { echo "/dev/input/${e##*/}"; return 0; }; done; return 1; }
wait_for 10 vnode || lb_fail "no virtio input node"
VNODE=$(vnode); wait_for 5 test -c "$VNODE" || fail "$VNODE not created"
wait_for 10 grep -q "system calls allowed" /tmp/loopbackd.log || lb_fail "no seccomp line in the log"

# The process: lbuser, its groups, no capability, no_new_privs, seccomp filter mode.
st=/proc/$LBPID/status
info "$(grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' $st | tr '\t' ' ' | tr '\n' '|')"
grep -qE '^Uid:\s+1000\s+1000\s+1000\s+1000$' $st || lb_fail "Uid: $(grep ^Uid $st)"
grep -qE '^Gid:\s+1000\s+1000\s+1000\s+1000$' $st || lb_fail "Gid: $(grep ^Gid $st)"
grep -qE '^Groups:\s+1000 1001 ?$' $st || lb_fail "Groups: $(grep ^Groups $st)"
for c in CapInh CapPrm CapEff CapBnd CapAmb; do
  grep -qE "^$c:\s+0000000000000000$" $st || lb_fail "$c: $(grep ^$c $st)"
done
grep -qE '^NoNewPrivs:\s+1$' $st || lb_fail "NoNewPrivs: $(grep ^NoNewPrivs $st)"
grep -qE '^Seccomp:\s+2$' $st || lb_fail "Seccomp: $(grep ^Seccomp $st)"
# every thread (the loop, the ADDDEV helpers) runs as lbuser under the filter. io_uring's workers (iou-wrk-N: kernel
# threads listed in the process, never in user space) made before the drop keep root's ids in /proc; they run each
# request with the credentials of the thread that submitted it (lbuser), and carry the filter too.
for t in /proc/$LBPID/task/*; do
  s=$(cat $t/status 2>/dev/null) && c=$(cat $t/comm 2>/dev/null) || continue   # a thread that just ended
  echo "$s" | grep -qE '^Seccomp:\s+2$' || lb_fail "thread $t ($c): $(echo "$s" | grep -E '^Seccomp:')"
  case "$c" in iou-*) info "io_uring worker $c: $(echo "$s" | grep -E '^Uid:' | tr '\t' ' ')"; continue;; esac
  echo "$s" | grep -qE '^Uid:\s+1000\s' && echo "$s" | grep -qE '^CapEff:\s+0000000000000000$' ||
    lb_fail "thread $t ($c): $(echo "$s" | grep -E '^(Uid|CapEff):' | tr '\n' ' ')"
done

# Every device under the filter.
hwrng_check 256 /tmp/rnd || lb_fail "hwrng"
odirect write /dev/vda 0 2M 51 && odirect check /dev/vda 0 2M 51 || lb_fail "vda I/O"
i2cset -y "$M" 0x50 0x10 0xa5 || lb_fail "i2cset via virtio"
[ "$(i2cget -y "$M" 0x50 0x10)" = 0xa5 ] && [ "$(i2cget -y "$N" 0x50 0x10)" = 0xa5 ] || lb_fail "i2c byte"
i2cset -y "$M" 0x50 0x20 0x1234 w && [ "$(i2cget -y "$N" 0x50 0x20 w)" = 0x1234 ] || lb_fail "i2c word"
gpiotool loop /dev/gpiochip0 1 5 20 > /tmp/gpio.out 2>&1 || lb_fail "gpio loop: $(cat /tmp/gpio.out)"
inputtool caps "$HOST" > /tmp/caps.host && inputtool caps "$VNODE" > /tmp/caps.virtio || lb_fail "input caps"
cmp -s /tmp/caps.host /tmp/caps.virtio || lb_fail "input capabilities differ"
inputtool led "$VNODE" 1 1 || lb_fail "LED write"

# SIGHUP: a new blk device on lbuser's image (opened and ADDDEV'ed after the drop).
cat >> /etc/loopbackd.conf <<'CONF'

[device.disk1]
type = "blk"
path = "/tmp/lb/disk1.img"
CONF
kill -HUP $LBPID
wait_for 20 test -b /dev/vdb || lb_fail "no /dev/vdb after SIGHUP"
odirect write /dev/vdb 0 1M 52 && odirect check /dev/vdb 0 1M 52 || lb_fail "vdb I/O"
odirect check /dev/vda 0 2M 51 || lb_fail "vda changed by reload"
# ctl add of a root-only image: refused with the reason; ctl remove: DELDEV after the drop.
printf '[device.disk2]\ntype = "blk"\npath = "/tmp/rootonly.img"\n' | loopbackd ctl --socket /tmp/ctl.sock add > /tmp/add.out 2>&1 &&
  lb_fail "ctl add of a root-only image succeeded"
grep -q "Permission denied" /tmp/add.out || lb_fail "ctl add error: $(cat /tmp/add.out)"
loopbackd ctl --socket /tmp/ctl.sock remove disk1 > /tmp/rm.out 2>&1 || lb_fail "ctl remove: $(cat /tmp/rm.out)"
wait_for 10 gone /dev/vdb || lb_fail "/dev/vdb still present after ctl remove"
loopbackd ctl --socket /tmp/ctl.sock status > /tmp/status.out 2>&1 || lb_fail "ctl status"
# blk's io_uring ring is restricted to its operations (curing.c; Linux 5.10+).
grep -q "^disk0 .* io-uring=restricted" /tmp/status.out || lb_fail "disk0 ring not restricted: $(grep ^disk0 /tmp/status.out)"
hwrng_check 64 /tmp/rnd || lb_fail "hwrng after reload"
grep -q forbidden /tmp/loopbackd.log && lb_fail "a forbidden system call"

# SIGTERM: clean exit (DELDEV of every device, in-flight requests complete), status 0.
kill -TERM $LBPID
i=0; while kill -0 $LBPID 2>/dev/null && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
kill -0 $LBPID 2>/dev/null && lb_fail "loopbackd did not exit on SIGTERM"
wait $LBPID; rc=$?; LBPID=
[ $rc -eq 0 ] || lb_fail "exit status $rc after SIGTERM"
grep -q "loopbackd: info: stopped" /tmp/loopbackd.log || lb_fail "no 'stopped' line"
wait_for 10 gone /dev/vda || fail "/dev/vda still present after SIGTERM"

# The test hook: a forbidden call on the loop thread is logged by name and kills the process with SIGSYS.
cp /tmp/base.conf /etc/loopbackd.conf
rm -f /tmp/ctl.sock   # lbuser could not unlink root's socket at exit (its directory is root's): replaced anyway
LOOPBACKD_TEST_SECCOMP_VIOLATION=1 loopbackd $LOOPBACKD_ARGS > /tmp/loopbackd.log 2>&1 & LBPID=$!
i=0; while kill -0 $LBPID 2>/dev/null && [ $i -lt 300 ]; do usleep 100000; i=$((i+1)); done
kill -0 $LBPID 2>/dev/null && lb_fail "loopbackd still running with the test hook"
wait $LBPID; rc=$?; LBPID=
[ $rc -eq 159 ] || lb_fail "exit status $rc with the test hook, want 159 (SIGSYS)"
grep -q "loopbackd: error: seccomp: forbidden system call 103 (syslog) in thread " /tmp/loopbackd.log || lb_fail "no SIGSYS log line"
info "$(grep forbidden /tmp/loopbackd.log)"
wait_for 10 gone /dev/vda || fail "/dev/vda still present after SIGSYS"

# The restart path (what systemd's Restart= does): the devices come back with their data.
loopbackd_start
wait_for 30 test -b /dev/vda || lb_fail "no /dev/vda after restart"
odirect check /dev/vda 0 2M 51 || lb_fail "data lost across the SIGSYS kill"
wait_for 10 is_virtio_rng || lb_fail "rng not bound after restart"
hwrng_check 64 /tmp/rnd || lb_fail "hwrng after restart"
loopbackd_stop TERM
kill $UPID 2>/dev/null
pass
