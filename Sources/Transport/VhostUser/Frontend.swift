import Glibc
import Synchronization
import CLinux

/// What a device type adds to the vhost-user front-end's conversation: a forwarded gpu's display protocol
/// (VHOST_USER_GPU_SET_SOCKET and the front-end side of vhost-user-gpu.rst). Every call comes on the device's loop.
public protocol VhostUserFrontendCompanion: AnyObject {
    /// Before every ring set-up (the first one at DRIVER_OK, after a driver reset, and each reconnect's), before
    /// SET_FEATURES: the messages to send first, each with the fds it carries (none when what was sent before
    /// still holds). The front-end owns the fds from here on (closes them once sent, or on failure).
    func ringsStarting() throws(DeviceError) -> [(request: VhostUserRequest, fds: [Int32])]
    /// The rings stopped: a driver reset (`backendGone` false: the same back-end process goes on), or the back-end
    /// connection was lost or the device shuts down (true: whatever `ringsStarting` opened for it is closed).
    func ringsStopped(backendGone: Bool)
    /// After a config space read was answered from the back-end's config: fields the front-end owns (a forwarded
    /// gpu: num_scanouts, QEMU's front-end's too).
    func configRead(offset: Int, _ buffer: UnsafeMutableRawBufferPointer)
}

extension VhostUserFrontendCompanion {
    public func configRead(offset: Int, _ buffer: UnsafeMutableRawBufferPointer) {}
}

/// A device whose body lives in an external vhost-user back-end (a vhost-device-* daemon, qemu-storage-daemon,
/// another loopbackd): loopbackd is the vhost-user front-end and forwards the driver's rings, memory, kicks and
/// interrupts (cloud-hypervisor's generic vhost-user device, crosvm's vhost_user_frontend).
///
/// Data path, `replay` (default, `reconnect = "replay"`): the back-end maps the driver's memory and reads the
/// driver's descriptor table and writes its used ring, but its avail ring is a shadow ring of ours (one memfd for
/// all queues, sent as an extra memory region above the driver's; `InflightTracker`). The driver side's kick
/// eventfds are watched on our loop (`passthroughRings`: the host itself neither watches nor writes the rings);
/// on a kick the front-end reads the used ring, copies the driver's new avail entries into the shadow ring,
/// publishes them and kicks the back-end through an eventfd of ours. EVENT_IDX is negotiated with the driver but
/// not with the back-end: the driver's `avail_event` is ours (set to the position copied up to, so the driver
/// kicks for its next entry), and the back-end interrupts on every completion, through an eventfd of ours: the
/// loop pumps the ring again and signals the driver side's interrupt (an eventfd, or the virtio-lo KICK ioctl).
/// So the front-end knows, exactly and by construction, which heads the back-end holds, whatever order it
/// completes them in and however far the driver runs ahead. `replay: false` (`reconnect = "reset"`): the driver
/// side's kick eventfds go to the back-end, which reads the driver's rings and signals the driver's interrupt
/// eventfd itself: no request passes through loopbackd. `relay: true` routes the kicks through the host
/// (`queueNotified`) instead.
/// Set-up and control messages wait for the back-end's replies; the loop serves every other device too, so it never
/// waits long: `init` (start-up, caller's thread) allows `replyTimeoutMs` per reply, a reconnect's hand-shake runs
/// on a short-lived thread of its own (`VhostUserConnectJob`), and every exchange that must run on the loop (ring
/// set-up, SET_CONFIG, stopping the rings at reset, re-reading the config) has `loopBudgetMs` in all, after which the
/// back-end counts as lost (closed, reconnect scheduled). A back-end server serving the same loop cannot answer the
/// loop's exchanges at all; put back-end servers on another loop or process.
///
/// Reconnect: when the back-end goes away the device keeps its queues; a loop timer retries with a restartable
/// 100 ms → 1 s backoff (never latched off): a non-blocking connect on the loop, then the hand-shake (features,
/// protocol features, SET_OWNER, queue count, request channel, config) on a helper thread, which hands the ready
/// socket back to the loop; the ring set-up (which needs the loop's ring state) follows there. Exact replay: for
/// every ring the heads the old back-end had taken and not completed (k of them; out-of-order completion leaves
/// them anywhere in the shadow ring) are rewritten into the shadow slots from used.idx on and the vring base is set
/// to used.idx, so the new back-end takes exactly those again, and nothing it already completed
/// (qemu-storage-daemon 7.2 offers no INFLIGHT_SHMFD). When the front-end cannot know the in-flight heads exactly
/// (a ring held garbage: a head or used id out of range), it never replays blindly: the rings stay stopped and
/// every queue is latched broken, so the driver sees NEEDS_RESET.
public final class VhostUserFrontendDevice: VirtioDevice, EventHandler {
    public let socketPath: String
    public let deviceID: UInt32
    public let queueMaxSizes: [UInt16]
    public let configSize: Int
    /// The back-end's features without vhost-user's bit 30 and what loopbackd's rings cannot do.
    public private(set) var offeredFeatures: VirtioFeatures = []
    public let loop: EventLoop
    /// Set by the daemon right after `init` (before the loop serves the device): a forwarded gpu's display server.
    public var companion: VhostUserFrontendCompanion?

    /// Protocol features this front-end implements.
    public static let protocolFeatures: VhostUserProtocolFeatures = [.mq, .replyAck, .config, .configureMemSlots, .backendReq]
    /// Longest wait for any single reply off the loop thread: the start-up hand-shake in `init` (caller's thread) and
    /// a reconnect's hand-shake (its own thread, at most `connectJobMs` in all).
    public static let replyTimeoutMs: Int32 = 1000
    static let connectJobMs: Int32 = 5000
    /// Longest the loop thread waits for one whole exchange with the back-end (ring set-up, SET_CONFIG, stopping the
    /// rings, GET_CONFIG): every other device on the loop waits as long. A back-end that cannot keep up with this
    /// right after answering a hand-shake is treated as lost (closed, reconnect with backoff).
    public static let loopBudgetMs: Int32 = 200
    static let protocolFeaturesBit: UInt64 = 1 << 30
    static let unforwardedFeatures: UInt64 = protocolFeaturesBit | VirtioFeatures.ringPacked.rawValue
        | VirtioFeatures.accessPlatform.rawValue | (1 << 26) /* VHOST_F_LOG_ALL */
    static let minBackoffMs: UInt64 = 100
    static let maxBackoffMs: UInt64 = 1000

    // Connection to the back-end.
    private var sock: Int32 = -1
    private var sockRegistration = -1
    private var channel: Int32 = -1            // our end of the BACKEND_REQ socketpair
    private var channelRegistration = -1
    private var backendFeatures: UInt64 = 0
    private var negotiated: VhostUserProtocolFeatures = []
    private var maxMemSlots = 0
    /// GET_QUEUE_NUM's answer (MQ only), and the ring set-up message in progress: for a refused set-up's error.
    private var backendQueueNum: UInt64?
    private var setupStep = "the ring set-up"
    private var sentRegions: [VhostUserMemoryRegion] = []
    private var config: [UInt8]

    // Driver side.
    private var acked: VirtioFeatures = []
    private var context: DeviceContext?
    private var kickFDs: [Int32] = []
    /// Per queue: the eventfd the back-end signals (`relayFD`, watched by the loop) and the driver side's interrupt
    /// it is forwarded to.
    private var calls: [(relayFD: Int32, registration: Int, notifier: Notifier)] = []
    /// Per queue: the shadow avail ring and the heads the back-end holds (see `InflightTracker`; replay mode).
    private var trackers: [InflightTracker] = []
    /// Replay mode: the driver side's kick eventfds (dups), watched by our loop; the back-end gets `kickFDs`
    /// (eventfds of ours) instead, signalled once the new entries are in the shadow ring.
    private var driverKicks: [(fd: Int32, registration: Int)] = []
    /// Replay mode: the shadow avail rings, one page-aligned slot per queue in one memfd, mapped shared here and
    /// sent to the back-end as an extra memory region above the driver's. Lives as long as the device.
    private var shadowFD: Int32 = -1
    private var shadowBase: UnsafeMutableRawPointer?
    private var shadowLength = 0
    private var shadowOffsets: [Int] = []
    private var ringsSetUp = false
    /// Set when a reconnect could not replay exactly and latched the queues: no ring set-up until the driver resets.
    private var latched = false

    // Reconnect.
    private var timerFD: Int32 = -1
    private var timerRegistration = -1
    /// Scan tick: pumps the shadow rings in case a kick never came: a driver without EVENT_IDX reads used.flags,
    /// where the back-end (without EVENT_IDX) may have set NO_NOTIFY while busy. 1 ms while the rings move, backing off to
    /// 64 ms while they do not (buffers a driver leaves posted, e.g. receive queues); off once every ring is empty
    /// and nothing moved for ~130 ms; back to 1 ms at the next kick or interrupt.
    private var scanFD: Int32 = -1
    private var scanRegistration = -1
    private var scanIntervalNs: UInt64 = 0   // 0: not armed
    static let minScanNs: UInt64 = 1_000_000
    static let maxScanNs: UInt64 = 64_000_000
    private var backoffMs = VhostUserFrontendDevice.minBackoffMs
    private var closed = false
    /// The reconnect hand-shake in progress on its helper thread, if any. Only the current job's result is adopted;
    /// one handed over after `shutdown` (which cancels it) is closed.
    private var connectJob: VhostUserConnectJob?

    /// Successful reconnects, failed attempts since the last success, config-change messages received.
    public private(set) var reconnects = 0
    /// Requests handed again to a restarted back-end (exact replay), and reconnects that refused to replay
    /// (queues latched, NEEDS_RESET).
    public private(set) var replayedRequests = 0
    public private(set) var replaysRefused = 0
    public private(set) var failedAttempts = 0
    public private(set) var configChanges = 0
    public var isConnected: Bool { sock >= 0 }

    private enum Token: UInt32 { case socket = 1, channel = 2, timer = 3, scan = 4 }
    private static let relayTokenBase: UInt32 = 0x100
    private static let kickTokenBase: UInt32 = 0x10000

    /// Connects to `socketPath` (retrying for up to `connectTimeoutMs` while the back-end starts), negotiates
    /// features and protocol features, checks the back-end has `queueSizes.count` queues (MQ), takes ownership
    /// (SET_OWNER), opens the back-end request channel and caches the config space. vhost-user does not carry the
    /// device type, queue sizes or config size: the caller gives them. Blocks the calling thread (start-up only:
    /// up to `connectTimeoutMs` plus `replyTimeoutMs` per reply; call it before the device's loop serves traffic, or
    /// off that loop's thread: the daemon builds its devices before it starts the loops). Reconnects never block.
    /// `relay`: route kicks through loopbackd's loop too instead of handing the driver side's kick eventfds to the
    /// back-end: the original virtio-loopback adapter's data path, kept to measure what it costs (`ab --relay`).
    public init(socketPath: String, deviceID: UInt32, queueSizes: [UInt16], configSize: Int = 0, loop: EventLoop,
                connectTimeoutMs: Int = 5000, relay: Bool = false, replay: Bool = true) throws(DeviceError) {
        self.relay = relay
        self.replay = replay
        self.socketPath = socketPath
        self.deviceID = deviceID
        queueMaxSizes = queueSizes
        self.configSize = configSize
        self.loop = loop
        config = [UInt8](repeating: 0, count: configSize)
        guard !queueSizes.isEmpty, configSize >= 0, configSize <= Int(VhostUserMessage.maxConfigBytes) else {
            throw DeviceError("vhost-user \(socketPath): need at least one queue and a config size of at most 256")
        }
        timerFD = lb_timerfd()
        scanFD = lb_timerfd()
        guard timerFD >= 0, scanFD >= 0 else {
            let e = Errno.current
            closeEverything()
            throw DeviceError("vhost-user: timerfd: \(e)")
        }
        let deadline = lb_now_ns() &+ UInt64(max(connectTimeoutMs, 0)) * 1_000_000
        while true {
            sock = socketPath.withCString { lb_unix_connect($0, 1) }
            if sock >= 0 { break }
            let e = Errno.current
            if lb_now_ns() >= deadline {
                closeEverything()
                throw DeviceError("vhost-user: cannot connect to \(socketPath): \(e)")
            }
            usleep(100_000)
        }
        // Start-up: the caller's thread waits (each reply up to `replyTimeoutMs`); the loop is not involved yet.
        do {
            var c = VhostUserConversation(fd: sock, deadline: UInt64.max, perReplyMs: Self.replyTimeoutMs)
            adopt(try Self.handshake(&c, queues: queueSizes.count, configSize: configSize))
        } catch {
            closeEverything()
            throw DeviceError("vhost-user \(socketPath): \(error)")
        }
        offeredFeatures = VirtioFeatures(rawValue: backendFeatures & ~Self.unforwardedFeatures)
        // The back-end shares eventfds with the loop from now on: watch the loop's calls on them (stallguard.c).
        lb_stall_watch(1)
        watching = true
        let me = UncheckedBox(self)
        loop.execute { me.value.watch() }
    }
    private var watching = false

    deinit { closeEverything() }

    private func closeEverything() {
        if sock >= 0 { FD.close(sock); sock = -1 }
        if channel >= 0 { FD.close(channel); channel = -1 }
        if timerFD >= 0 { FD.close(timerFD); timerFD = -1 }
        if scanFD >= 0 { FD.close(scanFD); scanFD = -1 }
        for f in kickFDs where f >= 0 { FD.close(f) }
        kickFDs = []
        for c in calls where c.relayFD >= 0 { FD.close(c.relayFD) }
        calls = []
        for k in driverKicks where k.fd >= 0 { FD.close(k.fd) }
        driverKicks = []
        trackers = []
        if let b = shadowBase { munmap(b, shadowLength); shadowBase = nil }
        if shadowFD >= 0 { FD.close(shadowFD); shadowFD = -1 }
    }

    /// Creates the shadow avail rings' memfd and mapping (once; sized for every queue's largest ring).
    private func makeShadow() throws(DeviceError) {
        guard shadowBase == nil else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        var offsets: [Int] = [], total = 0
        for m in queueMaxSizes {
            offsets.append(total)
            total += (6 + 2 * Int(m) + page - 1) / page * page
        }
        let fd = lb_memfd("loopbackd-shadow-avail", 1)
        guard fd >= 0 else { throw DeviceError("vhost-user: memfd: \(Errno.current)") }
        // Sealed before it is shared: a back-end cannot shrink it under our mapping (SIGBUS on the loop thread).
        guard ftruncate(fd, off_t(total)) == 0, lb_seal_size(fd) == 0 else {
            let e = Errno.current
            FD.close(fd)
            throw DeviceError("vhost-user: shadow rings: \(e)")
        }
        let p = mmap(nil, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else {
            let e = Errno.current
            FD.close(fd)
            throw DeviceError("vhost-user: shadow rings: mmap: \(e)")
        }
        shadowFD = fd
        shadowBase = p
        shadowLength = total
        shadowOffsets = offsets
    }

    /// Stops forwarding for good: unwatches and closes everything (loop thread; the host should have reset the
    /// device first). Needed only to release the object, since the loop keeps registered handlers alive.
    public func shutdown() {
        if watching { lb_stall_watch(-1); watching = false }
        closed = true
        connectJob?.cancel()
        connectJob = nil
        if context != nil { reset() }
        closeConnection()
        companion?.ringsStopped(backendGone: true)
        companion = nil
        if timerRegistration >= 0 { loop.unregister(fd: timerFD, registration: timerRegistration); timerRegistration = -1 }
        if scanRegistration >= 0 { loop.unregister(fd: scanFD, registration: scanRegistration); scanRegistration = -1 }
        closeEverything()
    }

    /// Registers the fds we own with the loop (loop thread; idempotent).
    private func watch() {
        guard !closed else { return }
        do throws(Errno) {
            if timerFD >= 0 && timerRegistration < 0 {
                timerRegistration = try loop.register(fd: timerFD, handler: self, token: Token.timer.rawValue)
            }
            if scanFD >= 0 && scanRegistration < 0 {
                scanRegistration = try loop.register(fd: scanFD, handler: self, token: Token.scan.rawValue)
            }
            if sock >= 0 && sockRegistration < 0 {
                sockRegistration = try loop.register(fd: sock, events: UInt32(LB_EPOLLIN | LB_EPOLLRDHUP), handler: self,
                                                     token: Token.socket.rawValue)
            }
            if channel >= 0 && channelRegistration < 0 {
                channelRegistration = try loop.register(fd: channel, handler: self, token: Token.channel.rawValue)
            }
        } catch {
            Log.error("vhost-user \(socketPath): cannot watch fds: \(error)")
        }
    }

    // MARK: request/reply

    /// An exchange on the loop thread: `loopBudgetMs` for all of it.
    private func loopConversation() throws(VhostUserError) -> VhostUserConversation {
        guard sock >= 0 else { throw .notConnected }
        return VhostUserConversation(fd: sock, negotiated: negotiated,
                                     deadline: VhostUserSocket.deadline(afterMs: Self.loopBudgetMs), perReplyMs: Self.loopBudgetMs)
    }

    /// Everything that does not depend on the driver: features, protocol features, queue count, mem slots,
    /// back-end request channel, ownership, config cache. Touches nothing but `c`'s socket and what it returns:
    /// runs on the caller's thread in `init` and on a `VhostUserConnectJob`'s thread at reconnect. On failure the
    /// channel it opened is closed again; the socket stays the caller's.
    static func handshake(_ c: inout VhostUserConversation, queues: Int, configSize: Int) throws(VhostUserError)
        -> VhostUserHandshake {
        var h = VhostUserHandshake(sock: c.fd)
        do throws(VhostUserError) {
            try c.request(.setOwner, ack: false)
            h.backendFeatures = try c.getU64(.getFeatures)
            if h.backendFeatures & protocolFeaturesBit != 0 {
                let offered = VhostUserProtocolFeatures(rawValue: try c.getU64(.getProtocolFeatures))
                let use = offered.intersection(protocolFeatures)
                try c.request(.setProtocolFeatures, { $0.append(use.rawValue) }, ack: false)
                c.negotiated = use
                h.negotiated = use
            }
            if h.negotiated.contains(.mq) {
                let n = try c.getU64(.getQueueNum)
                h.queueNum = n
                guard n >= UInt64(queues) else { throw .badReply("back-end has \(n) queue(s), \(queues) configured") }
            }
            h.maxMemSlots = h.negotiated.contains(.configureMemSlots) ? Int(min(try c.getU64(.getMaxMemSlots), 512)) : 0
            if h.negotiated.contains(.backendReq) {
                var sv: [Int32] = [-1, -1]
                guard lb_unix_socketpair(&sv, 1) == 0 else { throw .io(Errno.current) }
                h.channel = sv[0]
                defer { FD.close(sv[1]) }
                try c.request(.setBackendReqFD, fds: [sv[1]])
            }
            if h.negotiated.contains(.config) && configSize > 0 { h.config = try c.fetchConfig(size: configSize) }
        } catch {
            if h.channel >= 0 { FD.close(h.channel) }
            throw error
        }
        return h
    }

    /// Takes over a hand-shake's connection and findings (loop thread, or `init`).
    private func adopt(_ h: VhostUserHandshake) {
        sock = h.sock
        channel = h.channel
        backendFeatures = h.backendFeatures
        negotiated = h.negotiated
        maxMemSlots = h.maxMemSlots
        backendQueueNum = h.queueNum
        sentRegions = []
        if let c = h.config { config = c }
    }

    // MARK: VirtioDevice

    public func ackFeatures(_ features: VirtioFeatures) { acked = features }

    public func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        config.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<offset + buffer.count])) }
        companion?.configRead(offset: offset, buffer)
    }

    public func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) {
        for k in 0..<buffer.count { config[offset + k] = buffer[k] }
        guard sock >= 0, negotiated.contains(.config) else { return }
        do {
            try loopConversation().request(.setConfig) { w in
                w.append(UInt32(offset)); w.append(UInt32(buffer.count)); w.append(UInt32(0))
                w.append(bytes: Array(buffer))
            }
            // A write can change what reads return (virtio-input's select/subsel picks the answer): read it back.
            config = try loopConversation().fetchConfig(size: configSize)
        } catch {
            if case .rejected = error { Log.warning("vhost-user \(socketPath): \(error)") } else { connectionLost(error) }
        }
    }

    public func activate(_ context: DeviceContext) throws(DeviceError) {
        self.context = context
        let n = context.queueCount
        if replay { try makeShadow() }
        for q in 0..<n {
            let driverKick = q < context.kickFDs.count ? context.kickFDs[q] : -1
            if replay {
                // Replay: the back-end gets an eventfd of ours, signalled once the entries are in the shadow ring;
                // the driver side's kick eventfd is watched by our loop.
                if driverKick >= 0 {
                    let d = fcntl(driverKick, F_DUPFD_CLOEXEC, 0)
                    guard d >= 0 else { throw DeviceError("vhost-user: dup: \(Errno.current)") }
                    do {
                        driverKicks.append((d, try loop.register(fd: d, handler: self, token: Self.kickTokenBase + UInt32(q))))
                    } catch {
                        FD.close(d)
                        throw DeviceError("vhost-user: cannot watch kick fd: \(error)")
                    }
                } else {
                    driverKicks.append((-1, -1))   // kicks come through `queueNotified`
                }
                let k = lb_eventfd(0, 1)
                guard k >= 0 else { throw DeviceError("vhost-user: eventfd: \(Errno.current)") }
                kickFDs.append(k)
                PeerFD.noteOwner(k, "vhost-user back-end at \(socketPath)")
                continue
            }
            // The driver side's own kick eventfd goes to the back-end (passthroughRings): no relay hop.
            let k = driverKick >= 0 ? fcntl(driverKick, F_DUPFD_CLOEXEC, 0) : lb_eventfd(0, 1)
            guard k >= 0 else { throw DeviceError("vhost-user: eventfd: \(Errno.current)") }
            kickFDs.append(k)
            PeerFD.noteOwner(k, "vhost-user back-end at \(socketPath)")
        }
        latched = false
        for q in 0..<n {
            let irq = context.queues[q].interrupt
            if !replay && !relay && irq.kind == .eventfd {
                calls.append((-1, -1, irq))   // the back-end signals the driver's eventfd itself
                continue
            }
            // The back-end's interrupt comes to us first, so the in-flight heads are known (see the type's comment).
            let r = lb_eventfd(0, 1)
            guard r >= 0 else { throw DeviceError("vhost-user: eventfd: \(Errno.current)") }
            PeerFD.noteOwner(r, "vhost-user back-end at \(socketPath)")
            var reg = -1
            do { reg = try loop.register(fd: r, handler: self, token: Self.relayTokenBase + UInt32(q)) } catch {
                FD.close(r)
                throw DeviceError("vhost-user: cannot watch call relay: \(error)")
            }
            calls.append((r, reg, irq))
        }
        if replay, let base = shadowBase {
            let eventIdx = context.features.contains(.eventIdx)
            trackers = (0..<n).map { q in
                InflightTracker(size: context.queues[q].size, avail: context.queues[q].avail, shadow: base + shadowOffsets[q],
                                used: context.queues[q].used, lastAvail: context.queues[q].lastAvail, eventIdx: eventIdx)
            }
            // Entries already available, and `avail_event` set before the driver's next kick decision.
            for t in trackers { t.pump() }
            // During the loop's busy-poll window the shadow rings are pumped without waiting for a kick.
            if !polled { loop.addPoller(self); polled = true }
        }
        watch()
        guard sock >= 0 else {
            // The back-end is away: the set-up happens when it is back; requests wait in the rings.
            reconnectNow()
            return
        }
        do { try setupRings(bases: nil) } catch {
            // The back-end refused the first set-up: with a status, or (loopbackd's own server, for a message it
            // finds malformed, e.g. a vring larger than its queues) by closing the connection on it. Either is
            // most likely a configuration mismatch, not a crash: fail the start with what each side reports.
            switch error {
            case .rejected:
                throw DeviceError("vhost-user \(socketPath): \(error); \(diagnoseRejection())")
            case .peerClosed:
                let why = "back-end closed the connection at \(setupStep); \(diagnoseRejection())"
                closeConnection()
                throw DeviceError("vhost-user \(socketPath): \(why)")
            default:
                connectionLost(error)
            }
        }
    }

    /// After the back-end refused the ring set-up: what it says about itself next to what is configured, so the
    /// error names the likely cause. vhost-user carries neither the device type nor the queue sizes, so a back-end
    /// of another type (or with smaller queues) is only found out here: queue count (GET_QUEUE_NUM), config space
    /// size (GET_CONFIG, largest size it answers), device feature bits. Loop thread; a few exchanges within
    /// `loopBudgetMs`, on the error path only.
    func diagnoseRejection() -> String {
        let type = Self.typeName(deviceID)
        let sizes = Set(queueMaxSizes).count == 1 ? "\(queueMaxSizes.count) queue(s) of \(queueMaxSizes[0])"
            : "queue sizes \(queueMaxSizes.map(String.init).joined(separator: "/"))"
        var out = "likely a device type, queue count or queue size mismatch (vhost-user does not carry the type): "
            + "configured \(type), \(sizes), \(configSize)-byte config space; back-end: "
        var facts: [String] = []
        if let n = backendQueueNum { facts.append("\(n) queue(s)") }
        if let c = try? loopConversation(), lb_peek_byte(sock) != 0 {
            if negotiated.contains(.config) {
                // Largest size the back-end answers (an out-of-range GET_CONFIG gets the empty error reply).
                var lo = 0, hi = Int(VhostUserMessage.maxConfigBytes)
                if (try? c.fetchConfig(size: hi)) != nil { lo = hi } else {
                    while hi - lo > 1 {
                        let mid = (lo + hi) / 2
                        if (try? c.fetchConfig(size: mid)) != nil { lo = mid } else { hi = mid }
                    }
                }
                facts.append(lo >= Int(VhostUserMessage.maxConfigBytes) ? "config space of any size asked"
                             : lo == 0 ? "no config space" : "\(lo)-byte config space")
            }
        }
        let deviceBits = backendFeatures & 0xFF_FFFF
        facts.append("device feature bits 0x\(String(deviceBits, radix: 16))"
                     + (deviceBits != 0 && deviceID == 4 ? " (an rng has none)" : ""))
        out += facts.joined(separator: ", ")
        out += "; check type and queue-size against the back-end"
        return out
    }

    static func typeName(_ id: UInt32) -> String {
        switch id {
        case 1: return "net (virtio id 1)"
        case 2: return "blk (virtio id 2)"
        case 4: return "rng (virtio id 4)"
        default: return "virtio id \(id)"
        }
    }

    /// The host neither watches the kick eventfds nor polls or writes the rings: direct mode hands the driver
    /// side's kick eventfds to the back-end; replay mode watches them on our loop (and pumps the shadow rings).
    public var passthroughRings: Bool { !relay }
    /// virtio-input answers config reads from what was written just before (select/subsel): through the kernel
    /// module its writes must reach the back-end before the driver reads (synchronous config writes).
    public var configReadsDependOnWrites: Bool { deviceID == 18 }
    public let relay: Bool
    /// true: interrupts pass through loopbackd so the in-flight requests are known and a restarted back-end gets
    /// exactly those (`reconnect = "replay"`). false (`reconnect = "reset"`): the back-end signals the driver side's
    /// interrupt eventfd itself (no hop at all); a back-end that restarts with requests in flight latches the device
    /// NEEDS_RESET instead (nothing is guessed).
    public let replay: Bool
    /// Whether the interrupt of queue `q` goes straight from the back-end to the driver side.
    private func directCall(_ q: Int) -> Bool { q < calls.count && calls[q].relayFD < 0 }

    /// Only reached with `relay` or for driver sides without kick fds; otherwise the back-end (direct) or our own
    /// kick watch (replay) sees the kicks.
    @inline(__always)
    public func queueNotified(_ index: Int) {
        if index < trackers.count { pumped(index); return }
        if index < kickFDs.count { FD.signal(kickFDs[index]) }
    }

    /// Driver reset: stop every ring in the back-end (GET_VRING_BASE) and forget the queues.
    public func reset() {
        if ringsSetUp && sock >= 0, let ctx = context {
            do throws(VhostUserError) {
                // Bounded by `loopBudgetMs`: a back-end that does not confirm in time is dropped (closing the
                // connection stops its rings too).
                let c = try loopConversation()
                if backendFeatures & Self.protocolFeaturesBit != 0 {
                    for q in 0..<ctx.queueCount { try c.request(.setVringEnable, { $0.appendState(q, 0) }) }
                }
                for q in 0..<ctx.queueCount {
                    var w = VhostUserWriter.request(.getVringBase)
                    w.appendState(q, 0)
                    try c.send(w)
                    let p = try c.receiveReply(.getVringBase)
                    guard p.count == 8 else { throw VhostUserError.badReply("GET_VRING_BASE reply of \(p.count) bytes") }
                }
            } catch {
                connectionLost(error)
            }
        }
        ringsSetUp = false
        for c in calls where c.relayFD >= 0 {
            loop.unregister(fd: c.relayFD, registration: c.registration)
            FD.close(c.relayFD)
        }
        calls = []
        for k in driverKicks where k.fd >= 0 {
            loop.unregister(fd: k.fd, registration: k.registration)
            FD.close(k.fd)
        }
        driverKicks = []
        trackers = []
        if polled { loop.removePoller(self); polled = false }
        latched = false
        if scanIntervalNs != 0 { _ = lb_timerfd_arm(scanFD, 0); scanIntervalNs = 0 }
        for f in kickFDs { FD.close(f) }
        kickFDs = []
        context = nil
        companion?.ringsStopped(backendGone: false)
    }

    // MARK: rings

    private func userAddress(_ p: UnsafeMutableRawPointer, _ view: MemoryView) -> UInt64? {
        for i in 0..<view.count {
            let r = view.table[i]
            if p >= r.host && p - r.host < Int(r.size) { return r.userAddr + UInt64(p - r.host) }
        }
        return nil
    }

    private func sendMemoryTable(_ view: MemoryView, _ c: VhostUserConversation) throws(VhostUserError) {
        let regions = (0..<view.count).map { view.table[$0] }
        guard !regions.isEmpty, regions.allSatisfy({ $0.fd >= 0 }) else {
            throw .badRegion("the driver's memory has no fd to share with the back-end")
        }
        var descs = regions.map {
            VhostUserMemoryRegion(guestAddress: $0.guestBase, size: $0.size, userAddress: $0.userAddr, mmapOffset: $0.fdOffset)
        }
        var fds = regions.map { $0.fd }
        if replay, let b = shadowBase {
            // The shadow avail rings: one more region, at a guest address above all of the driver's (1 GiB
            // aligned; descriptors never point there), at our mapping's address for SET_VRING_ADDR.
            let gib: UInt64 = 1 << 30
            let top = regions.reduce(UInt64(0)) { max($0, $1.guestBase &+ $1.size) }
            descs.append(VhostUserMemoryRegion(guestAddress: (top + gib - 1) / gib * gib, size: UInt64(shadowLength),
                                               userAddress: UInt64(UInt(bitPattern: b)), mmapOffset: 0))
            fds.append(shadowFD)
        }
        if descs.count <= 8 {
            try c.request(.setMemTable, { w in
                w.append(UInt32(descs.count)); w.append(UInt32(0))
                for d in descs { w.appendRegion(d) }
            }, fds: fds)
        } else {
            guard negotiated.contains(.configureMemSlots), descs.count <= maxMemSlots else { throw .tooManyRegions(descs.count) }
            for old in sentRegions where !descs.contains(old) {
                try c.request(.remMemReg) { w in w.append(UInt64(0)); w.appendRegion(old) }
            }
            for (k, d) in descs.enumerated() where !sentRegions.contains(d) {
                try c.request(.addMemReg, { w in w.append(UInt64(0)); w.appendRegion(d) }, fds: [fds[k]])
            }
        }
        sentRegions = descs
    }

    /// Features, memory table, then per vring NUM, BASE, ADDR, CALL, KICK (call before kick: the back-end may
    /// start at the kick), then ENABLE; then one kick per ring so nothing already available waits.
    /// `bases`: per ring, where the back-end starts (reconnect: from `prepareReplay`); nil: the host's `lastAvail`.
    private func setupRings(bases: [UInt16]?) throws(VhostUserError) {
        guard let ctx = context else { return }
        guard acked.rawValue & ~backendFeatures == 0 else {
            throw .badReply("back-end no longer offers features 0x\(String(acked.rawValue & ~backendFeatures, radix: 16))")
        }
        // Loop thread: the whole exchange within `loopBudgetMs`.
        setupStep = "the ring set-up"
        let c = try loopConversation()
        if let companion {
            // QEMU's order (hw/display/vhost-user-gpu.c, set_status at DRIVER_OK): GPU_SET_SOCKET, then the start
            // of the rings (SET_FEATURES, SET_MEM_TABLE, vrings).
            let extra: [(request: VhostUserRequest, fds: [Int32])]
            do { extra = try companion.ringsStarting() } catch { throw .local("\(error)") }
            var pending = extra.flatMap { $0.fds }
            defer { for f in pending { FD.close(f) } }
            for m in extra {
                setupStep = "\(m.request)"
                try c.request(m.request, fds: m.fds)
                for f in m.fds { FD.close(f) }
                pending.removeAll { m.fds.contains($0) }
            }
        }
        var bits = acked.rawValue | (backendFeatures & Self.protocolFeaturesBit)
        // Replay: the back-end must not use EVENT_IDX: it would read used_event from the shadow ring (which the
        // driver never writes) and write avail_event (which is ours: `InflightTracker.pump`). Without it, it
        // interrupts on every completion (shadow avail.flags stays 0), and we relay each.
        if replay { bits &= ~VirtioFeatures.eventIdx.rawValue }
        setupStep = "SET_FEATURES 0x\(String(bits, radix: 16))"
        try c.request(.setFeatures) { $0.append(bits) }
        setupStep = "SET_MEM_TABLE"
        try sendMemoryTable(ctx.memory, c)
        for q in 0..<ctx.queueCount {
            let size = ctx.queues[q].size
            // First start: where the host says the ring is (replay: the shadow ring's start, used.idx). Reconnect:
            // the rewritten in-flight heads.
            let base = bases?[q] ?? (q < trackers.count ? trackers[q].usedSeen : ctx.queues[q].lastAvail)
            setupStep = "SET_VRING_NUM \(size) for queue \(q)"
            try c.request(.setVringNum) { $0.appendState(q, UInt32(size)) }
            setupStep = "SET_VRING_BASE/ADDR/CALL/KICK for queue \(q)"
            try c.request(.setVringBase) { $0.appendState(q, UInt32(base)) }
            let shadowAvail = q < trackers.count ? UInt64(UInt(bitPattern: trackers[q].shadow)) : nil
            guard let d = userAddress(ctx.queues[q].desc, ctx.memory),
                  let a = shadowAvail ?? userAddress(ctx.queues[q].avail, ctx.memory),
                  let u = userAddress(ctx.queues[q].used, ctx.memory) else {
                throw .ringAddress(index: q, "ring not inside the driver's memory")
            }
            try c.request(.setVringAddr) { w in
                w.append(UInt32(q)); w.append(UInt32(0)); w.append(d); w.append(u); w.append(a); w.append(UInt64(0))
            }
            try c.request(.setVringCall, { $0.append(UInt64(q)) }, fds: [directCall(q) ? calls[q].notifier.fd : calls[q].relayFD])
            try c.request(.setVringKick, { $0.append(UInt64(q)) }, fds: [kickFDs[q]])
        }
        if backendFeatures & Self.protocolFeaturesBit != 0 {
            setupStep = "SET_VRING_ENABLE"
            for q in 0..<ctx.queueCount { try c.request(.setVringEnable) { $0.appendState(q, 1) } }
        }
        ringsSetUp = true
        for t in trackers { t.pump() }
        for f in kickFDs { FD.signal(f) }
    }

    // MARK: connection loss and reconnect

    private func closeConnection() {
        if sock >= 0 {
            if sockRegistration >= 0 { loop.unregister(fd: sock, registration: sockRegistration) }
            FD.close(sock)
        }
        sock = -1
        sockRegistration = -1
        if channel >= 0 {
            if channelRegistration >= 0 { loop.unregister(fd: channel, registration: channelRegistration) }
            FD.close(channel)
        }
        channel = -1
        channelRegistration = -1
        ringsSetUp = false
        sentRegions = []
        companion?.ringsStopped(backendGone: true)
    }

    private func connectionLost(_ why: VhostUserError) {
        guard sock >= 0 else { return }
        Log.warning("vhost-user \(socketPath): back-end connection lost (\(why)); reconnecting")
        closeConnection()
        backoffMs = Self.minBackoffMs
        scheduleReconnect()
    }

    private func scheduleReconnect() {
        guard !closed, timerFD >= 0 else { return }
        _ = lb_timerfd_arm(timerFD, backoffMs * 1_000_000)
        backoffMs = min(backoffMs * 2, Self.maxBackoffMs)
    }

    /// One attempt (loop thread, on the backoff timer): a non-blocking connect (a Unix socket connects or fails at
    /// once), then the hand-shake on a helper thread (`VhostUserConnectJob`): the back-end may answer slowly or not
    /// at all, and the loop must go on serving the other devices meanwhile. The helper hands the ready socket back
    /// with `loop.execute` (`handshakeFinished`).
    private func reconnectNow() {
        guard sock < 0, !closed, connectJob == nil else { return }
        let s = socketPath.withCString { lb_unix_connect($0, 1) }
        guard s >= 0 else {
            failedAttempts += 1
            if failedAttempts == 1 || failedAttempts % 30 == 0 {
                Log.info("vhost-user \(socketPath): back-end not reachable (\(Errno.current)); retrying")
            }
            scheduleReconnect()
            return
        }
        guard let job = VhostUserConnectJob(sock: s, queues: queueMaxSizes.count, configSize: configSize) else {
            FD.close(s)
            failedAttempts += 1
            Log.warning("vhost-user \(socketPath): reconnect: eventfd: \(Errno.current)")
            scheduleReconnect()
            return
        }
        connectJob = job
        let me = UncheckedBox(self), loop = self.loop
        let t = Thread.spawn {
            // Helper thread: touches only the job (its socket, its cancel fd), never the device.
            guard job.run() else { return }
            loop.execute { me.value.handshakeFinished(job) }
        }
        pthread_detach(t.handle)
    }

    /// A reconnect hand-shake ended (loop thread): adopt the connection and set up the rings, or back off.
    private func handshakeFinished(_ job: VhostUserConnectJob) {
        let current = job === connectJob
        if current { connectJob = nil }
        guard current, !closed, sock < 0, let result = job.take() else {
            job.discard()   // stale: shut down meanwhile
            if current { scheduleReconnect() }
            return
        }
        let h: VhostUserHandshake
        switch result {
        case .failure(let error):
            failedAttempts += 1
            Log.warning("vhost-user \(socketPath): reconnect failed: \(error)")
            scheduleReconnect()
            return
        case .success(let v):
            h = v
        }
        let oldConfig = config
        adopt(h)
        do throws(VhostUserError) {
            watch()
            // The new back-end answered: the old connection is gone on its side too (vhost-user back-ends serve one
            // front-end at a time), so the used ring no longer moves and the final scan is exact.
            if context != nil && !latched {
                if let plan = prepareReplay() {
                    try setupRings(bases: plan.bases)
                    replayedRequests += plan.requests   // counted once the new back-end has them
                }
            }
        } catch {
            failedAttempts += 1
            let why = switch error {
            case .rejected: "\(error); \(diagnoseRejection())"
            case .peerClosed: "\(error) at \(setupStep); \(diagnoseRejection())"
            default: "\(error)"
            }
            Log.warning("vhost-user \(socketPath): reconnect failed: \(why)")
            closeConnection()
            scheduleReconnect()
            return
        }
        reconnects += 1
        failedAttempts = 0
        backoffMs = Self.minBackoffMs
        Log.info("vhost-user \(socketPath): back-end reconnected")
        if config != oldConfig { context?.configInterrupt.signal() }
    }

    /// Exact replay, before a restarted back-end gets the rings: a final scan of every ring, then, if every ring's
    /// in-flight heads are known exactly, they are rewritten below avail.idx (`InflightTracker.replay`) and the
    /// per-ring bases returned, with how many requests they hand over again. Otherwise nothing is rewritten, every
    /// queue is latched broken (the host raises NEEDS_RESET and the config interrupt) and nil is returned: the rings
    /// stay stopped until the driver resets.
    private func prepareReplay() -> (bases: [UInt16], requests: Int)? {
        guard let ctx = context else { return nil }
        if !replay {
            // reconnect = "reset": safe only when nothing was in flight (avail.idx == used.idx on every ring).
            var bases: [UInt16] = []
            for q in 0..<ctx.queueCount {
                let used = (ctx.queues[q].used + 2).assumingMemoryBound(to: Atomic<UInt16>.self).pointee.load(ordering: .acquiring)
                guard ctx.queues[q].availIdx == used else {
                    refuseReplay(ctx, q, .backendRestarted, detail: "reconnect = \"reset\" and requests were in flight")
                    return nil
                }
                bases.append(used)
            }
            return (bases, 0)
        }
        var plans: [Int] = []
        var failed: (queue: Int, why: String)?
        for q in 0..<min(ctx.queueCount, trackers.count) {
            let t = trackers[q]
            t.pump()
            guard let plan = t.planReplay() else {
                failed = (q, t.lossReason?.description ?? t.lost?.rawValue ?? "unknown")
                break
            }
            if let r = t.repeatedHead {
                Log.warning("vhost-user \(socketPath): queue \(q): the driver made head \(r.head) available again before the "
                            + "back-end returned it (driver bug); the old back-end held it \(r.times) times: replaying it as often")
            }
            plans.append(plan)
        }
        if plans.count != ctx.queueCount && failed == nil { failed = (plans.count, "no in-flight tracker for the queue (loopbackd bug)") }
        if let failed {
            refuseReplay(ctx, failed.queue, .backendRestarted, detail: failed.why)
            return nil
        }
        var bases: [UInt16] = []
        for (q, k) in plans.enumerated() {
            bases.append(trackers[q].replay(k: k))
        }
        let total = plans.reduce(0, +)
        if total > 0 { Log.info("vhost-user \(socketPath): replaying \(total) request(s) the old back-end had in flight") }
        return (bases, total)
    }

    /// Data safety over availability: without an exact in-flight set, replaying from used.idx would re-run requests
    /// already completed (a stale write applied over a newer one) and skip ones still pending (a hung driver).
    private func refuseReplay(_ ctx: DeviceContext, _ q: Int, _ why: QueueFault, detail: String? = nil) {
        replaysRefused += 1
        latched = true
        Log.error("vhost-user \(socketPath): back-end reconnected, but the requests it had in flight on queue \(q) are "
                  + "not known exactly (\(detail ?? why.rawValue)); not replaying: rings left stopped, device needs reset")
        for n in 0..<ctx.queueCount {
            ctx.queues[n].latch(.backendRestarted)
            ctx.faults.report(queue: n)
        }
    }

    /// Pumps ring `q` (kick or interrupt: used entries read, new avail entries copied to the shadow ring, the
    /// back-end kicked if there were any) and makes sure the scan tick runs at its fastest: a syscall only when the
    /// tick was off or had slowed down (while interrupts flow, every tick sees movement and stays at 1 ms).
    @inline(__always)
    private func pumped(_ q: Int) {
        if trackers[q].pump() && q < kickFDs.count { FD.signal(kickFDs[q]) }
        if scanIntervalNs != Self.minScanNs { armScan(Self.minScanNs) }
    }

    /// Registered as a poller while shadow rings exist (`EventLoop` busy-poll window).
    private var polled = false

    private func armScan(_ ns: UInt64) {
        guard scanFD >= 0 else { return }
        scanIntervalNs = ns
        _ = lb_timerfd_arm(scanFD, ns)
    }

    private func scanTick() {
        var busy = false, progressed = false
        for (q, t) in trackers.enumerated() {
            // A driver without EVENT_IDX may have seen the back-end's NO_NOTIFY in used.flags and not kicked.
            if t.pump() && q < kickFDs.count { FD.signal(kickFDs[q]) }
            busy = busy || t.busy
            progressed = progressed || t.progressed
            t.progressed = false
        }
        if progressed { armScan(Self.minScanNs); return }
        // Off only after ~130 ms without movement and with every ring empty. Not at the first empty look: a
        // driver that polls with interrupts suppressed passes through empty rings all the time, and would then
        // go on without an interrupt to restart the tick. A driver that really went idle re-enables interrupts
        // before it waits, so its next completion interrupts us and restarts the tick.
        if !busy && scanIntervalNs >= Self.maxScanNs { scanIntervalNs = 0; return }
        armScan(min(scanIntervalNs * 2, Self.maxScanNs))
    }

    /// Tests: makes queue `q`'s in-flight set unknown, as if a ring had held garbage.
    func loseTracking(_ q: Int) {
        if q < trackers.count { trackers[q].lose(.forced) }
    }

    /// Tests: why queue `q`'s in-flight set is not known exactly (nil: it is), naming the party at fault.
    func trackingLoss(_ q: Int) -> InflightLoss? { q < trackers.count ? trackers[q].lossReason : nil }

    /// Tests: whether queue `q`'s in-flight set is known exactly, and how often tracking was lost.
    func tracking(_ q: Int) -> (exact: Bool, losses: Int)? {
        q < trackers.count ? (trackers[q].isTracking, trackers[q].losses) : nil
    }

    // MARK: events

    public func handleEvent(token: UInt32, events: UInt32) {
        if token >= Self.kickTokenBase {
            // Replay: a driver kick. Copy its new entries into the shadow ring, then kick the back-end.
            let q = Int(token - Self.kickTokenBase)
            guard q < driverKicks.count, driverKicks[q].fd >= 0 else { return }
            _ = FD.drain(driverKicks[q].fd)
            if q < trackers.count { pumped(q) }
            return
        }
        if token >= Self.relayTokenBase {
            let q = Int(token - Self.relayTokenBase)
            guard q < calls.count, calls[q].relayFD >= 0 else { return }
            if FD.drain(calls[q].relayFD) != 0 {
                // Read what the back-end completed and copy what the driver added, then forward the interrupt.
                if q < trackers.count { pumped(q) }
                calls[q].notifier.signal()
            }
            return
        }
        switch Token(rawValue: token) {
        case .socket:
            guard sock >= 0 else { return }
            // Nothing is expected between replies: EOF, an error or unsolicited bytes all end the connection.
            // (The peek also filters stale events for an earlier socket.)
            let r = lb_peek_byte(sock)
            if r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return }
            connectionLost(r == 0 ? .peerClosed(midMessage: false) : r > 0 ? .badReply("unsolicited data") : .io(Errno.current))
        case .channel:
            backendRequest()
        case .timer:
            guard timerFD >= 0 else { return }
            _ = FD.drain(timerFD)
            reconnectNow()
        case .scan:
            guard scanFD >= 0, FD.drain(scanFD) != 0, scanIntervalNs != 0 else { return }
            scanTick()
        case nil:
            return
        }
    }

    /// A message on the back-end request channel. CONFIG_CHANGE_MSG: acknowledge first if asked (the back-end may
    /// wait for it: cloud-hypervisor PR #8206), then re-read the config space and raise the config interrupt.
    private func backendRequest() {
        guard channel >= 0 else { return }
        let r = lb_peek_byte(channel)
        if r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return }
        func dropChannel() {
            if channelRegistration >= 0 { loop.unregister(fd: channel, registration: channelRegistration) }
            FD.close(channel)
            channel = -1
            channelRegistration = -1
        }
        guard r > 0 else { dropChannel(); return }
        let h: VhostUserHeader
        do { (h, _) = try VhostUserSocket.receive(channel, timeoutMs: Self.loopBudgetMs, request: nil) } catch {
            Log.warning("vhost-user \(socketPath): back-end request channel: \(error)")
            dropChannel()
            return
        }
        let known = h.request == VhostUserBackendRequest.configChange.rawValue
        if h.needsReply {
            var w = VhostUserWriter.reply(h.request)
            w.append(UInt64(known ? 0 : 1))
            if !VhostUserSocket.sendNow(channel, w.message) { dropChannel() }
        }
        guard known else {
            Log.warning("vhost-user \(socketPath): unsupported back-end request \(h.request)")
            return
        }
        configChanges += 1
        if sock >= 0 && negotiated.contains(.config) && configSize > 0 {
            do { config = try loopConversation().fetchConfig(size: configSize) } catch { connectionLost(error); return }
        }
        context?.configInterrupt.signal()
    }
}

/// A request/reply conversation with a back-end over one socket. Every wait ends by `deadline` (the budget of the
/// whole conversation) and at most `perReplyMs` after it starts; `cancelFD` readable ends it at once. Plain values:
/// usable on any thread that owns the socket.
struct VhostUserConversation {
    let fd: Int32
    var negotiated: VhostUserProtocolFeatures = []
    let deadline: UInt64
    let perReplyMs: Int32
    var cancelFD: Int32 = -1

    private func waitLimit() -> UInt64 { min(deadline, VhostUserSocket.deadline(afterMs: perReplyMs)) }

    func send(_ w: VhostUserWriter, fds: [Int32] = []) throws(VhostUserError) {
        try VhostUserSocket.send(fd, w.message, fds: fds, deadline: waitLimit(), cancelFD: cancelFD)
    }

    func receiveReply(_ r: VhostUserRequest) throws(VhostUserError) -> [UInt8] {
        let (h, payload) = try VhostUserSocket.receive(fd, deadline: waitLimit(), request: r, cancelFD: cancelFD)
        guard h.request == r.rawValue, h.isReply else {
            throw .badReply("expected a reply to \(r), got request \(h.request) flags 0x\(String(h.flags, radix: 16))")
        }
        return payload
    }

    /// A set-up message; with REPLY_ACK it carries NEED_REPLY and we wait for the back-end's status, so the next
    /// step never races this one (vhost-device PR #153) and no sleeps are needed.
    func request(_ r: VhostUserRequest, _ build: (inout VhostUserWriter) -> Void = { _ in },
                 fds: [Int32] = [], ack: Bool = true) throws(VhostUserError) {
        let wantAck = ack && negotiated.contains(.replyAck)
        var w = VhostUserWriter.request(r, needReply: wantAck)
        build(&w)
        try send(w, fds: fds)
        guard wantAck else { return }
        let p = try receiveReply(r)
        guard p.count == 8 else { throw .badReply("\(r) ack of \(p.count) bytes") }
        let status = p.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
        guard status == 0 else { throw .rejected(r, status) }
    }

    func getU64(_ r: VhostUserRequest) throws(VhostUserError) -> UInt64 {
        try send(VhostUserWriter.request(r))
        let p = try receiveReply(r)
        guard p.count == 8 else { throw .badReply("\(r) reply of \(p.count) bytes") }
        return p.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
    }

    func fetchConfig(size: Int) throws(VhostUserError) -> [UInt8] {
        var w = VhostUserWriter.request(.getConfig)
        w.append(UInt32(0)); w.append(UInt32(size)); w.append(UInt32(0))
        w.append(bytes: [UInt8](repeating: 0, count: size))
        try send(w)
        let p = try receiveReply(.getConfig)
        // A zero-length payload is the back-end's error reply (vhost-user.rst GET_CONFIG).
        guard p.count == VhostUserMessage.configHeaderBytes + size else {
            throw p.isEmpty ? .rejected(.getConfig, 1) : .badReply("GET_CONFIG reply of \(p.count) bytes")
        }
        return Array(p[VhostUserMessage.configHeaderBytes...])
    }
}

/// What a hand-shake learnt, with the connection (`sock`) and the back-end request channel (`channel`, -1: none)
/// it leaves open. `config`: nil when not fetched (the cached config stays).
struct VhostUserHandshake {
    let sock: Int32
    var channel: Int32 = -1
    var backendFeatures: UInt64 = 0
    var negotiated: VhostUserProtocolFeatures = []
    var maxMemSlots = 0
    var queueNum: UInt64?
    var config: [UInt8]?

    func closeFDs() {
        if sock >= 0 { FD.close(sock) }
        if channel >= 0 { FD.close(channel) }
    }
}

/// One reconnect hand-shake on its own short-lived thread. Ownership: the helper thread owns `sock` (and the
/// channel it opens) until `run` publishes the result; the loop then takes it (`take`) or, if the job went stale
/// meanwhile, closes it (`discard`). `cancel` (loop) makes the helper give up at once: it closes its fds itself and
/// hands nothing over. `state` decides, exactly once, which of the two sides disposes of the fds.
final class VhostUserConnectJob: @unchecked Sendable {
    private let sock: Int32
    private let queues: Int
    private let configSize: Int
    private let cancelFD: Int32
    private static let running: UInt8 = 0, finished: UInt8 = 1, cancelled: UInt8 = 2
    private let state = Atomic<UInt8>(0)
    /// Written by the helper before `state` becomes `finished`; read by the loop only after the handover (which
    /// passes through the loop's mutex-protected queue).
    private var result: Result<VhostUserHandshake, VhostUserError>?

    init?(sock: Int32, queues: Int, configSize: Int) {
        cancelFD = lb_eventfd(0, 1)
        guard cancelFD >= 0 else { return nil }
        self.sock = sock
        self.queues = queues
        self.configSize = configSize
    }

    deinit { FD.close(cancelFD) }

    /// Helper thread: the hand-shake (each reply within `replyTimeoutMs`, all of it within `connectJobMs`).
    /// Returns true if the result must be handed to the loop; false if cancelled (everything already closed).
    func run() -> Bool {
        var c = VhostUserConversation(fd: sock, deadline: VhostUserSocket.deadline(afterMs: VhostUserFrontendDevice.connectJobMs),
                                      perReplyMs: VhostUserFrontendDevice.replyTimeoutMs, cancelFD: cancelFD)
        let r: Result<VhostUserHandshake, VhostUserError>
        do throws(VhostUserError) {
            r = .success(try VhostUserFrontendDevice.handshake(&c, queues: queues, configSize: configSize))
        } catch {
            FD.close(sock)
            r = .failure(error)
        }
        result = r
        if state.compareExchange(expected: Self.running, desired: Self.finished, ordering: .acquiringAndReleasing).exchanged {
            return true
        }
        if case .success(let h) = r { h.closeFDs() }
        result = nil
        return false
    }

    /// Loop thread: stop the helper. If it already finished, its handover is queued on the loop and `discard`s.
    func cancel() {
        if state.compareExchange(expected: Self.running, desired: Self.cancelled, ordering: .acquiringAndReleasing).exchanged {
            FD.signal(cancelFD)
        }
    }

    /// Loop thread, after the handover: the result, once.
    func take() -> Result<VhostUserHandshake, VhostUserError>? {
        guard state.load(ordering: .acquiring) == Self.finished else { return nil }
        defer { result = nil }
        return result
    }

    /// Loop thread, after the handover of a stale job: closes what it opened.
    func discard() {
        if let r = take(), case .success(let h) = r { h.closeFDs() }
    }
}

/// Busy-poll (`poll-us`): pump the shadow rings on every spin of the loop instead of waiting for the driver's kick.
extension VhostUserFrontendDevice: Poller {
    public func poll() -> Bool {
        guard ringsSetUp else { return false }
        var worked = false
        for q in 0..<trackers.count where trackers[q].pump() {
            if q < kickFDs.count { FD.signal(kickFDs[q]) }
            worked = true
        }
        return worked
    }
    public func setPolling(_ on: Bool) {}
}
