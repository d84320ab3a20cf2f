import Glibc
import Transport

/// 64-byte echo round trips on port 0: the driver writes 64 bytes (transmitq) and waits until the same 64 bytes
/// come back in its receive buffer. Behind an `echo` endpoint the device echoes; behind a `pty` endpoint this
/// workload plays the terminal on the slave side (reads the 64 bytes, writes them back), so the row includes the
/// pty. The driver runs without MULTIPORT (one port, two queues), like Linux with a plain console.
public final class ConsoleWorkload: Workload {
    let driver: SimDriver
    let rxq: SimQueue, txq: SimQueue
    private var rxHead: UInt16, txHead: UInt16
    private let rxBuf: UInt64, txBuf: UInt64
    private var rxOutstanding = false
    private var slave: Int32 = -1
    private let echoBuf = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)
    private var serial: UInt64 = 0
    private let verify: Bool
    public let bytesPerRequest = 64
    public let requestKind = "64-byte echo round trips"
    public var q: SimQueue { txq }

    public init?(_ d: SimDriver, verify: Bool = false) {
        // Port 0 must answer: an echo endpoint, a pty (played here), or a forwarded device (its back-end's port).
        let host = d.host, index = d.index
        let kind = host.loop.executeAndWait { () -> Int in
            guard let c = host.device(index) as? ConsoleDevice else { return 2 }
            switch c.endpoint(0) {
            case let f as FakeConsoleEndpoint: return f.echo ? 2 : 0
            case is PtyEndpoint: return 1
            default: return 0
            }
        }
        guard kind != 0 else {
            Log.info("console workload: port 0 is not \"echo\" or \"pty\"; no simulated requests")
            return nil
        }
        d.reset()
        do { try d.start(accept: { $0.subtracting(VirtioConsole.fMultiport) }, queueCount: 2) } catch {
            Log.error("console workload: cannot start the driver: \(error)")
            return nil
        }
        driver = d
        rxq = d.queues[0]; txq = d.queues[1]
        rxBuf = d.alloc(64); txBuf = d.alloc(64)
        guard let r = rxq.addChain(readable: [], writable: [(rxBuf, 64)]),
              let t = txq.addChain(readable: [(txBuf, 64)], writable: []) else { return nil }
        rxHead = r; txHead = t
        self.verify = verify
        let ptyPath = host.loop.executeAndWait { ((host.device(index) as? ConsoleDevice)?.endpoint(0) as? PtyEndpoint)?.path }
        if let ptyPath {
            slave = open(ptyPath, O_RDWR | O_NOCTTY | O_CLOEXEC)
            if slave < 0 { Log.error("console workload: cannot open \(ptyPath): \(Errno.current)"); return nil }
        }
    }
    deinit {
        if slave >= 0 { FD.close(slave) }
        echoBuf.deallocate()
    }

    public func runOne(spinNs: UInt64) -> Bool {
        if !rxOutstanding { rxq.submit(rxHead); rxOutstanding = true }
        serial &+= 1
        driver.host(txBuf).storeBytes(of: serial, as: UInt64.self)
        txq.submit(txHead)
        if slave >= 0 && !echoThroughSlave() { return false }
        guard let t = txq.waitUsed(timeoutMs: 1000, spinNs: spinNs), t.id == txHead else { return false }
        var got = 0
        while got < 64 {
            guard let u = rxq.waitUsed(timeoutMs: 1000, spinNs: spinNs), u.id == rxHead else { return false }
            rxOutstanding = false
            if verify && u.len > 0 {
                // Pieces arrive in order into the one buffer: compare them with the same bytes of what was sent.
                if memcmp(driver.host(rxBuf), driver.host(txBuf) + got, Int(u.len)) != 0 { return false }
            }
            got += Int(u.len)
            if got < 64 { rxq.submit(rxHead); rxOutstanding = true }
        }
        return got == 64
    }

    /// The terminal's side of a pty: 64 bytes in, the same 64 bytes out.
    private func echoThroughSlave() -> Bool {
        var n = 0
        while n < 64 {
            let k = read(slave, echoBuf + n, 64 - n)
            if k < 0 && errno == EINTR { continue }
            if k <= 0 { return false }
            n += k
        }
        var w = 0
        while w < 64 {
            let k = write(slave, echoBuf + w, 64 - w)
            if k < 0 && errno == EINTR { continue }
            if k <= 0 { return false }
            w += k
        }
        return true
    }
}
