import Glibc
import Transport

/// virtio-i2c (virtio 1.2 §5.19): the driver's I2C transfers, one request per message, grouped with FAIL_NEXT,
/// run on a host adapter (`I2CAdapter`) as one transfer each (repeated starts: a register-address write followed
/// by a read is one combined transaction, as on a real bus).
///
/// Every driver-controlled field is checked: the out header (8 readable bytes, possibly split), flags (only
/// FAIL_NEXT and M_RD), the address (7-bit), a write's data only readable and a read's only writable, at most
/// 65535 data bytes (i2c_msg.len), the status byte, groups of at most 42 messages on one bus. A bad request
/// fails its whole group (status ERR), counted and logged once; nothing latches for it.
public final class I2CDevice: VirtioDevice {
    public let deviceID = VirtioI2C.deviceID
    public let queueMaxSizes: [UInt16]
    public let offeredFeatures: VirtioFeatures = [.version1, .eventIdx, .indirectDesc, VirtioI2C.fZeroLength]
    public let configSize = 0
    public let adapter: I2CAdapter

    private var queues: UnsafeMutablePointer<SplitQueue>?
    private var faults: FaultReporter = .none
    /// The group being collected (chains held until the one without FAIL_NEXT arrives).
    private var group: HeldChains
    private var groupBad = false
    private var groupFlags: [UInt32]
    private var groupAddr: [UInt16]
    private let messages: UnsafeMutablePointer<I2CMessage>
    /// Data that does not sit in one guest segment goes through here (at most 64 KiB per group).
    private let bounce: UnsafeMutableRawPointer
    static let bounceBytes = 64 << 10
    private let header = UnsafeMutableRawPointer.allocate(byteCount: 8, alignment: 8)

    /// Requests completed, transfers run, transfers the bus failed, malformed requests.
    public private(set) var requests = 0, transfers = 0, busErrors = 0, badRequests = 0
    /// Groups run per `queueNotified` before yielding to the loop.
    static let groupsPerTurn = 64

    public init(adapter: I2CAdapter, queueSize: UInt16 = 64) {
        self.adapter = adapter
        queueMaxSizes = [queueSize]
        group = HeldChains(capacity: VirtioI2C.maxGroup, maxSegments: 8)
        groupFlags = [UInt32](repeating: 0, count: VirtioI2C.maxGroup)
        groupAddr = [UInt16](repeating: 0, count: VirtioI2C.maxGroup)
        messages = .allocate(capacity: VirtioI2C.maxGroup)
        bounce = .allocate(byteCount: Self.bounceBytes, alignment: 16)
    }
    deinit { messages.deallocate(); bounce.deallocate(); header.deallocate() }

    public func ackFeatures(_ features: VirtioFeatures) {}
    public func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {}
    public func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) {}
    public func activate(_ c: DeviceContext) throws(DeviceError) {
        queues = c.queues
        faults = c.faults
        group.removeAll()
        groupBad = false
    }
    public func reset() {
        queues = nil
        group.removeAll()   // the driver reset its rings: nothing is completed
        groupBad = false
    }
    /// Requests complete inside `queueNotified` except a group still waiting for its last message: give those
    /// back as failed (the driver sees an I/O error, never a hang) when the queue stops.
    public func quiesce() { failHeldGroup() }
    public var supportsQueueRestart: Bool { true }
    public func stopQueue(_ index: Int) { failHeldGroup() }

    private func bad(_ why: String) {
        badRequests += 1
        groupBad = true
        if badRequests == 1 { Log.warning("i2c: malformed request (\(why)); its transfer fails; further ones are not logged") }
    }

    public func queueNotified(_ index: Int) {
        guard let qs = queues, index == 0 else { return }
        let q = qs
        var groups = 0
        while true {
            q.pointee.disableNotifications()
            while let c = q.pointee.pop() {
                take(c)
                if group.isEmpty { groups += 1 }   // a group just ran
                if groups >= Self.groupsPerTurn {
                    q.pointee.publish()
                    if q.pointee.availIdx != q.pointee.lastAvail { q.pointee.yielded = true }
                    return
                }
            }
            if q.pointee.polling || !q.pointee.enableNotifications() { break }
        }
        q.pointee.publish()
        if q.pointee.faultPending { faults.report(queue: 0) }
    }

    /// Validates one request and adds it to the group; runs the group when it is complete.
    private func take(_ c: borrowing Chain) {
        // Without a status byte nothing can be reported: complete it empty (a driver bug).
        guard c.writableBytes >= 1, c.count > c.readableCount else {
            badRequests += 1
            if badRequests == 1 { Log.warning("i2c: request without a status byte; completed empty") }
            queues?.pointee.addUsed(head: c.head, written: 0)
            return
        }
        let k = group.count
        guard group.hold(c) else {
            // Too many messages in one group, or too fragmented to hold: fail what we have and this one.
            bad("group longer than \(VirtioI2C.maxGroup) messages or request in more than 8 pieces")
            failStatus(c)
            queues?.pointee.addUsed(head: c.head, written: 1)
            failHeldGroup()
            return
        }
        var flags: UInt32 = 0   // an unreadable header ends (and fails) the group
        // (No `||` here: its right side is a closure, which cannot capture the borrowed chain.)
        var headerRead = c.readableBytes >= UInt32(VirtioI2C.outHeaderSize)
        if headerRead { headerRead = c.read(into: header, length: 8) == 8 }
        if !headerRead {
            bad("out header shorter than 8 bytes")
        } else {
            let addr = UInt16(littleEndian: header.load(as: UInt16.self))
            flags = UInt32(littleEndian: header.load(fromByteOffset: 4, as: UInt32.self))
            let read = flags & VirtioI2C.flagRead != 0
            let dataIn = Int(c.readableBytes) - VirtioI2C.outHeaderSize, dataOut = Int(c.writableBytes) - 1
            if flags & ~(VirtioI2C.flagFailNext | VirtioI2C.flagRead) != 0 { bad("unknown flags 0x\(String(flags, radix: 16))") }
            // Linux puts the 7-bit address shifted left by one (drivers/i2c/busses/i2c-virtio.c).
            else if addr & 1 != 0 || addr >> 1 > 0x7f { bad("address 0x\(String(addr, radix: 16)) is not a shifted 7-bit address") }
            else if read && dataIn != 0 { bad("read request with data to send") }
            else if !read && dataOut != 0 { bad("write request with room for data back") }
            else if (read ? dataOut : dataIn) > 0xffff { bad("more than 65535 data bytes") }
            groupFlags[k] = flags
            groupAddr[k] = addr >> 1
        }
        if flags & VirtioI2C.flagFailNext == 0 { runGroup() }
    }

    /// Status byte of a chain not held (the last writable byte).
    private func failStatus(_ c: borrowing Chain) {
        let s = c.segments[c.count - 1]
        (s.base + Int(s.length) - 1).storeBytes(of: VirtioI2C.statusError, as: UInt8.self)
    }

    private func failHeldGroup() {
        guard !group.isEmpty else { return }
        groupBad = true
        runGroup()
    }

    /// Runs the held group as one transfer (or fails it whole) and completes its requests in order.
    private func runGroup() {
        let n = group.count
        var ok = !groupBad
        var bus = -1
        var used = 0
        if ok {
            for k in 0..<n {
                guard let (h, seg) = slot(k), let r = adapter.route(groupAddr[k]) else { ok = false; break }
                if bus >= 0 && r.bus != bus { ok = false; break }   // one transfer = one bus
                bus = r.bus
                let read = groupFlags[k] & VirtioI2C.flagRead != 0
                let len = read ? Int(h.writableBytes) - 1 : Int(h.readableBytes) - VirtioI2C.outHeaderSize
                var p: UnsafeMutableRawPointer? = nil
                if len > 0 {
                    // The data in one segment: the adapter uses it in place; else through the bounce buffer.
                    if let direct = single(h, seg, read: read, len: len) { p = direct } else {
                        guard used + len <= Self.bounceBytes else { ok = false; break }
                        p = bounce + used
                        used += len
                        if !read { _ = group.forEachReadable(h, seg, from: VirtioI2C.outHeaderSize, limit: len) { src, m, done in
                            (p! + done).copyMemory(from: src, byteCount: m); return m } }
                    }
                }
                messages[k] = I2CMessage(address: r.address, read: read, buffer: p, length: len)
            }
        }
        if ok {
            transfers += 1
            ok = adapter.transfer(bus: bus, UnsafeMutableBufferPointer(start: messages, count: n))
            if !ok { busErrors += 1 }
        }
        // Complete in order: reads copy bounced data back; status OK for all, or ERR for all.
        while let h = group.oldest {
            let (held, seg) = h
            let k = n - group.count
            let read = groupFlags[k] & VirtioI2C.flagRead != 0
            var written: UInt32 = 1
            if ok && read {
                let len = Int(held.writableBytes) - 1
                if len > 0, let p = messages[k].buffer, p >= bounce, p < bounce + Self.bounceBytes {
                    _ = group.forEachWritable(held, seg, from: 0, limit: len) { dst, m, done in
                        dst.copyMemory(from: p + done, byteCount: m); return m }
                }
                written = UInt32(len) + 1
            }
            // The status byte is the last writable byte.
            let last = seg[held.count - 1]
            (last.base + Int(last.length) - 1).storeBytes(of: ok ? VirtioI2C.statusOK : VirtioI2C.statusError, as: UInt8.self)
            queues?.pointee.addUsed(head: held.head, written: written)
            requests += 1
            _ = group.removeOldest()
        }
        groupBad = false
    }

    /// Held request `k` of the group (0 = oldest).
    private func slot(_ k: Int) -> (HeldChains.Held, UnsafeMutablePointer<Segment>)? { group.at(k) }

    /// The data's address if it is one piece of guest memory.
    private func single(_ h: HeldChains.Held, _ seg: UnsafeMutablePointer<Segment>, read: Bool, len: Int) -> UnsafeMutableRawPointer? {
        var found: UnsafeMutableRawPointer? = nil
        var pieces = 0
        if read {
            _ = group.forEachWritable(h, seg, from: 0, limit: len) { p, m, _ in pieces += 1; if m == len { found = p }; return m }
        } else {
            _ = group.forEachReadable(h, seg, from: VirtioI2C.outHeaderSize, limit: len) { p, m, _ in pieces += 1; if m == len { found = p }; return m }
        }
        return pieces == 1 ? found : nil
    }
}
