import Glibc
import CLinux
import Transport

/// The evdev ioctls (linux/input.h), computed with the asm-generic _IOC encoding of linux/ioctl.h (x86, arm,
/// arm64, riscv): dir << 30 | size << 16 | type << 8 | nr, _IOC_WRITE = 1, _IOC_READ = 2. (Swift does not import
/// function-like macros.)
enum Evdev {
    static func ioc(_ dir: UInt, _ nr: UInt, _ size: Int) -> UInt { dir << 30 | UInt(size) << 16 | UInt(UInt8(ascii: "E")) << 8 | nr }
    /// EVIOCGID: _IOR('E', 0x02, struct input_id) (4 × u16).
    static let getID = ioc(2, 0x02, 8)
    /// EVIOCGNAME(len): _IOC(_IOC_READ, 'E', 0x06, len).
    static func getName(_ len: Int) -> UInt { ioc(2, 0x06, len) }
    /// EVIOCGUNIQ(len): _IOC(_IOC_READ, 'E', 0x08, len) (the serial).
    static func getUniq(_ len: Int) -> UInt { ioc(2, 0x08, len) }
    /// EVIOCGPROP(len): _IOC(_IOC_READ, 'E', 0x09, len).
    static func getProp(_ len: Int) -> UInt { ioc(2, 0x09, len) }
    /// EVIOCGBIT(ev, len): _IOC(_IOC_READ, 'E', 0x20 + ev, len); ev 0 = the event types.
    static func getBit(_ ev: UInt16, _ len: Int) -> UInt { ioc(2, 0x20 + UInt(ev), len) }
    /// EVIOCGABS(abs): _IOR('E', 0x40 + abs, struct input_absinfo) (value, min, max, fuzz, flat, resolution: 6 × s32).
    static func getAbs(_ axis: UInt16) -> UInt { ioc(2, 0x40 + UInt(axis), 24) }
    /// EVIOCGRAB: _IOW('E', 0x90, int).
    static let grab = ioc(1, 0x90, 4)
    /// struct input_event: struct timeval (two longs), u16 type, u16 code, s32 value.
    static let eventSize = 2 * MemoryLayout<Int>.size + 8

    /// Reads what the virtio config space describes from an open evdev node.
    static func capabilities(_ fd: Int32) throws(DeviceError) -> InputCapabilities {
        var buf = [UInt8](repeating: 0, count: 256)
        func str(_ req: (Int) -> UInt) -> String? {
            let n = buf.withUnsafeMutableBytes { lb_ioctl_ptr(fd, req(255), $0.baseAddress) }
            guard n >= 0 else { return nil }
            return String(decoding: buf.prefix(Int(n)).prefix { $0 != 0 }, as: UTF8.self)
        }
        func bits(_ req: UInt) -> [UInt8] {
            buf = [UInt8](repeating: 0, count: 256)
            let n = buf.withUnsafeMutableBytes { lb_ioctl_ptr(fd, req, $0.baseAddress) }
            return n > 0 ? Array(buf.prefix(min(Int(n), VirtioInput.unionSize))) : []
        }
        guard let name = str(getName) else { throw DeviceError("EVIOCGNAME: \(Errno.current) (not an evdev node?)") }
        var c = InputCapabilities(name: name)
        c.serial = str(getUniq) ?? ""
        var id = (UInt16(0), UInt16(0), UInt16(0), UInt16(0))
        if withUnsafeMutableBytes(of: &id, { lb_ioctl_ptr(fd, getID, $0.baseAddress) }) == 0 {
            (c.bustype, c.vendor, c.product, c.version) = id
        }
        c.props = bits(getProp(VirtioInput.unionSize))
        let types = bits(getBit(0, 4))
        for t in 1...VirtioInput.evMax where Int(t >> 3) < types.count && types[Int(t >> 3)] & (1 << (t & 7)) != 0 {
            c.bits[Int(t)] = bits(getBit(t, VirtioInput.unionSize))
            // EV_REP has no codes in the bitmap sense the driver asks for: one byte says "present".
            if t == VirtioInput.evRep && !c.bits[Int(t)].contains(where: { $0 != 0 }) { c.bits[Int(t)] = [1] }
        }
        for axis in 0...VirtioInput.absMax where c.has(type: VirtioInput.evAbs, code: axis) {
            var a = (Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0))
            guard withUnsafeMutableBytes(of: &a, { lb_ioctl_ptr(fd, getAbs(axis), $0.baseAddress) }) == 0 else { continue }
            c.abs[axis] = AbsInfo(min: a.1, max: a.2, fuzz: a.3, flat: a.4, res: a.5)
        }
        return c
    }

    /// The device name of an evdev node (nil: not one, or cannot open).
    static func name(of path: String) -> String? {
        let fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { FD.close(fd) }
        var buf = [UInt8](repeating: 0, count: 256)
        let n = buf.withUnsafeMutableBytes { lb_ioctl_ptr(fd, getName(255), $0.baseAddress) }
        guard n >= 0 else { return nil }
        return String(decoding: buf.prefix(Int(n)).prefix { $0 != 0 }, as: UTF8.self)
    }

    /// /dev/input/eventN whose name is `name` (the lowest N if several), never one of the virtio-loopback
    /// module's own devices: the virtio-input device loopbackd exposes has the same name as its host device and
    /// lives in the same kernel, so a lookup by name (at start, or after a hot-unplug) could otherwise pick it.
    static func find(name: String, dir: String = "/dev/input") -> String? {
        let nodes = Sysfs.list(dir).filter { $0.hasPrefix("event") }
            .sorted { (Int($0.dropFirst(5)) ?? Int.max) < (Int($1.dropFirst(5)) ?? Int.max) }
        return nodes.first { !isVirtioLoopback($0) && Evdev.name(of: "\(dir)/\($0)") == name }.map { "\(dir)/\($0)" }
    }

    /// Whether input node `eventN` belongs to a device under /sys/devices/virtio-lo (the module's bus).
    static func isVirtioLoopback(_ event: String) -> Bool {
        guard let r = realpath("/sys/class/input/\(event)", nil) else { return false }
        defer { free(r) }
        return String(cString: r).containsText("/devices/virtio-lo/")
    }
}

/// A host evdev node (/dev/input/eventN, by `path` or by device `name`): its capabilities answer the config space,
/// its events feed the event queue, status events (LED, sound, force feedback) are written back to it. Optional
/// exclusive grab (EVIOCGRAB). Hot-unplug (ENODEV, hang-up): the fd is dropped, the device keeps running with no
/// events, and a 500 ms timer looks for the node again (same device name; by name: any eventN with that name).
public final class EvdevSource: InputSource, EventHandler {
    public let capabilities: InputCapabilities
    public let byPath: String?
    public let byName: String?
    public let grab: Bool
    public private(set) var path: String
    private var fd: Int32
    private var loop: EventLoop?
    private var registration = -1
    private var timer: LoopTimer?
    private unowned(unsafe) var sink: InputSink?
    private let buf: UnsafeMutableRawPointer
    private static let batch = 64
    /// Discarding after SYN_DROPPED until the next SYN_REPORT (evdev's protocol for a client that fell behind).
    private var dropping = false
    public private(set) var reopens = 0
    private var reportedMissing = false

    /// Opens the node (read-write for status events, read-only if that is refused) and reads its capabilities.
    public init(path: String?, name: String?, grab: Bool) throws(DeviceError) {
        byPath = path; byName = name; self.grab = grab
        guard let p = path ?? name.flatMap({ Evdev.find(name: $0) }) else {
            throw DeviceError("no evdev node named \"\(name ?? "")\" under /dev/input")
        }
        self.path = p
        fd = try EvdevSource.open(p, grab: grab)
        do { capabilities = try Evdev.capabilities(fd) } catch {
            FD.close(fd)
            throw DeviceError("\(p): \(error)")
        }
        if let name, capabilities.name != name { FD.close(fd); throw DeviceError("\(p) is \"\(capabilities.name)\", not \"\(name)\"") }
        buf = .allocate(byteCount: EvdevSource.batch * Evdev.eventSize, alignment: 8)
    }
    deinit {
        FD.close(fd)
        buf.deallocate()
    }

    private static func open(_ p: String, grab: Bool) throws(DeviceError) -> Int32 {
        var f = Glibc.open(p, O_RDWR | O_NONBLOCK | O_CLOEXEC)
        if f < 0 && (errno == EACCES || errno == EROFS) { f = Glibc.open(p, O_RDONLY | O_NONBLOCK | O_CLOEXEC) }
        guard f >= 0 else { throw DeviceError("cannot open \(p): \(Errno.current)") }
        if grab && lb_ioctl_val(f, Evdev.grab, 1) != 0 {
            let e = Errno.current
            FD.close(f)
            throw DeviceError("\(p): exclusive grab (EVIOCGRAB) refused: \(e)")
        }
        return f
    }

    public func start(loop: EventLoop, sink: InputSink) throws(DeviceError) {
        self.loop = loop
        self.sink = sink
        do { registration = try loop.register(fd: fd, events: IOEvents.readable.epollMask, handler: self, token: 0) } catch {
            throw DeviceError("\(path): cannot watch: \(error)")
        }
    }

    public func stop() {
        timer?.cancel(); timer = nil
        guard let loop, registration >= 0 else { return }
        loop.unregister(fd: fd, registration: registration)
        registration = -1
    }

    public func write(_ e: InputEvent) -> Bool {
        guard fd >= 0 else { return false }
        let n = Evdev.eventSize
        memset(buf, 0, n)
        buf.storeBytes(of: e.type, toByteOffset: n - 8, as: UInt16.self)
        buf.storeBytes(of: e.code, toByteOffset: n - 6, as: UInt16.self)
        buf.storeBytes(of: e.value, toByteOffset: n - 4, as: Int32.self)
        do { return try syscall(.write) { Glibc.write(fd, buf, n) } == n } catch {
            Log.warning("input: \(path): status write failed: \(error)")
            return false
        }
    }

    public func handleEvent(token: UInt32, events: UInt32) {
        let ev = IOEvents(epoll: events)
        if ev.contains(.readable) { readAll() }
        if fd >= 0 && (ev.contains(.hangUp) || ev.contains(.error)) { lost("hang-up on \(path)") }
    }

    private func readAll() {
        let size = Evdev.eventSize
        while fd >= 0 {
            let n: Int
            do { n = try syscall(.read) { Glibc.read(fd, buf, EvdevSource.batch * size) } } catch {
                if error == .again { return }
                lost("\(path): read: \(error)")
                return
            }
            if n == 0 { lost("\(path): end of file"); return }
            var off = 0
            while off + size <= n {
                let e = InputEvent(type: buf.load(fromByteOffset: off + size - 8, as: UInt16.self),
                                   code: buf.load(fromByteOffset: off + size - 6, as: UInt16.self),
                                   value: buf.load(fromByteOffset: off + size - 4, as: Int32.self))
                off += size
                if e.type == VirtioInput.evSyn && e.code == 3 { dropping = true; continue }   // SYN_DROPPED
                if dropping {
                    if e.type == VirtioInput.evSyn && e.code == VirtioInput.synReport { dropping = false }
                    continue
                }
                sink?.inputEvent(e)
            }
            if n < EvdevSource.batch * size { return }
        }
    }

    /// The node went away: stop watching it and look for it again every 500 ms.
    private func lost(_ why: String) {
        guard fd >= 0, let loop else { return }
        if registration >= 0 { loop.unregister(fd: fd, registration: registration); registration = -1 }
        FD.close(fd)
        fd = -1
        dropping = false
        sink?.inputSourceLost(why)
        reportedMissing = false
        if timer == nil {
            timer = try? LoopTimer(loop: loop) { [unowned self] _ in self.retry() }
            if timer == nil { Log.warning("input: \(path): no timer to look for the device again; it stays gone") }
        }
        timer?.arm(everyNs: 500_000_000)
    }

    private func retry() {
        guard fd < 0, let loop else { timer?.disarm(); return }
        let name = capabilities.name
        let candidate = byName != nil ? Evdev.find(name: name) : (Evdev.name(of: byPath ?? path) == name ? byPath : nil)
        guard let p = candidate else {
            if !reportedMissing { reportedMissing = true; Log.info("input: waiting for \"\(name)\" to come back") }
            return
        }
        let f: Int32
        do { f = try EvdevSource.open(p, grab: grab) } catch { return }
        if let c = try? Evdev.capabilities(f), c != capabilities {
            Log.warning("input: \(p): \"\(name)\" came back with other capabilities; the driver keeps the old ones")
        }
        do { registration = try loop.register(fd: f, events: IOEvents.readable.epollMask, handler: self, token: 0) } catch {
            FD.close(f); return
        }
        fd = f
        path = p
        reopens += 1
        timer?.disarm()
        Log.info("input: \(p): \"\(name)\" reopened")
        sink?.inputSourceBack()
        readAll()
    }
}
