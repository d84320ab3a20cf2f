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

