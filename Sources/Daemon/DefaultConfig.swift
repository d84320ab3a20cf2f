/// The embedded default configuration: byte for byte `etc/loopbackd.conf` (a test checks they match).
public let embeddedDefaultConfig = """
# loopbackd configuration (TOML subset). This file is also the binary's embedded default:
# `loopbackd` without -c uses /etc/loopbackd.conf if it exists, otherwise this text.
# Unknown keys and tables are errors; `loopbackd --check -c FILE` validates a file.

[daemon]
# Which driver side serves the devices:
#   "sim"       the simulated in-process driver: no kernel module needed; runs a visible demo workload
#   "virtio-lo" the virtio-loopback kernel module (/dev/virtio-lo): the kernel's own virtio drivers bind
#   "none"      no driver side: every device must set `serve` (vhost-user backend only)
transport = "sim"
# Character device of the kernel module (transport = "virtio-lo").
# device-node = "/dev/virtio-lo"
# error | warning | info | debug
log-level = "info"
# Busy-poll window in microseconds after the last request before sleeping in epoll (0 = off).
# Lower latency, at the price of a spinning core while busy.
poll-us = 0

# One table per device: [device.NAME], NAME = 1-32 of A-Z a-z 0-9 - _
#   type     "rng" | "blk"
#   backend  "inproc" (default): the device runs in loopbackd on the mapped rings;
#            "vhost-user:/path.sock": forwarded to an external vhost-user backend
#   serve    "/run/loopbackd/NAME.sock": serve this in-process device as a vhost-user backend
#            (to QEMU, crosvm, cloud-hypervisor) instead of attaching it to the transport

[device.rng0]
type = "rng"
backend = "inproc"
# source = "/dev/hwrng"     # optional entropy file; default getrandom(2)

[device.disk0]
type = "blk"
backend = "inproc"
# Regular file or block device. create-mib makes a sparse file of that size if the path does not exist.
path = "/tmp/loopbackd-disk0.img"
create-mib = 64
readonly = false
# Request queues (VIRTIO_BLK_F_MQ when > 1) and their size (power of two).
queues = 2
queue-size = 256

"""
