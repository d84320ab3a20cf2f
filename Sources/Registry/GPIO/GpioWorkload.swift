import Glibc
import Transport

/// The simulated driver's gpio workload, on the simulated chip's wired pairs (line 0 drives line n/2): line 0 an
/// output, line n/2 an input with both-edge interrupts and its eventq buffer posted, as Linux's gpio-virtio does
/// for a line requested by gpiomon. One round trip = SET_VALUE toggling line 0 (requestq response) + the edge
/// interrupt on line n/2 (eventq buffer completed VALID, posted again); with `verify` also GET_VALUE on line n/2
/// (must read the level just set). A driver that set up the requestq only (`bench` and `ab` start one queue; no
/// F_IRQ then) gets request round trips instead: SET_VALUE on line 0 + GET_VALUE on line n/2, checked. Chains and
/// buffers are built once.
public final class GpioWorkload: Workload {
    let driver: SimDriver
    public let q: SimQueue
    let events: SimQueue?
    private let reqHead: UInt16, evHead: UInt16
    private let req: UnsafeMutableRawPointer, resp: UnsafeMutableRawPointer, evStatus: UnsafeMutableRawPointer
    private let input: UInt16
    private let verify: Bool
    private var level = false
    private var timedOut = false
    public let bytesPerRequest = 2
    public let requestKind: String

    public init?(_ d: SimDriver, verify: Bool = false) {
        guard let cfg = d.readConfig(offset: 0, count: 2) else { return nil }
        let ngpio = UInt16(cfg[0]) | UInt16(cfg[1]) << 8
        guard ngpio >= 2, let q = d.queues.first else { return nil }
        let e: SimQueue? = d.queues.count >= 2 && d.features.contains(VirtioGpio.fIRQ) ? d.queues[1] : nil
        let r = d.alloc(8), s = d.alloc(2), eg = d.alloc(2), es = d.alloc(1)
        guard let rh = q.addChain(readable: [(r, 8)], writable: [(s, 2)]),
              let eh = e == nil ? 0 : e!.addChain(readable: [(eg, 2)], writable: [(es, 1)]) else { return nil }
        requestKind = e != nil ? "SET_VALUE + edge interrupt (line 0 wired to line n/2)"
                               : "SET_VALUE + GET_VALUE (line 0 wired to line n/2; requestq only)"
        driver = d
        self.q = q
        events = e
        reqHead = rh
        evHead = eh
        req = d.host(r)
        resp = d.host(s)
        evStatus = d.host(es)
        input = ngpio / 2
        self.verify = verify
        d.host(eg).storeBytes(of: input.littleEndian, as: UInt16.self)
        guard send(VirtioGpio.msgSetDirection, 0, UInt32(GpioDirection.output.rawValue)) == 0,
              send(VirtioGpio.msgSetValue, 0, 0) == 0,
              send(VirtioGpio.msgSetDirection, input, UInt32(GpioDirection.input.rawValue)) == 0 else { return nil }
        if let e {
            guard send(VirtioGpio.msgIRQType, input, UInt32(VirtioGpio.irqEdgeBoth)) == 0 else { return nil }
            e.submit(evHead)
        }
    }

    /// One request, waited for: the response value, or nil on ERR or a timeout.
    private func send(_ type: UInt16, _ line: UInt16, _ value: UInt32, spinNs: UInt64 = 0) -> UInt8? {
        req.storeBytes(of: type.littleEndian, as: UInt16.self)
        req.storeBytes(of: line.littleEndian, toByteOffset: 2, as: UInt16.self)
        req.storeBytes(of: value.littleEndian, toByteOffset: 4, as: UInt32.self)
        resp.storeBytes(of: 0xffff, as: UInt16.self)
        q.submit(reqHead)
        guard q.waitUsed(timeoutMs: 1000, spinNs: spinNs) != nil else { timedOut = true; return nil }
        guard resp.load(as: UInt8.self) == VirtioGpio.statusOK else { return nil }
        return resp.load(fromByteOffset: 1, as: UInt8.self)
    }

    public func runOne(spinNs: UInt64) -> Bool {
        // A timed-out request leaves its head with the device: never offer it again (one attempt per run).
        guard !timedOut else { return false }
        level.toggle()
        evStatus.storeBytes(of: 0xff, as: UInt8.self)
        guard send(VirtioGpio.msgSetValue, 0, level ? 1 : 0, spinNs: spinNs) != nil else { return false }
        guard let events else {
            guard let v = send(VirtioGpio.msgGetValue, input, 0, spinNs: spinNs) else { return false }
            return v == (level ? 1 : 0)
        }
        guard events.waitUsed(timeoutMs: 1000, spinNs: spinNs) != nil else { timedOut = true; return false }
        guard evStatus.load(as: UInt8.self) == VirtioGpio.irqStatusValid else { return false }
        events.submit(evHead)
        if verify {
            guard let v = send(VirtioGpio.msgGetValue, input, 0, spinNs: spinNs), v == (level ? 1 : 0) else { return false }
        }
        return true
    }
}
