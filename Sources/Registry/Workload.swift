import Glibc
import Synchronization
import CLinux
import Transport

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
    /// What one request is, for the demo's report ("64-byte reads").
    var requestKind: String { get }
    /// The driver-side queue (for kick and interrupt counts).
    var q: SimQueue { get }
    /// Throughput mode: `depth` requests of `size` payload bytes (nil: the type's default) to keep in flight on `q`,
    /// chains and buffers built now (nil: this type has no depth-N workload; the default). The QD1 chains stay.
    func depthRequests(depth: Int, size: Int?) throws(DeviceError) -> DepthRequests?
}

/// One queue's requests, queue depth 1, kept the way a real driver keeps them: a head belongs to the device from
/// the moment it is made available until its used entry comes back, however long that takes. A request that timed
/// out (a vhost-user back-end being restarted, say) is not made available again: that would hand the device the
/// same head twice (loopbackd's front-end would then replay it twice; Linux's virtqueue takes descriptors off its
/// free list until they are used). It stays pending; the next request first waits for it, and submits only once it
/// is back. Used entries for nothing outstanding (a device that completed something twice) are counted, not taken
/// for the next request's. No allocation per request.
public final class QD1Slot {
    public private(set) var q: SimQueue
    /// The head the device still holds after a timed-out wait (nil: nothing outstanding).
    public private(set) var pending: UInt16?
    /// Requests made available, used entries reaped for them, used entries that matched nothing outstanding.
    public private(set) var submitted = 0, completed = 0, unexpected = 0
    /// Set by a wait that timed out (the caller may look at the device status).
    public private(set) var timedOut = false

    public init(_ q: SimQueue) { self.q = q }

    /// After a driver reset the device holds nothing: start over on the new queue.
    public func restart(_ q: SimQueue) { self.q = q; pending = nil }

    /// Submits `head` and waits for its used entry; nil on a timeout (the head stays the device's) or when the
    /// entry is not `head`'s.
    @inline(__always)
    public func run(_ head: UInt16, timeoutMs: Int32, spinNs: UInt64) -> (id: UInt16, len: UInt32)? {
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
    public func settle(timeoutMs: Int32) -> Bool {
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
public func resetIfNeeded(_ d: SimDriver, _ slot: QD1Slot, recoveries: inout Int) -> SimQueue? {
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


// MARK: queue depth N (throughput)

/// The requests of a depth-N run on one queue, one per slot: chains and buffers are built once (by a workload's
/// `depthRequests`), a request only rewrites its slot's header, so nothing is allocated per request.
public protocol DepthRequests: AnyObject {
    /// Heads of the preallocated chains, one per slot (its count is the depth).
    var heads: [UInt16] { get }
    /// Nominal payload bytes of one request (for the report).
    var size: Int { get }
    /// Rewrites slot `i`'s request (header, sector, status) before it is made available again.
    func prepare(_ i: Int)
    /// Bytes slot `i`'s completed request moved (its used length is `len`), or -1 on a device error.
    func complete(_ i: Int, len: UInt32) -> Int
}

extension Workload {
    /// No depth-N requests for this type unless it provides them (the console and input workloads, say).
    public func depthRequests(depth: Int, size: Int?) throws(DeviceError) -> DepthRequests? { nil }
}

/// Latencies in a log-linear histogram (32 sub-buckets per power of two: ≤ 3 % error), preallocated: a depth-N run
/// of any length records every completion without allocating.
public final class LatencyHistogram {
    static let sub = 32, subBits = 5
    public static let bucketCount = (64 - subBits + 1) * sub
    let counts: UnsafeMutableBufferPointer<UInt64>
    public private(set) var count: UInt64 = 0
    public private(set) var max: UInt64 = 0

    public init() {
        counts = .allocate(capacity: Self.bucketCount)
        counts.initialize(repeating: 0)
    }
    deinit { counts.deallocate() }

    public func reset() {
        for i in counts.indices { counts[i] = 0 }
        count = 0; max = 0
    }

    @inline(__always)
    static func bucket(_ v: UInt64) -> Int {
        if v < UInt64(sub) { return Int(v) }
        let e = 63 - v.leadingZeroBitCount            // ≥ subBits
        return (e - subBits + 1) * sub + Int((v >> UInt64(e - subBits)) & UInt64(sub - 1))
    }
    /// The largest value in bucket `b`.
    static func upper(_ b: Int) -> UInt64 {
        if b < sub { return UInt64(b) }
        let e = b / sub + subBits - 1, m = UInt64(b % sub)
        let lo = (UInt64(sub) | m) << UInt64(e - subBits)
        return lo + (UInt64(1) << UInt64(e - subBits)) - 1
    }

    @inline(__always)
    public func record(_ ns: UInt64) {
        counts[Self.bucket(ns)] &+= 1
        count &+= 1
        if ns > max { max = ns }
    }

    /// The value at fraction `p` (0…1) of the recorded latencies (a bucket's upper bound; the maximum at p = 1).
    public func percentile(_ p: Double) -> UInt64 {
        guard count > 0 else { return 0 }
        let target = Swift.max(1, UInt64((p * Double(count)).rounded(.up)))
        if target >= count { return max }
        var seen: UInt64 = 0
        for b in 0..<Self.bucketCount {
            seen &+= counts[b]
            if seen >= target { return Swift.min(Self.upper(b), max) }
        }
        return max
    }
}

/// Keeps `depth` requests in flight on one simulated queue, the way a multi-queue driver keeps its hardware queue
/// busy: every slot's request is made available at the start; each wake-up reaps every used entry, re-arms each
/// completed slot at once (one avail publish and at most one kick per batch, like a driver's plug). Head → slot and
/// submit times live in arrays built once; no allocation per request. A wait that times out ends the run (`broken`:
/// the device still holds those heads, so they are never made available again).
public final class DepthRunner {
    public let q: SimQueue
    public let requests: DepthRequests
    public let depth: Int
    let heads: UnsafeMutableBufferPointer<UInt16>
    /// Slot of each head (-1: not one of ours) and each slot's submit time (0: not in flight).
    let slotOf: UnsafeMutableBufferPointer<Int32>
    let started: UnsafeMutableBufferPointer<UInt64>
    public let histogram = LatencyHistogram()
    public private(set) var completed = 0, errors = 0, bytes = 0, unexpected = 0, outstanding = 0
    public private(set) var broken = false

    public init(q: SimQueue, requests: DepthRequests) {
        self.q = q
        self.requests = requests
        let hs = requests.heads
        depth = hs.count
        heads = .allocate(capacity: Swift.max(1, depth))
        _ = heads.initialize(from: hs)
        slotOf = .allocate(capacity: Int(q.size))
        slotOf.initialize(repeating: -1)
        for (i, h) in hs.enumerated() { slotOf[Int(h)] = Int32(i) }
        started = .allocate(capacity: Swift.max(1, depth))
        started.initialize(repeating: 0)
    }
    deinit { heads.deallocate(); slotOf.deallocate(); started.deallocate() }

    /// Zeroes the counters and the histogram (after a warm-up).
    public func resetCounters() {
        completed = 0; errors = 0; bytes = 0; unexpected = 0
        histogram.reset()
    }

    @inline(__always)
    private func issue(_ i: Int, now: UInt64) {
        requests.prepare(i)
        started[i] = now
        q.pushAvail(heads[i])
        outstanding += 1
    }

    /// Runs until `count` requests were issued (count > 0), or until `deadlineNs` (lb_now_ns) passed (count == 0),
    /// then waits for the ones in flight. Returns the wall time in ns; the counters accumulate.
    public func run(count: Int, deadlineNs: UInt64 = 0, spinNs: UInt64, timeoutMs: Int32 = 2000) -> UInt64 {
        guard !broken else { return 0 }
        let t0 = lb_now_ns()
        var issued = 0
        var old = q.availIdx
        for i in 0..<depth where count > 0 ? issued < count : t0 < deadlineNs { issue(i, now: t0); issued += 1 }
        q.publish(); q.kickIfNeeded(old: old)
        while outstanding > 0 {
            guard var u = q.waitUsed(timeoutMs: timeoutMs, spinNs: spinNs) else { broken = true; break }
            let now = lb_now_ns()
            old = q.availIdx
            while true {
                let id = Int(u.id)
                let s = id < Int(q.size) ? Int(slotOf[id]) : -1
                if s >= 0 && started[s] != 0 {
                    histogram.record(now &- started[s])
                    started[s] = 0
                    outstanding -= 1
                    completed += 1
                    let b = requests.complete(s, len: u.len)
                    if b < 0 { errors += 1 } else { bytes += b }
                    if count > 0 ? issued < count : now < deadlineNs { issue(s, now: now); issued += 1 }
                } else {
                    unexpected += 1
                }
                guard let n = q.reap() else { break }
                u = n
            }
            if q.availIdx != old { q.publish(); q.kickIfNeeded(old: old) }
        }
        return lb_now_ns() &- t0
    }
}
