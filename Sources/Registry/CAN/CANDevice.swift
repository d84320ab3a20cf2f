import Glibc
import Transport

/// Counters of what the device did and refused (loop thread).
public struct CANStats: Equatable, Sendable {
    public var txFrames: UInt64 = 0
    public var rxFrames: UInt64 = 0
    /// Transmit requests answered NOT_OK because they were malformed, per reason.
    public var txRefused: [CANTxError: UInt64] = [:]
    public var txBad: UInt64 = 0
    /// Transmit requests answered NOT_OK because the controller was stopped (or went bus-off / was stopped while
    /// the frame waited), or because the host refused the frame.
    public var txWhileStopped: UInt64 = 0
    public var txHostRejected: UInt64 = 0
    /// A frame had to wait for the socket (send buffer full) or for a retry (interface queue full).
    public var txWaits: UInt64 = 0
    public var txRetries: UInt64 = 0
    /// Frames from the host the driver could not take (a kind it did not negotiate): not delivered.
    public var rxUndeliverable: UInt64 = 0
    /// A frame read but not yet delivered when the controller stopped (a stopped controller receives nothing).
    public var rxDiscardedAtStop: UInt64 = 0
    /// Receive or control buffers completed empty: too small (receive: for the frame waiting) or without room.
    public var badChains: UInt64 = 0
    public var controlBad: UInt64 = 0
    public var busOffs: UInt64 = 0
    public var starts: UInt64 = 0
    public var stops: UInt64 = 0
}

/// virtio-can (virtio 1.3 "CAN Device"): a CAN controller on a host CAN interface (`CANEndpoint`: SocketCAN, or a
/// fake bus).
///
/// Controller: STOPPED until the driver sends SET_CTRL_MODE_START (answered NOT_OK while the host interface is
/// down); SET_CTRL_MODE_STOP cancels the frame waiting for the socket (NOT_OK) and stops receiving. A bus-off error
/// frame, or the interface going down, is a bus-off: the controller stops, config `status` gets
/// VIRTIO_CAN_S_CTRL_BUSOFF and the config interrupt fires; the next START clears it.
///
/// Transmit: each request is decoded and checked (`decodeCANTx`), written to the socket, and completed with OK once
/// the socket accepted it (VIRTIO_CAN_F_LATE_TX_ACK is not offered). When the socket would block, the request waits
/// (held, not completed, its frame kept) and no later request is taken until it went out: frames keep their order
/// and none is dropped; the device resumes on the socket's writable edge (or, for SocketCAN's ENOBUFS, a full
/// interface queue that gives no edge, after a 1 ms timer).
///
/// Receive: the driver's buffers are held; frames are read from the socket only while a buffer is there, so when
/// the driver gives none the socket's own queue holds them (back-pressure, nothing read and dropped). A buffer too
/// small for the frame waiting is completed empty and the frame goes into the next one.
///
/// No allocation per frame: the frames in transit live in two preallocated 72-byte buffers.
public final class CANDevice: VirtioDevice, CANEndpointDelegate {
    public let deviceID = VirtioCAN.deviceID
    public let queueMaxSizes: [UInt16]
    public let offeredFeatures: VirtioFeatures
    public let configSize = VirtioCAN.configSize
    public let endpoint: CANEndpoint

    private var queues: UnsafeMutablePointer<SplitQueue>?
    private var queueCount = 0
    private var faults: FaultReporter = .none
    private var configInterrupt: Notifier = .none
    private var loop: EventLoop?
    private var endpointStarted = false
    private var retryTimer: LoopTimer?
    private var features: VirtioFeatures = []

    public private(set) var started = false
    public private(set) var status: UInt16 = 0
    /// What the driver last asked of the controller in this process (START accepted → true; STOP or a bus-off the
    /// driver was told of → false), and whether it asked anything yet: a vhost-user ring restart (the front-end's
    /// replay after a back-end restart, a VM pause) reactivates the device without the driver resetting, so its
    /// START is not sent again (see `activate`).
    private var driverWantsStarted = false
    private var controlSeen = false
    /// The transmit request waiting for the socket: its head, where its result goes, its frame.
    private var txWaiting = false
    private var txHead: UInt16 = 0
    private var txResult: UnsafeMutableRawPointer?
    private var txSize = 0
    private let txFrame: UnsafeMutableRawPointer
    /// A frame read from the socket, not yet in a driver buffer.
    private var rxPending = false
    private var rxSize = 0
    private let rxFrame: UnsafeMutableRawPointer
    /// The socket may have frames (an edge seen and no `.empty` since).
    private var hostReadable = false
    private var rxHeld: HeldChains
    private let header: UnsafeMutableRawPointer
    public private(set) var stats = CANStats()
    private var logged: UInt32 = 0

    /// `offerFD`: false keeps VIRTIO_CAN_F_CAN_FD off even when the endpoint takes FD frames.
    public init(endpoint: CANEndpoint, queueSize: UInt16 = 256, offerFD: Bool = true) {
        self.endpoint = endpoint
        queueMaxSizes = [queueSize, queueSize, queueSize]
        var f: VirtioFeatures = [.version1, .eventIdx, .indirectDesc, VirtioCAN.fClassic, VirtioCAN.fRTR]
        if endpoint.fdCapable && offerFD { f.insert(VirtioCAN.fFD) }
        offeredFeatures = f
        txFrame = .allocate(byteCount: LinuxCAN.fdMTU, alignment: 8)
        rxFrame = .allocate(byteCount: LinuxCAN.fdMTU, alignment: 8)
        header = .allocate(byteCount: VirtioCAN.headerSize, alignment: 8)
        rxHeld = HeldChains(capacity: Int(queueSize), maxSegments: 4)
    }
    deinit {
        retryTimer?.cancel()
        endpoint.stop()
        txFrame.deallocate(); rxFrame.deallocate(); header.deallocate()
    }

    // MARK: VirtioDevice

    public func ackFeatures(_ f: VirtioFeatures) { features = f }

    public func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        withUnsafeBytes(of: status.littleEndian) { s in
            for i in 0..<buffer.count where offset + i < s.count { buffer[i] = s[offset + i] }
        }
    }
    public func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) {}   // status is read-only

    public func activate(_ c: DeviceContext) throws(DeviceError) {
        guard c.queueCount >= 3 else {
            once(1 << 20, "the driver set up \(c.queueCount) queue(s), needs tx, rx and control: idle until reset")
            return
        }
        if !endpointStarted {
            try endpoint.start(loop: c.loop, delegate: self)
            endpointStarted = true
        }
        if retryTimer == nil {
            do {
                retryTimer = try LoopTimer(loop: c.loop) { [unowned self] _ in self.retryTX() }
            } catch { throw DeviceError("can: timer: \(error)") }
        }
        queues = c.queues
        queueCount = c.queueCount
        faults = c.faults
        configInterrupt = c.configInterrupt
        loop = c.loop
        features = c.features
        endpoint.configure(fd: features.contains(VirtioCAN.fFD), rtr: features.contains(VirtioCAN.fRTR))
        stopController()   // initially STOPPED
        status = 0
        // A control ring that does not start at 0 belongs to a driver that did not reset: it already sent START or
        // STOP (a fresh driver's rings start at index 0; vhost-user carries the position in SET_VRING_BASE).
        guard c.queues[VirtioCAN.controlQueue].lastAvail != 0 else { driverWantsStarted = false; controlSeen = false; return }
        if controlSeen && driverWantsStarted && endpoint.isUp {
            // The same process, rings restarted (VM pause, front-end reconnect): the controller runs on as before.
            started = true
            endpoint.setReceiving(true)
            hostReadable = true
        } else if !controlSeen || driverWantsStarted {
            // A new process serving a driver whose controller state it never saw (or an interface that went down
            // meanwhile): announce bus-off, which virtio_can turns into CAN_STATE_BUS_OFF; the CAN core's restart
            // (restart-ms, or `ip link set ... type can restart`) then sends START. A driver that had stopped the
            // controller ignores it (its state is STOPPED, above BUS_OFF). Without this the driver would think the
            // controller started and see every frame answered NOT_OK.
            stats.busOffs &+= 1
            driverWantsStarted = false
            status |= VirtioCAN.statusBusOff
            Log.info("can: \(endpoint.description): rings resumed with the controller state unknown or lost: bus-off announced so the driver restarts it")
            configInterrupt.signal()
        }
    }

    public func reset() {
        // The driver reset its rings: nothing is completed.
        txWaiting = false
        retryTimer?.disarm()
        rxHeld.removeAll()
        if started { endpoint.setReceiving(false) }
        started = false
        rxPending = false
        hostReadable = false
        status = 0
        queues = nil
        queueCount = 0
        configInterrupt = .none
    }

    /// A vhost-user front-end stopping the rings: the waiting frame gets one last try, else NOT_OK; receive
    /// buffers go back empty.
    public func quiesce() {
        guard let qs = queues else { return }
        if txWaiting { _ = flushWaiting(); if txWaiting { finishWaiting(VirtioCAN.resultNotOK) } }
        qs[VirtioCAN.txQueue].publish()
        while let h = rxHeld.removeOldest() { qs[VirtioCAN.rxQueue].addUsed(head: h.head, written: 0) }
        qs[VirtioCAN.rxQueue].publish()
    }

    public var supportsQueueRestart: Bool { true }

    public func stopQueue(_ q: Int) {
        guard let qs = queues else { return }
        switch q {
        case VirtioCAN.txQueue:
            if txWaiting { _ = flushWaiting(); if txWaiting { finishWaiting(VirtioCAN.resultNotOK) } }
        case VirtioCAN.rxQueue:
            while let h = rxHeld.removeOldest() { qs[q].addUsed(head: h.head, written: 0) }
        default: return
        }
        qs[q].publish()
    }

    public func startQueue(_ q: Int) {
        if q == VirtioCAN.rxQueue { pumpRX() }
        if q == VirtioCAN.txQueue { pumpTX() }
    }

    public func queueNotified(_ index: Int) {
        guard let qs = queues, index < queueCount else { return }
        switch index {
        case VirtioCAN.txQueue:
            pumpTX()
        case VirtioCAN.rxQueue:
            if !started && endpoint.discardQueued() { faults.again(queue: index) }
            qs[index].drain { c in
                if c.writableBytes >= UInt32(VirtioCAN.headerSize) && rxHeld.hold(c) { return nil }
                stats.badChains &+= 1
                once(1 << 16, "receive buffer shorter than the 16-byte header, or in more than 4 pieces: completed empty")
                return 0
            }
            pumpRX()
        case VirtioCAN.controlQueue:
            qs[index].drain { c in control(c) }
        default:
            qs[index].drain { _ in 0 }
        }
    }

    // MARK: control

    private func control(_ c: borrowing Chain) -> UInt32 {
        guard c.writableBytes >= 1 else {
            stats.controlBad &+= 1
            once(1 << 17, "control request without room for the result: completed empty")
            return 0
        }
        var result = VirtioCAN.resultNotOK
        if c.readableBytes >= 2, c.read(into: header, length: 2) == 2 {
            controlSeen = true
            switch UInt16(littleEndian: header.loadUnaligned(as: UInt16.self)) {
            case VirtioCAN.ctrlStart:
                if endpoint.isUp {
                    let had = status
                    status &= ~VirtioCAN.statusBusOff
                    if !started {
                        started = true
                        stats.starts &+= 1
                        endpoint.setReceiving(true)
                        hostReadable = true
                    }
                    result = VirtioCAN.resultOK
                    driverWantsStarted = true
                    // The spec lets the device omit this notification; the kernel module keeps a copy of the config.
                    if had != status { configInterrupt.signal() }
                } else {
                    Log.info("can: controller start refused: \(endpoint.description) is down")
                }
            case VirtioCAN.ctrlStop:
                if started { stats.stops &+= 1 }
                driverWantsStarted = false
                stopController()
                result = VirtioCAN.resultOK
            default:
                stats.controlBad &+= 1
                once(1 << 19, "unknown control message: NOT_OK")
            }
        } else {
            stats.controlBad &+= 1
        }
        var r = result
        _ = c.write(from: &r, length: 1)
        if result == VirtioCAN.resultOK && started { pumpRX() }
        return 1
    }

    /// STOPPED: the frame waiting for the socket is cancelled (NOT_OK), nothing more is received.
    private func stopController() {
        if txWaiting {
            stats.txWhileStopped &+= 1
            finishWaiting(VirtioCAN.resultNotOK)
            queues?[VirtioCAN.txQueue].publish()
        }
        retryTimer?.disarm()
        if rxPending { rxPending = false; stats.rxDiscardedAtStop &+= 1 }
        started = false
        endpoint.setReceiving(false)
        hostReadable = false
        // Requests that waited behind the cancelled frame are answered (NOT_OK: stopped) on the next loop turn: this
        // may run inside the transmit loop itself (a send that found the interface down). The loop that left the
        // frame waiting left kicks disabled: with none left, they are re-armed (SplitQueue.budgetSpent).
        if let qs = queues, qs[VirtioCAN.txQueue].budgetSpent() { faults.again(queue: VirtioCAN.txQueue) }
    }

    /// Bus-off (an error frame, the interface down): the controller stops and the driver hears it.
    private func busOff() {
        guard started else { return }
        stats.busOffs &+= 1
        Log.info("can: \(endpoint.description): bus-off (or the interface went down): controller stopped, driver notified")
        stopController()
        driverWantsStarted = false
        status |= VirtioCAN.statusBusOff
        configInterrupt.signal()
    }

    // MARK: transmit

    private func pumpTX() {
        guard let qs = queues else { return }
        let q = VirtioCAN.txQueue
        if txWaiting && !flushWaiting() { return }
        var chains = 0
        outer: while true {
            qs[q].disableNotifications()
            while let c = qs[q].pop() {
                if let w = transmit(c) { qs[q].addUsed(head: c.head, written: w) } else { break outer }
                chains += 1
                if chains >= SplitQueue.chainBudget {
                    // Chains left: another turn. None left: kicks back on (and re-checked), or with EVENT_IDX the
                    // stale avail_event would stop the driver's kicks for good.
                    if qs[q].budgetSpent() { faults.again(queue: q) }
                    break outer
                }
            }
            if qs[q].polling || !qs[q].enableNotifications() { break }
        }
        qs[q].publish()
        if qs[q].faultPending { faults.report(queue: q) }
    }

    /// One transmit request: the bytes written into it (1: the result; 0: no room for one), or nil when it waits
    /// for the socket (completed later, in order).
    private func transmit(_ c: borrowing Chain) -> UInt32? {
        guard c.writableBytes >= 1, c.count > c.readableCount else {
            refuse(.noResult)
            return 0
        }
        let result = c.segments[c.readableCount].base
        let n = c.read(into: header, length: VirtioCAN.headerSize)
        let frame: CANTxFrame
        switch decodeCANTx(header, readable: n < VirtioCAN.headerSize ? n : Int(c.readableBytes), features: features) {
        case .failure(let e):
            refuse(e)
            result.storeBytes(of: VirtioCAN.resultNotOK, as: UInt8.self)
            return 1
        case .success(let f): frame = f
        }
        guard started else {
            stats.txWhileStopped &+= 1
            result.storeBytes(of: VirtioCAN.resultNotOK, as: UInt8.self)
            return 1
        }
        let size = storeLinuxFrame(frame, txFrame)
        // Payload after the header (none for RTR); an FD frame's unused tail is zero.
        if frame.rtr || frame.length == 0 {
            (txFrame + 8).initializeMemory(as: UInt8.self, repeating: 0, count: size - 8)
        } else {
            _ = c.read(into: txFrame + 8, length: frame.length, at: VirtioCAN.headerSize)
            if size - 8 > frame.length { (txFrame + 8 + frame.length).initializeMemory(as: UInt8.self, repeating: 0, count: size - 8 - frame.length) }
        }
        txHead = c.head
        txResult = result
        txSize = size
        txWaiting = true
        if flushWaiting(publish: false) { return 1 }
        return nil
    }

    /// Sends the waiting frame; true once it is gone (sent or refused: its request completed, unless it is the one
    /// `transmit` is handling, `publish == false`, whose caller completes it).
    @discardableResult
    private func flushWaiting(publish: Bool = true) -> Bool {
        guard txWaiting else { return true }
        switch endpoint.send(txFrame, size: txSize) {
        case .sent:
            stats.txFrames &+= 1
            finish(VirtioCAN.resultOK, publish: publish)
            return true
        case .wouldBlock:
            stats.txWaits &+= 1
            return false
        case .retryLater:
            stats.txRetries &+= 1
            retryTimer?.arm(afterNs: 1_000_000)
            return false
        case .rejected:
            stats.txHostRejected &+= 1
            once(1 << 22, "\(endpoint.description) refused a frame: NOT_OK")
            finish(VirtioCAN.resultNotOK, publish: publish)
            return true
        case .down:
            stats.txHostRejected &+= 1
            finish(VirtioCAN.resultNotOK, publish: publish)
            busOff()
            return true
        }
    }

    private func finish(_ result: UInt8, publish: Bool) {
        if publish { finishWaiting(result); queues?[VirtioCAN.txQueue].publish() } else {
            txResult?.storeBytes(of: result, as: UInt8.self)
            txWaiting = false
        }
    }

    /// Completes the waiting request with `result` (not published).
    private func finishWaiting(_ result: UInt8) {
        guard txWaiting else { return }
        txWaiting = false
        txResult?.storeBytes(of: result, as: UInt8.self)
        queues?[VirtioCAN.txQueue].addUsed(head: txHead, written: 1)
    }

    private func retryTX() {
        guard txWaiting else { return }
        pumpTX()
    }

    // MARK: receive

    /// Moves frames from the socket into held receive buffers while both are there (at most a budget per turn).
    private func pumpRX() {
        guard let qs = queues, started else { return }
        let q = VirtioCAN.rxQueue
        var filled = 0
        while !rxHeld.isEmpty {
            if !rxPending {
                guard hostReadable else { break }
                switch endpoint.receive(into: rxFrame) {
                case .frame(let size):
                    rxPending = true
                    rxSize = size
                case .empty:
                    hostReadable = false
                case .busOff:
                    if filled > 0 { qs[q].publish() }
                    busOff()
                    return
                }
                guard rxPending else { break }
            }
            guard let (id, flags, length) = decodeLinuxFrame(rxFrame, size: rxSize, features: features) else {
                rxPending = false
                stats.rxUndeliverable &+= 1
                continue
            }
            guard let (h, seg) = rxHeld.oldest else { break }
            let need = VirtioCAN.headerSize + length
            _ = rxHeld.removeOldest()
            guard Int(h.writableBytes) >= need else {
                // Too small for this frame: given back empty; the frame goes into the next buffer.
                stats.badChains &+= 1
                once(1 << 23, "receive buffer of \(h.writableBytes) bytes too small for a \(length)-byte frame: completed empty")
                qs[q].addUsed(head: h.head, written: 0)
                filled += 1
                continue
            }
            storeRxHeader(header, id: id, flags: flags, length: length)
            let hp = header
            _ = rxHeld.forEachWritable(h, seg, from: 0, limit: VirtioCAN.headerSize) { p, k, done in
                p.copyMemory(from: hp + done, byteCount: k); return k
            }
            if length > 0 {
                let rtr = flags & VirtioCAN.flagRTR != 0
                let src = rxFrame + 8
                _ = rxHeld.forEachWritable(h, seg, from: VirtioCAN.headerSize, limit: length) { p, k, done in
                    if rtr { p.initializeMemory(as: UInt8.self, repeating: 0, count: k) } else { p.copyMemory(from: src + done, byteCount: k) }
                    return k
                }
            }
            qs[q].addUsed(head: h.head, written: UInt32(need))
            rxPending = false
            stats.rxFrames &+= 1
            filled += 1
            if filled >= SplitQueue.chainBudget {
                if !rxHeld.isEmpty && (hostReadable || rxPending) { faults.again(queue: q) }
                break
            }
        }
        if filled > 0 { qs[q].publish() }
    }

    // MARK: endpoint events

    public func endpointReadable() {
        guard started else {
            // A stopped controller takes nothing from the bus: drop it (bounded per turn).
            if queues != nil && endpoint.discardQueued() { faults.again(queue: VirtioCAN.rxQueue) }
            return
        }
        hostReadable = true
        pumpRX()
    }

    public func endpointWritable() {
        guard txWaiting else { return }
        pumpTX()
    }

    // MARK: errors

    private func refuse(_ e: CANTxError) {
        stats.txBad &+= 1
        stats.txRefused[e, default: 0] &+= 1
        once(UInt32(1) << UInt32(CANTxError.allCases.firstIndex(of: e) ?? 0), "transmit request refused: \(e.rawValue)")
    }

    private func once(_ bit: UInt32, _ m: @autoclosure () -> String) {
        guard logged & bit == 0 else { return }
        logged |= bit
        Log.warning("can: " + m())
    }
}
