import Glibc
import CLinux

/// The device the host actually runs: forwards every call to the served body and remembers its queues, so the
/// server can read each ring's position when the device stops (GET_VRING_BASE, re-activation on a new memory
/// table or kick fd). The position is read after the body's `reset` returned, i.e. once in-flight work settled.
final class ServedDevice: VirtioDevice {
    let inner: VirtioDevice
    private var context: DeviceContext?
    /// `lastAvail` of every queue at the last reset.
    private(set) var savedLastAvail: [UInt16] = []
    init(_ inner: VirtioDevice) { self.inner = inner }

    var deviceID: UInt32 { inner.deviceID }
    var queueMaxSizes: [UInt16] { inner.queueMaxSizes }
    var offeredFeatures: VirtioFeatures { inner.offeredFeatures }
    var configSize: Int { inner.configSize }
    func ackFeatures(_ features: VirtioFeatures) { inner.ackFeatures(features) }
    func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) { inner.readConfig(offset: offset, into: buffer) }
    func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) { inner.writeConfig(offset: offset, from: buffer) }
    func activate(_ c: DeviceContext) throws(DeviceError) {
        context = c
        try inner.activate(c)
    }
    func queueNotified(_ index: Int) { inner.queueNotified(index) }
    func reset() {
        // The front-end reads the ring positions we report (GET_VRING_BASE) and may restart the rings from them:
        // every request counted there must be completed in the used ring first.
        inner.quiesce()
        inner.reset()
        if let c = context { savedLastAvail = (0..<c.queueCount).map { c.queues[$0].lastAvail } }
        context = nil
    }
    func flush() { inner.flush() }
    func flushForRemoval() -> (@Sendable () -> Void)? { inner.flushForRemoval() }
    func quiesce() { inner.quiesce() }
    var supportsQueueRestart: Bool { inner.supportsQueueRestart }
    func stopQueue(_ index: Int) { inner.stopQueue(index) }
    func startQueue(_ index: Int) { inner.startQueue(index) }
}

/// One region of the front-end's memory, mapped here. Owns the mapping and the fd.
final class MappedRegion {
    let desc: VhostUserMemoryRegion
    let mapBase: UnsafeMutableRawPointer
    let mapLength: Int
    let host: UnsafeMutableRawPointer
    let file: FileRef
    var fd: Int32 { file.raw }
    /// The SIGBUS guard slot covering the mapping (peerguard.c).
    let guardSlot: Int32

    /// Checks a region's numbers alone: non-empty, no wrapping of the guest range, the user range or the file
    /// range. Runs before any arithmetic combines two regions (the overlap checks).
    static func validate(_ desc: VhostUserMemoryRegion) throws(VhostUserError) {
        guard desc.size > 0 else { throw .badRegion("size 0") }
        guard !desc.guestAddress.addingReportingOverflow(desc.size).overflow,
              !desc.userAddress.addingReportingOverflow(desc.size).overflow else { throw .badRegion("address range wraps") }
        let (end, o) = desc.mmapOffset.addingReportingOverflow(desc.size)
        guard !o, end <= UInt64(Int64.max) else { throw .badRegion("mmap offset + size overflows") }
    }

    /// Maps `desc` from `fd` (taking ownership of `fd` only on success). The mmap offset need not be page
    /// aligned: the mapping starts at the page below it. Only regular files (memfd, tmpfs, hugetlbfs) are mapped,
    /// and the range must lie inside the file, or touching it would SIGBUS the daemon (rust-vmm/vhost PR #63,
    /// vm-memory PR #320); a block or character device has no size fstat can check. The file may still shrink
    /// later (the peer owns it): the mapping is registered with the SIGBUS guard, which then replaces it with zero
    /// pages and signals `guardFD`, and the connection is closed.
    init(_ desc: VhostUserMemoryRegion, fd: Int32, guardFD: Int32) throws(VhostUserError) {
        try MappedRegion.validate(desc)
        let end = desc.mmapOffset + desc.size   // checked by validate
        // What may back a region, and the size it must cover: a regular file (memfd, tmpfs, hugetlbfs) or a block
        // device, sized by fstat / BLKGETSIZE64 (an empty /dev/loopN is refused); a character device has no size
        // to check (/dev/virtio-lo, whose mmap is the kernel's RAM when a loopbackd forwards a kernel device to
        // another: `ab --driver virtio-lo`): it is mapped and left to the SIGBUS guard, like a file that shrinks
        // later. Anything else (pipe, socket, directory, eventfd) cannot back memory.
        let kind = lb_fd_kind(fd)
        var fileSize: UInt64 = 0
        switch kind {
        case Int32(LB_FD_REGULAR):
            guard lb_fd_regular_size(fd, &fileSize) == 1 else { throw .io(Errno.current) }
        case Int32(LB_FD_BLOCK):
            var lbs: UInt32 = 0
            guard lb_blkdev_size(fd, &fileSize, &lbs) == 0 else { throw .badRegion("block device size: \(Errno.current)") }
        case Int32(LB_FD_CHAR):
            fileSize = .max
        default:
            throw .badRegion("region fd is \(PeerFD.kindName(kind)), which cannot back memory")
        }
        guard end <= fileSize else {
            throw .badRegion("offset \(desc.mmapOffset) + size \(desc.size) beyond the file's \(fileSize) bytes")
        }
        let page = UInt64(lb_page_size())
        let aligned = desc.mmapOffset & ~(page - 1)
        let delta = desc.mmapOffset - aligned
        let (length, o) = desc.size.addingReportingOverflow(delta)
        guard !o, length <= UInt64(Int.max) else { throw .badRegion("too large") }
        if let e = FaultInjection.take(.mmap) { throw .badRegion("mmap: \(Errno(e))") }
        let p = mmap(nil, Int(length), PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(aligned))
        guard let p, p != MAP_FAILED else { throw .badRegion("mmap: \(Errno.current)") }
        let slot = lb_guard_add(p, Int(length), guardFD)
        guard slot >= 0 else { munmap(p, Int(length)); throw .badRegion("no SIGBUS guard slot left: \(Errno.current)") }
        self.desc = desc
        mapBase = p
        mapLength = Int(length)
        host = p + Int(delta)
        file = FileRef(adopting: fd)
        guardSlot = slot
    }
    deinit {
        lb_guard_remove(guardSlot)
        munmap(mapBase, mapLength)
    }

    /// True once the SIGBUS guard replaced this mapping (the peer truncated the file).
    var faulted: Bool { lb_guard_broken(guardSlot) != 0 }

    func overlaps(_ r: VhostUserMemoryRegion) -> Bool { MappedRegion.overlap(desc, r) }
    /// Half-open ranges overlap: x < yEnd && y < xEnd. Ends saturate instead of trapping (both regions are
    /// validated first; saturation only ever errs towards "overlaps").
    static func overlap(_ a: VhostUserMemoryRegion, _ b: VhostUserMemoryRegion) -> Bool {
        func end(_ x: UInt64, _ n: UInt64) -> UInt64 { let (e, o) = x.addingReportingOverflow(n); return o ? .max : e }
        func cross(_ x: UInt64, _ y: UInt64) -> Bool { x < end(y, b.size) && y < end(x, a.size) }
        return cross(a.guestAddress, b.guestAddress) || cross(a.userAddress, b.userAddress)
    }
}

/// Per-vring state as the front-end set it (vhost-user.rst "Ring states").
final class VringState {
    var num: UInt16?
    var addr: VhostUserVringAddress?
    /// Next avail index to process when the ring (re)starts: SET_VRING_BASE, or where the device stopped.
    var base: UInt16 = 0
    /// The kick eventfd (the host gets dups), nil for none. `kickSet` is also true for a NOFD kick (polling).
    var kick: FileRef?
    var kickFD: Int32 { kick?.raw ?? -1 }
    var kickSet = false
    /// A stable fd number the queue's interrupt Notifier writes to. SET_VRING_CALL swaps the file behind it with
    /// dup3 (atomic), so a new call fd (QEMU sends one on every guest MSI-X mask/unmask) needs no re-activation.
    let callSlot: FileRef
    var err: FileRef?
    var enabled = false
    /// Stopped on its own while the device runs (GET_VRING_BASE or a change to this ring, for a device that
    /// supports queue restart): it starts again from `base` once ready, the other rings never stop.
    var stopped = false
    init(callSlot: FileRef) { self.callSlot = callSlot }

    var isConfigured: Bool { num != nil || addr != nil || kickSet }
    var isReady: Bool { num != nil && addr != nil && kickSet && enabled }

    func dropKick() {
        kick = nil
        kickSet = false
    }
}

/// One front-end connection: the receive buffer and everything negotiated on it.
final class VhostUserConnection {
    let socket: FileRef
    var fd: Int32 { socket.raw }
    var registration = -1
    let buffer: UnsafeMutableRawPointer
    var have = 0
    var header = VhostUserHeader(request: 0, flags: 0, size: 0)
    var fds: [Int32] = []
    var features: UInt64 = 0
    var protocolFeatures: VhostUserProtocolFeatures = []
    var vrings: [VringState] = []
    var regions: [MappedRegion] = []
    var memory: GuestMemory?
    var backendReq: FileRef?
    var status: UInt8 = 0
    /// Queues the host currently runs (0 = device stopped).
    var activeCount = 0
    /// Signalled by the SIGBUS guard when one of this connection's regions faulted.
    let guardEvent: FileRef
    var guardFD: Int32 { guardEvent.raw }
    var guardRegistration = -1

    init(fd: Int32, guardFD: Int32) {
        socket = FileRef(adopting: fd)
        guardEvent = FileRef(adopting: guardFD)
        buffer = .allocate(byteCount: VhostUserHeader.byteCount + Int(VhostUserHeader.maxPayload), alignment: 8)
    }
    /// Drops what the connection holds besides its own two fds (closed with the object).
    func closeAll() {
        for f in fds { FD.close(f) }   // received, not yet handed to a message
        fds = []
        vrings = []
        memory = nil
        regions = []
        backendReq = nil
    }
    deinit { buffer.deallocate() }
}

/// Serves one device body to a vhost-user front-end (QEMU, cloud-hypervisor, crosvm, another loopbackd) on a Unix
/// socket, on the host's event loop: the same body the simulated driver and the kernel link drive, now behind the
/// vhost-user protocol (QEMU docs/interop/vhost-user.rst).
///
/// - One connection at a time; further peers wait in the listen backlog until it ends.
/// - Every request is decoded strictly (`VhostUserMessage.decode`); any violation closes that connection (never
///   the daemon), resets the device and drops its memory, and the server listens again.
/// - Rings run when every vring the front-end configured has num + addr + kick and is enabled; changes to a
///   running ring stop the device and start it again from the rings' positions (`lastAvail` as saved, `used.idx`
///   re-read from the ring: rust-vmm vhost-user-backend #180).
public final class VhostUserBackendServer: EventHandler {
    public let socketPath: String
    public let host: DeviceHost
    /// The device's index in `host`.
    public let index: Int
    private let served: ServedDevice

    public static let maxMemSlots = 32
    public static let protocolFeatures: VhostUserProtocolFeatures =
        [.mq, .replyAck, .config, .configureMemSlots, .backendReq, .resetDevice, .status]
    static let protocolFeaturesBit: UInt64 = 1 << 30
    static let ringResetBit: UInt64 = 1 << 40
    /// CONFIG only for a device that has a config space: QEMU's vhost-user-rng warns about it otherwise.
    var offeredProtocolFeatures: VhostUserProtocolFeatures {
        served.configSize > 0 ? Self.protocolFeatures : Self.protocolFeatures.subtracting(.config)
    }

    private var listener: FileRef?
    private var listenFD: Int32 { listener?.raw ?? -1 }
    private var listenRegistration = -1
    /// The device's config interrupt (turned into CONFIG_CHANGE_MSG), and an eventfd nobody reads that call slots
    /// point at while the front-end has given no call fd.
    private var configEvent: FileRef?
    private var configFD: Int32 { configEvent?.raw ?? -1 }
    private var configRegistration = -1
    private var sink: FileRef?
    private var sinkFD: Int32 { sink?.raw ?? -1 }
    private var conn: VhostUserConnection?

    /// Accepted connections so far, the error that closed the last one, config-change messages sent.
    public private(set) var connectionsAccepted = 0
    public private(set) var lastError: VhostUserError?
    public private(set) var configChangesSent = 0
    /// Times accept failed for lack of resources and the listener was paused.
    public private(set) var acceptPauses = 0
    private var retryTimer: FileRef?
    private var retryRegistration = -1

    private enum Token: UInt32 { case listener = 1, connection = 2, config = 3, memoryGuard = 4, retry = 5 }

    /// Adds `device` to `host` (as `name`) and prepares to serve it on `socketPath`; `start()` listens.
    public init(socketPath: String, host: DeviceHost, name: String, device: VirtioDevice) {
        self.socketPath = socketPath
        self.host = host
        let served = ServedDevice(device)
        self.served = served
        index = host.loop.executeAndWait { host.add(name: name, device: served) }
    }

    /// Listens on the socket (a stale socket file is replaced, mode 0600). Callable from any thread.
    public func start() throws(Errno) {
        let err: Errno? = host.loop.executeAndWait { self.startOnLoop() }
        if let err { throw err }
    }

    /// Closes the connection (device reset, memory dropped), the listener and the socket file.
    public func stop() {
        host.loop.executeAndWait { self.stopOnLoop() }
    }

    /// True while a front-end is connected (tests, status).
    public var isConnected: Bool { host.loop.executeAndWait { self.conn != nil } }

    private func startOnLoop() -> Errno? {
        guard listener == nil else { return nil }
        do throws(Errno) {
            let l = FileRef(adopting: try syscall(.other) { socketPath.withCString { lb_unix_listen($0, 4, 0o600) } })
            listener = l
            configEvent = FileRef(try FD.eventfd())
            sink = FileRef(try FD.eventfd())
            configRegistration = try host.loop.register(fd: configFD, handler: self, token: Token.config.rawValue)
            try watchListener()
        } catch {
            stopOnLoop()
            return error
        }
        Log.info("vhost-user: \(host.name(index)) listening on \(socketPath)")
        return nil
    }

    private func stopOnLoop() {
        dropConnection()
        if listener != nil {
            if listenRegistration >= 0 { host.loop.unregister(fd: listenFD, registration: listenRegistration) }
            listenRegistration = -1
            listener = nil
            unlink(socketPath)
        }
        if configEvent != nil {
            if configRegistration >= 0 { host.loop.unregister(fd: configFD, registration: configRegistration) }
            configRegistration = -1
            configEvent = nil
        }
        sink = nil
        if let t = retryTimer { host.loop.unregister(fd: t.raw, registration: retryRegistration) }
        retryTimer = nil
        retryRegistration = -1
    }

    private func watchListener() throws(Errno) {
        guard listenFD >= 0, listenRegistration < 0 else { return }
        listenRegistration = try host.loop.register(fd: listenFD, handler: self, token: Token.listener.rawValue)
    }

    // MARK: events

    public func handleEvent(token: UInt32, events: UInt32) {
        switch Token(rawValue: token) {
        case .listener: accept()
        case .connection:
            // Hang-up or error with nothing left to read ends in recvmsg's 0 or error; bounded by the budget.
            readable()
        case .memoryGuard:
            guard let c = conn else { return }
            _ = FD.drain(c.guardFD)
            if c.regions.contains(where: { $0.faulted }) { fail(.memoryFault) }
        case .retry:
            if let t = retryTimer { _ = FD.drain(t.raw) }
            if conn == nil { try? watchListener() }
        case .config:
            guard configFD >= 0 else { return }
            _ = FD.drain(configFD)
            sendConfigChange()
        case nil: return
        }
    }

    private func accept() {
        guard listener != nil, conn == nil else { return }
        let fd: Int32
        do { fd = try syscall(.accept) { lb_unix_accept(listenFD) } } catch {
            if error.rawValue == EAGAIN || error.rawValue == EWOULDBLOCK { return }
            // EMFILE/ENFILE/ENOMEM leave the connection in the backlog and the listener readable: watching it
            // would spin the loop. Stop watching it and try again in 100 ms.
            Log.warning("vhost-user: \(host.name(index)): accept: \(error); retrying in 100 ms")
            pauseListener()
            return
        }
        let c: VhostUserConnection
        do {
            lb_guard_install()
            let g = try FD.eventfd()
            c = VhostUserConnection(fd: fd, guardFD: g.release())
            for _ in served.queueMaxSizes { c.vrings.append(VringState(callSlot: FileRef(try FD.dup(sinkFD)))) }
        } catch {
            FD.close(fd)
            Log.error("vhost-user: \(host.name(index)): cannot allocate fds for a connection: \(error)")
            pauseListener()
            return
        }
        do throws(Errno) {
            c.registration = try host.loop.register(fd: fd, events: UInt32(LB_EPOLLIN | LB_EPOLLRDHUP), handler: self,
                                                    token: Token.connection.rawValue)
            c.guardRegistration = try host.loop.register(fd: c.guardFD, handler: self, token: Token.memoryGuard.rawValue)
        } catch {
            Log.error("vhost-user: \(host.name(index)): cannot watch connection: \(error)")
            if c.registration >= 0 { host.loop.unregister(fd: fd, registration: c.registration) }
            c.closeAll()
            pauseListener()
            return
        }
        conn = c
        connectionsAccepted += 1
        lb_stall_watch(1)   // a peer shares fds with the loop from now on: watch its calls (stallguard.c)
        // One front-end at a time: the next one waits in the backlog until this one is gone.
        host.loop.unregister(fd: listenFD, registration: listenRegistration)
        listenRegistration = -1
        Log.info("vhost-user: \(host.name(index)): front-end connected")
    }

    /// Stops watching the listener and re-arms it from a one-shot timer (accept failed for lack of resources).
    private func pauseListener() {
        if listenRegistration >= 0 { host.loop.unregister(fd: listenFD, registration: listenRegistration) }
        listenRegistration = -1
        acceptPauses += 1
        if retryTimer == nil {
            do {
                let t = FileRef(adopting: try syscall(.timerfd) { lb_timerfd() })
                retryRegistration = try host.loop.register(fd: t.raw, handler: self, token: Token.retry.rawValue)
                retryTimer = t
            } catch {
                Log.error("vhost-user: \(host.name(index)): no timer to retry accept: \(error); listening again now")
                try? watchListener()
                return
            }
        }
        if let t = retryTimer { _ = lb_timerfd_arm(t.raw, 100_000_000) }
    }

    /// Reads whatever is available, a piece at a time: never past the end of the current message, so the
    /// descriptors that arrive belong to it (a front-end sends each message with one sendmsg).
    private func readable() {
        var budget = 64
        while budget > 0, let c = conn {
            let target = c.have < VhostUserHeader.byteCount ? VhostUserHeader.byteCount : VhostUserHeader.byteCount + Int(c.header.size)
            if c.have < target {
                var got = [Int32](repeating: -1, count: 16)
                var n: Int32 = 0, trunc: Int32 = 0
                let room = Int32(max(0, 8 - c.fds.count))
                let injected = FaultInjection.take(.recvmsg)
                let r = injected == nil ? lb_recvmsg_fds(c.fd, c.buffer + c.have, target - c.have, &got, room, &n, &trunc) : -1
                let e = injected ?? errno
                c.fds.append(contentsOf: got[0..<Int(n)])
                if trunc != 0 { fail(.tooManyFDs); return }
                if r == 0 { fail(.peerClosed(midMessage: c.have > 0 || !c.fds.isEmpty)); return }
                if r < 0 {
                    if e == EAGAIN || e == EWOULDBLOCK { return }
                    fail(e == ECONNRESET ? .peerClosed(midMessage: c.have > 0) : .io(Errno(e)))
                    return
                }
                c.have += r
                if c.have == VhostUserHeader.byteCount {
                    c.header = VhostUserHeader(from: c.buffer)
                    do throws(VhostUserError) { try c.header.validateRequest() } catch { fail(error); return }
                }
                if c.have < VhostUserHeader.byteCount + Int(c.header.size) || c.have < VhostUserHeader.byteCount { continue }
            }
            // A whole message.
            let h = c.header
            let fds = ReceivedFDs(c.fds)
            c.fds = []
            c.have = 0
            do throws(VhostUserError) { try process(c, h, fds) } catch { fail(error); return }
            budget -= 1
        }
    }

    private func fail(_ e: VhostUserError) {
        lastError = e
        if case .peerClosed(false) = e { Log.info("vhost-user: \(host.name(index)): front-end disconnected") } else {
            Log.warning("vhost-user: \(host.name(index)): closing connection: \(e)")
        }
        dropConnection()
    }

    /// Device reset, memory dropped, every fd closed; the listener takes the next front-end.
    private func dropConnection() {
        guard let c = conn else { return }
        stopDevice(c)
        (served.inner as? VhostUserGpuDisplayTaker)?.dropDisplaySocket()   // that front-end's display goes with it
        host.loop.unregister(fd: c.fd, registration: c.registration)
        host.loop.unregister(fd: c.guardFD, registration: c.guardRegistration)
        c.closeAll()
        conn = nil
        lb_stall_watch(-1)
        do { try watchListener() } catch { Log.error("vhost-user: cannot watch the listening socket again: \(error)") }
    }

    // MARK: messages

    private enum Outcome {
        /// A message with its own reply payload (GET_*).
        case reply([UInt8])
        /// Success (0) or failure (non-zero): sent as the REPLY_ACK u64 when the front-end asked for one.
        case status(UInt64)
    }

    private func process(_ c: VhostUserConnection, _ h: VhostUserHeader, _ fds: ReceivedFDs) throws(VhostUserError) {
        let payload = UnsafeRawBufferPointer(start: c.buffer + VhostUserHeader.byteCount, count: Int(h.size))
        let m = try VhostUserMessage.decode(h, payload: payload, fdCount: fds.count,
                                            limits: VhostUserLimits(queueMaxSizes: served.queueMaxSizes))
        Log.debug("vhost-user: \(host.name(index)): \(m)")
        switch try handle(m, c, fds) {
        case .reply(let payload):
            var w = VhostUserWriter.reply(h.request)
            w.append(bytes: payload)
            try reply(c, w.message)
        case .status(let s):
            // REPLY_ACK (vhost-user.rst "REPLY_ACK"): only when negotiated and asked for.
            if h.needsReply && c.protocolFeatures.contains(.replyAck) {
                var w = VhostUserWriter.reply(h.request)
                w.append(s)
                try reply(c, w.message)
            } else if s != 0 {
                Log.warning("vhost-user: \(host.name(index)): request \(h.request) failed")
            }
        }
    }

    private func reply(_ c: VhostUserConnection, _ bytes: [UInt8]) throws(VhostUserError) {
        // Replies are small; a front-end that does not read them while sending more is broken.
        guard VhostUserSocket.sendNow(c.fd, bytes) else { throw .io(Errno.current) }
    }

    private func u64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v) { Array($0) } }

    private func require(_ f: VhostUserProtocolFeatures, _ c: VhostUserConnection, _ r: VhostUserRequest) throws(VhostUserError) {
        guard c.protocolFeatures.contains(f) else { throw .notNegotiated(r) }
    }

    private func handle(_ m: VhostUserMessage, _ c: VhostUserConnection, _ fds: ReceivedFDs) throws(VhostUserError) -> Outcome {
        switch m {
        case .getFeatures:
            return .reply(u64(host.info(index).features.rawValue | Self.protocolFeaturesBit))

        case .setFeatures(var v):
            let offered = host.info(index).features.rawValue | Self.protocolFeaturesBit
            // VIRTIO_F_RING_RESET (bit 40, virtio 1.2 §6): QEMU 10's vhost-user-gpu passes on what the driver acked
            // of its own transport's offer without filtering it by the back-end's (the other vhost-user devices
            // filter). Ring resets reach a back-end as ring stop/start messages anyway: ignored, not an error.
            if v & ~offered == Self.ringResetBit { v &= ~Self.ringResetBit }
            guard v & ~offered == 0 else { throw .featuresNotOffered(v & ~offered) }
            if v != c.features { stopDevice(c) }
            c.features = v
            // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled (vhost-user.rst "Ring states";
            // rust-vmm vhost-user-backend #210).
            if v & Self.protocolFeaturesBit == 0 { for r in c.vrings { r.enabled = true } }
            return .status(reconcile(c) ? 0 : 1)

        case .setOwner:
            return .status(0)

        case .resetOwner, .resetDevice:
            // RESET_OWNER is deprecated; QEMU sends it instead of RESET_DEVICE to back-ends without that feature.
            if case .resetDevice = m { try require(.resetDevice, c, .resetDevice) }
            stopDevice(c)
            for r in c.vrings {
                r.num = nil; r.addr = nil; r.base = 0; r.enabled = false
                r.dropKick()
                r.err = nil
                _ = lb_dup3_cloexec(sinkFD, r.callSlot.raw)
            }
            c.features = 0
            c.status = 0
            return .status(0)

        case .setMemTable(let descs):
            // Every region's own numbers first: the overlap check combines two regions' numbers.
            for d in descs { try MappedRegion.validate(d) }
            var mapped: [MappedRegion] = []
            for (k, d) in descs.enumerated() {
                for e in descs[..<k] where MappedRegion.overlap(d, e) { throw .badRegion("regions overlap") }
                mapped.append(try MappedRegion(d, fd: fds.peek(k), guardFD: c.guardFD))
                _ = fds.take(k)   // owned by the region from now on
            }
            stopDevice(c)
            c.memory = nil
            c.regions = mapped
            try rebuildMemory(c)
            return .status(reconcile(c) ? 0 : 1)

        case .getMaxMemSlots:
            try require(.configureMemSlots, c, .getMaxMemSlots)
            return .reply(u64(UInt64(Self.maxMemSlots)))

        case .addMemReg(let d):
            try require(.configureMemSlots, c, .addMemReg)
            guard c.regions.count < Self.maxMemSlots else { throw .tooManyRegions(c.regions.count + 1) }
            try MappedRegion.validate(d)
            for r in c.regions where r.overlaps(d) { throw .badRegion("region overlaps an existing one") }
            let region = try MappedRegion(d, fd: fds.peek(0), guardFD: c.guardFD)
            _ = fds.take(0)
            stopDevice(c)
            c.memory = nil
            c.regions.append(region)
            try rebuildMemory(c)
            return .status(reconcile(c) ? 0 : 1)

        case .remMemReg(let d):
            try require(.configureMemSlots, c, .remMemReg)
            // Identified by guest address, user address and size; the mmap offset is ignored (vhost-user.rst).
            guard let k = c.regions.firstIndex(where: {
                $0.desc.guestAddress == d.guestAddress && $0.desc.userAddress == d.userAddress && $0.desc.size == d.size
            }) else {
                Log.warning("vhost-user: \(host.name(index)): REM_MEM_REG of an unknown region")
                return .status(1)
            }
            stopDevice(c)
            c.memory = nil
            c.regions.remove(at: k)
            try rebuildMemory(c)
            return .status(reconcile(c) ? 0 : 1)

        case .setVringNum(let i, let num):
            if i < c.activeCount && !stopRing(c, i) { stopDevice(c) }
            c.vrings[i].num = num
            return .status(reconcile(c) ? 0 : 1)

        case .setVringAddr(let a):
            if let mem = c.memory {
                // Checked now if the table is already there (QEMU sends it first); always checked at activation.
                let v = mem.view
                for (what, ua) in [("descriptor table", a.desc), ("avail ring", a.avail), ("used ring", a.used)]
                where v.guestAddress(ofUserAddress: ua) == nil {
                    throw .ringAddress(index: a.index, "\(what) at user address 0x\(String(ua, radix: 16)) is not in any region")
                }
            }
            if a.index < c.activeCount && !stopRing(c, a.index) { stopDevice(c) }
            c.vrings[a.index].addr = a
            return .status(reconcile(c) ? 0 : 1)

        case .setVringBase(let i, let base):
            if i < c.activeCount && !stopRing(c, i) { stopDevice(c) }   // saves the running rings' positions first
            c.vrings[i].base = base
            return .status(reconcile(c) ? 0 : 1)

        case .getVringBase(let i):
            // Stops the ring (vhost-user.rst "Ring states"); it restarts on the next SET_VRING_KICK. A device that
            // supports it stops this ring alone; others stop (and later restart) whole.
            if !(i < c.activeCount && stopRing(c, i)) { stopDevice(c) }
            // Every ring stopped (a driver reset, a VM stop): the device stops whole, as a device without
            // queue restart would, and starts fresh when the rings come back.
            if c.activeCount > 0 && c.vrings[0..<c.activeCount].allSatisfy({ $0.stopped }) { stopDevice(c) }
            let r = c.vrings[i]
            r.dropKick()
            _ = lb_dup3_cloexec(sinkFD, r.callSlot.raw)
            var w = VhostUserWriter(request: 0)
            w.appendState(i, UInt32(r.base))
            _ = reconcile(c)
            return .reply(Array(w.bytes[VhostUserHeader.byteCount...]))

        case .setVringKick(let i, let hasFD):
            if i < c.activeCount && !stopRing(c, i) { stopDevice(c) }
            if hasFD, let why = PeerFD.checkEventFD(fds.peek(0), for: .kick) { throw .badFD(.setVringKick, why) }
            if hasFD { PeerFD.noteOwner(fds.peek(0), "vhost-user front-end of \(host.name(index)) on \(socketPath)") }
            let r = c.vrings[i]
            r.dropKick()
            r.kick = hasFD ? FileRef(adopting: fds.take(0)) : nil
            r.kickSet = true
            return .status(reconcile(c) ? 0 : 1)

        case .setVringCall(let i, let hasFD):
            let r = c.vrings[i]
            if hasFD {
                // The call fd is written on the loop thread: it must be an eventfd and non-blocking.
                if let why = PeerFD.checkEventFD(fds.peek(0), for: .call) { throw .badFD(.setVringCall, why) }
                guard lb_dup3_cloexec(fds.peek(0), r.callSlot.raw) >= 0 else { throw .io(Errno.current) }
                PeerFD.noteOwner(r.callSlot.raw, "vhost-user front-end of \(host.name(index)) on \(socketPath)")
            } else {
                _ = lb_dup3_cloexec(sinkFD, r.callSlot.raw)
            }
            return .status(0)

        case .setVringErr(let i, let hasFD):
            let r = c.vrings[i]
            r.err = hasFD ? FileRef(adopting: fds.take(0)) : nil
            return .status(0)

        case .getProtocolFeatures:
            return .reply(u64(offeredProtocolFeatures.rawValue))

        case .setProtocolFeatures(let v):
            guard v & ~offeredProtocolFeatures.rawValue == 0 else { throw .protocolFeaturesNotOffered(v & ~offeredProtocolFeatures.rawValue) }
            c.protocolFeatures = VhostUserProtocolFeatures(rawValue: v)
            return .status(0)

        case .getQueueNum:
            try require(.mq, c, .getQueueNum)
            return .reply(u64(UInt64(served.queueMaxSizes.count)))

        case .setVringEnable(let i, let enable):
            if i < c.activeCount && !enable && !stopRing(c, i) { stopDevice(c) }
            c.vrings[i].enabled = enable
            return .status(reconcile(c) ? 0 : 1)

        case .setBackendReqFD:
            try require(.backendReq, c, .setBackendReqFD)
            if let why = PeerFD.checkSocket(fds.peek(0)) { throw .badFD(.setBackendReqFD, why) }
            c.backendReq = FileRef(adopting: fds.take(0))
            return .status(0)

        case .getConfig(let off, let size, let flags):
            try require(.config, c, .getConfig)
            var data = [UInt8](repeating: 0, count: Int(size))
            let ok = data.withUnsafeMutableBytes { host.readConfig(index, offset: Int(off), into: $0) }
            // Out of range: a zero-length payload is the spec's error reply (vhost-user.rst GET_CONFIG).
            guard ok else { return .reply([]) }
            var w = VhostUserWriter(request: 0)
            w.append(off); w.append(size); w.append(flags); w.append(bytes: data)
            return .reply(Array(w.bytes[VhostUserHeader.byteCount...]))

        case .setConfig(let off, _, let data):
            try require(.config, c, .setConfig)
            let ok = data.withUnsafeBytes { host.writeConfig(index, offset: Int(off), from: $0) }
            return .status(ok ? 0 : 1)

        case .setStatus(let s):
            // Recorded only: rings stop with GET_VRING_BASE, which QEMU sends after SET_STATUS 0, and must still
            // report the rings' positions then.
            try require(.status, c, .setStatus)
            c.status = s
            return .status(0)

        case .getStatus:
            try require(.status, c, .getStatus)
            return .reply(u64(UInt64(c.status | (host.status(index) & DeviceStatus.needsReset))))

        case .gpuSetSocket:
            // Only a device that presents through the display protocol takes it (vhost-user-gpu.rst); QEMU sends it
            // at each DRIVER_OK, before starting the rings, and closes its end when the device stops.
            guard let display = served.inner as? VhostUserGpuDisplayTaker else { throw .unsupportedRequest(.gpuSetSocket) }
            if let why = PeerFD.checkSocket(fds.peek(0)) { throw .badFD(.gpuSetSocket, why) }
            display.takeDisplaySocket(fds.take(0), loop: host.loop)
            return .status(0)
        }
    }

    private func rebuildMemory(_ c: VhostUserConnection) throws(VhostUserError) {
        guard !c.regions.isEmpty else { c.memory = nil; return }
        let infos = c.regions.map {
            RegionInfo(guestBase: $0.desc.guestAddress, size: $0.desc.size, host: $0.host, fd: $0.fd,
                       fdOffset: $0.desc.mmapOffset, userAddr: $0.desc.userAddress)
        }
        // The regions keep ownership of mappings and fds; GuestMemory only holds the table.
        do { c.memory = try GuestMemory(regions: infos, mappings: [], fds: []) } catch {
            c.regions = []
            throw .badRegion("region table rejected: \(error)")
        }
    }

    // MARK: running the device

    /// Stops the device if it runs, keeping each running ring's position as its base.
    private func stopDevice(_ c: VhostUserConnection) {
        guard c.activeCount > 0 else { return }
        if host.isActive(index) { host.reset(index) }
        let saved = served.savedLastAvail
        for n in 0..<min(c.activeCount, saved.count) { c.vrings[n].base = saved[n] }
        for r in c.vrings { r.stopped = false }
        c.activeCount = 0
    }

    /// Stops running ring `i` alone (saving its position as its base) if the device supports it; false: the caller
    /// must stop the whole device.
    private func stopRing(_ c: VhostUserConnection, _ i: Int) -> Bool {
        guard i < c.activeCount, host.supportsQueueRestart(index) else { return false }
        let r = c.vrings[i]
        if r.stopped { return true }
        guard let base = host.stopQueue(index, i) else { return false }
        r.base = base
        r.stopped = true
        return true
    }

    /// Starts ring `i`, stopped alone, again from its base (it is ready: num, addr, kick, enabled).
    private func restartRing(_ c: VhostUserConnection, _ i: Int) -> Bool {
        let r = c.vrings[i]
        guard let mem = c.memory, let num = r.num, let a = r.addr else { return false }
        let v = mem.view
        guard let d = v.guestAddress(ofUserAddress: a.desc), let av = v.guestAddress(ofUserAddress: a.avail),
              let u = v.guestAddress(ofUserAddress: a.used) else {
            Log.warning("vhost-user: \(host.name(index)): vring \(i) addresses are not in the memory table")
            return false
        }
        var kick: Int32 = -1
        if r.kickFD >= 0 {
            do { kick = try FD.dup(r.kickFD).release() } catch { Log.error("vhost-user: dup: \(error)"); return false }
        }
        do {
            try host.startQueue(index, i, config: QueueConfig(size: num, desc: d, avail: av, used: u), kickFD: kick,
                                interrupt: .eventfd(r.callSlot.raw), lastAvail: r.base, usedFromRing: true)
        } catch {
            Log.warning("vhost-user: \(host.name(index)): cannot restart vring \(i): \(error)")
            return false
        }
        r.stopped = false
        Log.debug("vhost-user: \(host.name(index)): vring \(i) restarted at \(r.base)")
        return true
    }

    /// Starts, restarts or stops the device to match the rings: it runs queues 0..<N when every configured vring
    /// (the highest configured one is N-1) is ready. Returns false if it should run but could not start.
    private func reconcile(_ c: VhostUserConnection) -> Bool {
        var want: Int? = nil
        // A ring stopped alone counts as running: the device keeps the others going meanwhile.
        if c.memory != nil, let last = c.vrings.lastIndex(where: { $0.isConfigured }),
           (0...last).allSatisfy({ c.vrings[$0].isReady || (c.vrings[$0].stopped && $0 < c.activeCount) }) {
            want = last + 1
        }
        if c.activeCount > 0 && want != c.activeCount { stopDevice(c) }
        if c.activeCount > 0 {
            var ok = true
            for i in 0..<c.activeCount where c.vrings[i].stopped && c.vrings[i].isReady { ok = restartRing(c, i) && ok }
            return ok
        }
        guard let n = want else { return true }
        return activate(c, n)
    }

    private func activate(_ c: VhostUserConnection, _ n: Int) -> Bool {
        guard let mem = c.memory else { return false }
        let name = host.name(index)
        let view = mem.view
        var configs: [QueueConfig] = []
        for i in 0..<n {
            let r = c.vrings[i]
            guard let num = r.num, let a = r.addr,
                  let d = view.guestAddress(ofUserAddress: a.desc),
                  let av = view.guestAddress(ofUserAddress: a.avail),
                  let u = view.guestAddress(ofUserAddress: a.used) else {
                Log.warning("vhost-user: \(name): vring \(i) addresses are not in the memory table")
                return false
            }
            configs.append(QueueConfig(size: num, desc: d, avail: av, used: u))
        }
        guard host.setFeatures(index, VirtioFeatures(rawValue: c.features & ~Self.protocolFeaturesBit)) else { return false }
        var kicks: [Int32] = []
        for i in 0..<n {
            let k = c.vrings[i].kickFD
            guard k >= 0 else { kicks.append(-1); continue }
            do { kicks.append(try FD.dup(k).release()) } catch {
                Log.error("vhost-user: \(name): dup: \(error)")
                for f in kicks { FD.close(f) }
                return false
            }
        }
        do {
            try host.activate(index, queues: configs, kickFDs: kicks,
                              interrupts: (0..<n).map { Notifier.eventfd(c.vrings[$0].callSlot.raw) },
                              configInterrupt: .eventfd(configFD), memory: mem,
                              lastAvail: (0..<n).map { c.vrings[$0].base }, usedFromRing: true)
        } catch {
            Log.warning("vhost-user: \(name): cannot start: \(error)")
            return false
        }
        c.activeCount = n
        Log.debug("vhost-user: \(name): running \(n) queue(s)")
        return true
    }

    /// The device raised its config interrupt: tell the front-end (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG) so it
    /// re-reads the config space with GET_CONFIG. Sent without NEED_REPLY, so no answer has to be read.
    private func sendConfigChange() {
        guard let c = conn, let channel = c.backendReq, c.protocolFeatures.isSuperset(of: [.backendReq, .config]) else { return }
        let m = VhostUserWriter(request: VhostUserBackendRequest.configChange.rawValue).message
        if VhostUserSocket.sendNow(channel.raw, m) { configChangesSent += 1; return }
        Log.warning("vhost-user: \(host.name(index)): back-end request channel failed (\(Errno.current)); closed")
        c.backendReq = nil
    }
}
