# guest-mem: 512M,slots=2,maxmem=1G
# Memory hot-plug under a running loopbackd (issue #11: "hosts with memory hot-plug are handled"). loopbackd maps
# System RAM once at start-up; then QEMU hot-plugs a 256 MiB DIMM (QMP object-add + device_add, tools/screendump.py
# runs them), which the guest onlines as ZONE_MOVABLE above 4 GiB. User pages come from the highest zone first, so
# the O_DIRECT buffers of the next writes and reads on /dev/vda lie in the new memory: loopbackd must map it when
# it first meets such a buffer (its log names the range) and serve the data unchanged, where before the queue
# latched ("buffer not inside mapped memory") and I/O failed. Then one new memory block is offlined and onlined
# again (the module unmaps it from loopbackd at each change; loopbackd's next access maps the real page again), the
# DIMM is unplugged (ACPI eject: offline + remove) and a second DIMM is plugged at the same address: the data is
# right after each step, loopbackd never dies (no SIGBUS), the kernel logs no warning.
. /tests/lib.sh
have_loopbackd
stty -F /dev/ttyS1 raw -echo 2>/dev/null
exec 3< /dev/ttyS1 || fail "no /dev/ttyS1"
qmp() { # TAG COMMAND JSON: run by the host on QEMU's monitor; its answer comes on ttyS1
  echo "GUEST-QMP $*"
  while read -r -t 30 l <&3; do
    case "$l" in "QMP $1 OK"*) return 0;; "QMP $1 "*) fail "QMP $2: $l";; esac
  done
  fail "QMP $1: no answer from the host on ttyS1"
}
online_blocks() { grep -l '^online' /sys/devices/system/memory/memory*/state 2>/dev/null | wc -l; }
mem_total() { sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo; }
io_round() { # SEED: 8 MiB written and read back with O_DIRECT, in four processes (fresh buffers each)
  for k in 0 1 2 3; do
    odirect write /dev/vda $((k * 8))M 8M $(($1 + k)) || lb_fail "$2: O_DIRECT write $k"
    odirect check /dev/vda $((k * 8))M 8M $(($1 + k)) || lb_fail "$2: O_DIRECT read back $k"
  done
  kill -0 $LBPID 2>/dev/null || lb_fail "$2: loopbackd died"
}
[ -w /sys/devices/system/memory/auto_online_blocks ] || fail "no memory hot-plug in this kernel"
echo online_movable > /sys/devices/system/memory/auto_online_blocks || fail "auto_online_blocks"
load_lo
truncate -s 64M /tmp/disk0.img
write_conf
cat >> /etc/loopbackd.conf <<'CONF'

[device.disk0]
type = "blk"
path = "/tmp/disk0.img"
queue-size = 64
CONF
loopbackd_start
wait_for 20 test -b /dev/vda || lb_fail "no /dev/vda"
io_round 10 "before hot-plug"
grep -q 'memory hot-plug' /tmp/loopbackd.log && lb_fail "a hot-plug mapping before any hot-plug"
b0=$(online_blocks); m0=$(mem_total)
qmp m1 object-add '{"qom-type":"memory-backend-ram","id":"mem1","size":268435456}'
qmp d1 device_add '{"driver":"pc-dimm","id":"dimm1","memdev":"mem1"}'
wait_for 20 sh -c "[ \$(grep -l '^online' /sys/devices/system/memory/memory*/state | wc -l) -ge $((b0 + 2)) ]" ||
  fail "the DIMM's memory did not come online ($(online_blocks) blocks online, $b0 before; $(dmesg | tail -n 3 | tr '\n' '|'))"
info "hot-plugged: MemTotal $m0 -> $(mem_total) kB, $b0 -> $(online_blocks) blocks online"
io_round 20 "after hot-plug"
grep -q 'memory hot-plug: mapped RAM 0x1' /tmp/loopbackd.log ||
  fail "no buffer landed in the hot-added memory (the test proved nothing): $(grep -c . /proc/zoneinfo) $(grep -A3 'zone *Movable' /proc/zoneinfo | tr -s ' \n' ' ')"
info "$(grep 'memory hot-plug' /tmp/loopbackd.log | head -n 2 | tr '\n' '|')"
grep -q 'queue .* broken' /tmp/loopbackd.log && lb_fail "a queue latched"
# offline one block of the DIMM (its pages migrate), I/O, online it again, I/O
blk=$(for f in /sys/devices/system/memory/memory*; do [ "$(cat $f/valid_zones 2>/dev/null)" = Movable ] && grep -q '^online' $f/state && echo $f; done | tail -n 1)
[ -n "$blk" ] || fail "no online movable block"
echo offline > $blk/state || fail "offline ${blk##*/}: $(dmesg | tail -n 2 | tr '\n' '|')"
io_round 30 "block offline"
echo online_movable > $blk/state || fail "online ${blk##*/} again"
io_round 40 "block online again"
# unplug the DIMM (the guest offlines and removes its memory), then plug a new one at the same address
qmp u1 device_del '{"id":"dimm1"}'
wait_for 30 sh -c "[ \$(sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo) -le $m0 ]" ||
  fail "the DIMM was not removed (MemTotal $(mem_total) kB, $m0 before): $(dmesg | tail -n 3 | tr '\n' '|')"
io_round 50 "after unplug"
qmp m2 object-add '{"qom-type":"memory-backend-ram","id":"mem2","size":268435456}'
qmp d2 device_add '{"driver":"pc-dimm","id":"dimm2","memdev":"mem2"}'
wait_for 20 sh -c "[ \$(grep -l '^online' /sys/devices/system/memory/memory*/state | wc -l) -ge $((b0 + 2)) ]" ||
  fail "the second DIMM did not come online"
io_round 60 "second DIMM"
grep -q 'queue .* broken' /tmp/loopbackd.log && lb_fail "a queue latched"
# the module unmapped the re-plugged range from loopbackd (MEM_GOING_ONLINE) and its fault handler mapped the new
# DIMM's pages again as loopbackd used them; none was an offline page (scratch)
read -r refaults scratch < /sys/module/virtio_loopback/parameters/ram_faults || fail "no ram_faults parameter"
info "module: $refaults RAM page(s) mapped again after a state change, $scratch scratch"
[ "$refaults" -gt 0 ] || fail "loopbackd used the re-plugged DIMM without a fault: its old mapping was not unmapped"
[ "$scratch" = 0 ] || fail "loopbackd touched $scratch offline page(s)"
loopbackd_stop TERM
odirect checkb /tmp/disk0.img 0 8M 60 || fail "backing file does not hold the last data"
info "$(grep -c 'memory hot-plug: mapped' /tmp/loopbackd.log) hot-plug mapping(s)"
pass
