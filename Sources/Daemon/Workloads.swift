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

/// One queue's requests, queue depth 1, kept the way a real driver keeps them: a head belongs to the device from
/// the moment it is made available until its used entry comes back, however long that takes. A request that timed
/// out (a vhost-user back-end being restarted, say) is not made available again: that would hand the device the
/// same head twice (loopbackd's front-end would then replay it twice; Linux's virtqueue takes descriptors off its
/// free list until they are used). It stays pending; the next request first waits for it, and submits only once it
/// is back. Used entries for nothing outstanding (a device that completed something twice) are counted, not taken
/// for the next request's. No allocation per request.
final class QD1Slot {
    private(set) var q: SimQueue
    /// The head the device still holds after a timed-out wait (nil: nothing outstanding).
    private(set) var pending: UInt16?
    /// Requests made available, used entries reaped for them, used entries that matched nothing outstanding.
    private(set) var submitted = 0, completed = 0, unexpected = 0
    /// Set by a wait that timed out (the caller may look at the device status).
    private(set) var timedOut = false

    init(_ q: SimQueue) { self.q = q }

    /// After a driver reset the device holds nothing: start over on the new queue.
    func restart(_ q: SimQueue) { self.q = q; pending = nil }

    /// Submits `head` and waits for its used entry; nil on a timeout (the head stays the device's) or when the
    /// entry is not `head`'s.
    @inline(__always)
    func run(_ head: UInt16, timeoutMs: Int32, spinNs: UInt64) -> (id: UInt16, len: UInt32)? {
        guard settle(timeoutMs: timeoutMs) else { return nil }
        q.submit(head)
        submitted += 1
        pending = head
        guard let u = q.waitUsed(timeoutMs: timeoutMs, spinNs: spinNs) else { timedOut = true; return nil }
        // Not ours: the device returned something not outstanding; ours stays pending.
        guard u.id == head else { unexpected += 1; return nil }
        pending = nil
        completed += 1
        return u
    }

    /// Waits for the request left outstanding by a timed-out call and drops used entries for nothing outstanding.
    /// false: still outstanding (nothing may be submitted, its buffers not touched).
    @inline(__always)
    func settle(timeoutMs: Int32) -> Bool {
        timedOut = false
        guard pending != nil || q.usedIdx != q.lastUsed else { return true }
        if let h = pending {
            guard let u = q.waitUsed(timeoutMs: timeoutMs) else { timedOut = true; return false }
            pending = nil
            completed += 1
            if u.id != h { unexpected += 1 }
        }
        while q.reap() != nil { unexpected += 1 }
        return true
    }
}

/// A device latched NEEDS_RESET (e.g. a vhost-user back-end restarted and the front-end could not replay exactly):
/// what a driver that handles it does: reset the device and start it again. Checked only after a timed-out wait.
/// Returns the new first queue, or nil if the device does not need a reset (or restarting failed; logged).
private func resetIfNeeded(_ d: SimDriver, _ slot: QD1Slot, recoveries: inout Int) -> SimQueue? {
    guard slot.timedOut, d.status & DeviceStatus.needsReset != 0 else { return nil }
    // Each start lays out fresh rings in the driver's bump-allocated RAM: bounded.
    guard recoveries < 100 else { return nil }
    recoveries += 1
    let n = d.queues.count
    Log.warning("simulated driver: device \(d.info.deviceID) needs reset (status 0x\(String(d.status, radix: 16))): resetting it")
    d.reset()
    do { try d.start(queueCount: n) } catch {
        Log.error("simulated driver: restart after reset failed: \(error)")
        return nil
    }
    guard let q = d.queues.first else { return nil }
    slot.restart(q)
    return q
}

/// 64-byte reads from virtio-rng.
final class RngWorkload: Workload {
    let driver: SimDriver
    let slot: QD1Slot
    private(set) var head: UInt16
    private let buffer: UInt64
    let bytesPerRequest = 64
    /// Driver resets after the device latched NEEDS_RESET.
    private(set) var recoveries = 0
    var q: SimQueue { slot.q }
    init?(_ d: SimDriver) {
        let b = d.alloc(64)
        guard let q = d.queues.first, let h = q.addChain(readable: [], writable: [(b, 64)]) else { return nil }
        driver = d
        buffer = b
        slot = QD1Slot(q)
        head = h
    }
    func runOne(spinNs: UInt64) -> Bool {
        guard let u = slot.run(head, timeoutMs: 1000, spinNs: spinNs) else {
            if let q = resetIfNeeded(driver, slot, recoveries: &recoveries),
               let h = q.addChain(readable: [], writable: [(buffer, 64)]) { head = h }
            return false
        }
        return u.len == 64
    }
}

/// virtio-blk 4 KiB requests at random sectors: reads, or (verify) a pattern write then a read-back compare.
final class BlkWorkload: Workload {
    let driver: SimDriver
    let slot: QD1Slot
    private(set) var readHead: UInt16, writeHead: UInt16
    private let gpa: (h: UInt64, b: UInt64, s: UInt64, wh: UInt64, wb: UInt64, ws: UInt64)
    let header: UnsafeMutableRawPointer, data: UnsafeMutableRawPointer, status: UnsafeMutableRawPointer
    let wheader: UnsafeMutableRawPointer, wdata: UnsafeMutableRawPointer, wstatus: UnsafeMutableRawPointer
    let blocks: UInt64
    let verify: Bool
    var rng: UInt64 = 0x9E37_79B9_7F4A_7C15
    let bytesPerRequest = 4096
    /// Requests that returned wrong data (verify mode).
    var mismatches = 0
    private(set) var recoveries = 0
    var q: SimQueue { slot.q }

    init?(_ d: SimDriver, verify: Bool) {
        guard let q = d.queues.first, let cap = d.readConfig(offset: 0, count: 8) else { return nil }
        let sectors = cap.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self).littleEndian }
        guard sectors >= 8 else { return nil }
        blocks = sectors / 8
        let h = d.alloc(16), b = d.alloc(4096, align: 4096), s = d.alloc(1)
        let wh = d.alloc(16), wb = d.alloc(4096, align: 4096), ws = d.alloc(1)
        gpa = (h, b, s, wh, wb, ws)
        guard let (r, w) = Self.chains(q, gpa) else { return nil }
        driver = d
        slot = QD1Slot(q)
        readHead = r; writeHead = w
        header = d.host(h); data = d.host(b); status = d.host(s)
        wheader = d.host(wh); wdata = d.host(wb); wstatus = d.host(ws)
        self.verify = verify
    }

    private static func chains(_ q: SimQueue, _ g: (h: UInt64, b: UInt64, s: UInt64, wh: UInt64, wb: UInt64, ws: UInt64))
        -> (UInt16, UInt16)? {
        guard let r = q.addChain(readable: [(g.h, 16)], writable: [(g.b, 4096), (g.s, 1)]),
              let w = q.addChain(readable: [(g.wh, 16), (g.wb, 4096)], writable: [(g.ws, 1)]) else { return nil }
        return (r, w)
    }

    private func next() -> UInt64 { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng }

    private func io(_ head: UInt16, _ hdr: UnsafeMutableRawPointer, _ st: UnsafeMutableRawPointer,
                    type: UInt32, sector: UInt64, spinNs: UInt64) -> Bool {
        hdr.storeBytes(of: type.littleEndian, as: UInt32.self)
        hdr.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
        hdr.storeBytes(of: sector.littleEndian, toByteOffset: 8, as: UInt64.self)
        st.storeBytes(of: 0xff, as: UInt8.self)
        guard slot.run(head, timeoutMs: 2000, spinNs: spinNs) != nil else { recover(); return false }
        return st.load(as: UInt8.self) == 0
    }

    private func recover() {
        guard let q = resetIfNeeded(driver, slot, recoveries: &recoveries), let (r, w) = Self.chains(q, gpa) else { return }
        readHead = r; writeHead = w
    }

    func runOne(spinNs: UInt64) -> Bool {
        // A request still outstanding from a timed-out call uses these very buffers: wait for it before touching them
        // (rewriting an in-flight write's data would change what a replaying back-end writes).
        guard slot.settle(timeoutMs: 2000) else { recover(); return false }
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
