/// What a device body gets when the driver sets DRIVER_OK: its queues (owned by the host, valid until `reset`),
/// the driver's memory, the loop it runs on, its config interrupt and the negotiated features.
public struct DeviceContext {
    public let queues: UnsafeMutablePointer<SplitQueue>
    public let queueCount: Int
    public let memory: MemoryView
    public let loop: EventLoop
    public let configInterrupt: Notifier
    public let features: VirtioFeatures
    /// For devices that pop chains outside `queueNotified` (e.g. after I/O completions): report a latched fault.
    public let faults: FaultReporter
    /// For `passthroughRings` devices: the driver side's kick eventfds (owned by the host; dup to keep).
    public let kickFDs: [Int32]
    public init(queues: UnsafeMutablePointer<SplitQueue>, queueCount: Int, memory: MemoryView, loop: EventLoop,
                configInterrupt: Notifier, features: VirtioFeatures, faults: FaultReporter = .none, kickFDs: [Int32] = []) {
        self.queues = queues; self.queueCount = queueCount; self.memory = memory; self.loop = loop
        self.configInterrupt = configInterrupt; self.features = features; self.faults = faults; self.kickFDs = kickFDs
    }
}

/// Lets a device tell its host that a queue just latched a fault (NEEDS_RESET + config interrupt). The host checks
/// after every kick itself; this covers chains a device pops from its own event handlers.
public struct FaultReporter {
    unowned(unsafe) let host: DeviceHost?
    let index: Int
    public static var none: FaultReporter { FaultReporter(host: nil, index: 0) }
    init(host: DeviceHost?, index: Int) { self.host = host; self.index = index }
    /// Call when `queues[q].faultPending` is set.
    public func report(queue q: Int) { host?.queueFaulted(index, q) }
    /// Runs `queueNotified(q)` again on a later loop turn: for a device that stopped at its per-turn budget
    /// outside `queueNotified` (e.g. output resumed by a host fd becoming writable). No allocation.
    public func again(queue q: Int) { host?.requeue(index, q) }
}

public struct DeviceError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

/// A virtio device body, written once and hosted by every driver side: the simulated driver, the kernel module
/// link, and the vhost-user backend server (crosvm's `VirtioDevice`/`VhostUserDevice` sharing one body).
/// All methods run on the host's event-loop thread.
public protocol VirtioDevice: AnyObject {
    /// Virtio device id (virtio 1.2 §5).
    var deviceID: UInt32 { get }
    /// One entry per queue: the largest ring size the device accepts.
    var queueMaxSizes: [UInt16] { get }
    /// Offered features, device-specific bits plus the transport bits the device wants.
    var offeredFeatures: VirtioFeatures { get }
    /// The driver's accepted subset (already masked to what was offered).
    func ackFeatures(_ features: VirtioFeatures)
    /// Size of the device's config space in bytes.
    var configSize: Int { get }
    /// Reads config bytes `[offset, offset+buffer.count)`; the host has checked the range.
    func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer)
    /// The driver wrote config bytes; the host has checked the range.
    func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer)
    /// The driver set DRIVER_OK: start serving the queues.
    func activate(_ context: DeviceContext) throws(DeviceError)
    /// The driver kicked queue `index` (or the host polls it): process what is available.
    func queueNotified(_ index: Int)
    /// Stop all I/O: wait for or cancel in-flight requests and forget the queues (they are freed after this).
    /// Completions of requests still in flight are not posted: the driver reset its rings.
    func reset()
    /// Complete every in-flight request into the used rings now. A vhost-user backend stopping a ring
    /// (GET_VRING_BASE on a VM pause, a new kick fd, a disconnect) must leave the used ring consistent with the base
    /// it reports, or a request counted in that base never completes and the guest hangs (QEMU stop/cont test).
    func quiesce()
    /// True for a device whose rings are served by another process (the vhost-user frontend): the host then
    /// neither watches the kick fds (they go to the device in `DeviceContext.kickFDs`, to hand to the backend),
    /// nor polls or writes the rings. The data path then bypasses loopbackd entirely.
    var passthroughRings: Bool { get }
    /// Flush buffered data to stable storage (SIGTERM, driver gone). Called before `reset`, so an asynchronous
    /// device first completes its in-flight requests (their writes must be covered by the flush).
    func flush()
    /// Live remove or reload (on the loop): like `flush`, but the slow durable part (fdatasync of a blk image) is
    /// returned for the caller to run off the loop thread, so one device's flush to slow storage (an SD card) never
    /// stalls the other devices of the process. In-flight requests are completed before it returns, as for `flush`.
    /// nil: nothing left to do. Exit paths call `flush` (the loop has nobody left to serve).
    func flushForRemoval() -> (@Sendable () -> Void)?
    /// Queue-level stop and start (crosvm's `stop_queue`/`start_queue`): true if the device can have one queue
    /// stopped and started again while the others run (a vhost-user front-end re-programming one ring: GET_VRING_BASE,
    /// a new kick fd), instead of a whole-device reset that would end a vsock connection or a sound stream.
    var supportsQueueRestart: Bool { get }
    /// Stop using queue `index`: complete (or give back) the chains taken from it; its memory is freed after this.
    func stopQueue(_ index: Int)
    /// Queue `index` (in the context's queue array) was rebuilt and runs again.
    func startQueue(_ index: Int)
    /// True if what the driver reads from the config space depends on what it wrote just before (virtio-input:
    /// select/subsel, then size and the union). A driver side that keeps its own copy of the config space (the
    /// kernel module) must then pass each config write to the device and wait for the answer (the module's
    /// SYNC_CONFIG extension) instead of answering reads from its copy.
    var configReadsDependOnWrites: Bool { get }
    /// True if the driver's interrupt handler may wait for this device: a kernel driver side must then raise used
    /// buffer interrupts from a kernel thread (the module's irqfd extension) rather than in the device thread (the
    /// KICK ioctl). virtio_console: the receive interrupt runs hvc_poll, which takes the hvc lock that a writer
    /// holds while it spins until we complete its chain. Raised in our thread, the loop spins in the kernel on that
    /// lock and never completes the chain (a soft lockup; holding input back while output is outstanding narrows
    /// the window but cannot close it: the writer can start right after the check).
    var interruptsMayWaitForDevice: Bool { get }
    /// Restricted memory (kernel link): every buffer of a request is bounced through the device's pool, so one
    /// request larger than the pool can never be mapped and the driver retries it for ever (virtio_blk: a request
    /// is up to seg_max segments of up to 256 KiB, the pool's largest mapping, and Linux 7.x builds requests of up to
    /// 4 MiB). Called before the driver sees the config: a device whose requests can be that large offers less, so
    /// that one request needs at most `bytes`. Default: nothing to limit.
    func limitRequestBytes(_ bytes: Int)
}

extension VirtioDevice {
    public func limitRequestBytes(_ bytes: Int) {}
    public var supportsQueueRestart: Bool { false }
    public func stopQueue(_ index: Int) {}
    public func startQueue(_ index: Int) {}
    public func flush() {}
    public func flushForRemoval() -> (@Sendable () -> Void)? { flush(); return nil }
    /// Devices that complete every request inside `queueNotified` have nothing in flight.
    public func quiesce() {}
    public var passthroughRings: Bool { false }
    public var configReadsDependOnWrites: Bool { false }
    public var interruptsMayWaitForDevice: Bool { false }
}
