import Glibc
import Synchronization
import CLinux
import Transport

/// 64-byte ping-pong through a host echo: the driver connects (REQUEST) from port 60000 to host port 60001 once,
/// where this workload listens on `uds-path_60001` and plays the host program (reads the 64 bytes, writes them
/// back) on the driver's thread; one round trip = RW out, RW back. Chains and buffers are built once; the
/// driver's fwd_cnt goes out in every packet, so the device's credit never runs out.
public final class VsockWorkload: Workload {
    let driver: SimDriver
    let rxq: SimQueue, txq: SimQueue
    private var rxBufs: [UInt16: UInt64] = [:]
    private let txBuf: UInt64
    private let txHead: UInt16
    private let conn: Int32
    private let echo = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)
    private var consumed: UInt32 = 0
    private var serial: UInt64 = 0
    private let verify: Bool
    private let guestCID: UInt64
    private let path: String
    public static let driverPort: UInt32 = 60000, hostPort: UInt32 = 60001
    /// The flow phase: a fresh connection per run, from driver port flowPortBase + n to host port flowHostPort.
    public static let flowHostPort: UInt32 = 60002, flowPortBase: UInt32 = 61000
    static let rxBufSize = 64 << 10
    var flowRuns: UInt32 = 0
    var flowSlots: (heads: [UInt16], bufs: [UInt64], size: Int, credit: UInt16, creditBuf: UInt64)?
    public let bytesPerRequest = 64
    public let requestKind = "64-byte ping-pong round trips through a host echo socket"
    public var q: SimQueue { txq }

    /// On an in-process vsock with a uds-path (bench, ab's in-process side).
    public convenience init?(_ d: SimDriver, verify: Bool = false) {
        let host = d.host, index = d.index
        guard let (path, cid) = host.loop.executeAndWait({ () -> (String, UInt64)? in
            guard let v = host.device(index) as? VsockDevice, let u = v.host as? UnixVsockHost else { return nil }
            return (u.path, v.guestCID)
        }) else {
            Log.info("vsock workload: not an in-process vsock with uds-path; no simulated requests")
            return nil
        }
        self.init(d, hostPath: path, guestCID: cid, verify: verify)
    }

    /// On any vsock whose hybrid-vsock path is `hostPath`: a forwarded one (ab's socket side: loopbackd's child or
    /// another back-end such as vhost-device-vsock, whose driver connections reach `hostPath_PORT`).
    public init?(_ d: SimDriver, hostPath path: String, guestCID cid: UInt64, verify: Bool = false) {
        guestCID = cid
        // bench starts drivers with one queue; vsock needs rx, tx and event.
        if d.queues.count < 3 {
            d.reset()
            do { try d.start() } catch { Log.error("vsock workload: cannot start the driver: \(error)"); return nil }
        }
        let listenPath = "\(path)_\(Self.hostPort)"
        let l = lb_unix_listen(listenPath, 1, 0o600)
        guard l >= 0 else { Log.error("vsock workload: cannot listen on \(listenPath): \(Errno.current)"); return nil }
        defer { FD.close(l); unlink(listenPath) }
        driver = d
        rxq = d.queues[0]; txq = d.queues[1]
        self.verify = verify
        self.path = path
        // 16 receive buffers of 64 KiB (the driver's buf_alloc of 1 MiB): the ping-pong uses 64 bytes of each, the
        // flow phase (`flow`) fills them.
        for _ in 0..<16 {
            let b = d.alloc(VirtioVsock.headerSize + Self.rxBufSize)
            guard let h = rxq.addChain(readable: [], writable: [(b, UInt32(VirtioVsock.headerSize + Self.rxBufSize))]) else { return nil }
            rxBufs[h] = b
            rxq.submit(h)
        }
        for _ in 0..<2 {
            let b = d.alloc(8)
            if let h = d.queues[2].addChain(readable: [], writable: [(b, 8)]) { d.queues[2].submit(h) }
        }
        txBuf = d.alloc(VirtioVsock.headerSize + 64)
        guard let t = txq.addChain(readable: [(txBuf, UInt32(VirtioVsock.headerSize + 64))], writable: []) else { return nil }
        txHead = t
        // Connect once: REQUEST (header only: a chain of its own), RESPONSE back.
        let reqBuf = d.alloc(VirtioVsock.headerSize)
        VsockHeader(srcCID: cid, dstCID: VirtioVsock.hostCID, srcPort: Self.driverPort, dstPort: Self.hostPort, op: .request,
                    bufAlloc: 1 << 20).store(to: d.host(reqBuf))
        guard let rh = txq.addChain(readable: [(reqBuf, UInt32(VirtioVsock.headerSize))], writable: []) else { return nil }
        txq.submit(rh)
        guard txq.waitUsed(timeoutMs: 2000) != nil, lb_poll_one(l, 1, 2000) > 0 else {
            Log.error("vsock workload: the connection to \(listenPath) did not come"); return nil
        }
        conn = lb_unix_accept(l)
        guard conn >= 0 else { return nil }
        _ = fcntl(conn, F_SETFL, fcntl(conn, F_GETFL) & ~O_NONBLOCK)
        guard let resp = nextPacket(timeoutMs: 2000, spinNs: 0), resp == VirtioVsock.Op.response.rawValue else {
            Log.error("vsock workload: no RESPONSE"); return nil
        }
    }
    deinit {
        if conn >= 0 { FD.close(conn) }
        echo.deallocate()
    }

    /// The op of the next packet that is not a credit update (RW payload checked against what was sent).
    private func nextPacket(timeoutMs: Int32, spinNs: UInt64) -> UInt16? {
        while true {
            guard let u = rxq.waitUsed(timeoutMs: timeoutMs, spinNs: spinNs), let b = rxBufs[u.id] else { return nil }
            let h = VsockHeader(from: driver.host(b))
            var ok = true
            if h.op == VirtioVsock.Op.rw.rawValue {
                consumed &+= h.len
                if verify { ok = h.len == 64 && memcmp(driver.host(b) + VirtioVsock.headerSize, driver.host(txBuf) + VirtioVsock.headerSize, 64) == 0 }
            }
            rxq.submit(u.id)
            if h.op == VirtioVsock.Op.creditUpdate.rawValue || h.op == VirtioVsock.Op.creditRequest.rawValue { continue }
            return ok ? h.op : 0
        }
    }

    public func runOne(spinNs: UInt64) -> Bool {
        serial &+= 1
        let p = driver.host(txBuf)
        VsockHeader(srcCID: guestCID, dstCID: VirtioVsock.hostCID, srcPort: Self.driverPort, dstPort: Self.hostPort, len: 64,
                    op: .rw, bufAlloc: 1 << 20, fwdCnt: consumed).store(to: p)
        for k in 0..<8 { (p + VirtioVsock.headerSize + 8 * k).storeBytes(of: serial &+ UInt64(k), as: UInt64.self) }
        txq.submit(txHead)
        // The host program: 64 bytes in, the same 64 bytes out.
        var n = 0
        while n < 64 {
            let k = read(conn, echo + n, 64 - n)
            if k < 0 && errno == EINTR { continue }
            if k <= 0 { return false }
            n += k
        }
        guard write(conn, echo, 64) == 64 else { return false }
        guard let t = txq.waitUsed(timeoutMs: 1000, spinNs: spinNs), t.id == txHead else { return false }
        return nextPacket(timeoutMs: 1000, spinNs: spinNs) == VirtioVsock.Op.rw.rawValue
    }
}

// MARK: flow (throughput with credit flow control)

/// The direction of a flow run: driver → host into a sink socket, host → driver from a source socket, or both ways
/// through a host echo (what comes in goes back out).
public enum VsockFlow: String, CaseIterable, Sendable { case toHost = "to-host", toDriver = "to-driver", both = "echo" }

/// What one flow run moved: bytes the host read from the connection (to host) and bytes the driver received (to
/// driver), within `elapsedNs` from the first packet to the deadline.
public struct VsockFlowResult {
    public var toHost: UInt64 = 0, toDriver: UInt64 = 0
    public var elapsedNs: UInt64 = 0
    public var errors = 0
    /// Packets the driver could not send for want of credit (times the credit ran out with a free slot).
    public var creditStalls = 0
    public init() {}
}

/// The host end of a flow run, on its own thread: sink, source or echo on the accepted unix socket (non-blocking,
/// polled every 20 ms for the stop flag).
final class VsockFlowHost: @unchecked Sendable {
    let fd: Int32, mode: VsockFlow
    let stop = Atomic<Bool>(false)
    let received = Atomic<UInt64>(0)
    let failed = Atomic<Bool>(false)
    init(fd: Int32, mode: VsockFlow) { self.fd = fd; self.mode = mode }
    func run() {
        let cap = 256 << 10
        let buf = UnsafeMutableRawPointer.allocate(byteCount: cap, alignment: 64)
        defer { buf.deallocate() }
        memset(buf, 0x5a, cap)
        var pending = 0, at = 0            // echo: bytes read and not yet written back
        while !stop.load(ordering: .relaxed) {
            var events: Int32 = 0
            switch mode {
            case .toHost: events = Int32(POLLIN)
            case .toDriver: events = Int32(POLLOUT)
            case .both: events = pending > 0 ? Int32(POLLOUT) : Int32(POLLIN)
            }
            let r = lb_poll_one(fd, events, 20)
            if r <= 0 { continue }
            if mode == .toHost || (mode == .both && pending == 0) {
                let k = read(fd, buf, mode == .both ? 64 << 10 : cap)
                if k == 0 { return }
                if k < 0 { if errno == EAGAIN || errno == EINTR { continue }; failed.store(true, ordering: .relaxed); return }
                received.add(UInt64(k), ordering: .relaxed)
                if mode == .both { pending = k; at = 0 }
            } else {
                let k = send(fd, buf + at, mode == .both ? pending - at : 64 << 10, Int32(MSG_NOSIGNAL))
                if k < 0 { if errno == EAGAIN || errno == EINTR { continue }; if !stop.load(ordering: .relaxed) { failed.store(true, ordering: .relaxed) }; return }
                if mode == .both { at += k; if at == pending { pending = 0 } }
            }
        }
    }
}

extension VsockWorkload {
    /// One flow run of `seconds` on a fresh connection: the driver keeps up to `depth` RW packets of `size` bytes
    /// in flight, never beyond the device's credit (buf_alloc − (tx_cnt − fwd_cnt), virtio 1.2 §5.10.6.3, from the
    /// headers it receives), returns every receive buffer at once and tells the device its own fwd_cnt in each
    /// packet, or in a CREDIT_UPDATE once a quarter of its 1 MiB buf_alloc was consumed since it last did. Ends
    /// with RST. Buffers and chains are built on the first run (the driver's RAM is bump-allocated).
    public func flow(_ mode: VsockFlow, seconds: Double, depth: Int, size: Int) -> VsockFlowResult {
        var res = VsockFlowResult()
        guard size > 0, size <= 64 << 10, depth > 0 else { res.errors = 1; return res }
        if flowSlots == nil {
            var heads: [UInt16] = [], bufs: [UInt64] = []
            for _ in 0..<depth {
                let b = driver.alloc(VirtioVsock.headerSize + size)
                let p = driver.host(b) + VirtioVsock.headerSize
                for i in 0..<size { (p + i).storeBytes(of: UInt8(truncatingIfNeeded: i &* 13 | 1), as: UInt8.self) }
                guard let h = txq.addChain(readable: [(b, UInt32(VirtioVsock.headerSize + size))], writable: []) else {
                    Log.error("vsock flow: depth \(depth) needs \(depth + 1) free transmit descriptors; the queue (size \(txq.size)) has fewer")
                    res.errors = 1; return res
                }
                heads.append(h); bufs.append(b)
            }
            let cb = driver.alloc(VirtioVsock.headerSize)
            guard let ch = txq.addChain(readable: [(cb, UInt32(VirtioVsock.headerSize))], writable: []) else { res.errors = 1; return res }
            flowSlots = (heads, bufs, size, ch, cb)
        }
        guard let slots = flowSlots, slots.heads.count == depth, slots.size == size else { res.errors = 1; return res }
        flowRuns &+= 1
        let port = Self.flowPortBase &+ flowRuns
        let bufAlloc: UInt32 = 1 << 20
        let listenPath = "\(path)_\(Self.flowHostPort)"
        let l = lb_unix_listen(listenPath, 1, 0o600)
        guard l >= 0 else { Log.error("vsock flow: cannot listen on \(listenPath): \(Errno.current)"); res.errors = 1; return res }
        defer { FD.close(l); unlink(listenPath) }
        func header(_ op: VirtioVsock.Op, len: UInt32, fwd: UInt32) -> VsockHeader {
            VsockHeader(srcCID: guestCID, dstCID: VirtioVsock.hostCID, srcPort: port, dstPort: Self.flowHostPort, len: len, op: op,
                        bufAlloc: bufAlloc, fwdCnt: fwd)
        }
        var creditBusy = false
        func sendControl(_ op: VirtioVsock.Op, fwd: UInt32) -> Bool {
            guard !creditBusy else { return false }
            header(op, len: 0, fwd: fwd).store(to: driver.host(slots.creditBuf))
            creditBusy = true
            txq.submit(slots.credit)
            return true
        }
        // Peer (device) credit, from every packet of this connection.
        var peerBufAlloc: UInt32 = 0, peerFwdCnt: UInt32 = 0, connected = false, closed = false
        var consumed: UInt32 = 0, lastFwdSent: UInt32 = 0, txCnt: UInt32 = 0
        var counting = false
        /// Reaps both queues: transmit chains back to the free list, receive buffers read and returned.
        var free: [Int] = Array((0..<depth).reversed())
        var slotOf = [Int](repeating: -1, count: Int(txq.size))
        for (i, h) in slots.heads.enumerated() { slotOf[Int(h)] = i }
        func reapAll() -> Bool {
            var any = false
            while let u = txq.reap() {
                any = true
                if u.id == slots.credit { creditBusy = false }
                else if slotOf[Int(u.id)] >= 0 { free.append(slotOf[Int(u.id)]) }
            }
            let old = rxq.availIdx
            while let u = rxq.reap() {
                any = true
                guard let b = rxBufs[u.id] else { res.errors += 1; continue }
                let h = VsockHeader(from: driver.host(b))
                if h.dstPort == port && h.srcPort == Self.flowHostPort {
                    peerBufAlloc = h.bufAlloc; peerFwdCnt = h.fwdCnt
                    switch VirtioVsock.Op(rawValue: h.op) {
                    case .response: connected = true
                    case .rw:
                        consumed &+= h.len
                        if counting { res.toDriver &+= UInt64(h.len) }
                    case .rst, .shutdown: closed = true
                    default: break
                    }
                }
                rxq.pushAvail(u.id)
            }
            if rxq.availIdx != old { rxq.publish(); rxq.kickIfNeeded(old: old) }
            return any
        }
        /// Sleeps until either queue has used entries (or `ms` passed).
        func wait(_ ms: Int32) {
            rxq.enableInterrupts(); txq.enableInterrupts()
            if rxq.usedIdx != rxq.lastUsed || txq.usedIdx != txq.lastUsed { return }
            var p = [pollfd(fd: rxq.interruptFD.raw, events: Int16(POLLIN), revents: 0), pollfd(fd: txq.interruptFD.raw, events: Int16(POLLIN), revents: 0)]
            _ = poll(&p, 2, ms)
            _ = FD.drain(rxq.interruptFD.raw); _ = FD.drain(txq.interruptFD.raw)
        }
        // Connect: REQUEST, RESPONSE (its header carries the device's first credit).
        guard sendControl(.request, fwd: 0) else { res.errors = 1; return res }
        let tc = lb_now_ns()
        while !connected && !closed && lb_now_ns() &- tc < 2_000_000_000 { if !reapAll() { wait(100) } }
        guard connected, lb_poll_one(l, Int32(POLLIN), 2000) > 0 else {
            Log.error("vsock flow: no connection to \(listenPath)"); res.errors = 1; return res
        }
        let conn = lb_unix_accept(l)
        guard conn >= 0 else { res.errors = 1; return res }
        defer { FD.close(conn) }
        _ = lb_set_nonblocking(conn)
        let hostEnd = VsockFlowHost(fd: conn, mode: mode)
        let thread = Thread.spawn { hostEnd.run() }
        let t0 = lb_now_ns(), deadline = t0 &+ UInt64(seconds * 1e9)
        counting = true
        var lastProgress = t0
        while !closed {
            let now = lb_now_ns()
            if now >= deadline { break }
            if reapAll() { lastProgress = now }
            let old = txq.availIdx
            if mode != .toDriver {
                while let i = free.last {
                    let credit = peerBufAlloc &- (txCnt &- peerFwdCnt)
                    guard credit >= UInt32(size), credit <= peerBufAlloc else { res.creditStalls += 1; break }
                    free.removeLast()
                    header(.rw, len: UInt32(size), fwd: consumed).store(to: driver.host(slots.bufs[i]))
                    txq.pushAvail(slots.heads[i])
                    txCnt &+= UInt32(size)
                    lastFwdSent = consumed
                }
            }
            if txq.availIdx != old { txq.publish(); txq.kickIfNeeded(old: old) }
            if consumed &- lastFwdSent >= bufAlloc / 4 && sendControl(.creditUpdate, fwd: consumed) { lastFwdSent = consumed }
            if lb_now_ns() &- lastProgress > 2_000_000_000 { Log.error("vsock flow: no progress for 2 s"); res.errors += 1; break }
            if txq.usedIdx == txq.lastUsed && rxq.usedIdx == rxq.lastUsed {
                wait(Int32(max(1, min(100, (deadline &- min(deadline, lb_now_ns())) / 1_000_000))))
            }
        }
        counting = false
        res.elapsedNs = lb_now_ns() &- t0
        res.toHost = hostEnd.received.load(ordering: .relaxed)
        hostEnd.stop.store(true, ordering: .relaxed)
        thread.join()
        if closed || hostEnd.failed.load(ordering: .relaxed) { res.errors += 1 }
        // Close: RST (the device drops what it holds for the connection and completes it), then everything back.
        let tr = lb_now_ns()
        while creditBusy && lb_now_ns() &- tr < 1_000_000_000 { if !reapAll() { wait(10) } }
        _ = sendControl(.rst, fwd: consumed)
        while (free.count < depth || creditBusy) && lb_now_ns() &- tr < 2_000_000_000 { if !reapAll() { wait(10) } }
        if free.count < depth || creditBusy { Log.error("vsock flow: transmit chains not returned after RST"); res.errors += 1 }
        usleep(20_000)
        _ = reapAll()
        return res
    }
}
