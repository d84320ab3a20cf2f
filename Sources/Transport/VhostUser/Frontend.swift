import Glibc
import Synchronization
import CLinux

/// A device whose body lives in an external vhost-user back-end (a vhost-device-* daemon, qemu-storage-daemon,
/// another loopbackd): loopbackd is the vhost-user front-end and forwards the driver's rings, memory, kicks and
/// interrupts (cloud-hypervisor's generic vhost-user device, crosvm's vhost_user_frontend).
///
/// Data path: the back-end maps the driver's memory and processes the rings itself; it reads the driver side's
/// kick eventfds and writes its interrupt eventfds directly (`passthroughRings`: the host neither watches nor polls
/// these rings), so no request passes through loopbackd. With the kernel module, the interrupt eventfd is the
/// module's irqfd extension; only a driver side whose interrupt is not an eventfd needs the call relay below.
/// A back-end server serving the same loop would deadlock the synchronous set-up exchange (bounded by the 1 s reply
/// timeout); put back-end servers on another loop or process.
///
/// Reconnect: when the back-end goes away the device keeps its queues; a loop timer retries with a restartable
/// 100 ms → 1 s backoff (never latched off) and then redoes the whole set-up with every vring's base = the ring's
/// `used.idx` and kicks every ring. This is in-order replay: requests the old back-end had taken but not completed
/// are taken again by the new one, which is correct for back-ends that complete in order (or whose requests are
/// idempotent, like rng and block reads/writes); out-of-order back-ends would need INFLIGHT_SHMFD (not implemented).
public final class VhostUserFrontendDevice: VirtioDevice, EventHandler {
    public let socketPath: String
    public let deviceID: UInt32
    public let queueMaxSizes: [UInt16]
    public let configSize: Int
    /// The back-end's features without vhost-user's bit 30 and what loopbackd's rings cannot do.
    public private(set) var offeredFeatures: VirtioFeatures = []
    public let loop: EventLoop

    /// Protocol features this front-end implements.
    public static let protocolFeatures: VhostUserProtocolFeatures = [.mq, .replyAck, .config, .configureMemSlots, .backendReq]
    /// Longest wait for any single reply (set-up runs on the loop thread; a dead back-end must not stall it longer).
    public static let replyTimeoutMs: Int32 = 1000
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
    private var sentRegions: [VhostUserMemoryRegion] = []
    private var config: [UInt8]

    // Driver side.
    private var acked: VirtioFeatures = []
    private var context: DeviceContext?
    private var kickFDs: [Int32] = []
    /// Per queue: where the back-end's call goes. `relayFD` >= 0 when the driver's interrupt is not an eventfd
    /// (e.g. the virtio-lo KICK ioctl): we watch it and signal `notifier`.
    private var calls: [(relayFD: Int32, registration: Int, notifier: Notifier)] = []
    private var ringsSetUp = false

    // Reconnect.
    private var timerFD: Int32 = -1
    private var timerRegistration = -1
    private var backoffMs = VhostUserFrontendDevice.minBackoffMs
    private var closed = false

    /// Successful reconnects, failed attempts since the last success, config-change messages received.
    public private(set) var reconnects = 0
    public private(set) var failedAttempts = 0
    public private(set) var configChanges = 0
    public var isConnected: Bool { sock >= 0 }

    private enum Token: UInt32 { case socket = 1, channel = 2, timer = 3 }
    private static let relayTokenBase: UInt32 = 0x100

    /// Connects to `socketPath` (retrying for up to `connectTimeoutMs` while the back-end starts), negotiates
    /// features and protocol features, checks the back-end has `queueSizes.count` queues (MQ), takes ownership
    /// (SET_OWNER), opens the back-end request channel and caches the config space. vhost-user does not carry the
    /// device type, queue sizes or config size: the caller gives them. Blocks the calling thread (start-up only).
    /// `relay`: route kicks and interrupts through loopbackd's loop instead of handing the driver side's eventfds
    /// to the back-end: the original virtio-loopback adapter's data path, kept to measure what it costs (`ab --relay`).
    public init(socketPath: String, deviceID: UInt32, queueSizes: [UInt16], configSize: Int = 0, loop: EventLoop,
                connectTimeoutMs: Int = 5000, relay: Bool = false) throws(DeviceError) {
        self.relay = relay
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
        guard timerFD >= 0 else { throw DeviceError("vhost-user: timerfd: \(Errno.current)") }
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
        do { try handshake() } catch {
            closeEverything()
            throw DeviceError("vhost-user \(socketPath): \(error)")
        }
        offeredFeatures = VirtioFeatures(rawValue: backendFeatures & ~Self.unforwardedFeatures)
        let me = UncheckedBox(self)
        loop.execute { me.value.watch() }
    }

    deinit { closeEverything() }

    private func closeEverything() {
        if sock >= 0 { close(sock); sock = -1 }
        if channel >= 0 { close(channel); channel = -1 }
        if timerFD >= 0 { close(timerFD); timerFD = -1 }
        for f in kickFDs where f >= 0 { close(f) }
        kickFDs = []
        for c in calls where c.relayFD >= 0 { close(c.relayFD) }
        calls = []
    }

    /// Stops forwarding for good: unwatches and closes everything (loop thread; the host should have reset the
    /// device first). Needed only to release the object, since the loop keeps registered handlers alive.
    public func shutdown() {
        closed = true
        if context != nil { reset() }
        closeConnection()
        if timerRegistration >= 0 { loop.unregister(fd: timerFD, registration: timerRegistration); timerRegistration = -1 }
        closeEverything()
    }

    /// Registers the fds we own with the loop (loop thread; idempotent).
    private func watch() {
        guard !closed else { return }
        do throws(Errno) {
            if timerFD >= 0 && timerRegistration < 0 {
                timerRegistration = try loop.register(fd: timerFD, handler: self, token: Token.timer.rawValue)
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

    private func send(_ w: VhostUserWriter, fds: [Int32] = []) throws(VhostUserError) {
        guard sock >= 0 else { throw .notConnected }
        try VhostUserSocket.send(sock, w.message, fds: fds, timeoutMs: Self.replyTimeoutMs)
    }

    private func receiveReply(_ r: VhostUserRequest) throws(VhostUserError) -> [UInt8] {
        let (h, payload) = try VhostUserSocket.receive(sock, timeoutMs: Self.replyTimeoutMs, request: r)
        guard h.request == r.rawValue, h.isReply else {
            throw .badReply("expected a reply to \(r), got request \(h.request) flags 0x\(String(h.flags, radix: 16))")
        }
        return payload
    }

    /// A set-up message; with REPLY_ACK it carries NEED_REPLY and we wait for the back-end's status, so the next
    /// step never races this one (vhost-device PR #153) and no sleeps are needed.
    private func request(_ r: VhostUserRequest, _ build: (inout VhostUserWriter) -> Void = { _ in },
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

    private func getU64(_ r: VhostUserRequest) throws(VhostUserError) -> UInt64 {
        try send(VhostUserWriter.request(r))
        let p = try receiveReply(r)
        guard p.count == 8 else { throw .badReply("\(r) reply of \(p.count) bytes") }
        return p.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
    }

    private func fetchConfig() throws(VhostUserError) -> [UInt8] {
        var w = VhostUserWriter.request(.getConfig)
        w.append(UInt32(0)); w.append(UInt32(configSize)); w.append(UInt32(0))
        w.append(bytes: [UInt8](repeating: 0, count: configSize))
        try send(w)
        let p = try receiveReply(.getConfig)
        // A zero-length payload is the back-end's error reply (vhost-user.rst GET_CONFIG).
        guard p.count == VhostUserMessage.configHeaderBytes + configSize else {
            throw p.isEmpty ? .rejected(.getConfig, 1) : .badReply("GET_CONFIG reply of \(p.count) bytes")
        }
        return Array(p[VhostUserMessage.configHeaderBytes...])
    }

    /// Everything that does not depend on the driver: features, protocol features, queue count, mem slots,
    /// back-end request channel, ownership, config cache.
    private func handshake() throws(VhostUserError) {
        try request(.setOwner, ack: false)
        backendFeatures = try getU64(.getFeatures)
        negotiated = []
        if backendFeatures & Self.protocolFeaturesBit != 0 {
            let offered = VhostUserProtocolFeatures(rawValue: try getU64(.getProtocolFeatures))
            let use = offered.intersection(Self.protocolFeatures)
            try request(.setProtocolFeatures, { $0.append(use.rawValue) }, ack: false)
            negotiated = use
        }
        if negotiated.contains(.mq) {
            let n = try getU64(.getQueueNum)
            guard n >= UInt64(queueMaxSizes.count) else {
                throw .badReply("back-end has \(n) queue(s), \(queueMaxSizes.count) configured")
            }
        }
        maxMemSlots = negotiated.contains(.configureMemSlots) ? Int(min(try getU64(.getMaxMemSlots), 512)) : 0
        sentRegions = []
        if negotiated.contains(.backendReq) {
            var sv: [Int32] = [-1, -1]
            guard lb_unix_socketpair(&sv, 1) == 0 else { throw .io(Errno.current) }
            do { try request(.setBackendReqFD, fds: [sv[1]]) } catch {
                close(sv[0]); close(sv[1])
                throw error
            }
            close(sv[1])
            channel = sv[0]
        }
        if negotiated.contains(.config) && configSize > 0 { config = try fetchConfig() }
    }

    // MARK: VirtioDevice

    public func ackFeatures(_ features: VirtioFeatures) { acked = features }

    public func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        config.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<offset + buffer.count])) }
    }

    public func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) {
        for k in 0..<buffer.count { config[offset + k] = buffer[k] }
        guard sock >= 0, negotiated.contains(.config) else { return }
        do {
            try request(.setConfig) { w in
                w.append(UInt32(offset)); w.append(UInt32(buffer.count)); w.append(UInt32(0))
                w.append(bytes: Array(buffer))
            }
        } catch {
            if case .rejected = error { Log.warning("vhost-user \(socketPath): \(error)") } else { connectionLost(error) }
        }
    }

    public func activate(_ context: DeviceContext) throws(DeviceError) {
        self.context = context
        let n = context.queueCount
        for q in 0..<n {
            // The driver side's own kick eventfd goes to the back-end (passthroughRings): no relay hop.
            let k = q < context.kickFDs.count && context.kickFDs[q] >= 0 ? fcntl(context.kickFDs[q], F_DUPFD_CLOEXEC, 0) : lb_eventfd(0, 1)
            guard k >= 0 else { throw DeviceError("vhost-user: eventfd: \(Errno.current)") }
            kickFDs.append(k)
        }
        for q in 0..<n {
            let irq = context.queues[q].interrupt
            if !relay && (irq.kind == .eventfd || irq.kind == .none) {
                calls.append((-1, -1, irq))   // the back-end signals the driver's eventfd itself
                continue
            }
            let r = lb_eventfd(0, 1)
            guard r >= 0 else { throw DeviceError("vhost-user: eventfd: \(Errno.current)") }
            var reg = -1
            do { reg = try loop.register(fd: r, handler: self, token: Self.relayTokenBase + UInt32(q)) } catch {
                close(r)
                throw DeviceError("vhost-user: cannot watch call relay: \(error)")
            }
            calls.append((r, reg, irq))
        }
        watch()
        guard sock >= 0 else {
            // The back-end is away: the set-up happens when it is back; requests wait in the rings.
            reconnectNow()
            return
        }
        do { try setupRings(reconnect: false) } catch {
            if case .rejected = error { throw DeviceError("vhost-user \(socketPath): \(error)") }
            connectionLost(error)
        }
    }

    /// The back-end reads the driver's kick eventfd and writes the driver's interrupt eventfd directly.
    public var passthroughRings: Bool { !relay }
    public let relay: Bool

    /// Only reached for driver sides without kick fds; normally the back-end sees the driver's kicks itself.
    @inline(__always)
    public func queueNotified(_ index: Int) {
        if index < kickFDs.count { FD.signal(kickFDs[index]) }
    }

    /// Driver reset: stop every ring in the back-end (GET_VRING_BASE) and forget the queues.
    public func reset() {
        if ringsSetUp && sock >= 0, let ctx = context {
            do throws(VhostUserError) {
                if backendFeatures & Self.protocolFeaturesBit != 0 {
                    for q in 0..<ctx.queueCount { try request(.setVringEnable, { $0.appendState(q, 0) }) }
                }
                for q in 0..<ctx.queueCount {
                    var w = VhostUserWriter.request(.getVringBase)
                    w.appendState(q, 0)
                    try send(w)
                    let p = try receiveReply(.getVringBase)
                    guard p.count == 8 else { throw VhostUserError.badReply("GET_VRING_BASE reply of \(p.count) bytes") }
                }
            } catch {
                connectionLost(error)
            }
        }
        ringsSetUp = false
        for c in calls where c.relayFD >= 0 {
            loop.unregister(fd: c.relayFD, registration: c.registration)
            close(c.relayFD)
        }
        calls = []
        for f in kickFDs { close(f) }
        kickFDs = []
        context = nil
    }

    // MARK: rings

    private func userAddress(_ p: UnsafeMutableRawPointer, _ view: MemoryView) -> UInt64? {
        for i in 0..<view.count {
            let r = view.table[i]
            if p >= r.host && p - r.host < Int(r.size) { return r.userAddr + UInt64(p - r.host) }
        }
        return nil
    }

    private func sendMemoryTable(_ view: MemoryView) throws(VhostUserError) {
        let regions = (0..<view.count).map { view.table[$0] }
        guard !regions.isEmpty, regions.allSatisfy({ $0.fd >= 0 }) else {
            throw .badRegion("the driver's memory has no fd to share with the back-end")
        }
        let descs = regions.map {
            VhostUserMemoryRegion(guestAddress: $0.guestBase, size: $0.size, userAddress: $0.userAddr, mmapOffset: $0.fdOffset)
        }
        if descs.count <= 8 {
            try request(.setMemTable, { w in
                w.append(UInt32(descs.count)); w.append(UInt32(0))
                for d in descs { w.appendRegion(d) }
            }, fds: regions.map { $0.fd })
        } else {
            guard negotiated.contains(.configureMemSlots), descs.count <= maxMemSlots else { throw .tooManyRegions(descs.count) }
            for old in sentRegions where !descs.contains(old) {
                try request(.remMemReg) { w in w.append(UInt64(0)); w.appendRegion(old) }
            }
            for (k, d) in descs.enumerated() where !sentRegions.contains(d) {
                try request(.addMemReg, { w in w.append(UInt64(0)); w.appendRegion(d) }, fds: [regions[k].fd])
            }
        }
        sentRegions = descs
    }

    /// Features, memory table, then per vring NUM, BASE, ADDR, CALL, KICK (call before kick: the back-end may
    /// start at the kick), then ENABLE; then one kick per ring so nothing already available waits.
    private func setupRings(reconnect: Bool) throws(VhostUserError) {
        guard let ctx = context else { return }
        guard acked.rawValue & ~backendFeatures == 0 else {
            throw .badReply("back-end no longer offers features 0x\(String(acked.rawValue & ~backendFeatures, radix: 16))")
        }
        let bits = acked.rawValue | (backendFeatures & Self.protocolFeaturesBit)
        try request(.setFeatures) { $0.append(bits) }
        try sendMemoryTable(ctx.memory)
        for q in 0..<ctx.queueCount {
            let size = ctx.queues[q].size
            // First start: where the host says the ring is. Reconnect: in-order replay from used.idx.
            let base = reconnect ? (ctx.queues[q].used + 2).assumingMemoryBound(to: Atomic<UInt16>.self).pointee.load(ordering: .acquiring)
                                 : ctx.queues[q].lastAvail
            try request(.setVringNum) { $0.appendState(q, UInt32(size)) }
            try request(.setVringBase) { $0.appendState(q, UInt32(base)) }
            guard let d = userAddress(ctx.queues[q].desc, ctx.memory), let a = userAddress(ctx.queues[q].avail, ctx.memory),
                  let u = userAddress(ctx.queues[q].used, ctx.memory) else {
                throw .ringAddress(index: q, "ring not inside the driver's memory")
            }
            try request(.setVringAddr) { w in
                w.append(UInt32(q)); w.append(UInt32(0)); w.append(d); w.append(u); w.append(a); w.append(UInt64(0))
            }
            let call = calls[q]
            let callFD = call.relayFD >= 0 ? call.relayFD : call.notifier.fd
            if call.relayFD < 0 && call.notifier.kind == .none {
                try request(.setVringCall) { $0.append(UInt64(q) | VhostUserMessage.noFDFlag) }
            } else {
                try request(.setVringCall, { $0.append(UInt64(q)) }, fds: [callFD])
            }
            try request(.setVringKick, { $0.append(UInt64(q)) }, fds: [kickFDs[q]])
        }
        if backendFeatures & Self.protocolFeaturesBit != 0 {
            for q in 0..<ctx.queueCount { try request(.setVringEnable) { $0.appendState(q, 1) } }
        }
        ringsSetUp = true
        for f in kickFDs { FD.signal(f) }
    }

    // MARK: connection loss and reconnect

    private func closeConnection() {
        if sock >= 0 {
            if sockRegistration >= 0 { loop.unregister(fd: sock, registration: sockRegistration) }
            close(sock)
        }
        sock = -1
        sockRegistration = -1
        if channel >= 0 {
            if channelRegistration >= 0 { loop.unregister(fd: channel, registration: channelRegistration) }
            close(channel)
        }
        channel = -1
        channelRegistration = -1
        ringsSetUp = false
        sentRegions = []
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

    /// One attempt: non-blocking connect, then the set-up exchange (each reply bounded by `replyTimeoutMs`).
    private func reconnectNow() {
        guard sock < 0, !closed else { return }
        sock = socketPath.withCString { lb_unix_connect($0, 1) }
        guard sock >= 0 else {
            failedAttempts += 1
            if failedAttempts == 1 || failedAttempts % 30 == 0 {
                Log.info("vhost-user \(socketPath): back-end not reachable (\(Errno.current)); retrying")
            }
            scheduleReconnect()
            return
        }
        let oldConfig = config
        do throws(VhostUserError) {
            try handshake()
            watch()
            if context != nil { try setupRings(reconnect: true) }
        } catch {
            failedAttempts += 1
            Log.warning("vhost-user \(socketPath): reconnect failed: \(error)")
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

    // MARK: events

    public func handleEvent(token: UInt32, events: UInt32) {
        if token >= Self.relayTokenBase {
            let q = Int(token - Self.relayTokenBase)
            guard q < calls.count, calls[q].relayFD >= 0 else { return }
            if FD.drain(calls[q].relayFD) != 0 { calls[q].notifier.signal() }
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
            close(channel)
            channel = -1
            channelRegistration = -1
        }
        guard r > 0 else { dropChannel(); return }
        let h: VhostUserHeader
        do { (h, _) = try VhostUserSocket.receive(channel, timeoutMs: Self.replyTimeoutMs, request: nil) } catch {
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
            do { config = try fetchConfig() } catch { connectionLost(error); return }
        }
        context?.configInterrupt.signal()
    }
}
