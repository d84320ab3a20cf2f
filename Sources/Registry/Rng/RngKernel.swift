import Glibc
import Transport

/// How the kernel exposes virtio-rng: a new hwrng in rng_available (it has no sysfs link to its device).
struct RngExposure: KernelExposure {
    var waitsFor: String { "new hwrng in rng_available" }
    func snapshot() -> Set<String> { KernelRng.available() }
    func find(virtio: String, before: Set<String>) throws(DeviceError) -> (KernelTarget & RoundTrip)? {
        let new = KernelRng.available().subtracting(before)
        if new.count > 1 { throw DeviceError("more than one new hwrng: \(new.sorted())") }
        guard new.count == 1, let n = new.first else { return nil }
        return try KernelRng(virtio: virtio, hwrng: n)
    }
    /// /dev/hwrng reads the current rng: give it back to the source it had, if that was not one of ours.
    func saveState() -> ([String]) -> Void {
        let saved = Sysfs.read(KernelRng.current)
        return { ours in
            if let s = saved, !s.isEmpty, s != "none", !ours.contains(s) { _ = Sysfs.write(KernelRng.current, s) }
        }
    }
}

/// virtio-rng through the kernel's hwrng core: 64-byte reads of /dev/hwrng, which reads the *current* rng only,
/// so each phase first makes this device current (rng_current). The buffer is allocated once.
public final class KernelRng: KernelTarget, RoundTrip {
    static let current = "/sys/class/misc/hw_random/rng_current"
    static let availablePath = "/sys/class/misc/hw_random/rng_available"
    static func available() -> Set<String> {
        Set((Sysfs.read(availablePath) ?? "").split(separator: " ").map(String.init).filter { !$0.isEmpty })
    }
    var fd: Int32
    let buf: UnsafeMutableRawPointer

    init(virtio: String, hwrng: String) throws(DeviceError) {
        fd = open("/dev/hwrng", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw DeviceError("cannot open /dev/hwrng: \(Errno.current)") }
        buf = .allocate(byteCount: 64, alignment: 64)
        super.init(virtio: virtio, name: hwrng)
    }
    deinit { buf.deallocate() }
    public override func close() { if fd >= 0 { Glibc.close(fd); fd = -1 } }

    public func beginPhase() throws(DeviceError) {
        guard Sysfs.write(KernelRng.current, name) else { throw DeviceError("cannot select \(name) in \(KernelRng.current): \(Errno.current)") }
        guard Sysfs.read(KernelRng.current) == name else {
            throw DeviceError("\(KernelRng.current) is \"\(Sysfs.read(KernelRng.current) ?? "?")\" after selecting \(name)")
        }
    }

    public func runOne(spinNs: UInt64) -> Bool {
        var got = 0
        while got < 64 {
            let n = read(fd, buf + got, 64 - got)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            got += n
        }
        return true
    }
}
