import Glibc
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
    public static let driverPort: UInt32 = 60000, hostPort: UInt32 = 60001
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
        for _ in 0..<16 {
            let b = d.alloc(VirtioVsock.headerSize + 4096)
            guard let h = rxq.addChain(readable: [], writable: [(b, UInt32(VirtioVsock.headerSize + 4096))]) else { return nil }
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
