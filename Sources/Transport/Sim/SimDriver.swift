import Glibc
import Synchronization
import CLinux

/// The simulated driver: an in-process user-space virtio driver that plays the kernel's part on machines without
/// the kernel module. It negotiates features, lays out split rings in memfd "RAM", adds buffers, kicks through
/// eventfds and waits for interrupts on eventfds, reads and writes config, and resets: the same events the kernel
/// link produces. Runs on its own thread (tests, `bench`, `ab`); talks to the host's loop with `executeAndWait`.
public final class SimDriver {
    public let host: DeviceHost
    public let index: Int
    public let memory: GuestMemory
    public private(set) var info: DeviceInfo
    public private(set) var features: VirtioFeatures = []
    public private(set) var queues: [SimQueue] = []
    private var next: UInt64 = 0
    private let ramSize: UInt64
    public let configInterruptFD: OwnedFD

    /// `ramSize`: bytes of driver memory for rings and buffers.
    public init(host: DeviceHost, index: Int, ramSize: Int = 64 << 20, guestBase: UInt64 = 0x1000_0000) throws(Errno) {
        self.host = host
        self.index = index
        memory = try GuestMemory.memfdRAM(size: ramSize, guestBase: guestBase)
        ramBase = guestBase
        self.ramSize = UInt64(ramSize)
        next = guestBase
        info = host.loop.executeAndWait { host.info(index) }
        configInterruptFD = try FD.eventfd()
    }
    private let ramBase: UInt64

    /// Bump allocator over driver RAM: returns a guest address.
    public func alloc(_ size: Int, align: Int = 16) -> UInt64 {
        let a = UInt64(align)
        let start = (next + a - 1) / a * a
        precondition(start + UInt64(size) <= ramBase + ramSize, "simulated driver out of RAM")
        next = start + UInt64(size)
        return start
    }
    public func host(_ gpa: UInt64) -> UnsafeMutableRawPointer { memory.view.translate(gpa, 1)! }

    /// ACKNOWLEDGE → DRIVER → FEATURES_OK → rings → DRIVER_OK, like a kernel driver's probe.
    /// `accept` filters the offered features (default: take all); `queueSizes` defaults to each queue's max.
    public func start(accept: (VirtioFeatures) -> VirtioFeatures = { $0 }, queueSizes: [UInt16]? = nil,
                      queueCount: Int? = nil) throws(DeviceError) {
        let host = self.host, index = self.index
        info = host.loop.executeAndWait { host.info(index) }
        let want = accept(info.features)
        let ok = host.loop.executeAndWait { host.setFeatures(index, want) }
        guard ok else { throw DeviceError("FEATURES_OK refused") }
        features = want
        let n = queueCount ?? info.queueMaxSizes.count
        var configs: [QueueConfig] = []
        var kicks: [Int32] = []
        var irqs: [Notifier] = []
        queues = []
        for q in 0..<n {
            let size = queueSizes?[q] ?? info.queueMaxSizes[q]
            let s = Int(size)
            // Linux vring layout: desc, then avail, then used at the next 4096 boundary.
            let desc = alloc(QueueConfig.descBytes(s) + QueueConfig.availBytes(s), align: 4096)
            let avail = desc + UInt64(QueueConfig.descBytes(s))
            let used = alloc(QueueConfig.usedBytes(s), align: 4096)
            let sq: SimQueue
            do { sq = try SimQueue(driver: self, size: size, desc: desc, avail: avail, used: used) } catch {
                throw DeviceError("eventfd: \(error)")
            }
            queues.append(sq)
            configs.append(QueueConfig(size: size, desc: desc, avail: avail, used: used))
            guard let k = try? FD.dup(sq.kickFD.raw) else { throw DeviceError("dup failed") }
            kicks.append(k.release())
            irqs.append(.eventfd(sq.interruptFD.raw))
        }
        let mem = memory, cfgIRQ = Notifier.eventfd(configInterruptFD.raw)
        let err = host.loop.executeAndWait { () -> DeviceError? in
            do throws(DeviceError) { try host.activate(index, queues: configs, kickFDs: kicks, interrupts: irqs, configInterrupt: cfgIRQ, memory: mem); return nil }
            catch { return error }
        }
        if let err { throw err }
    }

    /// Writing status 0: the device stops and forgets its queues.
    public func reset() {
        let host = self.host, index = self.index
        host.loop.executeAndWait { host.reset(index) }
        queues = []
    }

    public var status: UInt8 { let host = self.host, index = self.index; return host.loop.executeAndWait { host.status(index) } }

    public func readConfig(offset: Int, count: Int) -> [UInt8]? {
        let host = self.host, index = self.index
        return host.loop.executeAndWait { () -> [UInt8]? in
            var b = [UInt8](repeating: 0, count: count)
            let ok = b.withUnsafeMutableBytes { host.readConfig(index, offset: offset, into: $0) }
            return ok ? b : nil
        }
    }
    @discardableResult
    public func writeConfig(offset: Int, bytes: [UInt8]) -> Bool {
        let host = self.host, index = self.index
        return host.loop.executeAndWait { bytes.withUnsafeBytes { host.writeConfig(index, offset: offset, from: $0) } }
    }
}

/// The driver side of one split ring: raw access for hostile tests, and a fast path (`submit`, `reap`) for
/// benchmarks that does not allocate.
public final class SimQueue {
    public let size: UInt16
    public let descGPA: UInt64, availGPA: UInt64, usedGPA: UInt64
    let desc: UnsafeMutableRawPointer, avail: UnsafeMutableRawPointer, used: UnsafeMutableRawPointer
    public let kickFD: OwnedFD
    public let interruptFD: OwnedFD
    /// Driver's shadow of avail.idx and its last seen used.idx.
    public private(set) var availIdx: UInt16 = 0
    public private(set) var lastUsed: UInt16 = 0
    private var freeHeads: [UInt16]
    public var eventIdx: Bool
    /// Kicks sent and waits that had to sleep for an interrupt (notification cost per request).
    public private(set) var kicks = 0
    public private(set) var sleeps = 0

    init(driver: SimDriver, size: UInt16, desc: UInt64, avail: UInt64, used: UInt64) throws(Errno) {
        self.size = size
        descGPA = desc; availGPA = avail; usedGPA = used
        self.desc = driver.host(desc); self.avail = driver.host(avail); self.used = driver.host(used)
        kickFD = try FD.eventfd()
        interruptFD = try FD.eventfd()
        freeHeads = Array((0..<size).reversed())
        eventIdx = driver.features.contains(.eventIdx)
        memset(self.desc, 0, QueueConfig.descBytes(Int(size)))
        memset(self.avail, 0, QueueConfig.availBytes(Int(size)))
        memset(self.used, 0, QueueConfig.usedBytes(Int(size)))
    }

    // MARK: raw ring access (hostile drivers write anything here)

    public func setDescriptor(_ i: Int, addr: UInt64, len: UInt32, flags: UInt16, next: UInt16) {
        let d = desc + 16 * i
        d.storeBytes(of: addr.littleEndian, as: UInt64.self)
        d.storeBytes(of: len.littleEndian, toByteOffset: 8, as: UInt32.self)
        d.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
        d.storeBytes(of: next.littleEndian, toByteOffset: 14, as: UInt16.self)
    }
    /// Writes `head` into the next avail slot (not yet published).
    public func pushAvail(_ head: UInt16) {
        (avail + 4 + 2 * Int(availIdx & (size - 1))).storeBytes(of: head.littleEndian, as: UInt16.self)
        availIdx &+= 1
    }
    /// Publishes avail.idx with release ordering (the device's acquire load pairs with it).
    public func publish(availIndex: UInt16? = nil) {
        if let v = availIndex { availIdx = v }
        (avail + 2).assumingMemoryBound(to: Atomic<UInt16>.self).pointee.store(availIdx, ordering: .releasing)
    }
    /// Kicks if the device wants it (EVENT_IDX avail_event or NO_NOTIFY flag), like virtqueue_kick_prepare.
    public func kickIfNeeded(old: UInt16) {
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        let need: Bool
        if eventIdx {
            let ev = (used + 4 + 8 * Int(size)).load(as: UInt16.self).littleEndian
            need = availIdx &- ev &- 1 < availIdx &- old
        } else {
            need = used.load(as: UInt16.self).littleEndian & 1 == 0
        }
        if need { kick() }
    }
    public func kick() { kicks += 1; FD.signal(kickFD.raw) }
    public var usedIdx: UInt16 { (used + 2).assumingMemoryBound(to: Atomic<UInt16>.self).pointee.load(ordering: .acquiring) }
    public var usedFlags: UInt16 { used.load(as: UInt16.self).littleEndian }
    /// Sets used_event (EVENT_IDX) so the device interrupts when used.idx passes it; or clears NO_INTERRUPT.
    public func enableInterrupts() {
        if eventIdx { (avail + 4 + 2 * Int(size)).storeBytes(of: lastUsed.littleEndian, as: UInt16.self) }
        else { avail.storeBytes(of: UInt16(0), as: UInt16.self) }
        atomicMemoryFence(ordering: .sequentiallyConsistent)
    }
    public func disableInterrupts() {
        if eventIdx { (avail + 4 + 2 * Int(size)).storeBytes(of: (lastUsed &- 1).littleEndian, as: UInt16.self) }
        else { avail.storeBytes(of: UInt16(1).littleEndian, as: UInt16.self) }
    }

    // MARK: well-behaved driver

    /// Builds a chain of direct descriptors (readable first, then writable); returns its head, or nil if the
    /// ring is full. Uses `count` descriptors from the free list.
    public func addChain(readable: [(UInt64, UInt32)], writable: [(UInt64, UInt32)]) -> UInt16? {
        let all = readable.map { ($0.0, $0.1, UInt16(0)) } + writable.map { ($0.0, $0.1, UInt16(2)) }
        guard !all.isEmpty, all.count <= freeHeads.count else { return nil }
        var ids: [UInt16] = []
        for _ in all { ids.append(freeHeads.removeLast()) }
        for (k, d) in all.enumerated() {
            let last = k == all.count - 1
            setDescriptor(Int(ids[k]), addr: d.0, len: d.1, flags: d.2 | (last ? 0 : 1), next: last ? 0 : ids[k + 1])
        }
        chainLengths[Int(ids[0])] = UInt16(all.count)
        chainIDs[Int(ids[0])] = ids
        return ids[0]
    }
    private lazy var chainLengths = [UInt16](repeating: 0, count: Int(size))
    private lazy var chainIDs = [[UInt16]](repeating: [], count: Int(size))

    /// Adds `head` to the avail ring, publishes, and kicks if needed.
    public func submit(_ head: UInt16) {
        let old = availIdx
        pushAvail(head)
        publish()
        kickIfNeeded(old: old)
    }

    /// Returns the next used element, if any (acquire on used.idx).
    public func reap() -> (id: UInt16, len: UInt32)? {
        guard usedIdx != lastUsed else { return nil }
        let e = used + 4 + 8 * Int(lastUsed & (size - 1))
        let id = e.load(as: UInt32.self).littleEndian
        let len = e.load(fromByteOffset: 4, as: UInt32.self).littleEndian
        lastUsed &+= 1
        return (UInt16(truncatingIfNeeded: id), len)
    }

    /// Returns a reaped chain's descriptors to the free list (for chains built with `addChain`).
    public func recycle(_ head: UInt16) {
        let ids = chainIDs[Int(head)]
        for i in ids.reversed() { freeHeads.append(i) }
        chainIDs[Int(head)] = []
    }

    /// Waits until a used element is available: spins up to `spinNs` first, then sleeps on the interrupt eventfd.
    public func waitUsed(timeoutMs: Int32 = 5000, spinNs: UInt64 = 0) -> (id: UInt16, len: UInt32)? {
        // Like Linux's virtio drivers, keep interrupts enabled (used_event current) unless busy-polling: a device
        // (or a vhost-user backend whose interrupts loopbackd relays to track in-flight requests) then signals
        // every completion, even when this driver happens to find it before sleeping.
        if spinNs == 0 { enableInterrupts() }
        if spinNs > 0 {
            let end = lb_now_ns() &+ spinNs
            var spins: UInt32 = 0
            repeat {
                if let r = reap() { return r }
                // The device's loop thread may share this CPU: yield every 8th spin (as the loop does), not on every
                // one (a system call per spin adds its cost to the round trip being measured).
                spins &+= 1
                if spins & 7 == 0 { sched_yield() } else { lb_cpu_relax() }
            } while lb_now_ns() < end
        }
        while true {
            if let r = reap() { return r }
            enableInterrupts()
            if let r = reap() { return r }
            sleeps += 1
            if FD.wait(interruptFD.raw, timeoutMs: timeoutMs) == 0 { return reap() }
        }
    }
}
