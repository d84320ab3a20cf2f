import Glibc
import CLinux

/// What a driver side learns about a device before negotiating.
public struct DeviceInfo: Sendable {
    public var deviceID: UInt32
    public var features: VirtioFeatures
    public var queueMaxSizes: [UInt16]
    public var configSize: Int
}

/// The uniform per-device counters (requests, bytes, errors, in flight), summed over the device's queues.
public struct DeviceStats: Sendable, Equatable {
    public var requests: UInt64 = 0
    public var bytesWritten: UInt64 = 0
    /// Queues latched broken since the device was added.
    public var errors: UInt64 = 0
    public var inFlight: UInt64 = 0
}

/// One queue as the control socket shows it (`loopbackd ctl status`).
public struct QueueState: Sendable, Equatable {
    public var size: UInt16
    /// Next avail position the device consumes; the driver's `avail.idx`; the next used position.
    public var lastAvail: UInt16
    public var availIdx: UInt16
    public var used: UInt16
    public var inFlight: UInt64
    /// Why the queue is latched broken (the device then has NEEDS_RESET), nil while healthy.
    public var fault: String?
}

/// Per-device histogram of the loop time a queue run takes (kick or poll → chains taken and processed; for an
/// asynchronous device such as blk: submitted), in log2 buckets of `lb_ticks` (bucket k: [2^k, 2^(k+1)) ticks).
public struct LatencyHistogram: Sendable, Equatable {
    public static let buckets = 32
    public var counts: [UInt64]
    /// Nanoseconds per tick, measured against CLOCK_MONOTONIC since the host started.
    public var nsPerTick: Double
    /// Upper bound of bucket `k` in nanoseconds.
    public func upperNs(_ k: Int) -> Double { Double(UInt64(1) << UInt64(k + 1)) * nsPerTick }
    public var total: UInt64 { counts.reduce(0, &+) }
}

/// A driver side that wants to hear about device-side events it must forward (virtio-lo, vhost-user).
public protocol DeviceHostObserver: AnyObject {
    /// A queue was latched broken: the device status now has NEEDS_RESET.
    func deviceNeedsReset(_ index: Int)
}

/// Runs device bodies on one event loop and turns driver-side events into device calls. Every driver side (the
/// simulated driver, the kernel link, the vhost-user backend server) produces the same events: device added,
/// features negotiated, queues ready (DRIVER_OK), kick, config access, reset.
/// All methods except `init` run on the loop thread (driver sides on other threads use `loop.executeAndWait`).
public final class DeviceHost: EventHandler, Poller, DeferredWork {
    public let loop: EventLoop
    private var slots: [Slot] = []
    public weak var observer: DeviceHostObserver?

    final class Slot {
        let name: String
        let device: VirtioDevice
        var status: UInt8 = 0
        var features: VirtioFeatures = []
        var queues: UnsafeMutablePointer<SplitQueue>?
        var queueCount = 0
        var kickFDs: [Int32] = []
        var registrations: [Int] = []
        var memory: GuestMemory?
        var configInterrupt: Notifier = .none
        /// Counters of queues already freed (a reset), plus faults.
        var retired = DeviceStats()
        init(name: String, device: VirtioDevice) { self.name = name; self.device = device }
    }

    /// What a kick or a poll needs, in plain memory with an unowned(unsafe) device reference: the per-request path
    /// does no retain/release (`slots` owns the devices). Written only on the loop thread at add/activate/reset.
    struct HotSlot {
        var device: Unmanaged<DeviceTrampoline>
        var queues: UnsafeMutablePointer<SplitQueue>?
        var queueCount: Int
        var kickFDs: UnsafeMutablePointer<Int32>?
        var passthrough: Bool
        /// This device's `LatencyHistogram.buckets` counters (in `latency`).
        var latency: UnsafeMutablePointer<UInt64>
    }
    public static let maxDevices = 1024
    private let hot = UnsafeMutablePointer<HotSlot>.allocate(capacity: DeviceHost.maxDevices)
    private var trampolines: [DeviceTrampoline] = []
    /// Queue-run time histograms, `LatencyHistogram.buckets` per device index (pages touched only when used).
    private let latency = UnsafeMutablePointer<UInt64>.allocate(capacity: DeviceHost.maxDevices * LatencyHistogram.buckets)
    /// Indices of removed devices, reused by `add`.
    private var freeIndices: [Int] = []
    /// Tick/clock pair at start, for `nsPerTick`.
    private let origin = (ticks: lb_ticks(), ns: lb_now_ns())

    /// Queues that stopped at their per-turn budget, as device << 16 | queue; run again next loop turn.
    /// Two arrays swapped per turn, capacity kept: no allocation once warm.
    private var deferred: [UInt32] = []
    private var deferredRunning: [UInt32] = []

    public init(loop: EventLoop) {
        self.loop = loop
        deferred.reserveCapacity(64)
        deferredRunning.reserveCapacity(64)
        loop.addPoller(self)
        loop.addDeferredWork(self)
    }

    deinit {
        for i in slots.indices { hot[i].kickFDs?.deallocate() }
        hot.deinitialize(count: slots.count)
        hot.deallocate()
        latency.deallocate()
    }

    /// Adds a device; returns its index (the token the driver side uses).
    /// The index of a removed device is reused.
    public func add(name: String, device: VirtioDevice) -> Int {
        let t = DeviceTrampoline.make(device)
        if let i = freeIndices.popLast() {
            trampolines[i] = t
            hot[i].device = .passUnretained(t)
            hot[i].latency.update(repeating: 0, count: LatencyHistogram.buckets)
            slots[i] = Slot(name: name, device: device)
            return i
        }
        precondition(slots.count < DeviceHost.maxDevices, "more than \(DeviceHost.maxDevices) devices on one host")
        trampolines.append(t)
        let hist = latency + slots.count * LatencyHistogram.buckets
        hist.initialize(repeating: 0, count: LatencyHistogram.buckets)
        (hot + slots.count).initialize(to: HotSlot(device: .passUnretained(t), queues: nil, queueCount: 0, kickFDs: nil,
                                                   passthrough: false, latency: hist))
        slots.append(Slot(name: name, device: device))
        return slots.count - 1
    }

    /// Removes device `i` for good (live remove, reload): completes its in-flight requests, resets it and releases
    /// the body; a later `add` may reuse the index. The driver side must have let go of it first. Returns the
    /// durable part of its flush (`VirtioDevice.flushForRemoval`) for the caller to run off the loop.
    @discardableResult
    public func remove(_ i: Int) -> (@Sendable () -> Void)? {
        guard i < slots.count, !freeIndices.contains(i) else { return nil }
        let durable = slots[i].device.flushForRemoval()
        reset(i)
        let gone = RemovedDevice()
        let t = DeviceTrampoline.make(gone)
        trampolines[i] = t
        hot[i].device = .passUnretained(t)
        hot[i].kickFDs?.deallocate()
        hot[i].kickFDs = nil
        slots[i] = Slot(name: "", device: gone)
        freeIndices.append(i)
        return durable
    }
    /// True for the index of a removed device (not reused yet).
    public func isRemoved(_ i: Int) -> Bool { freeIndices.contains(i) }

    /// The driver's accepted features (empty before FEATURES_OK and after a reset).
    public func features(_ i: Int) -> VirtioFeatures { slots[i].features }

    /// Every queue of a running device (empty while stopped).
    public func queueStates(_ i: Int) -> [QueueState] {
        guard i < slots.count, let q = slots[i].queues else { return [] }
        return (0..<slots[i].queueCount).map { n in
            QueueState(size: q[n].size, lastAvail: q[n].lastAvail, availIdx: q[n].availIdx, used: q[n].nextUsed,
                       inFlight: q[n].taken &- q[n].completed, fault: q[n].fault?.rawValue)
        }
    }

    /// The queue-run time histogram of device `i`.
    public func latencyHistogram(_ i: Int) -> LatencyHistogram {
        let h = hot[i].latency
        let counts = (0..<LatencyHistogram.buckets).map { h[$0] }
        var dt = lb_ticks() &- origin.ticks, dn = lb_now_ns() &- origin.ns
        if dn < 1_000_000 {   // too early for a good ratio: measure over 1 ms
            let t0 = lb_ticks(), n0 = lb_now_ns()
            while lb_now_ns() &- n0 < 1_000_000 {}
            dt = lb_ticks() &- t0; dn = lb_now_ns() &- n0
        }
        return LatencyHistogram(counts: counts, nsPerTick: dt == 0 ? 1 : Double(dn) / Double(dt))
    }

    public var count: Int { slots.count }
    public func name(_ i: Int) -> String { slots[i].name }
    public func device(_ i: Int) -> VirtioDevice { slots[i].device }
    public func status(_ i: Int) -> UInt8 { slots[i].status }
    public func isActive(_ i: Int) -> Bool { slots[i].queues != nil }
    /// The next avail position queue `q` of device `i` will consume (chains taken so far), if it runs.
    public func lastAvail(_ i: Int, _ q: Int) -> UInt16? {
        guard i < slots.count, let queues = slots[i].queues, q < slots[i].queueCount else { return nil }
        return queues[q].lastAvail
    }

    /// Heads queue `q` will take again before its ring (in-flight record recovered at a resume).
    public func replayCount(_ i: Int, _ q: Int) -> Int {
        guard i < slots.count, let queues = slots[i].queues, q < slots[i].queueCount else { return 0 }
        return queues[q].replayCount
    }

    /// Requests, bytes and errors so far; requests in flight now.
    public func stats(_ i: Int) -> DeviceStats {
        let s = slots[i]
        var t = s.retired
        if let q = s.queues {
            for n in 0..<s.queueCount {
                t.requests &+= q[n].taken
                t.bytesWritten &+= q[n].bytesWritten
                t.inFlight &+= q[n].taken &- q[n].completed
            }
        }
        return t
    }

    public func info(_ i: Int) -> DeviceInfo {
        let d = slots[i].device
        let offered = VirtioFeatures(rawValue: d.offeredFeatures.rawValue
            & (VirtioFeatures.deviceSpecificMask.rawValue | VirtioFeatures.transportSupported.rawValue))
        return DeviceInfo(deviceID: d.deviceID, features: offered, queueMaxSizes: d.queueMaxSizes, configSize: d.configSize)
    }

    /// The driver's features. Bits we did not offer are a driver error: FEATURES_OK is refused (returns false).
    public func setFeatures(_ i: Int, _ f: VirtioFeatures) -> Bool {
        let s = slots[i]
        guard s.queues == nil else { return false }
        let offered = info(i).features
        guard f.isSubset(of: offered) else {
            Log.warning("\(s.name): driver accepted features \(hex(f.rawValue)) not offered (\(hex(offered.rawValue)))")
            return false
        }
        s.features = f
        s.device.ackFeatures(f)
        s.status |= DeviceStatus.featuresOK
        return true
    }

    /// Config space access; false if the range is outside the config space.
    public func readConfig(_ i: Int, offset: Int, into b: UnsafeMutableRawBufferPointer) -> Bool {
        let d = slots[i].device
        guard offset >= 0, offset <= d.configSize, b.count <= d.configSize - offset else { return false }
        d.readConfig(offset: offset, into: b)
        return true
    }
    public func writeConfig(_ i: Int, offset: Int, from b: UnsafeRawBufferPointer) -> Bool {
        let d = slots[i].device
        guard offset >= 0, offset <= d.configSize, b.count <= d.configSize - offset else { return false }
        d.writeConfig(offset: offset, from: b)
        return true
    }

    /// DRIVER_OK: builds the queues (validating each ring), registers the kick fds, activates the device.
    /// The host takes ownership of `kickFDs` (closed at reset), even on failure. A kick fd of -1 means the driver
    /// side delivers kicks with `kick(_:_:)` instead.
    public func activate(_ i: Int, queues configs: [QueueConfig], kickFDs: [Int32], interrupts: [Notifier],
                         configInterrupt: Notifier, memory: GuestMemory,
                         lastAvail: [UInt16]? = nil, usedFromRing: Bool = false,
                         inflightLogs: [UnsafeMutableRawPointer]? = nil) throws(DeviceError) {
        let s = slots[i]
        if s.queues != nil { reset(i) }
        s.kickFDs = kickFDs
        s.memory = memory
        s.configInterrupt = configInterrupt
        let maxes = s.device.queueMaxSizes
        guard configs.count <= maxes.count, configs.count == kickFDs.count, configs.count == interrupts.count else {
            closeKicks(s)
            throw DeviceError("\(s.name): \(configs.count) queues set up, device has \(maxes.count)")
        }
        let passthrough = s.device.passthroughRings
        let q = UnsafeMutablePointer<SplitQueue>.allocate(capacity: max(configs.count, 1))
        for (n, c) in configs.enumerated() {
            do {
                // Passthrough rings are only validated here; the queue never writes them (usedFromRing).
                let queue = try SplitQueue(config: c, maxSize: maxes[n], memory: memory.view, features: s.features,
                                           interrupt: interrupts[n], lastAvail: lastAvail?[n] ?? 0,
                                           usedFromRing: usedFromRing || passthrough)
                (q + n).initialize(to: queue)
                // In-flight record (VDUSE): a resumed queue (usedFromRing) takes its position and replays from it.
                if let logs = inflightLogs, n < logs.count { q[n].attachInflightLog(logs[n], resume: usedFromRing) }
            } catch {
                q.deinitialize(count: n)
                q.deallocate()
                closeKicks(s)
                throw DeviceError("\(s.name): queue \(n): \(error.rawValue)")
            }
        }
        // Activated inside a poll window (found by bench: one run in two had the driver kick every request while the
        // loop polled): the window's `setPolling(true)` ran before these queues existed.
        if loop.isPolling && !passthrough {
            for n in 0..<configs.count { q[n].polling = true; q[n].disableNotifications() }
        }
        s.queues = q
        s.queueCount = configs.count
        let kicks = UnsafeMutablePointer<Int32>.allocate(capacity: max(kickFDs.count, 1))
        kicks.initialize(from: kickFDs, count: kickFDs.count)
        hot[i].kickFDs?.deallocate()
        hot[i].kickFDs = kicks
        hot[i].queues = q
        hot[i].queueCount = configs.count
        hot[i].passthrough = passthrough
        // One registration per queue (-1: none), so `registrations[n]` is queue n's.
        for (n, fd) in kickFDs.enumerated() {
            guard fd >= 0 && !passthrough else { s.registrations.append(-1); continue }
            // Edge-triggered: every eventfd write (a kick) wakes epoll again, so the counter need not be read back
            // (one system call less per kick); epoll_ctl ADD reports a kick that came before it.
            do { s.registrations.append(try loop.register(fd: fd, events: UInt32(LB_EPOLLIN) | LB_EPOLLET, handler: self,
                                                          token: UInt32(i) << 16 | UInt32(n))) } catch {
                reset(i)
                throw DeviceError("\(s.name): cannot watch kick fd: \(error)")
            }
        }
        do {
            try s.device.activate(DeviceContext(queues: q, queueCount: configs.count, memory: memory.view, loop: loop,
                                                configInterrupt: configInterrupt, features: s.features,
                                                faults: FaultReporter(host: self, index: i),
                                                kickFDs: passthrough ? kickFDs : []))
        } catch {
            reset(i)
            throw error
        }
        s.status |= DeviceStatus.driverOK
        // Chains the driver made available before we watched its kicks must not be lost.
        if !passthrough { for n in 0..<configs.count where q[n].hasAvailable { kick(i, n) } }
    }

    // MARK: one queue at a time

    public func supportsQueueRestart(_ i: Int) -> Bool { slots[i].device.supportsQueueRestart }

    /// Stops queue `q` of a running device that supports it: the device completes what it took from the queue,
    /// the kick fd is closed. Returns the queue's next avail index (where it restarts), nil if it cannot.
    public func stopQueue(_ i: Int, _ q: Int) -> UInt16? {
        let s = slots[i]
        guard let queues = s.queues, q < s.queueCount, s.device.supportsQueueRestart else { return nil }
        if queues[q].stopped { return queues[q].lastAvail }
        s.device.stopQueue(q)
        if q < s.registrations.count, q < s.kickFDs.count, s.registrations[q] >= 0 {
            loop.unregister(fd: s.kickFDs[q], registration: s.registrations[q])
            s.registrations[q] = -1
        }
        if q < s.kickFDs.count {
            FD.close(s.kickFDs[q])
            s.kickFDs[q] = -1
            hot[i].kickFDs?[q] = -1
        }
        queues[q].stopped = true
        return queues[q].lastAvail
    }

    /// Rebuilds stopped queue `q` from `config` (validated like at DRIVER_OK) and starts it again; the host takes
    /// ownership of `kickFD` (-1: kicks come through `kick`), even when it throws (the queue then stays stopped).
    public func startQueue(_ i: Int, _ q: Int, config: QueueConfig, kickFD: Int32, interrupt: Notifier,
                           lastAvail: UInt16, usedFromRing: Bool) throws(DeviceError) {
        let s = slots[i]
        guard let queues = s.queues, q < s.queueCount, queues[q].stopped, let mem = s.memory else {
            FD.close(kickFD)
            throw DeviceError("\(s.name): queue \(q) is not stopped")
        }
        let fresh: SplitQueue
        do {
            fresh = try SplitQueue(config: config, maxSize: s.device.queueMaxSizes[q], memory: mem.view, features: s.features,
                                   interrupt: interrupt, lastAvail: lastAvail, usedFromRing: usedFromRing)
        } catch {
            FD.close(kickFD)
            throw DeviceError("\(s.name): queue \(q): \(error.rawValue)")
        }
        (queues + q).deinitialize(count: 1)
        (queues + q).initialize(to: fresh)
        if loop.isPolling && !hot[i].passthrough { queues[q].polling = true; queues[q].disableNotifications() }
        if q < s.kickFDs.count { s.kickFDs[q] = kickFD; hot[i].kickFDs?[q] = kickFD }
        if kickFD >= 0 && q < s.registrations.count {
            do { s.registrations[q] = try loop.register(fd: kickFD, events: UInt32(LB_EPOLLIN) | LB_EPOLLET, handler: self,
                                                          token: UInt32(i) << 16 | UInt32(q)) } catch {   // edge-triggered, as in `activate`
                queues[q].stopped = true
                throw DeviceError("\(s.name): cannot watch kick fd: \(error)")
            }
        }
        s.device.startQueue(q)
        if queues[q].hasAvailable { kick(i, q) }
    }

    /// A kick for queue `q` of device `i` (from a kick fd or a driver side without fds).
    @inline(__always)
    public func kick(_ i: Int, _ q: Int) {
        guard i < slots.count, let queues = hot[i].queues, q < hot[i].queueCount else { return }
        // Timed with the cycle counter (a few ns, no allocation); a run that took nothing is not counted.
        let taken = queues[q].taken, t0 = lb_ticks()
        hot[i].device.queueNotified(q)
        if queues[q].taken != taken {
            let dt = lb_ticks() &- t0
            hot[i].latency[min(63 &- (dt | 1).leadingZeroBitCount, LatencyHistogram.buckets &- 1)] &+= 1
        }
        if queues[q].faultPending { latched(i, q) }
        if queues[q].yielded { deferQueue(i, q) }
    }

    /// The queue stopped at its budget with chains left: run it again after the loop served the other fds.
    private func deferQueue(_ i: Int, _ q: Int) {
        guard let queues = hot[i].queues else { return }
        queues[q].yielded = false
        if !queues[q].scheduled {
            queues[q].scheduled = true
            deferred.append(UInt32(i) << 16 | UInt32(q))
        }
        loop.requestDeferredTurn()
    }

    public func runDeferred() {
        swap(&deferred, &deferredRunning)
        for t in deferredRunning {
            let i = Int(t >> 16), q = Int(t & 0xffff)
            // The device may have been reset since (its queues are new or gone).
            guard i < slots.count, let queues = hot[i].queues, q < hot[i].queueCount, queues[q].scheduled else { continue }
            queues[q].scheduled = false
            kick(i, q)
        }
        deferredRunning.removeAll(keepingCapacity: true)
    }

    /// A device asks for another `queueNotified` on a later turn (see `FaultReporter.again`).
    func requeue(_ i: Int, _ q: Int) {
        guard i < slots.count, hot[i].queues != nil, q < hot[i].queueCount else { return }
        deferQueue(i, q)
    }

    /// A device reports a fault latched outside `kick` (see `FaultReporter`).
    public func queueFaulted(_ i: Int, _ q: Int) {
        guard i < slots.count, let queues = slots[i].queues, q < slots[i].queueCount, queues[q].faultPending else { return }
        latched(i, q)
    }

    public func handleEvent(token: UInt32, events: UInt32) {
        let i = Int(token >> 16), q = Int(token & 0xffff)
        guard i < slots.count, q < hot[i].queueCount, hot[i].kickFDs != nil else { return }
        if events & UInt32(LB_EPOLLERR | LB_EPOLLHUP) != 0 {
            // Hang-up or error never goes away (level-triggered): stop watching the fd, or the loop would spin on
            // it; the queue can no longer be kicked, so it is latched (NEEDS_RESET) until the driver resets.
            kickFailed(i, q)
            return
        }
        // Edge-triggered (see `activate`): no read of the counter; the queue's own budget bounds the work, and a
        // queue that stops at its budget is requeued by the host, not by the fd staying readable.
        kick(i, q)
    }

    private func kickFailed(_ i: Int, _ q: Int) {
        let s = slots[i]
        if q < s.registrations.count, q < s.kickFDs.count, s.registrations[q] >= 0 {
            loop.unregister(fd: s.kickFDs[q], registration: s.registrations[q])
            s.registrations[q] = -1
        }
        guard let queues = s.queues else { return }
        queues[q].latch(.kickBroken)
        if queues[q].faultPending { latched(i, q) }
    }

    /// A queue broke: NEEDS_RESET plus a config interrupt (virtio 1.2 §2.1.2), logged once.
    private func latched(_ i: Int, _ q: Int) {
        let s = slots[i]
        guard let queues = s.queues else { return }
        queues[q].faultPending = false
        s.retired.errors &+= 1
        Log.error("\(s.name): queue \(q) broken: \(queues[q].fault?.rawValue ?? "?"); device needs reset")
        s.status |= DeviceStatus.needsReset
        s.configInterrupt.signal()
        observer?.deviceNeedsReset(i)
    }

    /// Driver reset (status 0), driver gone, or shutdown: the device stops, queues are freed, kicks unwatched.
    public func reset(_ i: Int) {
        let s = slots[i]
        if s.queues != nil { s.device.reset() }
        for (n, r) in s.registrations.enumerated() where n < s.kickFDs.count && r >= 0 {
            loop.unregister(fd: s.kickFDs[n], registration: r)
        }
        s.registrations = []
        closeKicks(s)
        hot[i].queues = nil
        hot[i].queueCount = 0
        hot[i].passthrough = false
        if let q = s.queues {
            for n in 0..<s.queueCount {
                s.retired.requests &+= q[n].taken
                s.retired.bytesWritten &+= q[n].bytesWritten
            }
            q.deinitialize(count: s.queueCount)
            q.deallocate()
        }
        s.queues = nil
        s.queueCount = 0
        s.memory = nil
        s.status = 0
        s.features = []
        s.configInterrupt = .none
    }

    private func closeKicks(_ s: Slot) {
        for fd in s.kickFDs where fd >= 0 { FD.close(fd) }
        s.kickFDs = []
    }

    /// SIGTERM: complete in-flight requests, flush files, stop every device.
    public func shutdown() {
        for i in slots.indices {
            slots[i].device.flush()
            reset(i)
        }
    }

    // MARK: Poller

    public func poll() -> Bool {
        var worked = false
        for i in 0..<slots.count {
            guard let q = hot[i].queues, !hot[i].passthrough else { continue }
            for n in 0..<hot[i].queueCount where q[n].hasAvailable {
                kick(i, n)
                worked = true
            }
        }
        return worked
    }

    public func setPolling(_ on: Bool) {
        for i in 0..<slots.count {
            guard let q = hot[i].queues, !hot[i].passthrough else { continue }
            for n in 0..<hot[i].queueCount {
                q[n].polling = on
                if on { q[n].disableNotifications() } else if q[n].enableNotifications() { kick(i, n) }
            }
        }
    }
}

/// What a removed device's index holds until `add` reuses it: a device with nothing.
private final class RemovedDevice: VirtioDevice {
    var deviceID: UInt32 { 0 }
    var queueMaxSizes: [UInt16] { [] }
    var offeredFeatures: VirtioFeatures { [] }
    func ackFeatures(_ features: VirtioFeatures) {}
    var configSize: Int { 0 }
    func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {}
    func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) {}
    func activate(_ context: DeviceContext) throws(DeviceError) { throw DeviceError("removed device") }
    func queueNotified(_ index: Int) {}
    func reset() {}
}

func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
