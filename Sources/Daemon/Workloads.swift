import Glibc
import Synchronization
import CLinux
import Transport
import Registry

/// One request at a time through some driver (queue depth 1): what `ab` times. The simulated driver's workloads
/// below, or user-space I/O through a kernel driver (ABKernel.swift).
public protocol RoundTrip: AnyObject {
    /// Issues one request and waits for it; false on a device error or a timeout.
    func runOne(spinNs: UInt64) -> Bool
    /// Called before each timed phase (and the warm-up): e.g. make this device the one a shared node reads.
    func beginPhase() throws(DeviceError)
}

extension RoundTrip {
    public func beginPhase() throws(DeviceError) {}
}

/// Driver-side request generators for the simulated driver: one request at a time (queue depth 1), so each call
/// measures one full round trip (kick → device → used + interrupt). Chains are built once; a request only
/// rewrites its header and resubmits the same head, so the driver side does not allocate either.
public protocol Workload: RoundTrip {
    /// Bytes of payload one request moves.
    var bytesPerRequest: Int { get }
    /// The driver-side queue (for kick and interrupt counts).
    var q: SimQueue { get }
}

/// Picks the workload for a device type: rng reads, blk random 4 KiB reads (or verified writes+reads).
public func makeWorkload(type: String, driver: SimDriver, verify: Bool) -> Workload? {
    switch type {
    case "rng": return RngWorkload(driver)
    case "blk": return BlkWorkload(driver, verify: verify)
    default: return nil
    }
}

/// 64-byte reads from virtio-rng.
final class RngWorkload: Workload {
    let q: SimQueue
    let head: UInt16
    let bytesPerRequest = 64
    init?(_ d: SimDriver) {
        guard let q = d.queues.first, let h = q.addChain(readable: [], writable: [(d.alloc(64), 64)]) else { return nil }
        self.q = q
        head = h
    }
    func runOne(spinNs: UInt64) -> Bool {
        q.submit(head)
        guard let u = q.waitUsed(timeoutMs: 1000, spinNs: spinNs) else { return false }
        return u.len == 64
    }
}

/// virtio-blk 4 KiB requests at random sectors: reads, or (verify) a pattern write then a read-back compare.
final class BlkWorkload: Workload {
    let q: SimQueue
    let readHead: UInt16, writeHead: UInt16
    let header: UnsafeMutableRawPointer, data: UnsafeMutableRawPointer, status: UnsafeMutableRawPointer
    let wheader: UnsafeMutableRawPointer, wdata: UnsafeMutableRawPointer, wstatus: UnsafeMutableRawPointer
    let blocks: UInt64
    let verify: Bool
    var rng: UInt64 = 0x9E37_79B9_7F4A_7C15
    let bytesPerRequest = 4096
    /// Requests that returned wrong data (verify mode).
    var mismatches = 0

    init?(_ d: SimDriver, verify: Bool) {
        guard let q = d.queues.first, let cap = d.readConfig(offset: 0, count: 8) else { return nil }
        let sectors = cap.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self).littleEndian }
        guard sectors >= 8 else { return nil }
        blocks = sectors / 8
        let h = d.alloc(16), b = d.alloc(4096, align: 4096), s = d.alloc(1)
        let wh = d.alloc(16), wb = d.alloc(4096, align: 4096), ws = d.alloc(1)
        guard let r = q.addChain(readable: [(h, 16)], writable: [(b, 4096), (s, 1)]),
              let w = q.addChain(readable: [(wh, 16), (wb, 4096)], writable: [(ws, 1)]) else { return nil }
        self.q = q
        readHead = r; writeHead = w
        header = d.host(h); data = d.host(b); status = d.host(s)
        wheader = d.host(wh); wdata = d.host(wb); wstatus = d.host(ws)
        self.verify = verify
    }

    private func next() -> UInt64 { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng }

    private func io(_ head: UInt16, _ hdr: UnsafeMutableRawPointer, _ st: UnsafeMutableRawPointer,
                    type: UInt32, sector: UInt64, spinNs: UInt64) -> Bool {
        hdr.storeBytes(of: type.littleEndian, as: UInt32.self)
        hdr.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
        hdr.storeBytes(of: sector.littleEndian, toByteOffset: 8, as: UInt64.self)
        st.storeBytes(of: 0xff, as: UInt8.self)
        q.submit(head)
        guard q.waitUsed(timeoutMs: 2000, spinNs: spinNs) != nil else { return false }
        return st.load(as: UInt8.self) == 0
    }

    func runOne(spinNs: UInt64) -> Bool {
        let sector = (next() % blocks) * 8
        guard verify else { return io(readHead, header, status, type: 0, sector: sector, spinNs: spinNs) }
        // Fill the write buffer with a pattern derived from the sector and a fresh random tag.
        let tag = next()
        for k in 0..<512 { wdata.storeBytes(of: tag &+ UInt64(k) &+ sector, toByteOffset: 8 * k, as: UInt64.self) }
        guard io(writeHead, wheader, wstatus, type: 1, sector: sector, spinNs: spinNs),
              io(readHead, header, status, type: 0, sector: sector, spinNs: spinNs) else { return false }
        if memcmp(data, wdata, 4096) != 0 { mismatches += 1; return false }
        return true
    }
}

/// Per-device counters a workload thread updates and the main thread prints.
final class Counters: Sendable {
    let requests = Atomic<Int>(0)
    let errors = Atomic<Int>(0)
}
