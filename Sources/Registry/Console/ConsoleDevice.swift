import Glibc
import Transport

/// What counts as a console port: its id, its name (PORT_NAME; the driver's /dev/virtio-ports/NAME), whether it
/// is a console (CONSOLE_PORT; the driver's /dev/hvcN) and its host endpoint.
public struct ConsolePortConfig {
    public var id: Int
    public var name: String
    public var isConsole: Bool
    public var endpoint: ConsoleEndpoint
    public init(id: Int, name: String = "", isConsole: Bool, endpoint: ConsoleEndpoint) {
        self.id = id; self.name = name; self.isConsole = isConsole; self.endpoint = endpoint
    }
}

/// Counters of what the device refused or dropped (loop thread).
public struct ConsoleStats: Equatable, Sendable {
    /// Driver control messages dropped as malformed (`ConsoleControlError`), and per reason.
    public var badControl: UInt64 = 0
    public var badControlByReason: [ConsoleControlError: UInt64] = [:]
    /// Chains completed empty: control receive buffers shorter than 8 bytes, chains on queues of ports the device
    /// did not add, chains with more segments than the device holds.
    public var badChains: UInt64 = 0
    /// Device → driver control messages dropped because the driver gave no buffers for too long.
    public var controlOverflow: UInt64 = 0
    /// Console output dropped while no host client was connected (named ports hold theirs instead).
    public var droppedBytes: UInt64 = 0
    /// Bytes moved host → driver and driver → host.
    public var bytesToDriver: UInt64 = 0
    public var bytesFromDriver: UInt64 = 0
    public var emergencyWrites: UInt64 = 0
}

final class ConsolePort {
    let id: Int
    let name: [UInt8]
    let isConsole: Bool
    let endpoint: ConsoleEndpoint
    /// Receive buffers the driver gave (waiting for host data) and transmit chains parked on a blocked endpoint.
    var rx: HeldChains
    var tx: HeldChains
    let iov: UnsafeMutablePointer<iovec>
    /// The driver set the port up (PORT_READY 1) / a process in the driver's OS has it open (PORT_OPEN 1).
    var guestReady = false
    var guestOpen = false
    var connected: Bool
    /// Output is parked on the endpoint (wait for writable) or on a missing client (wait for a connection).
    var stalled = false
    /// Host input was left unread because output of this hvc port is outstanding (`ConsoleDevice.holdsInput`):
    /// read it when the output completes.
    var rxDeferred = false
    var size: (cols: UInt16, rows: UInt16) = (0, 0)
    init(_ c: ConsolePortConfig, queueSize: Int) {
        id = c.id
        name = Array(c.name.utf8)
        isConsole = c.isConsole
        endpoint = c.endpoint
        rx = HeldChains(capacity: queueSize, maxSegments: ConsoleDevice.maxSegments)
        tx = HeldChains(capacity: queueSize, maxSegments: ConsoleDevice.maxSegments)
        iov = .allocate(capacity: ConsoleDevice.maxSegments)
        connected = c.endpoint.isConnected
    }
    deinit { iov.deallocate() }
}

/// virtio-console (virtio 1.2 §5.3): ports whose host side is a `ConsoleEndpoint` (pty, unix socket, stdio, file,
/// or a fake). F_SIZE (terminal size from a pty/tty endpoint), F_MULTIPORT (control queues, named ports, a console
/// port), F_EMERG_WRITE.
///
/// Data path: receive buffers are held (`HeldChains`) until the endpoint has data, which is read straight into
/// them (readv); each read completes one buffer with what it got. Transmit chains are written straight from the
/// driver's buffers (writev); when the endpoint would block, the chain is parked with its progress, the port takes
/// no more chains (kicks stay disabled) and resumes when the endpoint reports writable: a slow reader stalls its
/// port, never the loop, and no byte is lost or reordered. When a host client goes away, a named port's output is
/// held for the next client (the driver is told PORT_OPEN 0, and Linux then blocks writers); a console port's
/// output is dropped and counted (Linux's hvc writes wait for the buffer with interrupts off: holding it would
/// hang the guest's console writers; QEMU's virtio-serial discards in the same case).
///
/// Every driver-controlled value is checked: control messages (size, event, value, port id: dropped with a
/// counted, once-logged warning), chains on queues of ports not added, chains longer than the device holds.
public final class ConsoleDevice: VirtioDevice, ConsoleEndpointDelegate {
    public let deviceID = VirtioID.console
    /// hvc writers spin under the hvc lock that our receive interrupt takes: interrupts via the module's irqfd.
    public var interruptsMayWaitForDevice: Bool { true }
    public let queueMaxSizes: [UInt16]
    public let offeredFeatures: VirtioFeatures
    public let configSize = VirtioConsole.configSize
    /// max_nr_ports: the highest configured port id + 1.
    public let maxPorts: Int
    let ports: [ConsolePort?]
    public static let maxSegments = 64
    public static let maxNameBytes = 127

    private var queues: UnsafeMutablePointer<SplitQueue>?
    private var queueCount = 0
    private var faults: FaultReporter = .none
    private var configInterrupt: Notifier = .none
    private var started = false
    public private(set) var multiport = false
    private var features: VirtioFeatures = []
    /// Driver buffers on the control receiveq, and device → driver messages waiting for one.
    private var controlIn: HeldChains
    private struct Pending { var id: UInt32; var event: UInt16; var value: UInt16 }
    private let pending: UnsafeMutablePointer<Pending>
    private let pendingCapacity: Int
    private var pendingFirst = 0, pendingCount = 0
    private let scratch: UnsafeMutableRawPointer
    private var sizeTimer: LoopTimer?
    public private(set) var stats = ConsoleStats()
    private var logged: UInt32 = 0

    public init(ports configs: [ConsolePortConfig], queueSize: UInt16 = 256) {
        precondition(!configs.isEmpty && configs.count <= VirtioConsole.maxPorts)
        let n = (configs.map(\.id).max() ?? 0) + 1
        maxPorts = n
        var table = [ConsolePort?](repeating: nil, count: n)
        for c in configs { table[c.id] = ConsolePort(c, queueSize: Int(queueSize)) }
        ports = table
        queueMaxSizes = Array(repeating: queueSize, count: VirtioConsole.queueCount(ports: n))
        offeredFeatures = [.version1, .eventIdx, .indirectDesc, VirtioConsole.fSize, VirtioConsole.fMultiport, VirtioConsole.fEmergWrite]
        controlIn = HeldChains(capacity: Int(queueSize), maxSegments: 8)
        pendingCapacity = 8 * n + 16
        pending = .allocate(capacity: pendingCapacity)
        scratch = .allocate(byteCount: VirtioConsole.controlSize + ConsoleDevice.maxNameBytes + 1, alignment: 8)
    }
    deinit {
        for p in ports { p?.endpoint.stop() }
        sizeTimer?.cancel()
        pending.deallocate()
        scratch.deallocate()
    }

    /// The endpoint of port `id` (tests, the workload).
    public func endpoint(_ id: Int) -> ConsoleEndpoint? { id < ports.count ? ports[id]?.endpoint : nil }
    /// Host-side connection and driver-side state of port `id` (tests).
    public func portState(_ id: Int) -> (connected: Bool, guestReady: Bool, guestOpen: Bool, stalled: Bool, heldRx: Int, heldTx: Int)? {
        guard id < ports.count, let p = ports[id] else { return nil }
        return (p.connected, p.guestReady, p.guestOpen, p.stalled, p.rx.count, p.tx.count)
    }

    public func ackFeatures(_ f: VirtioFeatures) { features = f }

    public func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        let p0: (cols: UInt16, rows: UInt16) = ports[0]?.size ?? (0, 0)
        withUnsafeTemporaryAllocation(byteCount: VirtioConsole.configSize, alignment: 4) { c in
            c.storeBytes(of: p0.cols.littleEndian, toByteOffset: 0, as: UInt16.self)
            c.storeBytes(of: p0.rows.littleEndian, toByteOffset: 2, as: UInt16.self)
            c.storeBytes(of: UInt32(maxPorts).littleEndian, toByteOffset: 4, as: UInt32.self)
            c.storeBytes(of: UInt32(0), toByteOffset: 8, as: UInt32.self)
            for i in 0..<buffer.count { buffer[i] = c[offset + i] }
        }
    }

    /// Only emerg_wr is writable: its low byte goes to port 0's endpoint, best effort (virtio 1.2 §5.3.4).
    public func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) {
        let at = VirtioConsole.emergWriteOffset - offset
        guard features.contains(VirtioConsole.fEmergWrite), at >= 0, at < buffer.count, let p = ports[0] else {
            once(1 << 20, "driver wrote read-only config bytes \(offset)..<\(offset + buffer.count); ignored")
            return
        }
        var c = buffer[at]
        stats.emergencyWrites &+= 1
        withUnsafeMutableBytes(of: &c) { b in
            p.iov[0] = iovec(iov_base: b.baseAddress, iov_len: 1)
            _ = p.endpoint.write(p.iov, 1)
        }
    }

    public func activate(_ context: DeviceContext) throws(DeviceError) {
        queues = context.queues
        queueCount = context.queueCount
        faults = context.faults
        configInterrupt = context.configInterrupt
        multiport = features.contains(VirtioConsole.fMultiport) && queueCount >= 4
        if !started {
            for p in ports { if let p { try p.endpoint.start(loop: context.loop, port: p.id, delegate: self) } }
            started = true
            if ports.contains(where: { $0?.endpoint.windowSize != nil }) {
                do {
                    let t = try LoopTimer(loop: context.loop) { [unowned self] _ in self.refreshSizes() }
                    t.arm(everyNs: 1_000_000_000)
                    sizeTimer = t
                } catch { Log.warning("console: no terminal size updates: \(error)") }
            }
        }
        for p in ports { if let p { p.connected = p.endpoint.isConnected; if let s = p.endpoint.windowSize { p.size = s } } }
        if !multiport {
            // One port, the console: no control messages, nothing to wait for.
            guard let p = ports[0] else {
                Log.warning("console: the driver did not accept MULTIPORT and port 0 is not configured: no port works")
                return
            }
            p.guestReady = true
            p.guestOpen = true
        }
    }

    public func reset() {
        queues = nil
        queueCount = 0
        multiport = false
        controlIn.removeAll()
        pendingCount = 0
        for p in ports {
            guard let p else { continue }
            p.rx.removeAll(); p.tx.removeAll()
            p.guestReady = false; p.guestOpen = false; p.stalled = false
        }
    }

    /// A vhost-user back-end stopping its rings: every held chain goes back now (receive and control buffers
    /// empty; parked output after one last write attempt, the rest counted as dropped).
    public func quiesce() {
        guard let qs = queues else { return }
        for p in ports {
            guard let p else { continue }
            let rq = VirtioConsole.rxQueue(p.id), tq = VirtioConsole.txQueue(p.id)
            if rq < queueCount { while let h = p.rx.removeOldest() { qs[rq].addUsed(head: h.head, written: 0) }; qs[rq].publish() }
            if tq < queueCount {
                if let (h, seg) = p.tx.oldest {
                    let (k, _) = transmit(p, seg, h.readableCount, total: Int(h.readableBytes), skip: Int(p.tx.progress))
                    stats.droppedBytes &+= UInt64(Int(h.readableBytes) - Int(p.tx.progress) - k)
                }
                while let h = p.tx.removeOldest() { qs[tq].addUsed(head: h.head, written: 0) }
                qs[tq].publish()
            }
            p.stalled = false
        }
        if multiport { while let h = controlIn.removeOldest() { qs[2].addUsed(head: h.head, written: 0) }; qs[2].publish() }
    }

    // MARK: queues

    public func queueNotified(_ index: Int) {
        guard let qs = queues, index < queueCount else { return }
        if multiport && index == VirtioConsole.controlRx {
            qs[index].drain { c in
                guard c.writableBytes >= UInt32(VirtioConsole.controlSize) else { badChain("control receive buffer shorter than 8 bytes"); return 0 }
                if controlIn.hold(c) { return nil }
                badChain("control receive buffer with too many segments"); return 0
            }
            flushControl()
            return
        }
        if multiport && index == VirtioConsole.controlTx {
            qs[index].drain { c in
                let n = min(Int(c.readableBytes), VirtioConsole.controlSize)
                let got = c.read(into: scratch, length: n)
                controlMessage(UnsafeRawBufferPointer(start: scratch, count: got))
                return 0
            }
            return
        }
        guard let (id, tx) = VirtioConsole.port(ofQueue: index), id < ports.count, let p = ports[id],
              multiport || id == 0 else {
            qs[index].drain { _ in badChain("chain on a queue of a port the device did not add"); return 0 }
            return
        }
        if tx { pumpTX(p); return }
        qs[index].drain { c in
            if c.writableBytes > 0 && p.rx.hold(c) { return nil }
            badChain(c.writableBytes == 0 ? "receive chain with no writable buffer" : "receive chain with too many segments")
            return 0
        }
        pumpRX(p)
    }

    /// host → driver: fill held receive buffers while the endpoint has data.
    private func pumpRX(_ p: ConsolePort) {
        guard let qs = queues, p.connected, p.guestOpen else { return }
        if holdsInput(p) { return }
        let q = VirtioConsole.rxQueue(p.id)
        var filled = false
        while let (h, seg) = p.rx.oldest {
            let n = fillIOV(p.iov, seg, h.readableCount, h.count, skip: 0)
            let r = p.endpoint.read(p.iov, n)
            guard case .bytes(let k) = r else {
                if r == .closed { hostGone(p) }
                break
            }
            qs[q].addUsed(head: h.head, written: UInt32(k))
            _ = p.rx.removeOldest()
            stats.bytesToDriver &+= UInt64(k)
            filled = true
        }
        if filled { qs[q].publish() }
    }

    /// Output of `p` drops (console port without a client) rather than waits (named port).
    @inline(__always) private func drops(_ p: ConsolePort) -> Bool { p.isConsole || !multiport }

    /// An hvc port (a console port, or port 0 without MULTIPORT) takes no host input while one of its transmit
    /// chains is outstanding. Linux's hvc_write holds the hvc lock, interrupts off, while virtio_console's
    /// put_chars spins until we complete the chain; the receive interrupt we would raise runs virtio_console's
    /// in_intr → hvc_poll, which takes that same lock, and over virtio-loopback it runs synchronously in this
    /// thread (the KICK ioctl): publishing input while the writer waits for us hangs both (the guest's writer
    /// spins on us, we spin on its lock). So chains the driver made available go out first, and while one is
    /// parked on a full endpoint the input stays unread (at the endpoint: no byte lost) until it completes.
    /// This only narrows the window (a writer can start right after the check: a soft lockup in one guest run of
    /// six); the kernel link therefore raises this device's interrupts from a kernel worker
    /// (`interruptsMayWaitForDevice`), where waiting on the lock does not stop us completing the writer's chain.
    private func holdsInput(_ p: ConsolePort) -> Bool {
        guard drops(p), let qs = queues else { return false }
        let tq = VirtioConsole.txQueue(p.id)
        if p.tx.count == 0 && tq < queueCount && qs[tq].hasAvailable { pumpTXChains(p) }
        if p.tx.count > 0 { p.rxDeferred = true; return true }
        p.rxDeferred = false
        return false
    }

    /// driver → host: the parked chain first, then new chains until the endpoint blocks or the budget is spent.
    private func pumpTX(_ p: ConsolePort) {
        pumpTXChains(p)
        if p.rxDeferred && p.tx.count == 0 && !p.stalled {
            p.rxDeferred = false
            pumpRX(p)
        }
    }

    private func pumpTXChains(_ p: ConsolePort) {
        guard let qs = queues else { return }
        let q = VirtioConsole.txQueue(p.id)
        guard q < queueCount else { return }
        var completed = false
        if let (h, seg) = p.tx.oldest {
            if !p.connected && !drops(p) { return }
            let left = Int(h.readableBytes) - Int(p.tx.progress)
            let (k, r) = p.connected ? transmit(p, seg, h.readableCount, total: Int(h.readableBytes), skip: Int(p.tx.progress)) : (0, .closed)
            p.tx.progress &+= UInt32(k)
            if r == .wouldBlock { p.stalled = true; return }
            if r == .closed {
                hostGone(p)
                guard drops(p) else { p.stalled = true; return }
                stats.droppedBytes &+= UInt64(left - k)
            }
            qs[q].addUsed(head: h.head, written: 0)
            _ = p.tx.removeOldest()
            completed = true
        }
        p.stalled = false
        var chains = 0, bytes = 0
        outer: while true {
            qs[q].disableNotifications()
            while let c = qs[q].pop() {
                chains += 1
                let total = Int(c.readableBytes)
                let (k, r) = p.connected ? transmit(p, c.segments, c.readableCount, total: total, skip: 0) : (0, .closed)
                bytes += k
                if r == .closed { hostGone(p) }
                if r == .closed && drops(p) {
                    stats.droppedBytes &+= UInt64(total - k)
                    once(1 << 21, "port \(p.id): output dropped while no host client is connected")
                } else if r != .bytes(total) && total > 0 {
                    // Park it where it stopped; take no more chains (kicks stay disabled) until writable/connected.
                    if p.tx.hold(c) {
                        p.tx.progress = UInt32(k)
                        p.stalled = true
                        if completed { qs[q].publish() }
                        return
                    }
                    badChain("transmit chain with too many segments (rest dropped)")
                    stats.droppedBytes &+= UInt64(total - k)
                }
                qs[q].addUsed(head: c.head, written: 0)
                completed = true
                if chains >= SplitQueue.chainBudget || bytes >= Int(SplitQueue.byteBudget) {
                    if qs[q].budgetSpent() { faults.again(queue: q) }
                    break outer
                }
            }
            if qs[q].polling || !qs[q].enableNotifications() { break }
        }
        if completed { qs[q].publish() }
    }

    /// Writes readable bytes [skip, total) of `seg[0..<nseg]`; returns bytes written and how it ended
    /// (`.bytes(total - skip)` when all went out).
    private func transmit(_ p: ConsolePort, _ seg: UnsafeMutablePointer<Segment>, _ nseg: Int, total: Int, skip: Int) -> (Int, EndpointIO) {
        var off = skip
        while off < total {
            let n = fillIOV(p.iov, seg, 0, nseg, skip: off)
            let r = p.endpoint.write(p.iov, n)
            guard case .bytes(let k) = r else { return (off - skip, r) }
            off += k
            stats.bytesFromDriver &+= UInt64(k)
        }
        return (off - skip, .bytes(off - skip))
    }

    @inline(__always)
    private func fillIOV(_ iov: UnsafeMutablePointer<iovec>, _ seg: UnsafeMutablePointer<Segment>, _ from: Int, _ to: Int, skip: Int) -> Int {
        var s = skip, n = 0, i = from
        while i < to && n < ConsoleDevice.maxSegments {
            let l = Int(seg[i].length)
            if s >= l { s -= l; i += 1; continue }
            iov[n] = iovec(iov_base: seg[i].base + s, iov_len: l - s)
            n += 1
            s = 0
            i += 1
        }
        return n
    }

    /// The host side of `p` went away: reads and writes stop; the driver hears PORT_OPEN 0.
    private func hostGone(_ p: ConsolePort) {
        guard p.connected else { return }
        p.connected = false
        Log.info("console: port \(p.id) (\(p.endpoint.description)): host side disconnected")
        if multiport && p.guestReady { sendControl(p.id, .portOpen, 0) }
    }

    // MARK: endpoint events

    public func endpointReadable(_ port: Int) {
        guard port < ports.count, let p = ports[port] else { return }
        pumpRX(p)
    }
    public func endpointWritable(_ port: Int) {
        guard port < ports.count, let p = ports[port], p.stalled else { return }
        pumpTX(p)
    }
    public func endpointConnection(_ port: Int, connected: Bool) {
        guard port < ports.count, let p = ports[port] else { return }
        guard connected else { hostGone(p); return }
        guard !p.connected else { return }
        p.connected = true
        Log.info("console: port \(p.id) (\(p.endpoint.description)): host side connected")
        guard queues != nil else { return }
        if multiport && p.guestReady { sendControl(p.id, .portOpen, 1) }
        pumpTX(p)
        pumpRX(p)
    }

    // MARK: control messages

    private func controlMessage(_ b: UnsafeRawBufferPointer) {
        let ports = self.ports
        switch ConsoleDriverControl.decode(b, maxPorts: maxPorts, configured: { ports[$0] != nil }) {
        case .failure(let e):
            stats.badControl &+= 1
            stats.badControlByReason[e, default: 0] &+= 1
            let bit = UInt32(1) << UInt32(ConsoleControlError.allCases.firstIndex(of: e) ?? 0)
            once(bit, "driver control message dropped: \(e.rawValue)")
        case .success(.deviceReady(let ok)):
            guard ok else { Log.warning("console: the driver reported a failed set-up (DEVICE_READY 0)"); return }
            for p in ports { if let p { sendControl(p.id, .portAdd, 0) } }
        case .success(.portReady(let id, let ok)):
            guard let p = ports[id] else { return }
            guard ok else { Log.warning("console: the driver failed to set up port \(id) (PORT_READY 0)"); return }
            guard !p.guestReady else { return }   // a repeated PORT_READY changes nothing
            p.guestReady = true
            if p.isConsole {
                sendControl(id, .consolePort, 1)
                if features.contains(VirtioConsole.fSize), p.size.cols != 0 { sendControl(id, .resize, 0) }
            }
            if !p.name.isEmpty { sendControl(id, .portName, 1) }
            sendControl(id, .portOpen, p.connected ? 1 : 0)
        case .success(.portOpen(let id, let open)):
            guard let p = ports[id] else { return }
            p.guestOpen = open
            if open { pumpRX(p) }
        }
    }

    /// Queues a device → driver message (PORT_OPEN and RESIZE replace an older one for the same port) and sends
    /// what fits in the driver's buffers.
    private func sendControl(_ id: Int, _ event: VirtioConsole.Event, _ value: UInt16) {
        guard multiport, queues != nil else { return }
        if event == .portOpen || event == .resize {
            for k in 0..<pendingCount {
                let i = (pendingFirst + k) % pendingCapacity
                if pending[i].id == UInt32(id) && pending[i].event == event.rawValue { pending[i].value = value; flushControl(); return }
            }
        }
        guard pendingCount < pendingCapacity else {
            stats.controlOverflow &+= 1
            once(1 << 22, "driver gives no control buffers: control messages dropped")
            return
        }
        pending[(pendingFirst + pendingCount) % pendingCapacity] = Pending(id: UInt32(id), event: event.rawValue, value: value)
        pendingCount += 1
        flushControl()
    }

    private func flushControl() {
        guard let qs = queues, multiport else { return }
        var sent = false
        while pendingCount > 0, controlIn.oldest != nil {
            let m = pending[pendingFirst]
            pendingFirst = (pendingFirst + 1) % pendingCapacity
            pendingCount -= 1
            scratch.storeBytes(of: m.id.littleEndian, as: UInt32.self)
            scratch.storeBytes(of: m.event.littleEndian, toByteOffset: 4, as: UInt16.self)
            scratch.storeBytes(of: m.value.littleEndian, toByteOffset: 6, as: UInt16.self)
            var len = VirtioConsole.controlSize
            let p = Int(m.id) < ports.count ? ports[Int(m.id)] : nil
            if m.event == VirtioConsole.Event.portName.rawValue, let p {
                // The name, then a NUL (Linux copies len - 8 bytes and terminates it itself).
                let n = min(p.name.count, ConsoleDevice.maxNameBytes)
                p.name.withUnsafeBytes { (scratch + len).copyMemory(from: $0.baseAddress!, byteCount: n) }
                (scratch + len + n).storeBytes(of: 0, as: UInt8.self)
                len += n + 1
            } else if m.event == VirtioConsole.Event.resize.rawValue, let p {
                // Linux reads { rows, cols } after the header (drivers/char/virtio_console.c, handle_control_message).
                scratch.storeBytes(of: p.size.rows.littleEndian, toByteOffset: len, as: UInt16.self)
                scratch.storeBytes(of: p.size.cols.littleEndian, toByteOffset: len + 2, as: UInt16.self)
                len += 4
            }
            let n = controlIn.fillOldest(from: scratch, length: len)
            if let h = controlIn.removeOldest() { qs[VirtioConsole.controlRx].addUsed(head: h.head, written: UInt32(n)) }
            sent = true
        }
        if sent { qs[VirtioConsole.controlRx].publish() }
    }

    /// Terminal sizes of pty/tty endpoints (every second): the config (single port) or RESIZE (console ports).
    private func refreshSizes() {
        for p in ports {
            guard let p, let s = p.endpoint.windowSize, s != p.size else { continue }
            p.size = s
            guard queues != nil, features.contains(VirtioConsole.fSize) else { continue }
            if multiport { if p.isConsole && p.guestReady { sendControl(p.id, .resize, 0) } }
            else if p.id == 0 { configInterrupt.signal() }
        }
    }

    private func badChain(_ what: String) {
        stats.badChains &+= 1
        once(1 << 23, "driver error: \(what); completed empty")
    }

    /// Logs a warning the first time `bit` is seen (the counters keep the rest).
    private func once(_ bit: UInt32, _ m: @autoclosure () -> String) {
        guard logged & bit == 0 else { return }
        logged |= bit
        Log.warning("console: " + m())
    }
}
