import Glibc
import Transport

/// virtio-input (virtio 1.2 §5.8): queue 0 (eventq) holds the driver's 8-byte buffers until the host device has
/// events; queue 1 (statusq) carries LED/sound/force-feedback events back to the host device.
///
/// Events arrive from the `InputSource` one by one and are grouped up to EV_SYN/SYN_REPORT; a complete group is
/// delivered only when the driver has posted enough buffers for all of it (QEMU's virtio-input rule), in order,
/// with one publish. While the driver has too few buffers, groups wait in a bounded host-side ring; when it is
/// full the oldest whole groups are dropped (counted, rate-limited warning): the device never blocks and never
/// allocates per event. The config space (select/subsel) is answered from the source's capabilities; every value
/// the driver writes or sends is checked.
public final class InputDevice: VirtioDevice, InputSink {
    public let deviceID = VirtioInput.deviceID
    public let queueMaxSizes: [UInt16]
    public let offeredFeatures: VirtioFeatures = [.version1, .eventIdx, .indirectDesc]
    public let configSize = VirtioInput.configSize
    public var configReadsDependOnWrites: Bool { true }   // select/subsel, then size and the union
    public let source: InputSource
    public let caps: InputCapabilities

    private var queues: UnsafeMutablePointer<SplitQueue>?
    private var queueCount = 0
    private var faults: FaultReporter = .none
    private var started = false
    private var held: HeldChains

    // Config space: the driver's select/subsel and the answer (size + union), recomputed on each write.
    private var select: UInt8 = 0, subsel: UInt8 = 0
    private let cfg = UnsafeMutableRawPointer.allocate(byteCount: VirtioInput.configSize, alignment: 8)

    // Host-side ring of pending events (wire format) and the lengths of its complete groups, both preallocated.
    public let ringCapacity: Int
    private let ring: UnsafeMutablePointer<UInt64>
    private var ringHead = 0, ringCount = 0
    /// Events at the ring's tail that belong to the group still open (no SYN_REPORT yet).
    private var openCount = 0
    private let groupLens: UnsafeMutablePointer<Int32>
    private var groupHead = 0, groupCount = 0

    /// Counters (loop thread). Driver errors: event chains with fewer than 8 writable bytes or too fragmented,
    /// status chains that are not one 8-byte readable event or name an event the host device does not have.
    public private(set) var badEventChains = 0
    public private(set) var badStatusEvents = 0
    public private(set) var statusWritten = 0
    public private(set) var statusFailed = 0
    /// Config writes outside select/subsel (read-only fields) and selects answered with size 0.
    public private(set) var badConfigWrites = 0
    public private(set) var unknownSelects = 0
    public private(set) var eventsDelivered: UInt64 = 0
    public private(set) var groupsDelivered: UInt64 = 0
    public private(set) var droppedGroups: UInt64 = 0
    public private(set) var droppedEvents: UInt64 = 0
    /// Events that came while no driver had the device running (dropped: they would be stale).
    public private(set) var droppedInactive: UInt64 = 0
    public private(set) var sourceLost = false
    public private(set) var unplugs = 0
    /// Pieces delivered of groups larger than the queue (they can never fit whole).
    public private(set) var splitGroups = 0

    public init(source: InputSource, queueSize: UInt16 = 64, ringEvents: Int = 1024) {
        self.source = source
        caps = source.capabilities
        queueMaxSizes = [queueSize, queueSize]
        held = HeldChains(capacity: Int(queueSize), maxSegments: 8)
        ringCapacity = max(ringEvents, 8)
        ring = .allocate(capacity: ringCapacity)
        groupLens = .allocate(capacity: ringCapacity)
        cfg.initializeMemory(as: UInt8.self, repeating: 0, count: VirtioInput.configSize)
    }
    deinit {
        if started { source.stop() }
        cfg.deallocate()
        ring.deallocate()
        groupLens.deallocate()
    }

    public func ackFeatures(_ features: VirtioFeatures) {}

    // MARK: config space (§5.8.4)

    public func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        guard let b = buffer.baseAddress else { return }
        b.copyMemory(from: cfg + offset, byteCount: buffer.count)
    }

    public func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) {
        // Only select (0) and subsel (1) are driver-writable; size and the union are read-only.
        var changed = false
        for (k, v) in buffer.enumerated() {
            switch offset + k {
            case 0: select = v; changed = true
            case 1: subsel = v; changed = true
            default: badConfigWrites += 1
            }
        }
        if changed { answer() }
    }

    /// Computes size + union for the current select/subsel. Anything unknown or out of range answers size 0.
    private func answer() {
        cfg.initializeMemory(as: UInt8.self, repeating: 0, count: VirtioInput.configSize)
        cfg.storeBytes(of: select, as: UInt8.self)
        cfg.storeBytes(of: subsel, toByteOffset: 1, as: UInt8.self)
        let u = cfg + VirtioInput.unionOffset
        var size = 0
        func bytes(_ a: [UInt8]) -> Int {
            // Bitmaps: up to the last non-zero byte (an empty bitmap answers 0: the type is absent).
            var n = min(a.count, VirtioInput.unionSize)
            while n > 0 && a[n - 1] == 0 { n -= 1 }
            for i in 0..<n { u.storeBytes(of: a[i], toByteOffset: i, as: UInt8.self) }
            return n
        }
        switch select {
        case VirtioInput.cfgIDName where subsel == 0: size = bytes(Array(caps.name.utf8))
        case VirtioInput.cfgIDSerial where subsel == 0: size = bytes(Array(caps.serial.utf8))
        case VirtioInput.cfgIDDevids where subsel == 0:
            for (i, v) in [caps.bustype, caps.vendor, caps.product, caps.version].enumerated() {
                u.storeBytes(of: v.littleEndian, toByteOffset: 2 * i, as: UInt16.self)
            }
            size = 8
        case VirtioInput.cfgPropBits where subsel == 0: size = bytes(caps.props)
        case VirtioInput.cfgEVBits:
            // subsel = event type; EV_SYN is implied (the driver never asks), types beyond EV_MAX do not exist.
            if subsel != 0 && UInt16(subsel) <= VirtioInput.evMax { size = bytes(caps.bits[Int(subsel)]) }
        case VirtioInput.cfgAbsInfo:
            if UInt16(subsel) <= VirtioInput.absMax, caps.has(type: VirtioInput.evAbs, code: UInt16(subsel)),
               let a = caps.abs[UInt16(subsel)] {
                for (i, v) in [a.min, a.max, a.fuzz, a.flat, a.res].enumerated() {
                    u.storeBytes(of: v.littleEndian, toByteOffset: 4 * i, as: Int32.self)
                }
                size = 20
            }
        default: break
        }
        if size == 0 && select != VirtioInput.cfgUnset { unknownSelects += 1 }
        cfg.storeBytes(of: UInt8(size), toByteOffset: 2, as: UInt8.self)
    }

    // MARK: lifecycle

    public func activate(_ context: DeviceContext) throws(DeviceError) {
        if !started {
            try source.start(loop: context.loop, sink: self)
            started = true
        }
        queues = context.queues
        queueCount = context.queueCount
        faults = context.faults
        held.removeAll()
        clearRing()
    }

    public func reset() {
        queues = nil
        queueCount = 0
        held.removeAll()
        clearRing()
    }

    /// A vhost-user ring stop (GET_VRING_BASE) must leave nothing in flight: held event buffers are completed with
    /// an empty report (an all-zero event is EV_SYN/SYN_REPORT 0: the driver reads it as "nothing changed").
    public func quiesce() {
        guard let q = queues, queueCount > 0 else { return }
        var zero: UInt64 = 0
        while held.oldest != nil {
            _ = held.fillOldest(from: &zero, length: 8)
            let n = held.progress
            guard let h = held.removeOldest() else { break }
            q[0].addUsed(head: h.head, written: n)
        }
        q[0].publish()
        if q[0].faultPending { faults.report(queue: 0) }
    }

    private func clearRing() {
        ringHead = 0; ringCount = 0; openCount = 0; groupHead = 0; groupCount = 0
    }

    // MARK: queues

    public func queueNotified(_ index: Int) {
        guard let q = queues, index < queueCount else { return }
        if index == 0 {
            q[0].drain { chain in
                // Each buffer takes one event: fewer than 8 writable bytes is a driver error (completed empty now).
                guard chain.writableBytes >= UInt32(VirtioInput.eventSize) else {
                    badEventChains += 1
                    if badEventChains == 1 { Log.warning("input: driver posted an event buffer with \(chain.writableBytes) writable bytes (needs 8); completed empty") }
                    return 0
                }
                if held.hold(chain) { return nil }
                badEventChains += 1
                return 0
            }
            deliver()
        } else {
            q[1].drain { chain in status(chain); return 0 }
        }
    }

    /// One status event (§5.8.6.2): exactly one readable 8-byte virtio_input_event, of a type the host device
    /// takes back (LED, sound, force feedback) and a code it has; written to the host device.
    private func status(_ chain: borrowing Chain) {
        var w: UInt64 = 0
        let readable = chain.readableBytes
        guard readable == UInt32(VirtioInput.eventSize), chain.read(into: &w, length: 8) == 8 else {
            badStatus("a status buffer of \(readable) readable bytes"); return
        }
        let e = InputEvent(wire: UInt64(littleEndian: w))
        switch e.type {
        case VirtioInput.evLed, VirtioInput.evSnd, VirtioInput.evFF:
            guard caps.has(type: e.type, code: e.code) else { badStatus("status event type \(e.type) code \(e.code) the host device does not have"); return }
        default:
            badStatus("status event of type \(e.type)"); return
        }
        if source.write(e) { statusWritten += 1 } else { statusFailed += 1 }
    }

    private func badStatus(_ what: @autoclosure () -> String) {
        badStatusEvents += 1
        Log.warning("input: driver sent \(what()); ignored")
    }

    /// Moves complete groups into held buffers while a whole group fits, then publishes once.
    private func deliver() {
        guard let q = queues else { return }
        var moved = false
        while groupCount > 0 {
            let n = Int(groupLens[groupHead])
            if held.count < n {
                // A group larger than the driver's ring could never fit whole: deliver it in pieces as buffers come.
                guard n > Int(q[0].size), held.count > 0 else { break }
                splitGroups += 1
                let k = held.count
                fill(q, k)
                groupLens[groupHead] = Int32(n - k)
                moved = true
                break
            }
            fill(q, n)
            groupHead = (groupHead + 1) % ringCapacity
            groupCount -= 1
            groupsDelivered &+= 1
            moved = true
        }
        if moved {
            q[0].publish()
            if q[0].faultPending { faults.report(queue: 0) }
        }
    }

    /// Copies `k` events from the ring's head into the `k` oldest held buffers.
    @inline(__always)
    private func fill(_ q: UnsafeMutablePointer<SplitQueue>, _ k: Int) {
        for _ in 0..<k {
            var w = ring[ringHead].littleEndian
            ringHead = (ringHead + 1) % ringCapacity
            ringCount -= 1
            _ = held.fillOldest(from: &w, length: 8)
            guard let h = held.removeOldest() else { break }
            q[0].addUsed(head: h.head, written: 8)
            eventsDelivered &+= 1
        }
    }

    // MARK: InputSink

    public func inputEvent(_ e: InputEvent) {
        guard queues != nil, queueCount > 0 else { droppedInactive &+= 1; return }
        if ringCount == ringCapacity { makeRoom() }
        ring[(ringHead + ringCount) % ringCapacity] = e.wire
        ringCount += 1
        openCount += 1
        if e.type == VirtioInput.evSyn && e.code == VirtioInput.synReport {
            groupLens[(groupHead + groupCount) % ringCapacity] = Int32(openCount)
            groupCount += 1
            openCount = 0
            deliver()
        }
    }

    /// The ring is full: drop the oldest complete group, or (one open group fills it all) the open group so far.
    private func makeRoom() {
        let n: Int
        let droppedWhole = groupCount > 0
        if groupCount > 0 {
            n = Int(groupLens[groupHead])
            groupHead = (groupHead + 1) % ringCapacity
            groupCount -= 1
            ringHead = (ringHead + n) % ringCapacity
        } else {
            n = openCount
            openCount = 0
        }
        ringCount -= n
        droppedGroups &+= 1
        droppedEvents &+= UInt64(n)
        Log.warning("input: driver is not taking events; dropped the oldest group (\(droppedGroups) groups, \(droppedEvents) events dropped so far)")
        // Groups are delivered in order: the next one may have waited only behind the one dropped, and fit the
        // buffers the driver has now (left waiting, it would be the next one dropped).
        if droppedWhole { deliver() }
    }

    public func inputSourceLost(_ why: String) {
        // The open group will never be completed: forget it.
        ringCount -= openCount
        openCount = 0
        sourceLost = true
        unplugs += 1
        Log.warning("input: host device gone (\(why)); the device stays, with no events")
    }

    public func inputSourceBack() {
        sourceLost = false
        Log.info("input: host device back")
    }

    /// Snapshot for tests and the demo (loop thread).
    public var pendingEvents: Int { ringCount }
    public var heldBuffers: Int { held.count }
}
