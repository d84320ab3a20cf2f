import Glibc
import Synchronization
import CLinux

/// Something that owns fds in the loop. `token` is the value given at registration.
public protocol EventHandler: AnyObject {
    func handleEvent(token: UInt32, events: UInt32)
}

/// Something the loop busy-polls during the poll window (swift-nio SelectorEpoll + cloud-hypervisor's 50 µs poll).
public protocol Poller: AnyObject {
    /// Process whatever is ready; return true if there was work.
    func poll() -> Bool
    /// Entering (true) or leaving (false) the poll window: a queue keeps driver kicks disabled while polled and
    /// re-enables them (with the re-check) when the window ends.
    func setPolling(_ on: Bool)
}

/// Work that stopped at its per-turn budget (a queue the driver keeps topped up, vhost-net CVE-2019-3900's
/// class): the loop calls `runDeferred` once per turn, after dispatching every fd that became ready meanwhile, so
/// one busy device or peer cannot hold the thread that serves all the others.
public protocol DeferredWork: AnyObject {
    func runDeferred()
}

/// One epoll thread that owns all fds of the devices it serves (principle 8). Only `execute`, `executeAndWait`
/// and `stop` may be called from other threads; everything else runs on the loop thread.
public final class EventLoop: @unchecked Sendable {
    private let epfd: OwnedFD
    private let wakeFD: OwnedFD
    // Registration slots; epoll's u64 data = slot << 40 | generation << 32 | token. The generation (bumped when a
    // slot is reused) keeps an event already fetched for an unregistered fd from reaching the slot's new owner.
    private var handlers: [EventHandler?] = []      // owns the handlers (strong)
    private var trampolines: [EventTrampoline?] = []
    private var generations: [UInt8] = []
    private var alive: [Bool] = []
    private var freeSlots: [Int] = []
    private var pollers: [Poller] = []              // owns the pollers (strong)
    private var pollTrampolines: [PollTrampoline] = []
    // Hot-path tables in plain memory with unretained trampolines (System/Unretained.swift): dispatch and polling
    // do no retain/release per event. Fixed capacity, so the pointers never move.
    public static let maxRegistrations = 16384
    private let hotHandlers = UnsafeMutablePointer<Unmanaged<EventTrampoline>>.allocate(capacity: EventLoop.maxRegistrations)
    private let hotPollers = UnsafeMutablePointer<Unmanaged<PollTrampoline>>.allocate(capacity: 16)
    private var hotPollerCount = 0
    private var deferredRunners: [DeferredWork] = []   // owns them (strong)
    private var deferredTrampolines: [DeferredTrampoline] = []
    private let hotDeferred = UnsafeMutablePointer<Unmanaged<DeferredTrampoline>>.allocate(capacity: 16)
    private var hotDeferredCount = 0
    /// Set (loop thread) by `requestDeferredTurn`: the next epoll_wait does not sleep.
    private var deferredPending = false
    private let pending = Mutex<[@Sendable () -> Void]>([])
    private let running = Atomic<Bool>(false)
    private let stopRequested = Atomic<Bool>(false)
    private var loopThread: pthread_t?
    private var threadID: Int32 = 0
    /// Busy-poll window in nanoseconds (0 = off): how long the loop keeps polling after the last work.
    public var pollWindowNs: UInt64
    /// How often the loop entered a poll window (each entry re-arms driver kicks when it ends).
    public private(set) var pollWindows = 0
    /// Loop thread: inside a poll window now. Queues created meanwhile (a device activated while the loop polls
    /// others) must start polled too (`DeviceHost`), or they re-enable kicks after every drain for the whole window.
    public private(set) var isPolling = false

    public init(pollMicroseconds: Int = 0) throws(Errno) {
        epfd = OwnedFD(adopting: try syscall { lb_epoll_create() })
        wakeFD = try FD.eventfd()
        pollWindowNs = UInt64(pollMicroseconds) * 1000
        _ = try syscall { lb_epoll_ctl(epfd.raw, Int32(LB_EPOLL_CTL_ADD), wakeFD.raw, UInt32(LB_EPOLLIN), UInt64.max) }
    }

    public var isLoopThread: Bool { threadID != 0 && lb_gettid() == threadID }
    /// The loop thread's Linux thread id while it runs (0 otherwise): for its CPU time in /proc (bench).
    public var loopThreadID: Int32 { threadID }

    // MARK: registration (loop thread)

    /// Registers `fd` for `events` (EPOLLIN by default); returns a registration id for `unregister`.
    @discardableResult
    public func register(fd: Int32, events: UInt32 = UInt32(LB_EPOLLIN), handler: EventHandler, token: UInt32) throws(Errno) -> Int {
        let slot: Int
        if freeSlots.isEmpty && handlers.count == EventLoop.maxRegistrations { throw Errno(EMFILE) }
        let t = EventTrampoline.make(handler)
        if let s = freeSlots.popLast() { slot = s; handlers[s] = handler; trampolines[s] = t; generations[s] &+= 1; alive[s] = true }
        else { slot = handlers.count; handlers.append(handler); trampolines.append(t); generations.append(0); alive.append(true) }
        hotHandlers[slot] = .passUnretained(t)
        let data = UInt64(slot) << 40 | UInt64(generations[slot]) << 32 | UInt64(token)
        do throws(Errno) { _ = try syscall(.epollCtl) { lb_epoll_ctl(epfd.raw, Int32(LB_EPOLL_CTL_ADD), fd, events, data) } } catch {
            handlers[slot] = nil; trampolines[slot] = nil; alive[slot] = false; freeSlots.append(slot); throw error
        }
        return slot
    }

    public func unregister(fd: Int32, registration: Int) {
        _ = lb_epoll_ctl(epfd.raw, Int32(LB_EPOLL_CTL_DEL), fd, 0, 0)
        if registration >= 0 && registration < handlers.count && alive[registration] {
            handlers[registration] = nil
            trampolines[registration] = nil
            alive[registration] = false
            freeSlots.append(registration)
        }
    }

    /// Registers a `DeferredWork` (once per owner; at most 16 per loop).
    public func addDeferredWork(_ d: DeferredWork) {
        precondition(deferredRunners.count < 16, "more than 16 deferred-work owners on one loop")
        deferredRunners.append(d)
        deferredTrampolines.append(DeferredTrampoline.make(d))
        hotDeferred[deferredRunners.count - 1] = .passUnretained(deferredTrampolines[deferredRunners.count - 1])
        hotDeferredCount = deferredRunners.count
    }
    /// Loop thread: some `DeferredWork` has work left; run it next turn, after the fds that are ready.
    @inline(__always)
    public func requestDeferredTurn() { deferredPending = true }

    public func addPoller(_ p: Poller) { pollers.append(p); rebuildPollers() }
    public func removePoller(_ p: Poller) { pollers.removeAll { $0 === p }; rebuildPollers() }
    private func rebuildPollers() {
        precondition(pollers.count <= 16, "more than 16 pollers on one loop")
        pollTrampolines = pollers.map { PollTrampoline.make($0) }
        for (k, t) in pollTrampolines.enumerated() { hotPollers[k] = .passUnretained(t) }
        hotPollerCount = pollers.count
    }

    deinit {
        hotHandlers.deallocate()
        hotPollers.deallocate()
        hotDeferred.deallocate()
    }

    // MARK: cross-thread

    /// Runs `work` on the loop thread soon.
    public func execute(_ work: @escaping @Sendable () -> Void) {
        pending.withLock { $0.append(work) }
        FD.signal(wakeFD.raw)
    }

    /// Runs `work` on the loop thread and waits for it (control plane only: allocates).
    public func executeAndWait<T>(_ work: @escaping () -> T) -> T {
        if isLoopThread || !running.load(ordering: .acquiring) { return work() }
        let box = ResultBox<T>()
        guard let done = try? FD.eventfd(nonblocking: false) else { fatalError("eventfd for executeAndWait failed") }
        let fd = done.raw
        let w = UncheckedBox(work)
        execute { box.value = w.value(); FD.signal(fd) }
        _ = FD.wait(fd)
        return box.value!
    }

    public func stop() {
        stopRequested.store(true, ordering: .releasing)
        FD.signal(wakeFD.raw)
    }

    // MARK: running

    /// Runs the loop on the calling thread until `stop()`.
    public func run() {
        threadID = lb_gettid()
        // The loop's calls on peer-shared fds may be interrupted by the stall watchdog (stallguard.c).
        _ = lb_stall_register_thread()
        defer { lb_stall_unregister_thread() }
        running.store(true, ordering: .releasing)
        var events = [lb_epoll_event](repeating: lb_epoll_event(), count: 64)
        var pollUntil: UInt64 = 0
        var polling = false
        var idleSpins: UInt32 = 0
        while !stopRequested.load(ordering: .acquiring) {
            // Inside a poll window the polled queues need no system call; other fds (sockets, timers, eventfds)
            // are looked at every 16th idle spin only (a few µs), so the window costs no syscall per spin.
            var n: Int32 = 0
            if !polling || deferredPending || idleSpins & 15 == 0 {
                let timeout: Int32 = polling || deferredPending ? 0 : -1
                n = events.withUnsafeMutableBufferPointer { lb_epoll_wait(epfd.raw, $0.baseAddress, 64, timeout) }
            }
            var worked = n > 0
            if n > 0 { dispatch(events, n) } else if n < 0 && errno != EINTR { Log.error("epoll_wait: \(Errno.current)"); break }
            if deferredPending {
                deferredPending = false
                for k in 0..<hotDeferredCount { hotDeferred[k].runDeferred() }
                worked = true
            }
            guard pollWindowNs > 0 else { continue }
            // Plain memory, not the array: no iterator allocation (AllocationTests) and no retain per poll.
            for k in 0..<hotPollerCount where hotPollers[k].poll() { worked = true }
            let now = lb_now_ns()
            if worked {
                idleSpins = 0
                pollUntil = now &+ pollWindowNs
                if !polling { polling = true; isPolling = true; pollWindows += 1; for p in pollers { p.setPolling(true) } }
            } else if polling && now >= pollUntil {
                // Window over: re-enable kicks; `setPolling(false)` drains anything that slipped in.
                polling = false
                isPolling = false
                idleSpins = 0
                for p in pollers { p.setPolling(false) }
            } else if polling {
                // Pause, and yield every 8th idle spin: if the driver's thread shares this CPU, spinning without
                // yielding would starve the very request we wait for (measured: ~2 poll windows per request when the
                // loop never yielded; 64 pauses per yield made the round trip 2-3x slower on a loaded 2-vCPU machine),
                // and a yield on every spin is a system call per spin (~0.3 µs), most of the busy-polled round trip
                // when the driver runs on another CPU.
                idleSpins &+= 1
                if idleSpins & 7 == 0 { sched_yield() } else { lb_cpu_relax() }
            }
        }
        if polling { isPolling = false; for p in pollers { p.setPolling(false) } }
        runPending()
        running.store(false, ordering: .releasing)
        threadID = 0
    }

    private func dispatch(_ events: [lb_epoll_event], _ n: Int32) {
        for i in 0..<Int(n) {
            let data = events[i].data
            if data == UInt64.max { _ = FD.drain(wakeFD.raw); runPending(); continue }
            let slot = Int(data >> 40)
            // A handler may unregister another fd whose event is already in this batch: skip stale slots.
            guard slot < alive.count, alive[slot], generations[slot] == UInt8(truncatingIfNeeded: data >> 32) else { continue }
            hotHandlers[slot].handleEvent(token: UInt32(truncatingIfNeeded: data), events: events[i].events)
        }
    }

    private func runPending() {
        let work = pending.withLock { q -> [@Sendable () -> Void] in let w = q; q.removeAll(); return w }
        for w in work { w() }
    }

    /// Starts the loop on a new thread.
    public func startThread() {
        let ctx = Unmanaged.passRetained(self).toOpaque()
        var t = pthread_t()
        let r = pthread_create(&t, nil, eventLoopThreadMain, ctx)
        precondition(r == 0, "pthread_create failed: \(r)")
        loopThread = t
        while !running.load(ordering: .acquiring) && !stopRequested.load(ordering: .acquiring) { sched_yield() }
    }

    /// Stops a loop started with `startThread` and joins it.
    public func stopAndJoin() {
        stop()
        if let t = loopThread { pthread_join(t, nil); loopThread = nil }
    }
}

private final class ResultBox<T>: @unchecked Sendable { var value: T? }

/// Control-plane closures cross to the loop thread and back while the caller waits, so they never run
/// concurrently with the caller: not Sendable by type, safe by protocol.
struct UncheckedBox<T>: @unchecked Sendable { let value: T; init(_ v: T) { value = v } }

// A global function, not a closure: Swift 6 main-actor closures passed to pthread_create crash (machine notes).
private func eventLoopThreadMain(_ ctx: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let loop = Unmanaged<EventLoop>.fromOpaque(ctx!).takeRetainedValue()
    loop.run()
    return nil
}
