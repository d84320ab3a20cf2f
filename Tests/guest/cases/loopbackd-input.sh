# loopbackd serves virtio-input from a host evdev device: a uinput keyboard + touch screen (inputtool) →
# loopbackd (name = its device name, exclusive grab) → the kernel's virtio_input → a new /dev/input/eventN under
# /sys/devices/virtio-lo. Checks: the virtio node has the host device's name, ids, properties, LEDs and every ABS
# range; a known key + touch sequence arrives in order, grouped by SYN_REPORT, with the right codes and values; an
# LED written on the virtio node reaches the uinput device (status queue → EV_LED write on the host node);
# unplugging the uinput device leaves loopbackd and the virtio device up, and a new uinput device of that name is
# picked up again (events flow); a driver reload and a SIGKILL + restart each give a working node again; SIGTERM
# removes the virtio device.
# Needs in the image: the modules evdev, uinput, virtio_input (loaded here if present in /lib/modules and not
# loaded yet) and /bin/inputtool (Tests/guest/tools/inputtool.c, static).
# The module's config space is a kernel-side copy: virtio_input's probe writes select/subsel and reads the answer
# at once, inside ADDDEV; loopbackd adds input devices with SYNC_CONFIG, so each write waits until loopbackd's loop
# has applied it to the device and stored the answer (without it the node had an empty name and no capabilities).
. /tests/lib.sh
have_loopbackd
[ -x /bin/inputtool ] || fail "no /bin/inputtool in the image (harness: build Tests/guest/tools/inputtool.c static, copy to /bin)"
for m in evdev uinput virtio_input; do
  grep -q "^$m " /proc/modules && continue
  if [ -f /lib/modules/$m.ko ]; then insmod /lib/modules/$m.ko || fail "insmod $m"
  elif [ ! -d /sys/module/$m ]; then fail "module $m not in the image (harness: img_add_modules ... evdev uinput virtio_input)"
  fi
done
[ -c /dev/uinput ] || fail "no /dev/uinput"
load_lo

DEV=lb-test-kbd-touch
bg_start /tmp/uinput1.log inputtool uinput "$DEV" /tmp/go1 /tmp/next1
U1=$BGPID
wait_for 10 grep -q READY /tmp/uinput1.log || fail "uinput device not created: $(cat /tmp/uinput1.log)"
HOST=$(inputtool find "$DEV") || fail "no evdev node for $DEV"
info "host node $HOST"

write_conf
cat >> /etc/loopbackd.conf <<CONF

[device.kbd0]
type = "input"
name = "$DEV"
grab = true
CONF
loopbackd_start
vnode() { for e in /sys/devices/virtio-lo/virtio*/input/input*/event*; do [ -e "$e" ] && { echo "/dev/input/${e##*/}"; return 0; }; done; return 1; }
wait_for 20 vnode || lb_fail "no input node under /sys/devices/virtio-lo"
VNODE=$(vnode)
wait_for 5 test -c "$VNODE" || fail "$VNODE not created"
info "virtio node $VNODE"

# Capabilities: identical on both sides (name, ids, props, LEDs, every ABS axis with min max fuzz flat res).
inputtool caps "$HOST" > /tmp/caps.host || fail "caps $HOST"
inputtool caps "$VNODE" > /tmp/caps.virtio || fail "caps $VNODE"
cmp -s /tmp/caps.host /tmp/caps.virtio || fail "capabilities differ: host [$(tr '\n' '|' < /tmp/caps.host)] virtio [$(tr '\n' '|' < /tmp/caps.virtio)]"
grep -q "^abs 53 0 1919 0 0 10$" /tmp/caps.virtio || fail "ABS_MT_POSITION_X range: $(tr '\n' '|' < /tmp/caps.virtio)"
grep -q "^id 0006 1234 5678 0001$" /tmp/caps.virtio || fail "ids: $(tr '\n' '|' < /tmp/caps.virtio)"

# The known sequence (inputtool.c): key A down, up; touch down at (100, 200); touch up. The virtio side must read
# exactly these events, in order, each group closed by its SYN_REPORT (0 0 0).
cat > /tmp/expect <<'EXP'
1 30 1
0 0 0
1 30 0
0 0 0
3 57 1
3 53 100
3 54 200
1 330 1
3 0 100
3 1 200
0 0 0
3 57 -1
1 330 0
0 0 0
EXP
read_sequence() { # $1 = go file, $2 = output
  bg_start "$2" inputtool read "$VNODE" 14 20
  r=$BGPID
  usleep 300000
  touch "$1"
  wait $r || fail "read on $VNODE: $(tr '\n' '|' < "$2")"
  cmp -s /tmp/expect "$2" || fail "events differ: got [$(tr '\n' '|' < "$2")]"
}
read_sequence /tmp/go1 /tmp/events1
info "14 events in order through virtio_input"

# Status path: LED_CAPSL on, written on the virtio node, read back as EV_LED from the uinput fd.
inputtool led "$VNODE" 1 1 || fail "LED write on $VNODE"
wait_for 10 grep -q "^LED 1 1$" /tmp/uinput1.log || lb_fail "LED did not reach the uinput device: $(tr '\n' '|' < /tmp/uinput1.log)"
info "LED_CAPSL reached the host device"

# Hot-unplug: the uinput device goes; loopbackd and the virtio device stay; a new one of that name is picked up.
touch /tmp/next1
wait_for 10 grep -q DESTROYED /tmp/uinput1.log || fail "uinput device not destroyed"
wait $U1
wait_for 10 grep -q "host device gone" /tmp/loopbackd.log || lb_fail "unplug not noticed"
kill -0 $LBPID 2>/dev/null || lb_fail "loopbackd died on unplug"
[ -c "$VNODE" ] || fail "virtio node gone on host unplug"
bg_start /tmp/uinput2.log inputtool uinput "$DEV" /tmp/go2
wait_for 10 grep -q READY /tmp/uinput2.log || fail "second uinput device not created"
wait_for 10 grep -q reopened /tmp/loopbackd.log || lb_fail "host device not reopened"
# The same sequence again, as the virtio node reports it: it is the same input device, so the input core drops
# the ABS values equal to the last ones (the touch lands where the first one did) and only the tracking id, keys
# and SYN_REPORTs come through; the VT keyboard handler may also reset LED_CAPSL (17 1 0) on the virtio node when
# the new keyboard appears: LED events are left out of the comparison.
cat > /tmp/expect2 <<'EXP'
1 30 1
0 0 0
1 30 0
0 0 0
3 57 1
1 330 1
0 0 0
3 57 -1
1 330 0
0 0 0
EXP
bg_start /tmp/events2.raw inputtool read "$VNODE" 11 5
r=$BGPID
usleep 300000
touch /tmp/go2
wait $r   # 10 events without an LED event: the read times out after 5 s, the comparison decides
grep -v '^17 ' /tmp/events2.raw > /tmp/events2
cmp -s /tmp/expect2 /tmp/events2 || fail "events after replug differ: got [$(tr '\n' '|' < /tmp/events2.raw)]"
info "events flow again after unplug and replug"

# Driver reload, then SIGKILL + restart: each time a new virtio node whose status path reaches the host device
# (an LED the VT layer does not set: NUML, then SCROLLL, on).
rmmod virtio_input || fail "rmmod virtio_input"
wait_for 10 gone "$VNODE" || fail "$VNODE still there after rmmod"
insmod /lib/modules/virtio_input.ko 2>/dev/null || modprobe virtio_input 2>/dev/null || fail "insmod virtio_input again"
wait_for 20 vnode || lb_fail "no input node after driver reload"
VNODE=$(vnode); wait_for 5 test -c "$VNODE" || fail "$VNODE not created"
inputtool led "$VNODE" 0 1 || fail "LED write on $VNODE"
wait_for 10 grep -q "^LED 0 1$" /tmp/uinput2.log || lb_fail "LED after driver reload did not reach the host device: $(tr '\n' '|' < /tmp/uinput2.log)"
info "driver reload: $VNODE, status path ok"
kill -9 "$LBPID"; wait "$LBPID" 2>/dev/null; LBPID=
wait_for 10 gone "$VNODE" || fail "$VNODE still there after SIGKILL"
no_d_state || fail "task in D state after SIGKILL"
loopbackd_start
wait_for 20 vnode || lb_fail "no input node after restart"
VNODE=$(vnode); wait_for 5 test -c "$VNODE" || fail "$VNODE not created"
inputtool led "$VNODE" 2 1 || fail "LED write on $VNODE"
wait_for 10 grep -q "^LED 2 1$" /tmp/uinput2.log || lb_fail "LED after SIGKILL + restart did not reach the host device: $(tr '\n' '|' < /tmp/uinput2.log)"
info "SIGKILL + restart: $VNODE, status path ok"

loopbackd_stop TERM
wait_for 10 gone "$VNODE" || fail "$VNODE still there after SIGTERM"
pass
