import Glibc
import Transport

/// Counters of what the device did and refused (loop thread).
public struct VsockStats: Equatable, Sendable {
    /// Driver packets refused (dropped or answered with RST), and per reason.
    public var badPackets: UInt64 = 0
    public var badByReason: [VsockPacketError: UInt64] = [:]
    /// Receive/event chains completed empty because they were too small or too fragmented.
    public var badChains: UInt64 = 0
    public var rstSent: UInt64 = 0
    public var creditUpdatesSent: UInt64 = 0
    public var connectionsOpened: UInt64 = 0
    /// Driver REQUESTs nobody on the host listened for (answered RST).
    public var connectionsRefused: UInt64 = 0
    public var bytesFromDriver: UInt64 = 0
    public var bytesToDriver: UInt64 = 0
    /// Transmit chains parked because a host socket could not take more (total, and the most at once).
    public var parkedChains: UInt64 = 0
    public var maxParked: Int = 0
    /// RSTs for packets of no connection that found the RST queue full (the driver gives no receive buffers).
    public var rstOverflow: UInt64 = 0
    public var transportResets: UInt64 = 0
}

/// One connection (a slot of the device's table; the host side uses the slot index as its handle).
struct VsockConn {
    enum State: UInt8 { case free, connecting, connected, closing }
    var state: State = .free
    /// Our (host side) port and the driver's port.
    var localPort: UInt32 = 0
    var peerPort: UInt32 = 0
    /// The driver's receive credit: its buffer and what it has consumed; what we sent it.
    var peerBufAlloc: UInt32 = 0
    var peerFwdCnt: UInt32 = 0
    var txCnt: UInt32 = 0
    /// Bytes the driver sent us (accepted) and bytes written to the host socket; fwd_cnt we last told the driver.
    var rxCnt: UInt32 = 0
    var fwdCnt: UInt32 = 0
    var lastFwdSent: UInt32 = 0
    /// Packets to send the driver (bits of `Pending`).
    var pending: UInt8 = 0
    /// The host socket may have data (edge seen, no `.wouldBlock` since); it reported end of file.
    var hostReadable = false
    var hostEOF = false
    /// SHUTDOWN flags the driver sent, applied once parked output is written.
    var driverShutdown: UInt32 = 0
    var inReady = false
    /// Parked transmit chains (a list through the park pool) and bytes of the first one already written.
    var parkHead: Int32 = -1
    var parkTail: Int32 = -1
    var parkProgress: UInt32 = 0
    var parked: Int32 = 0

    enum Pending { static let request: UInt8 = 1, response: UInt8 = 2, credit: UInt8 = 4, shutdown: UInt8 = 8, creditRequest: UInt8 = 16 }
}

/// virtio-vsock (virtio 1.2 §5.10), stream sockets between the driver (guest CID `guestCID`) and the host (CID 2)
/// through a `VsockHost` (hybrid vsock unix sockets, or a fake).
///
/// Data path, driver → host: each RW packet is written straight from the driver's transmit buffers to the host
/// socket (writev); when the socket would block, the chain is parked on its connection (not completed), later
/// packets of that connection park behind it, other connections go on, and the connection's fwd_cnt (the driver's
/// credit) stops growing until the host reads. The device gives the driver `bufAlloc` bytes of credit per
/// connection and sends CREDIT_UPDATE when a quarter of it has been forwarded since the driver last heard. Host →
/// driver: receive buffers are held until a connection has data and the driver's credit allows; the host socket is
/// read straight into them (readv, after the header), at most the credit, the buffer and 64 KiB per packet.
/// Connections are served round robin. No allocation per packet: the connection table, its hash index, the park
/// pool and the RST queue are preallocated.
///
/// Every driver-controlled field is checked: header size, type (STREAM only), op, src_cid (the guest CID), dst_cid
/// (2), len (≤ the chain's payload; 0 on packets without payload), credit (no more data than the credit given).
/// A bad packet of a connection resets it (RST both ways); one for no connection is answered with RST, or dropped
/// when its addresses are wrong; each is counted (`stats`), the first of each kind logged.
public final class VsockDevice: VirtioDevice, VsockHostDelegate {
    public let deviceID = VirtioVsock.deviceID
    public let queueMaxSizes: [UInt16]
    public let offeredFeatures: VirtioFeatures = [.version1, .eventIdx, .indirectDesc, VirtioVsock.fStream]
    public let configSize = VirtioVsock.configSize
    public let guestCID: UInt64
    public let host: VsockHost
    /// Credit the device gives the driver per connection (bytes the driver may send ahead of the host reading).
    public let bufAlloc: UInt32
    public let maxConnections: Int
    public static let maxSegments = 20

    private var queues: UnsafeMutablePointer<SplitQueue>?
    private var queueCount = 0
    private var faults: FaultReporter = .none
    private var loop: EventLoop?
    private var hostStarted = false

    // Connections: slots, a free stack, an open-addressing index keyed by (local port << 32 | peer port).
    let conns: UnsafeMutablePointer<VsockConn>
    private let freeSlots: UnsafeMutablePointer<Int32>
    private var freeCount: Int
    private let indexKeys: UnsafeMutablePointer<UInt64>
    private let indexSlots: UnsafeMutablePointer<Int32>
    private let indexMask: Int
    public private(set) var connectionCount = 0
    /// Connections with something to send the driver, served round robin.
    private let ready: UnsafeMutablePointer<Int32>
    private var readyFirst = 0, readyCount = 0
    /// RSTs for packets of no connection (src/dst ports of the RST).
    private let rstQueue: UnsafeMutablePointer<(UInt32, UInt32)>
    private static let rstCapacity = 256
    private var rstFirst = 0, rstCount = 0
    private var nextLocalPort: UInt32 = 49152

    // Park pool: transmit chains waiting for their host socket (payload segments only).
    private struct Parked { var head: UInt16; var count: Int32; var length: UInt32; var next: Int32 }
    private let parkSlots: UnsafeMutablePointer<Parked>
    private let parkSegments: UnsafeMutablePointer<Segment>
    private let parkCapacity: Int
    private let parkFree: UnsafeMutablePointer<Int32>
    private var parkFreeCount: Int
    private var parkedNow = 0

    private var rxHeld: HeldChains
    private var eventHeld: HeldChains
    private var transportResetPending = false
    private let iov: UnsafeMutablePointer<iovec>
    private let scratch: UnsafeMutableRawPointer
    public private(set) var stats = VsockStats()
    private var logged: UInt32 = 0

    public init(guestCID: UInt64, host: VsockHost, queueSize: UInt16 = 256, bufAlloc: UInt32 = 256 << 10, maxConnections: Int = 1024) {
        precondition(guestCID >= 3 && maxConnections > 0)
        self.guestCID = guestCID
        self.host = host
        self.bufAlloc = bufAlloc
        self.maxConnections = maxConnections
        queueMaxSizes = [queueSize, queueSize, queueSize]
        conns = .allocate(capacity: maxConnections)
        conns.initialize(repeating: VsockConn(), count: maxConnections)
        freeSlots = .allocate(capacity: maxConnections)
        for i in 0..<maxConnections { freeSlots[i] = Int32(maxConnections - 1 - i) }
        freeCount = maxConnections
        var cap = 16
        while cap < 2 * maxConnections { cap <<= 1 }
        indexMask = cap - 1
        indexKeys = .allocate(capacity: cap)
        indexSlots = .allocate(capacity: cap)
        indexSlots.initialize(repeating: -1, count: cap)
        ready = .allocate(capacity: maxConnections)
        rstQueue = .allocate(capacity: Self.rstCapacity)
        parkCapacity = Int(queueSize)
        parkSlots = .allocate(capacity: parkCapacity)
        parkSegments = .allocate(capacity: parkCapacity * Self.maxSegments)
        parkFree = .allocate(capacity: parkCapacity)
        for i in 0..<parkCapacity { parkFree[i] = Int32(parkCapacity - 1 - i) }
        parkFreeCount = parkCapacity
        rxHeld = HeldChains(capacity: Int(queueSize), maxSegments: Self.maxSegments)
        eventHeld = HeldChains(capacity: Int(queueSize), maxSegments: 4)
        iov = .allocate(capacity: Self.maxSegments)
        scratch = .allocate(byteCount: 64, alignment: 8)
    }
    deinit {
        host.stop()
        conns.deallocate(); freeSlots.deallocate(); indexKeys.deallocate(); indexSlots.deallocate(); ready.deallocate()
        rstQueue.deallocate(); parkSlots.deallocate(); parkSegments.deallocate(); parkFree.deallocate()
        iov.deallocate(); scratch.deallocate()
    }

    /// What tests look at: a connection's state and counters, by (host port, driver port).
    public struct ConnectionInfo: Equatable {
        public var slot: Int, connected: Bool, txCnt: UInt32, rxCnt: UInt32, fwdCnt: UInt32, peerBufAlloc: UInt32, peerFwdCnt: UInt32, parked: Int
    }
    public func connection(hostPort: UInt32, driverPort: UInt32) -> ConnectionInfo? {
        let s = lookup(hostPort, driverPort)
        guard s >= 0 else { return nil }
        let c = conns[Int(s)]
        return ConnectionInfo(slot: Int(s), connected: c.state == .connected, txCnt: c.txCnt, rxCnt: c.rxCnt, fwdCnt: c.fwdCnt,
                              peerBufAlloc: c.peerBufAlloc, peerFwdCnt: c.peerFwdCnt, parked: Int(c.parked))
    }

    // MARK: VirtioDevice

    public func ackFeatures(_ f: VirtioFeatures) {}

    public func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        withUnsafeBytes(of: guestCID.littleEndian) { c in
            for i in 0..<buffer.count where offset + i < c.count { buffer[i] = c[offset + i] }
        }
    }
    public func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) {}   // guest_cid is read-only

    public func activate(_ c: DeviceContext) throws(DeviceError) {
        // rx and tx are enough: QEMU's vhost-user-vsock keeps the event queue for itself (its vhost device has two
        // virtqueues; QEMU sends TRANSPORT_RESET after a migration), so a served device sees two. Without the event
        // queue a reset reaches the driver as RSTs only.
        guard c.queueCount >= 2 else {
            // Nothing works without rx and tx: the device stays idle (takes no chains) until a reset.
            once(1 << 24, "the driver set up \(c.queueCount) queue(s), needs rx and tx: idle until reset")
            return
        }
        queues = c.queues
        queueCount = c.queueCount
        faults = c.faults
        loop = c.loop
        if !hostStarted {
            try host.start(loop: c.loop, delegate: self)
            hostStarted = true
        }
    }

    public func reset() {
        if connectionCount > 0 { transportResetPending = true }
        closeAll()
        host.stop()
        hostStarted = false
        queues = nil
        queueCount = 0
        rxHeld.removeAll()
        eventHeld.removeAll()
        rstCount = 0
        readyCount = 0
    }

    /// A vhost-user back-end stopping its rings: held buffers go back empty, parked output gets one last write
    /// and its chains complete; the connections are closed (their state goes with the rings) and the driver hears
    /// TRANSPORT_RESET when the device runs again.
    public func quiesce() {
        guard let qs = queues else { return }
        for s in 0..<maxConnections where conns[s].state != .free { flushParked(s); dropParked(s) }
        qs[VirtioVsock.txQueue].publish()
        while let h = rxHeld.removeOldest() { qs[VirtioVsock.rxQueue].addUsed(head: h.head, written: 0) }
        qs[VirtioVsock.rxQueue].publish()
        if queueCount > VirtioVsock.eventQueue {
            while let h = eventHeld.removeOldest() { qs[VirtioVsock.eventQueue].addUsed(head: h.head, written: 0) }
            qs[VirtioVsock.eventQueue].publish()
        }
        if connectionCount > 0 { transportResetPending = true }
        closeAll()
    }

    public var supportsQueueRestart: Bool { true }

    public func stopQueue(_ q: Int) {
        guard let qs = queues else { return }
        switch q {
        case VirtioVsock.rxQueue:
            while let h = rxHeld.removeOldest() { qs[q].addUsed(head: h.head, written: 0) }
        case VirtioVsock.txQueue:
            // Output that cannot be written now would be lost: those connections are reset (RST both ways).
            for s in 0..<maxConnections where conns[s].parkHead >= 0 {
                flushParked(s)
                if conns[s].parkHead >= 0 { dropParked(s); resetConnection(s, .creditExceeded, count: false) }
            }
        case VirtioVsock.eventQueue:
            while let h = eventHeld.removeOldest() { qs[q].addUsed(head: h.head, written: 0) }
        default: return
        }
        qs[q].publish()
    }

    public func startQueue(_ q: Int) {
        if q == VirtioVsock.rxQueue { pumpRX() }
    }

    /// Drops every connection and tells the driver (TRANSPORT_RESET): what a restarted device does.
    public func transportReset() {
        closeAll()
        transportResetPending = true
        flushEvents()
    }

    // MARK: queues

    public func queueNotified(_ index: Int) {
        guard let qs = queues, index < queueCount else { return }
        switch index {
        case VirtioVsock.rxQueue:
            qs[index].drain { c in
                if c.writableBytes > UInt32(VirtioVsock.headerSize) && rxHeld.hold(c) { return nil }
                badChain("receive buffer shorter than the header or too fragmented")
                return 0
            }
            pumpRX()
        case VirtioVsock.txQueue:
            pumpTX()
            if rstCount > 0 || readyCount > 0 { pumpRX() }
        case VirtioVsock.eventQueue:
            qs[index].drain { c in
                if c.writableBytes >= UInt32(VirtioVsock.eventSize) && eventHeld.hold(c) { return nil }
                badChain("event buffer shorter than 4 bytes")
                return 0
            }
            flushEvents()
        default:
            qs[index].drain { _ in 0 }
        }
    }

    /// Driver packets, with the no-lost-kick loop and the per-turn budget (not `drain`: handling a packet may
    /// complete parked chains of the same queue, which must not happen inside the queue's own mutating call).
    private func pumpTX() {
        guard let qs = queues else { return }
        let q = VirtioVsock.txQueue
        var chains = 0
        outer: while true {
            qs[q].disableNotifications()
            while let c = qs[q].pop() {
                if let w = transmitPacket(c) { qs[q].addUsed(head: c.head, written: w) }
                chains += 1
                if chains >= SplitQueue.chainBudget {
                    if qs[q].budgetSpent() { faults.again(queue: q) }
                    break outer
                }
            }
            if qs[q].polling || !qs[q].enableNotifications() { break }
        }
        qs[q].publish()
    }

    /// One driver packet. nil: the chain was parked (completed later); else 0 (transmit chains carry no writable bytes).
    private func transmitPacket(_ c: borrowing Chain) -> UInt32? {
        guard c.readableBytes >= UInt32(VirtioVsock.headerSize) else { refuse(.shortHeader); return 0 }
        _ = c.read(into: scratch, length: VirtioVsock.headerSize)
        let h = VsockHeader(from: scratch)
        let payload = Int(c.readableBytes) - VirtioVsock.headerSize
        let s = lookup(h.dstPort, h.srcPort)
        if let e = validateVsockHeader(h, payload: payload, guestCID: guestCID) {
            refuse(e)
            switch e {
            case .badSourceCID, .badDestinationCID: break   // not ours to answer
            default:
                if s >= 0 { resetConnection(Int(s), e, count: false) }
                else if h.op != VirtioVsock.Op.rst.rawValue { queueRST(h) }
            }
            return 0
        }
        let op = VirtioVsock.Op(rawValue: h.op)!
        guard s >= 0 else {
            switch op {
            case .request: openFromDriver(h)
            case .rst: break
            default: refuse(.noConnection); queueRST(h)
            }
            return 0
        }
        let slot = Int(s)
        if conns[slot].peerBufAlloc != h.bufAlloc || conns[slot].peerFwdCnt != h.fwdCnt {
            conns[slot].peerBufAlloc = h.bufAlloc
            conns[slot].peerFwdCnt = h.fwdCnt
            conns[slot].pending &= ~VsockConn.Pending.creditRequest
            if conns[slot].hostReadable { markReady(slot) }
        }
        switch op {
        case .request:
            // A second REQUEST for a live connection: the driver lost track of it.
            resetConnection(slot, .noConnection, count: true)
        case .response:
            guard conns[slot].state == .connecting else { resetConnection(slot, .noConnection, count: true); return 0 }
            conns[slot].state = .connected
            host.established(slot, localPort: conns[slot].localPort)
            markReady(slot)
        case .rst:
            dropParked(slot)
            closeConnection(slot)
        case .shutdown:
            conns[slot].driverShutdown |= h.flags & (VirtioVsock.shutdownRcv | VirtioVsock.shutdownSend)
            if conns[slot].parkHead < 0 { applyShutdown(slot) }
        case .rw:
            guard conns[slot].state == .connected || conns[slot].state == .closing else {
                resetConnection(slot, .noConnection, count: true); return 0
            }
            guard conns[slot].driverShutdown & VirtioVsock.shutdownSend == 0 else { resetConnection(slot, .badLength, count: true); return 0 }
            let len = h.len
            guard conns[slot].rxCnt &- conns[slot].fwdCnt &+ len <= bufAlloc,
                  UInt64(conns[slot].rxCnt &- conns[slot].fwdCnt) + UInt64(len) <= UInt64(bufAlloc) else {
                resetConnection(slot, .creditExceeded, count: true); return 0
            }
            conns[slot].rxCnt &+= len
            stats.bytesFromDriver &+= UInt64(len)
            guard len > 0 else { return 0 }
            if conns[slot].parkHead < 0 {
                let k = writeToHost(slot, c.segments, c.readableCount, skip: VirtioVsock.headerSize, length: Int(len))
                if k < 0 { return 0 }   // host gone: the connection was reset
                if k == Int(len) { creditCheck(slot); return 0 }
                return park(slot, c, done: UInt32(k), length: len) ? nil : 0
            }
            return park(slot, c, done: 0, length: len) ? nil : 0
        case .creditUpdate:
            markReady(slot)
        case .creditRequest:
            conns[slot].pending |= VsockConn.Pending.credit
            markReady(slot)
        }
        return 0
    }

    /// Writes `length` bytes of `seg` after `skip` to the host socket of `slot`; returns bytes written (fewer:
    /// the socket would block), or -1 when the host side is gone (the connection is reset).
    private func writeToHost(_ slot: Int, _ seg: UnsafeMutablePointer<Segment>, _ nseg: Int, skip: Int, length: Int) -> Int {
        var done = 0
        while done < length {
            let n = fillIOV(seg, nseg, skip: skip + done, limit: length - done)
            let r = host.write(slot, iov, n)
            switch r {
            case .bytes(let k):
                done += k
                conns[slot].fwdCnt &+= UInt32(k)
            case .wouldBlock:
                return done
            case .closed:
                resetConnection(slot, nil, count: false)
                return -1
            }
        }
        return done
    }

    @inline(__always)
    private func fillIOV(_ seg: UnsafeMutablePointer<Segment>, _ nseg: Int, skip: Int, limit: Int) -> Int {
        var s = skip, n = 0, i = 0, left = limit
        while i < nseg && n < Self.maxSegments && left > 0 {
            let l = Int(seg[i].length)
            if s >= l { s -= l; i += 1; continue }
            let k = min(l - s, left)
            iov[n] = iovec(iov_base: seg[i].base + s, iov_len: k)
            n += 1
            left -= k
            s = 0
            i += 1
        }
        return n
    }

    /// Parks the payload of `c` (bytes `done..<length` still to write) on `slot`; false when it cannot (too
    /// fragmented: the connection is reset).
    private func park(_ slot: Int, _ c: borrowing Chain, done: UInt32, length: UInt32) -> Bool {
        // Payload segments: skip the header in the readable part.
        var skip = VirtioVsock.headerSize, n = 0
        guard parkFreeCount > 0 else { resetConnection(slot, .creditExceeded, count: true); return false }
        let e = Int(parkFree[parkFreeCount - 1])
        let seg = parkSegments + e * Self.maxSegments
        var i = 0
        while i < c.readableCount {
            let l = Int(c.segments[i].length)
            if skip >= l { skip -= l; i += 1; continue }
            guard n < Self.maxSegments else { once(1 << 20, "transmit chain with more than \(Self.maxSegments) segments"); resetConnection(slot, .badLength, count: true); return false }
            var sg = c.segments[i]
            sg.base += skip
            sg.length -= UInt32(skip)
            seg[n] = sg
            n += 1
            skip = 0
            i += 1
        }
        parkFreeCount -= 1
        parkSlots[e] = Parked(head: c.head, count: Int32(n), length: length, next: -1)
        if conns[slot].parkTail >= 0 { parkSlots[Int(conns[slot].parkTail)].next = Int32(e) } else {
            conns[slot].parkHead = Int32(e)
            conns[slot].parkProgress = done
        }
        conns[slot].parkTail = Int32(e)
        conns[slot].parked += 1
        parkedNow += 1
        stats.parkedChains &+= 1
        if parkedNow > stats.maxParked { stats.maxParked = parkedNow }
        return true
    }

    /// Writes parked output of `slot` until its socket blocks; completes the chains written.
    private func flushParked(_ slot: Int) {
        guard let qs = queues else { return }
        var completed = false
        while conns[slot].parkHead >= 0 {
            let e = Int(conns[slot].parkHead)
            let p = parkSlots[e]
            let from = Int(conns[slot].parkProgress)
            let k = writeToHost(slot, parkSegments + e * Self.maxSegments, Int(p.count), skip: from, length: Int(p.length) - from)
            if k < 0 { completed = true; break }   // reset: the parked chains were completed
            conns[slot].parkProgress &+= UInt32(k)
            guard Int(conns[slot].parkProgress) == Int(p.length) else { break }
            popParked(slot)
            qs[VirtioVsock.txQueue].addUsed(head: p.head, written: 0)
            completed = true
        }
        if completed { qs[VirtioVsock.txQueue].publish() }
        guard conns[slot].state != .free else { return }
        if conns[slot].parkHead < 0 {
            applyShutdown(slot)
            guard conns[slot].state != .free else { return }
            // The transmit queue stopped taking chains? No: other connections go on. Chains may wait behind.
        }
        creditCheck(slot)
    }

    private func popParked(_ slot: Int) {
        let e = Int(conns[slot].parkHead)
        conns[slot].parkHead = parkSlots[e].next
        if conns[slot].parkHead < 0 { conns[slot].parkTail = -1 }
        conns[slot].parkProgress = 0
        conns[slot].parked -= 1
        parkFree[parkFreeCount] = Int32(e)
        parkFreeCount += 1
        parkedNow -= 1
    }

    /// Completes the parked chains of `slot` unwritten (connection reset, queue stop).
    private func dropParked(_ slot: Int) {
        guard let qs = queues else {
            while conns[slot].parkHead >= 0 { popParked(slot) }
            return
        }
        var any = false
        while conns[slot].parkHead >= 0 {
            let head = parkSlots[Int(conns[slot].parkHead)].head
            popParked(slot)
            qs[VirtioVsock.txQueue].addUsed(head: head, written: 0)
            any = true
        }
        if any { qs[VirtioVsock.txQueue].publish() }
    }

    /// SHUTDOWN from the driver, once its output is written: SEND → the host reads end of file; both → the
    /// connection ends (RST back, as the spec's clean disconnect).
    private func applyShutdown(_ slot: Int) {
        let f = conns[slot].driverShutdown
        guard f != 0 else { return }
        if f & VirtioVsock.shutdownSend != 0 { host.shutdownWrite(slot) }
        if f & (VirtioVsock.shutdownSend | VirtioVsock.shutdownRcv) == (VirtioVsock.shutdownSend | VirtioVsock.shutdownRcv) {
            resetConnection(slot, nil, count: false)
        }
    }

    /// Sends CREDIT_UPDATE when a quarter of the credit was forwarded since the driver last heard fwd_cnt.
    @inline(__always)
    private func creditCheck(_ slot: Int) {
        if conns[slot].fwdCnt &- conns[slot].lastFwdSent >= bufAlloc / 4 {
            conns[slot].pending |= VsockConn.Pending.credit
            markReady(slot)
            pumpRX()
        }
    }

    // MARK: host → driver

    /// Fills held receive buffers: RSTs first, then connections round robin (control packets, then data).
    private func pumpRX() {
        guard let qs = queues else { return }
        let q = VirtioVsock.rxQueue
        var filled = false, packets = 0
        while !rxHeld.isEmpty {
            if rstCount > 0 {
                let (src, dst) = rstQueue[rstFirst]
                rstFirst = (rstFirst + 1) % Self.rstCapacity
                rstCount -= 1
                sendPacket(VsockHeader(srcCID: VirtioVsock.hostCID, dstCID: guestCID, srcPort: src, dstPort: dst, op: .rst), payload: 0)
                stats.rstSent &+= 1
                filled = true
                continue
            }
            guard readyCount > 0 else { break }
            let slot = Int(ready[readyFirst])
            readyFirst = (readyFirst + 1) % maxConnections
            readyCount -= 1
            conns[slot].inReady = false
            guard conns[slot].state != .free else { continue }
            if serve(slot) { filled = true; markReady(slot) }
            packets += 1
            if packets >= SplitQueue.chainBudget {
                if readyCount > 0 || rstCount > 0 { faults.again(queue: q) }
                break
            }
        }
        if filled { qs[q].publish() }
    }

    /// Sends one packet for `slot` into the oldest held buffer; true if it sent one (more may follow).
    private func serve(_ slot: Int) -> Bool {
        var c = conns[slot]
        func control(_ op: VirtioVsock.Op, _ bit: UInt8, flags: UInt32 = 0) -> Bool {
            conns[slot].pending &= ~bit
            sendPacket(header(slot, op, flags: flags), payload: 0)
            return true
        }
        if c.pending & VsockConn.Pending.request != 0 { return control(.request, VsockConn.Pending.request) }
        if c.pending & VsockConn.Pending.response != 0 { return control(.response, VsockConn.Pending.response) }
        if c.state == .connected && c.hostReadable && !c.hostEOF && c.driverShutdown & VirtioVsock.shutdownRcv == 0 {
            let inFlight = c.txCnt &- c.peerFwdCnt
            let credit32 = c.peerBufAlloc >= inFlight ? Int(c.peerBufAlloc - inFlight) : 0
            if credit32 > 0, let (h, seg) = rxHeld.oldest {
                let room = min(Int(h.writableBytes) - VirtioVsock.headerSize, credit32, VirtioVsock.maxPacketPayload)
                if room > 0 {
                    var n = 0
                    _ = rxHeld.forEachWritable(h, seg, from: VirtioVsock.headerSize, limit: room) { p, k, _ in
                        guard n < Self.maxSegments else { return 0 }
                        iov[n] = iovec(iov_base: p, iov_len: k); n += 1; return k
                    }
                    switch host.read(slot, iov, n) {
                    case .bytes(let k):
                        conns[slot].txCnt &+= UInt32(k)
                        stats.bytesToDriver &+= UInt64(k)
                        conns[slot].pending &= ~VsockConn.Pending.credit
                        var hd = header(slot, .rw)
                        hd.len = UInt32(k)
                        sendPacket(hd, payload: k)
                        return true
                    case .wouldBlock:
                        conns[slot].hostReadable = false
                    case .closed:
                        conns[slot].hostReadable = false
                        conns[slot].hostEOF = true
                        // End of file: the host sends no more (SHUTDOWN with SEND only). It may still read (a
                        // half-close): the driver's data keeps flowing until a write fails (then RST).
                        // vhost-device-vsock sends both flags here, which makes Linux fail the guest's send() with
                        // EPIPE after a host half-close (measured with the guest case).
                        conns[slot].pending |= VsockConn.Pending.shutdown
                    }
                }
            } else if credit32 == 0 && c.pending & VsockConn.Pending.creditRequest == 0 && c.txCnt != 0 {
                // Out of credit with host data waiting: ask once (the driver answers CREDIT_UPDATE).
                conns[slot].pending |= VsockConn.Pending.creditRequest
                return control(.creditRequest, 0)
            }
        }
        c = conns[slot]
        if c.pending & VsockConn.Pending.shutdown != 0 {
            conns[slot].state = .closing
            return control(.shutdown, VsockConn.Pending.shutdown, flags: VirtioVsock.shutdownSend)
        }
        if c.pending & VsockConn.Pending.credit != 0 {
            stats.creditUpdatesSent &+= 1
            return control(.creditUpdate, VsockConn.Pending.credit)
        }
        return false
    }

    private func header(_ slot: Int, _ op: VirtioVsock.Op, flags: UInt32 = 0) -> VsockHeader {
        conns[slot].lastFwdSent = conns[slot].fwdCnt
        return VsockHeader(srcCID: VirtioVsock.hostCID, dstCID: guestCID, srcPort: conns[slot].localPort,
                           dstPort: conns[slot].peerPort, op: op, flags: flags, bufAlloc: bufAlloc, fwdCnt: conns[slot].fwdCnt)
    }

    /// Writes `h` into the oldest held receive buffer (whose payload, if any, is already in place) and completes it.
    private func sendPacket(_ h: VsockHeader, payload: Int) {
        guard let qs = queues, let (held, seg) = rxHeld.oldest else { return }
        h.store(to: scratch)
        let s = scratch
        _ = rxHeld.forEachWritable(held, seg, from: 0, limit: VirtioVsock.headerSize) { p, k, done in
            p.copyMemory(from: s + done, byteCount: k); return k
        }
        _ = rxHeld.removeOldest()
        qs[VirtioVsock.rxQueue].addUsed(head: held.head, written: UInt32(VirtioVsock.headerSize + payload))
    }

    private func flushEvents() {
        guard let qs = queues, queueCount > VirtioVsock.eventQueue, transportResetPending, let (h, seg) = eventHeld.oldest else { return }
        scratch.storeBytes(of: VirtioVsock.eventTransportReset.littleEndian, as: UInt32.self)
        let s = scratch
        let n = eventHeld.forEachWritable(h, seg, from: 0, limit: VirtioVsock.eventSize) { p, k, done in
            p.copyMemory(from: s + done, byteCount: k); return k
        }
        _ = eventHeld.removeOldest()
        qs[VirtioVsock.eventQueue].addUsed(head: h.head, written: UInt32(n))
        qs[VirtioVsock.eventQueue].publish()
        transportResetPending = false
        stats.transportResets &+= 1
    }

    // MARK: connections

    @inline(__always)
    private func hash(_ key: UInt64) -> Int { Int(truncatingIfNeeded: (key &* 0x9E37_79B9_7F4A_7C15) >> 32) & indexMask }

    private func lookup(_ local: UInt32, _ peer: UInt32) -> Int32 {
        let key = UInt64(local) << 32 | UInt64(peer)
        var i = hash(key)
        while indexSlots[i] >= 0 {
            if indexKeys[i] == key { return indexSlots[i] }
            i = (i + 1) & indexMask
        }
        return -1
    }

    private func insert(_ local: UInt32, _ peer: UInt32, _ slot: Int32) {
        let key = UInt64(local) << 32 | UInt64(peer)
        var i = hash(key)
        while indexSlots[i] >= 0 { i = (i + 1) & indexMask }
        indexKeys[i] = key
        indexSlots[i] = slot
    }

    /// Linear-probing delete with backward shift (no tombstones: lookups stay short however long it runs).
    private func remove(_ local: UInt32, _ peer: UInt32) {
        let key = UInt64(local) << 32 | UInt64(peer)
        var i = hash(key)
        while indexSlots[i] >= 0 && indexKeys[i] != key { i = (i + 1) & indexMask }
        guard indexSlots[i] >= 0 else { return }
        var j = i
        while true {
            indexSlots[i] = -1
            while true {
                j = (j + 1) & indexMask
                guard indexSlots[j] >= 0 else { return }
                let k = hash(indexKeys[j])
                // Move j back to i unless its home k lies cyclically in (i, j].
                if i <= j ? (i < k && k <= j) : (i < k || k <= j) { continue }
                break
            }
            indexKeys[i] = indexKeys[j]
            indexSlots[i] = indexSlots[j]
            i = j
        }
    }

    private func allocate(local: UInt32, peer: UInt32) -> Int? {
        guard freeCount > 0 else { return nil }
        freeCount -= 1
        let s = Int(freeSlots[freeCount])
        // A slot freed while on the ready list is still there: keep the mark (the entry serves the new connection),
        // so each slot is on the list at most once and the list never overflows.
        let onReadyList = conns[s].inReady
        conns[s] = VsockConn()
        conns[s].inReady = onReadyList
        conns[s].localPort = local
        conns[s].peerPort = peer
        insert(local, peer, Int32(s))
        connectionCount += 1
        stats.connectionsOpened &+= 1
        return s
    }

    private func openFromDriver(_ h: VsockHeader) {
        guard let s = allocate(local: h.dstPort, peer: h.srcPort) else {
            refuse(.tableFull); queueRST(h); return
        }
        guard host.connect(s, port: h.dstPort) else {
            stats.connectionsRefused &+= 1
            release(s)
            queueRST(h)
            return
        }
        conns[s].state = .connected
        conns[s].peerBufAlloc = h.bufAlloc
        conns[s].peerFwdCnt = h.fwdCnt
        conns[s].pending = VsockConn.Pending.response
        conns[s].hostReadable = true   // data may already be waiting
        markReady(s)
    }

    public func hostConnect(toDriverPort port: UInt32) -> Int? {
        guard queues != nil else { return nil }
        var local = nextLocalPort, tries = 0
        while lookup(local, port) >= 0 && tries < 65536 { local = local == UInt32.max ? 49152 : local + 1; tries += 1 }
        nextLocalPort = local == UInt32.max ? 49152 : local + 1
        guard let s = allocate(local: local, peer: port) else { refuseOnce(.tableFull); return nil }
        conns[s].state = .connecting
        conns[s].pending = VsockConn.Pending.request
        markReady(s)
        pumpRX()
        return s
    }

    /// Ends `slot`: RST to the driver, the host socket closed, parked chains completed.
    private func resetConnection(_ slot: Int, _ reason: VsockPacketError?, count: Bool) {
        if count, let reason { refuse(reason) }
        guard conns[slot].state != .free else { return }
        enqueueRST(src: conns[slot].localPort, dst: conns[slot].peerPort)
        dropParked(slot)
        closeConnection(slot)
        pumpRX()
    }

    private func closeConnection(_ slot: Int) {
        guard conns[slot].state != .free else { return }
        host.close(slot)
        release(slot)
    }

    private func release(_ slot: Int) {
        remove(conns[slot].localPort, conns[slot].peerPort)
        while conns[slot].parkHead >= 0 { popParked(slot) }
        conns[slot].state = .free
        conns[slot].pending = 0
        freeSlots[freeCount] = Int32(slot)
        freeCount += 1
        connectionCount -= 1
        // A slot still on the ready list is skipped there (state free).
    }

    private func closeAll() {
        for s in 0..<maxConnections where conns[s].state != .free {
            while conns[s].parkHead >= 0 { popParked(s) }
            closeConnection(s)
        }
    }

    private func markReady(_ slot: Int) {
        guard !conns[slot].inReady, readyCount < maxConnections else { return }
        conns[slot].inReady = true
        ready[(readyFirst + readyCount) % maxConnections] = Int32(slot)
        readyCount += 1
    }

    private func queueRST(_ h: VsockHeader) { enqueueRST(src: h.dstPort, dst: h.srcPort); pumpRX() }

    private func enqueueRST(src: UInt32, dst: UInt32) {
        guard rstCount < Self.rstCapacity else { stats.rstOverflow &+= 1; return }
        rstQueue[(rstFirst + rstCount) % Self.rstCapacity] = (src, dst)
        rstCount += 1
    }

    // MARK: host events

    public func hostReadable(_ conn: Int) {
        guard conn < maxConnections, conns[conn].state != .free else { return }
        conns[conn].hostReadable = true
        markReady(conn)
        pumpRX()
    }

    public func hostWritable(_ conn: Int) {
        guard conn < maxConnections, conns[conn].state != .free, conns[conn].parkHead >= 0 else { return }
        flushParked(conn)
    }

    // MARK: errors

    private func refuse(_ e: VsockPacketError) {
        stats.badPackets &+= 1
        stats.badByReason[e, default: 0] &+= 1
        refuseOnce(e)
    }
    private func refuseOnce(_ e: VsockPacketError) {
        let bit = UInt32(1) << UInt32(VsockPacketError.allCases.firstIndex(of: e) ?? 0)
        once(bit, "driver packet refused: \(e.rawValue)")
    }

    private func badChain(_ what: String) {
        stats.badChains &+= 1
        once(1 << 23, "driver error: \(what); completed empty")
    }

    private func once(_ bit: UInt32, _ m: @autoclosure () -> String) {
        guard logged & bit == 0 else { return }
        logged |= bit
        Log.warning("vsock: " + m())
    }
}
