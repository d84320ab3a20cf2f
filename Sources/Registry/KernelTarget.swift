import Glibc
import Transport

/// A kernel device under test (`ab --driver virtio-lo`): the virtio device the module created and the user-space
/// node that reaches it. Each device type says how the kernel exposes it (`KernelExposure`, in its folder).
open class KernelTarget {
    public static let root = "/sys/devices/virtio-lo"
    /// virtioN under /sys/devices/virtio-lo.
    public let virtio: String
    /// What the user-space side uses (the hwrng name, the disk vdX, …).
    public let name: String
    public init(virtio: String, name: String) { self.virtio = virtio; self.name = name }
    open func close() {}

    /// The virtio devices present now.
    /// A restricted device (module extension RESTRICTED) sits under its pool's DMA device: `poolN/virtioM`.
    public static func present() -> Set<String> {
        var s = Set<String>()
        for e in Sysfs.list(root) {
            if e.hasPrefix("virtio") { s.insert(e) }
            else if e.hasPrefix("pool") { for v in Sysfs.list("\(root)/\(e)") where v.hasPrefix("virtio") { s.insert("\(e)/\(v)") } }
        }
        return s
    }

    /// The kernel device ADDDEV just created (the one new virtioN under /sys/devices/virtio-lo) and its node, as
    /// the type's exposure finds it. The driver registers its node after DRIVER_OK (ADDDEV returns at DRIVER_OK),
    /// so this waits up to 5 s.
    public static func find(_ exposure: KernelExposure, before: Set<String>, state: Set<String>) throws(DeviceError)
        -> KernelTarget & RoundTrip {
        let added = present().subtracting(before)
        guard added.count == 1, let v = added.first else {
            throw DeviceError("cannot tell which kernel device was just added (new under \(root): \(added.sorted()))")
        }
        for _ in 0..<500 {
            if let t = try exposure.find(virtio: v, before: state) { return t }
            usleep(10_000)
        }
        throw DeviceError("kernel device \(v): no \(exposure.waitsFor) within 5 s")
    }
}

/// How the kernel's own driver exposes a device type to user space, for `ab --driver virtio-lo`.
public protocol KernelExposure {
    /// Type-specific state before the device is added (e.g. the hwrng names), compared after.
    func snapshot() -> Set<String>
    /// The node of kernel device `virtio` (just added), or nil if the driver has not registered it yet.
    func find(virtio: String, before: Set<String>) throws(DeviceError) -> (KernelTarget & RoundTrip)?
    /// What `find` waits for (for the error text).
    var waitsFor: String { get }
    /// Saves global state the run changes; the returned closure restores it, given the names of the run's targets.
    func saveState() -> ([String]) -> Void
}

extension KernelExposure {
    public func snapshot() -> Set<String> { [] }
    public func saveState() -> ([String]) -> Void { { _ in } }
}

/// Small sysfs reads and writes, without Foundation.
public enum Sysfs {
    /// The file's text without the trailing newline; nil if it cannot be read.
    public static func read(_ path: String) -> String? {
        guard var s = try? FD.readText(path, limit: 4096) else { return nil }
        while s.last == "\n" || s.last == " " { s.removeLast() }
        return s
    }

    public static func write(_ path: String, _ value: String) -> Bool {
        let f = open(path, O_WRONLY | O_CLOEXEC)
        guard f >= 0 else { return false }
        defer { Glibc.close(f) }
        var v = value
        return v.withUTF8 { Glibc.write(f, $0.baseAddress, $0.count) } == value.utf8.count
    }

    /// Entry names of a directory (without . and ..); empty if it cannot be read.
    public static func list(_ path: String) -> [String] {
        guard let d = opendir(path) else { return [] }
        defer { closedir(d) }
        var out: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { out.append(name) }
        }
        return out
    }
}
