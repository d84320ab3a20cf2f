import Glibc
import CLinux
import Transport
import Registry

/// The driver side of `loopbackd ab`.
enum ABDriver: String {
    case sim
    case virtioLo = "virtio-lo"

    /// `[daemon] transport = "virtio-lo"` → the kernel module (an error later if its node does not open);
    /// otherwise the kernel module when its node (`device-node`, default /dev/virtio-lo) opens read-write, else the
    /// simulated driver. `requested` ("sim", "virtio-lo"; nil or "auto" = the rule above) is for a `--driver` flag.
    static func choose(_ config: DaemonConfig, requested: String? = nil) -> ABDriver {
        switch requested {
        case "sim": return .sim
        case "virtio-lo": return .virtioLo
        default: break
        }
        if config.transport == .virtioLo { return .virtioLo }
        let f = open(config.deviceNode, O_RDWR | O_CLOEXEC)
        if f >= 0 { FD.close(f); return .virtioLo }
        return .sim
    }
}

extension AB {
    /// Driver side = the kernel's own driver, through the virtio-loopback module. One loop, one VirtioLoLink, two
    /// kernel devices: (a) the device body, (b) a vhost-user frontend forwarding to the backend. The workload is
    /// user-space I/O on the kernel device that belongs to each path (KernelRng, KernelBlk), timed here.
    static func runKernel(_ d: DeviceConfig, _ config: DaemonConfig, _ o: Options, socket: String,
                          pollUs: Int) throws(DeviceError) -> Int32 {
        let loop: EventLoop
        do { loop = try EventLoop(pollMicroseconds: pollUs) } catch { throw DeviceError("event loop: \(error)") }
        let host = DeviceHost(loop: loop)
        let ia = host.add(name: d.name, device: try d.make())
        let ib = host.add(name: d.name + "-socket",
                          device: try makeFrontend(d, socket: socket, loop: loop, relay: o.relay, replay: !o.direct && !o.relay))
        loop.startThread()
        var link: VirtioLoLink?
        var targets: [KernelTarget & RoundTrip] = []
        defer {
            for t in targets { t.close() }
            link?.removeAll()
            loop.executeAndWait { host.shutdown() }
            loop.stopAndJoin()
        }
        let l = try VirtioLoLink(host: host, devicePath: config.deviceNode)
        link = l
        let savedRng = d.type == "rng" ? Sysfs.read(KernelRng.current) : nil
        defer {
            // Give /dev/hwrng back to the source it had, if that was not one of ours.
            if let s = savedRng, !s.isEmpty, s != "none", !targets.contains(where: { $0.name == s }) {
                _ = Sysfs.write(KernelRng.current, s)
            }
        }
        for (i, path) in [(ia, "inproc"), (ib, "socket")] {
            let before = KernelTarget.snapshot()
            do { try l.add(i) } catch { throw DeviceError("\(path) path: \(error)") }
            let t = try KernelTarget.find(type: d.type, before: before)
            Log.info("\(d.name): \(path) path is kernel device \(t.virtio) (\(t.name))")
            targets.append(t)
        }
        return try compare(targets[0], targets[1], d, o, driver: .virtioLo, pollUs: pollUs,
                           socket: socket, targets: (targets[0].name, targets[1].name))
    }
}

/// A kernel device under test: the virtio device the module created and the user-space node that reaches it.
class KernelTarget {
    static let root = "/sys/devices/virtio-lo"
    /// virtioN under /sys/devices/virtio-lo.
    let virtio: String
    /// What the user-space side uses: the hwrng name (virtio_rng.N) or the disk (vdX).
    let name: String
    init(virtio: String, name: String) { self.virtio = virtio; self.name = name }
    func close() {}

    struct Snapshot {
        var virtio: Set<String>
        var rngs: Set<String>
    }

    static func snapshot() -> Snapshot {
        Snapshot(virtio: Set(Sysfs.list(root).filter { $0.hasPrefix("virtio") }), rngs: KernelRng.available())
    }

    /// The kernel device ADDDEV just created (the one new virtioN under /sys/devices/virtio-lo), and its node:
    /// a blk device's disk is /sys/devices/virtio-lo/virtioN/block/vdX; an rng's hwrng has no sysfs link to its
    /// device, so it is the one name new in rng_available. The driver registers those after DRIVER_OK (ADDDEV
    /// returns at DRIVER_OK), so this waits up to 5 s.
    static func find(type: String, before: Snapshot) throws(DeviceError) -> KernelTarget & RoundTrip {
        let added = Set(Sysfs.list(root).filter { $0.hasPrefix("virtio") }).subtracting(before.virtio)
        guard added.count == 1, let v = added.first else {
            throw DeviceError("cannot tell which kernel device was just added (new under \(root): \(added.sorted()))")
        }
        for _ in 0..<500 {
            switch type {
            case "blk":
                // The disk's own directory (the /sys/block/vdX link comes a moment later), its size, its node.
                if let disk = Sysfs.list("\(root)/\(v)/block").first(where: { $0.hasPrefix("vd") }),
                   let s = Sysfs.read("\(root)/\(v)/block/\(disk)/size"), let sectors = UInt64(s), sectors > 0,
                   access("/dev/\(disk)", F_OK) == 0 {
                    return try KernelBlk(virtio: v, disk: disk, sectors: sectors)
                }
            default:
                let new = KernelRng.available().subtracting(before.rngs)
                if new.count == 1, let n = new.first { return try KernelRng(virtio: v, hwrng: n) }
                if new.count > 1 { throw DeviceError("more than one new hwrng: \(new.sorted())") }
            }
            usleep(10_000)
        }
        throw DeviceError("kernel device \(v): no " + (type == "blk" ? "/dev/vdX (\(root)/\(v)/block)" : "new hwrng in rng_available") + " within 5 s")
    }
}

/// virtio-rng through the kernel's hwrng core: 64-byte reads of /dev/hwrng, which reads the *current* rng only,
/// so each phase first makes this device current (rng_current). The buffer is allocated once.
final class KernelRng: KernelTarget, RoundTrip {
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
    override func close() { if fd >= 0 { Glibc.close(fd); fd = -1 } }

    func beginPhase() throws(DeviceError) {
        guard Sysfs.write(KernelRng.current, name) else { throw DeviceError("cannot select \(name) in \(KernelRng.current): \(Errno.current)") }
        guard Sysfs.read(KernelRng.current) == name else {
            throw DeviceError("\(KernelRng.current) is \"\(Sysfs.read(KernelRng.current) ?? "?")\" after selecting \(name)")
        }
    }

    func runOne(spinNs: UInt64) -> Bool {
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

/// virtio-blk through the kernel's virtio_blk: 4 KiB O_DIRECT reads at random 4 KiB-aligned offsets of /dev/vdX
/// into one aligned buffer (the same xorshift sequence as the simulated driver's BlkWorkload).
final class KernelBlk: KernelTarget, RoundTrip {
    var fd: Int32
    let buf: UnsafeMutableRawPointer
    let blocks: UInt64
    var rng: UInt64 = 0x9E37_79B9_7F4A_7C15
    /// O_DIRECT (glibc exposes it only with _GNU_SOURCE): asm-generic 0o40000; arm/arm64 0o200000.
    #if arch(arm64) || arch(arm)
    static let oDirect: Int32 = 0o200000
    #else
    static let oDirect: Int32 = 0o40000
    #endif

    init(virtio: String, disk: String, sectors: UInt64) throws(DeviceError) {
        guard sectors >= 8 else { throw DeviceError("/dev/\(disk): smaller than 4 KiB (\(sectors) sectors)") }
        blocks = sectors / 8
        fd = open("/dev/\(disk)", O_RDONLY | KernelBlk.oDirect | O_CLOEXEC)
        guard fd >= 0 else { throw DeviceError("cannot open /dev/\(disk) (O_DIRECT): \(Errno.current)") }
        buf = .allocate(byteCount: 4096, alignment: 4096)
        super.init(virtio: virtio, name: disk)
    }
    deinit { buf.deallocate() }
    override func close() { if fd >= 0 { Glibc.close(fd); fd = -1 } }

    func runOne(spinNs: UInt64) -> Bool {
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
        let off = off_t(Int64(bitPattern: (rng % blocks) * 4096))
        while true {
            let n = pread(fd, buf, 4096, off)
            if n < 0 && errno == EINTR { continue }
            return n == 4096
        }
    }
}

/// Small sysfs reads and writes, without Foundation.
enum Sysfs {
    /// The file's text without the trailing newline; nil if it cannot be read.
    static func read(_ path: String) -> String? {
        guard var s = try? FD.readText(path, limit: 4096) else { return nil }
        while s.last == "\n" || s.last == " " { s.removeLast() }
        return s
    }

    static func write(_ path: String, _ value: String) -> Bool {
        let f = open(path, O_WRONLY | O_CLOEXEC)
        guard f >= 0 else { return false }
        defer { Glibc.close(f) }
        var v = value
        return v.withUTF8 { Glibc.write(f, $0.baseAddress, $0.count) } == value.utf8.count
    }

    /// Entry names of a directory (without . and ..); empty if it cannot be read.
    static func list(_ path: String) -> [String] {
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
