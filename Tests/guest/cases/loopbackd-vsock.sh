# virtio-vsock through the module with the kernel's own vmw_vsock_virtio_transport; the host side is loopbackd's
# hybrid vsock (unix sockets in the same guest: the "host" of a native system is its own user space).
# 64 connections used to stall the device's transmit queue (kicks left disabled when a turn ended at its budget
# just as the ring ran empty: VsockTests.testTransmitBudgetSpentOnAnEmptyRingRearmsKicks); the RST and CONNECT
# steps after them are what found it. On a failure the case prints the device's queues (loopbackd ctl status).
# Checks: 256 MiB each way on one connection with per-byte pattern checks both sides; 64 concurrent connections;
# a connect to a port nobody listens on fails fast (RST); a host program reaches a driver-side listener with
# CONNECT P; driver reload (rmmod/insmod the transport) and loopbackd SIGKILL + restart leave it usable.
. /tests/lib.sh
# queue state into the log before failing
vfail() { loopbackd ctl -c /etc/loopbackd.conf status 2>&1 | while read -r l; do info "ctl: $l"; done; lb_fail "$1"; }
have_loopbackd
[ -x /bin/vsocktool ] || fail "no vsocktool in the image (Tests/guest/setup.sh builds it)"
for m in vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
  insmod /lib/modules/$m.ko || fail "insmod $m"
done
load_lo
write_conf
sed -i '/^\[daemon\]/a control = "/run/lb-control.sock"' /etc/loopbackd.conf   # ctl status on a failure
cat >> /etc/loopbackd.conf <<CONF

[device.vsock0]
type = "vsock"
guest-cid = 3
uds-path = "/tmp/v.sock"
CONF
loopbackd_start
wait_for 20 test -S /tmp/v.sock || vfail "loopbackd does not listen on /tmp/v.sock"
usleep 500000   # the transport probes after DRIVER_OK

# 256 MiB each way
vsocktool serve-unix /tmp/v.sock_1234 1 > /tmp/serve.out 2>&1 &
sp=$!
wait_for 5 test -S /tmp/v.sock_1234 || fail "no host listener"
vsocktool connect 2 1234 268435456 1 > /tmp/client.out 2>&1 || vfail "256 MiB exchange: $(cat /tmp/client.out)"
wait $sp || vfail "host side of the 256 MiB exchange: $(cat /tmp/serve.out)"
info "256 MiB each way: $(cat /tmp/client.out)"

# 64 connections at once
vsocktool serve-unix /tmp/v.sock_1235 64 > /tmp/serve.out 2>&1 &
sp=$!
wait_for 5 test -S /tmp/v.sock_1235 || fail "no host listener"
vsocktool connect 2 1235 1048576 64 > /tmp/client.out 2>&1 || vfail "64 connections: $(tail -3 /tmp/client.out)"
wait $sp || vfail "host side of 64 connections: $(tail -3 /tmp/serve.out)"
[ "$(grep -c '^ok' /tmp/client.out)" = 64 ] || vfail "64 connections: $(grep -c '^ok' /tmp/client.out) ok"
info "64 concurrent connections ok"

# RST on a closed port
vsocktool refused 2 4321 || vfail "connect to a closed port"

# host → driver: CONNECT P to a listener in the driver's OS
vsocktool listen 5000 16777216 > /tmp/listen.out 2>&1 &
lp=$!
usleep 300000
vsocktool connect-unix /tmp/v.sock 5000 16777216 > /tmp/cu.out 2>&1 || vfail "CONNECT 5000: $(cat /tmp/cu.out)"
wait $lp || vfail "driver-side listener: $(cat /tmp/listen.out)"
info "host-initiated connection: $(cat /tmp/cu.out)"

# SIGKILL + restart: the transport comes back, a new connection works
kill -9 "$LBPID"; wait "$LBPID" 2>/dev/null; LBPID=
no_d_state || fail "task in D state after SIGKILL"
loopbackd_start
wait_for 20 test -S /tmp/v.sock || vfail "no listener after restart"
usleep 500000
vsocktool serve-unix /tmp/v.sock_1236 1 > /tmp/serve.out 2>&1 &
sp=$!
wait_for 5 test -S /tmp/v.sock_1236 || fail "no host listener"
vsocktool connect 2 1236 1048576 1 > /tmp/client.out 2>&1 || vfail "after restart: $(cat /tmp/client.out)"
wait $sp || vfail "host side after restart"

# driver reload: the transport's remove resets the device (connections end), a new probe works again
rmmod vmw_vsock_virtio_transport || fail "rmmod vmw_vsock_virtio_transport"
insmod /lib/modules/vmw_vsock_virtio_transport.ko || fail "insmod vmw_vsock_virtio_transport again"
usleep 500000
vsocktool serve-unix /tmp/v.sock_1237 1 > /tmp/serve.out 2>&1 &
sp=$!
wait_for 5 test -S /tmp/v.sock_1237 || fail "no host listener"
vsocktool connect 2 1237 1048576 1 > /tmp/client.out 2>&1 || vfail "after driver reload: $(cat /tmp/client.out)"
wait $sp || vfail "host side after driver reload"
info "SIGKILL + restart and driver reload: new connections work"

loopbackd_stop TERM
grep -iE 'warning|error' /tmp/loopbackd.log && fail "loopbackd logged a warning or error"
pass
