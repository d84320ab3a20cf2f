import Glibc
import Transport

/// `type = "vsock"` (virtio-vsock, virtio 1.2 §5.10): the keys its table accepts (documented in loopbackd.conf(5);
/// the reader enforces the list).
///   guest-cid   the driver's CID, 3 … 2^32-2 (the config space's guest_cid); required in-process
///   uds-path    absolute path (< 100 bytes): hybrid vsock. The driver's connection to CID 2 port P reaches the
///               unix socket `uds-path_P`; a host program connects to `uds-path` and writes `CONNECT P\n` to reach
///               the driver's listener on port P (answered `OK <host port>\n`); required in-process
///   queue-size  power of two 2-1024, default 256 (all three queues)
/// Forwarded (`backend = "vhost-user:…"`): the back-end has the CID and the sockets; only `queue-size` applies.
extension DeviceType {
    public static var vsock: DeviceType {
        DeviceType(name: "vsock", keys: ["guest-cid", "uds-path", "queue-size"], factory: makeVsock,
                   workload: { d, verify in VsockWorkload(d, verify: verify) })
    }

    static func makeVsock(_ name: String, _ r: inout OptionReader, _ backend: DeviceBackend) throws(ConfigError)
        -> (DeviceShape, () throws(DeviceError) -> VirtioDevice) {
        let cid = try r.int("guest-cid", range: 3...0xffff_fffe)
        let path = try r.string("uds-path")
        let qs = try r.int("queue-size", range: 2...1024) ?? 256
        if qs & (qs - 1) != 0 { throw r.error("queue-size", "must be a power of two, found \(qs)") }
        let size = UInt16(qs)
        let shape = DeviceShape(deviceID: VirtioVsock.deviceID, queueSizes: [size, size, size], configSize: VirtioVsock.configSize)
        guard backend == .inproc else {
            if cid != nil { throw r.error("guest-cid", "a forwarded vsock's CID is its vhost-user back-end's (--guest-cid); only queue-size applies") }
            if path != nil { throw r.error("uds-path", "a forwarded vsock's sockets are its vhost-user back-end's (--uds-path); only queue-size applies") }
            return (shape, { () throws(DeviceError) -> VirtioDevice in throw DeviceError("\(name): forwarded vsock has no in-process body") })
        }
        guard let cid else { throw r.error("guest-cid", "an in-process vsock needs guest-cid (the driver's CID, 3 or more)") }
        guard let path else { throw r.error("uds-path", "an in-process vsock needs uds-path (hybrid vsock: the driver reaches port P at uds-path_P)") }
        // sun_path is 108 bytes: room for "_" and a 10-digit port.
        guard path.hasPrefix("/"), path.utf8.count < 96 else {
            throw r.error("uds-path", "must be an absolute path shorter than 96 bytes (the driver's ports add _PORT)")
        }
        return (shape, { () throws(DeviceError) -> VirtioDevice in
            let host: UnixVsockHost
            do { host = try UnixVsockHost(path: path, capacity: 1024) } catch { throw DeviceError("\(name): \(error)") }
            return VsockDevice(guestCID: UInt64(cid), host: host, queueSize: size)
        })
    }
}
