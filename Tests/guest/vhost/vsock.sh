# vhost-user-vsock-pci (QEMU 7.2 front-end) in front of loopbackd's vsock0 (served, hybrid vsock on the host): the
# kernel's vmw_vsock_virtio_transport in the guest reaches unix sockets on the CI machine: 16 MiB each way on one
# connection and 8 connections at once (vsocktool's pattern checked byte by byte on both sides), RST for a port
# nobody listens on, and a host program reaches a guest listener with CONNECT P (the harness runs the host ends).
. /tests/lib.sh
[ -x /bin/vsocktool ] || fail "no vsocktool in the image (Tests/guest/setup.sh builds it)"
for m in vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
  insmod /lib/modules/$m.ko || fail "insmod $m"
done
usleep 500000   # the transport probes and fills its receive queue
vsocktool connect 2 1234 16777216 1 > /tmp/c1.out 2>&1 || fail "16 MiB exchange: $(tail -3 /tmp/c1.out | tr '\n' '|')"
info "16 MiB each way: $(cat /tmp/c1.out)"
vsocktool connect 2 1235 1048576 8 > /tmp/c2.out 2>&1 || fail "8 connections: $(grep -v '^ok' /tmp/c2.out | head -3 | tr '\n' '|')"
[ "$(grep -c '^ok' /tmp/c2.out)" = 8 ] || fail "8 connections: $(grep -c '^ok' /tmp/c2.out) ok"
info "8 concurrent connections ok"
vsocktool refused 2 4321 > /tmp/r.out 2>&1 || fail "connect to a closed port: $(cat /tmp/r.out)"
echo GUEST-VSOCK-LISTEN
vsocktool listen 5000 4194304 > /tmp/l.out 2>&1 || fail "guest listener (CONNECT 5000 from the host): $(cat /tmp/l.out | tr '\n' '|')"
info "host → guest CONNECT 5000: $(tail -1 /tmp/l.out)"
pass
