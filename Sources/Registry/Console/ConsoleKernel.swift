import Glibc
import Transport

/// How the kernel exposes virtio-console to `ab --driver virtio-lo`: the first named port of the device
/// (virtioN/virtio-ports/vportNpM with a non-empty `name`; a console port's vport cannot be opened, it is the hvc).
/// The port's endpoint must echo (`ports = ["NAME=echo"]`): each request writes 64 bytes and reads them back.
struct ConsoleExposure: KernelExposure {
    var waitsFor: String { "a named port /dev/vportNpM (\(KernelTarget.root)/virtioN/virtio-ports)" }
    func find(virtio v: String, before: Set<String>) throws(DeviceError) -> (KernelTarget & RoundTrip)? {
        let dir = "\(KernelTarget.root)/\(v)/virtio-ports"
        for p in Sysfs.list(dir).sorted() where p.hasPrefix("vport") {
            guard let name = Sysfs.read("\(dir)/\(p)/name"), !name.isEmpty, access("/dev/\(p)", F_OK) == 0 else { continue }
            return try KernelConsolePort(virtio: v, node: p)
        }
        return nil
    }
}

/// A named virtio-console port through the kernel's virtio_console: 64 bytes written, the same 64 read back.
public final class KernelConsolePort: KernelTarget, RoundTrip {
    var fd: Int32
    let buf: UnsafeMutableRawPointer
    init(virtio: String, node: String) throws(DeviceError) {
        fd = open("/dev/\(node)", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw DeviceError("cannot open /dev/\(node): \(Errno.current)") }
        buf = .allocate(byteCount: 64, alignment: 64)
        super.init(virtio: virtio, name: node)
    }
    deinit { buf.deallocate() }
    public override func close() { if fd >= 0 { Glibc.close(fd); fd = -1 } }

    public func runOne(spinNs: UInt64) -> Bool {
        var n = 0
        while n < 64 {
            let k = write(fd, buf + n, 64 - n)
            if k < 0 && errno == EINTR { continue }
            if k <= 0 { return false }
            n += k
        }
        n = 0
        while n < 64 {
            let k = read(fd, buf + n, 64 - n)
            if k < 0 && errno == EINTR { continue }
            if k <= 0 { return false }
            n += k
        }
        return true
    }
}
