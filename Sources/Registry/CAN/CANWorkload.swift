import Glibc
import Transport

/// The simulated driver's CAN workload on the simulated bus (`simulated = true`: every frame comes back): the
/// controller is started once (SET_CTRL_MODE_START), then one round trip = a classic 8-byte frame sent (its request
/// completed OK once the bus took it) and the same frame received. Chains and buffers are built once; with `verify`,
/// the received frame's id and payload are checked against the one sent. On a real interface there is no echo
/// peer: no workload (the device idles under transport "sim").
public final class CANWorkload: Workload {
    let driver: SimDriver
    let txq: SimQueue, rxq: SimQueue
    private var rxBufs: [UInt64]
    private let txBuf: UInt64, txResult: UInt64
    private let txHead: UInt16
    private var serial: UInt64 = 0
    private let verify: Bool
    private var timedOut = false
    public let bytesPerRequest = 8
    public let requestKind = "8-byte CAN frames sent and received back (simulated bus)"
    public var q: SimQueue { txq }
    static let rxBufferSize = VirtioCAN.headerSize + VirtioCAN.maxFDLength

    public init?(_ d: SimDriver, verify: Bool = false) {
        let host = d.host, index = d.index
        guard host.loop.executeAndWait({ () -> Bool in
            // Forwarded to a vhost-user back-end (bench through the front-end, ab's socket path): the back-end is
            // expected to run a simulated bus too; if it does not echo, every round trip times out and counts as an
            // error rather than passing.
            if let f = host.device(index) as? VhostUserFrontendDevice { return f.deviceID == VirtioCAN.deviceID }
            guard let c = host.device(index) as? CANDevice, let bus = c.endpoint as? FakeCANBus else { return false }
            return bus.echo
        }) else {
            Log.info("can workload: not an in-process can device with simulated = true; no simulated requests")
            return nil
        }
        if d.queues.count < 3 {
            d.reset()
            do { try d.start() } catch { Log.error("can workload: cannot start the driver: \(error)"); return nil }
        }
        driver = d
        txq = d.queues[VirtioCAN.txQueue]; rxq = d.queues[VirtioCAN.rxQueue]
        let ctl = d.queues[VirtioCAN.controlQueue]
        self.verify = verify
        rxBufs = [UInt64](repeating: 0, count: Int(rxq.size))
        for _ in 0..<min(64, Int(rxq.size)) {
            let b = d.alloc(Self.rxBufferSize)
            guard let h = rxq.addChain(readable: [], writable: [(b, UInt32(Self.rxBufferSize))]) else { return nil }
            rxBufs[Int(h)] = b
            rxq.submit(h)
        }
        // START the controller.
        let cOut = d.alloc(2), cIn = d.alloc(1)
        d.host(cOut).storeBytes(of: VirtioCAN.ctrlStart.littleEndian, as: UInt16.self)
        d.host(cIn).storeBytes(of: 0xff, as: UInt8.self)
        guard let ch = ctl.addChain(readable: [(cOut, 2)], writable: [(cIn, 1)]) else { return nil }
        ctl.submit(ch)
        guard ctl.waitUsed(timeoutMs: 2000) != nil, d.host(cIn).load(as: UInt8.self) == VirtioCAN.resultOK else {
            Log.error("can workload: controller start failed"); return nil
        }
        txBuf = d.alloc(VirtioCAN.headerSize + 8)
        txResult = d.alloc(1)
        let h = d.host(txBuf)
        h.storeBytes(of: VirtioCAN.msgTX.littleEndian, as: UInt16.self)
        h.storeBytes(of: UInt16(8).littleEndian, toByteOffset: 2, as: UInt16.self)
        h.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
        h.storeBytes(of: VirtioCAN.flagExtended.littleEndian, toByteOffset: 8, as: UInt32.self)
        h.storeBytes(of: UInt32(0x1234567).littleEndian, toByteOffset: 12, as: UInt32.self)
        guard let t = txq.addChain(readable: [(txBuf, UInt32(VirtioCAN.headerSize + 8))], writable: [(txResult, 1)]) else { return nil }
        txHead = t
    }

    public func runOne(spinNs: UInt64) -> Bool {
        guard !timedOut else { return false }
        serial &+= 1
        let p = driver.host(txBuf)
        p.storeBytes(of: serial.littleEndian, toByteOffset: VirtioCAN.headerSize, as: UInt64.self)
        driver.host(txResult).storeBytes(of: 0xff, as: UInt8.self)
        txq.submit(txHead)
        guard let t = txq.waitUsed(timeoutMs: 1000, spinNs: spinNs) else { timedOut = true; return false }
        guard t.id == txHead, driver.host(txResult).load(as: UInt8.self) == VirtioCAN.resultOK else { return false }
        guard let u = rxq.waitUsed(timeoutMs: 1000, spinNs: spinNs) else { timedOut = true; return false }
        var ok = u.len == UInt32(VirtioCAN.headerSize + 8)
        let b = rxBufs[Int(u.id)]
        if verify && ok {
            let r = driver.host(b)
            ok = UInt16(littleEndian: r.load(as: UInt16.self)) == VirtioCAN.msgRX
                && UInt32(littleEndian: r.load(fromByteOffset: 12, as: UInt32.self)) == 0x1234567
                && UInt64(littleEndian: r.loadUnaligned(fromByteOffset: VirtioCAN.headerSize, as: UInt64.self)) == serial
        }
        rxq.submit(u.id)
        return ok
    }
}
