import Glibc
import CLinux
import Transport

/// The front-end side of the vhost-user-gpu display protocol (QEMU docs/interop/vhost-user-gpu.rst), for a gpu
/// forwarded to an external back-end such as QEMU's vhost-user-gpu: before each ring set-up the vhost-user
/// front-end sends VHOST_USER_GPU_SET_SOCKET with one end of a fresh socketpair (`ringsStarting`); the back-end then
/// asks this server for the display (GET_PROTOCOL_FEATURES, GET_DISPLAY_INFO: the configured scanouts, GET_EDID:
/// `GpuEDID.block` of the scanout's mode) and sends it the picture: SCANOUT (a scanout's size, 0: off), UPDATE
/// (a rectangle of pixels), CURSOR_UPDATE / CURSOR_POS / CURSOR_POS_HIDE, and with a dmabuf-capable back-end
/// DMABUF_SCANOUT(2) + DMABUF_UPDATE. The server keeps a host copy of each scanout's picture and presents it on
/// the scanout's `GpuOutput` exactly as the in-process `GpuDevice` does (scanoutChanged, flush, cursorChanged,
/// cursorMoved), so `none`, `file:` and later `kms` work the same for both.
///
/// Pixels: UPDATE carries the rectangle in the resource's own format; QEMU's front-end composites it as
/// PIXMAN_x8r8g8b8 (hw/display/vhost-user-gpu.c), i.e. B8G8R8X8 bytes in memory, the format Linux's virtio-gpu
/// uses for its framebuffers. The host copy is kept and presented as B8G8R8X8; the cursor's 64×64 image as
/// B8G8R8A8 (ARGB8888, Linux's cursor format).
///
/// Wire format: the codec in Transport/VhostUser/GpuDisplay.swift (`VhostUserGpuReceiver` reads whole messages
/// with their fds, `VhostUserGpuMessage.decode` checks every size, count and scanout id, `VhostUserGpuReply`
/// encodes the answers). Hostile back-end: on top of the codec's checks, UPDATE rectangles must lie inside the
/// scanout's picture (64-bit), a scanout's picture is at most `maxSide` pixels a side and all pictures together
/// stay within `memoryBudget`; anything the codec or these checks refuse ends the display connection with a log
/// line naming the cause (the back-end keeps its rings; a new display socket comes with the next ring set-up).
/// Reads are non-blocking and bounded per wake-up (`messagesPerEvent`, `bytesPerEvent`), so a flood delays the
/// loop's other devices by at most one bound. Memory: the pictures (within `memoryBudget`) and one receive buffer
/// of the largest message they allow (UPDATE of a whole picture: 20 + `memoryBudget` bytes at most, touched only
/// as far as messages reach), allocated once; no allocation per frame or cursor message.
public final class GpuDisplayServer: VhostUserFrontendCompanion, EventHandler, GpuFrameSource {
    public let name: String
    public let modes: [GpuMode]
    public let outputs: [GpuOutput]
    public let memoryBudget: Int
    public let loop: EventLoop
    /// Largest scanout side accepted from the back-end (a driver's SET_SCANOUT rectangle may exceed the mode).
    public static let maxSide: UInt32 = 16384
    static let messagesPerEvent = 64
    static let bytesPerEvent = 8 << 20
    /// Protocol features offered (vhost-user-gpu.rst): GET_EDID, and DMABUF_SCANOUT2 (its modifier tells a
    /// linear buffer, the only kind mapped here, from a tiled one).
    public static let offeredProtocolFeatures: VhostUserGpuProtocolFeatures = [.edid, .dmabuf2]
    static let cursorBytes = VhostUserGpuMessage.cursorImageBytes

    private struct Scanout {
        var pixels: UnsafeMutableRawPointer?
        var capacity = 0
        var width: UInt32 = 0, height: UInt32 = 0
        var shown = false
        // dmabuf: the back-end's buffer, mapped read-only; `rect` is the scanout inside it.
        var dmabuf: UnsafeMutableRawPointer?
        var dmabufLength = 0
        var dmabufStride = 0
        var dmabufRect = GpuRect(x: 0, y: 0, width: 0, height: 0)
        // Cursor.
        var cursor: UnsafeMutableRawPointer
        var cursorKnown = false, cursorVisible = false
        var hotX: UInt32 = 0, hotY: UInt32 = 0, cursorX: UInt32 = 0, cursorY: UInt32 = 0
    }
    private var scanouts: [Scanout]
    private var fd: Int32 = -1
    private var registration = -1
    private var outputsStarted = false

    private let receiver: VhostUserGpuReceiver
    private let reply: UnsafeMutableRawBufferPointer
    private var negotiated: VhostUserGpuProtocolFeatures = []
    private let edids: [[UInt8]]

    /// Counters (tests, logs): messages handled, UPDATEs applied, connections closed for a protocol violation.
    public private(set) var messages = 0, updates = 0, cursorUpdates = 0, violations = 0, connections = 0
    /// The last reason a connection was closed by us (tests).
    public private(set) var lastViolation: String?

    public init(name: String, modes: [GpuMode], outputs: [GpuOutput], memoryBudget: Int, loop: EventLoop) throws(DeviceError) {
        precondition(!modes.isEmpty && modes.count <= VirtioGPU.maxScanouts && outputs.count == modes.count)
        self.name = name
        self.modes = modes
        self.outputs = outputs
        self.memoryBudget = memoryBudget
        self.loop = loop
        scanouts = modes.map { _ in
            let c = UnsafeMutableRawPointer.allocate(byteCount: Self.cursorBytes, alignment: 16)
            memset(c, 0, Self.cursorBytes)
            return Scanout(cursor: c)
        }
        edids = modes.enumerated().map { GpuEDID.block(mode: $0.element, scanout: $0.offset) }
        // The largest message: CURSOR_UPDATE, or an UPDATE of a whole picture the budget allows.
        let largest = min(memoryBudget, Int(Self.maxSide) * Int(Self.maxSide) * 4, Int(UInt32.max) - 64)
        receiver = VhostUserGpuReceiver(limits: VhostUserGpuLimits(scanouts: modes.count,
                                                                   maxPayload: max(VhostUserGpuMessage.cursorUpdateBytes, VhostUserGpuUpdate.byteCount + largest)))
        reply = .allocate(byteCount: VhostUserGpuHeader.byteCount + VhostUserGpuReply.edidBytes, alignment: 16)
    }

    deinit {
        closeConnection()
        if outputsStarted { for o in outputs { o.stop() } }
        for s in scanouts {
            s.pixels?.deallocate()
            s.cursor.deallocate()
            if let m = s.dmabuf { munmap(m, s.dmabufLength) }
        }
        reply.deallocate()
    }

    // MARK: VhostUserFrontendCompanion

    public func ringsStarting() throws(DeviceError) -> [(request: VhostUserRequest, fds: [Int32])] {
        if !outputsStarted {
            for (i, o) in outputs.enumerated() { try o.start(loop: loop, scanout: i, source: self) }
            outputsStarted = true
        }
        // After a driver reset the same back-end still holds its display socket, and QEMU 7.2's refuses a second
        // SET_SOCKET while it does (vg_process_msg: sock_fd must be -1): keep the connection, send nothing.
        if fd >= 0 { return [] }
        var sv: [Int32] = [-1, -1]
        guard lb_unix_socketpair(&sv, 1) == 0 else { throw DeviceError("\(name): display socketpair: \(Errno.current)") }
        do {
            registration = try loop.register(fd: sv[0], events: UInt32(LB_EPOLLIN | LB_EPOLLRDHUP), handler: self, token: 1)
        } catch {
            FD.close(sv[0]); FD.close(sv[1])
            throw DeviceError("\(name): cannot watch the display socket: \(error)")
        }
        fd = sv[0]
        connections += 1
        negotiated = []
        return [(.gpuSetSocket, [sv[1]])]
    }

    /// A driver reset blanks the outputs (the driver sets its scanouts again) but keeps the display connection to
    /// the same back-end (QEMU's front-end closes it and sends a new one at the next start, which the 7.2 back-end
    /// ignores: after a driver reload it has no display at all, seen in the guest case); a lost back-end or a
    /// shutdown closes it.
    public func ringsStopped(backendGone: Bool) {
        if backendGone { closeConnection() } else { blank() }
    }

    /// virtio_gpu_config (§5.7.4): num_scanouts (offset 8) is the display's, not the back-end's (QEMU's front-end
    /// overrides it the same way: hw/display/vhost-user-gpu.c get_config).
    public func configRead(offset: Int, _ buffer: UnsafeMutableRawBufferPointer) {
        let n = UInt32(modes.count).littleEndian
        withUnsafeBytes(of: n) { v in
            for k in 0..<buffer.count where offset + k >= 8 && offset + k < 12 { buffer[k] = v[offset + k - 8] }
        }
    }

    /// Closes the display connection; every scanout and cursor shows nothing (the back-end's next conversation
    /// starts from SCANOUT again).
    private func closeConnection() {
        if fd >= 0 {
            if registration >= 0 { loop.unregister(fd: fd, registration: registration) }
            FD.close(fd)
        }
        fd = -1; registration = -1
        receiver.consume()   // a message cut short: its bytes and fds are dropped
        blank()
    }

    /// Every scanout and cursor shows nothing.
    private func blank() {
        for i in 0..<scanouts.count {
            unmapDmabuf(i)
            if scanouts[i].shown { scanouts[i].shown = false; outputs[i].scanoutChanged(frame: nil) }
            if scanouts[i].cursorVisible {
                scanouts[i].cursorVisible = false
                outputs[i].cursorChanged(image: nil, hotX: 0, hotY: 0, x: scanouts[i].cursorX, y: scanouts[i].cursorY)
            }
            scanouts[i].cursorKnown = false
        }
    }

    private func violation(_ why: String) {
        violations += 1
        lastViolation = why
        Log.warning("\(name): vhost-user-gpu display: \(why); closing the display connection")
        closeConnection()
    }

    public var isConnected: Bool { fd >= 0 }

    // MARK: GpuFrameSource

    public func currentFrame(_ s: Int) -> GpuFrame? {
        guard s >= 0, s < scanouts.count, scanouts[s].shown, let p = scanouts[s].pixels else { return nil }
        return frame(s, p)
    }

    @inline(__always)
    private func frame(_ s: Int, _ p: UnsafeMutableRawPointer) -> GpuFrame {
        GpuFrame(pixels: p, stride: Int(scanouts[s].width) * 4, format: .b8g8r8x8,
                 rect: GpuRect(x: 0, y: 0, width: scanouts[s].width, height: scanouts[s].height))
    }

    /// The cursor image of scanout `s` as presented (tests).
    public func cursor(_ s: Int) -> (visible: Bool, hotX: UInt32, hotY: UInt32, x: UInt32, y: UInt32, image: UnsafeRawPointer)? {
        guard s >= 0, s < scanouts.count, scanouts[s].cursorKnown else { return nil }
        let c = scanouts[s]
        return (c.cursorVisible, c.hotX, c.hotY, c.cursorX, c.cursorY, UnsafeRawPointer(c.cursor))
    }

    // MARK: receiving

    public func handleEvent(token: UInt32, events: UInt32) {
        var bytes = 0
        for _ in 0..<Self.messagesPerEvent {
            guard fd >= 0 else { return }
            do throws(VhostUserGpuError) {
                guard case .message(var h) = try receiver.receive(fd) else { return }
                // A request's flags are not looked at (QEMU's front-end ignores them): QEMU 7.2's back-end sends
                // UPDATE in a g_try_malloc'ed message whose flags it never sets (vg_resource_flush), so they hold
                // whatever the heap had, the REPLY bit included (seen in the guest case).
                h.flags = 0
                let m = try VhostUserGpuMessage.decode(h, payload: receiver.payload, fdCount: receiver.fdCount, limits: receiver.limits)
                messages &+= 1
                let ok = handle(m, receiver.payload)
                receiver.consume()
                guard ok else { return }
                bytes += Int(h.size)
                if bytes >= Self.bytesPerEvent { return }   // the rest waits for the next turn of the loop
            } catch {
                if case .scanoutID(.getEDID, _, _) = error {
                    // A driver may ask for any scanout id the virtio spec allows; the back-end relays it and waits
                    // for a reply of the EDID's size: answer the error virtio-gpu has for it, keep the display.
                    receiver.consume()
                    guard send(.edid(type: VirtioGPU.respErrInvalidScanoutID, data: [])) else { return }
                    continue
                }
                if case .peerClosed(midMessage: false) = error {
                    Log.info("\(name): vhost-user-gpu display: the back-end closed the display connection")
                    closeConnection()
                } else {
                    violation("\(error)")
                }
                return
            }
        }
    }

    // MARK: requests

    /// One decoded message (`payload`: its bytes, pixels after the fixed part). False once the connection was closed.
    private func handle(_ m: VhostUserGpuMessage, _ payload: UnsafeRawBufferPointer) -> Bool {
        switch m {
        case .getProtocolFeatures:
            return send(.protocolFeatures(Self.offeredProtocolFeatures.rawValue))
        case .setProtocolFeatures(let f):
            let set = VhostUserGpuProtocolFeatures(rawValue: f)
            guard Self.offeredProtocolFeatures.isSuperset(of: set) else {
                violation("SET_PROTOCOL_FEATURES 0x\(String(f, radix: 16)) beyond the offered 0x\(String(Self.offeredProtocolFeatures.rawValue, radix: 16))")
                return false
            }
            negotiated = set
            return true
        case .getDisplayInfo:
            return send(.displayInfo(type: VirtioGPU.respOKDisplayInfo,
                                     modes: modes.map { VhostUserGpuDisplayMode(width: $0.width, height: $0.height, enabled: 1) }))
        case .getEDID(let s):
            // A scanout out of range never gets here (the codec refuses it).
            return send(.edid(type: VirtioGPU.respOKEDID, data: edids[Int(s)]))
        case .cursorPos(let p), .cursorPosHide(let p):
            return cursorMessage(p, hide: m.request == .cursorPosHide, hot: nil, image: nil)
        case .cursorUpdate(let p, let hotX, let hotY):
            return cursorMessage(p, hide: false, hot: (hotX, hotY), image: payload.baseAddress! + m.fixedBytes)
        case .scanout(let v):
            let i = Int(v.scanout)
            unmapDmabuf(i)
            if v.width == 0 || v.height == 0 { return disable(i) }
            return show(i, v.width, v.height)
        case .update(let u):
            return update(u, pixels: payload.baseAddress! + m.fixedBytes)
        case .dmabufScanout(let d):
            return dmabufScanout(d, fd: receiver.takeFD(0))
        case .dmabufUpdate(let u):
            return dmabufUpdate(u)
        }
    }

    private func disable(_ i: Int) -> Bool {
        if scanouts[i].shown { scanouts[i].shown = false; outputs[i].scanoutChanged(frame: nil) }
        return true
    }

    /// The scanout now shows a `w`×`h` picture (black until the first UPDATE), allocated within the budget.
    private func show(_ i: Int, _ w: UInt32, _ h: UInt32) -> Bool {
        guard w <= Self.maxSide, h <= Self.maxSide else {
            violation("scanout \(i) of \(w)x\(h): more than \(Self.maxSide) pixels a side")
            return false
        }
        let need = Int(w) * Int(h) * 4
        if need > scanouts[i].capacity {
            let others = scanouts.enumerated().reduce(0) { $0 + ($1.offset == i ? 0 : $1.element.capacity) }
            guard others + need <= memoryBudget else {
                violation("scanout \(i) of \(w)x\(h) needs \(need >> 10) KiB: over the display budget of \(memoryBudget >> 20) MiB "
                          + "(memory-budget-mib) with the other scanouts' \(others >> 10) KiB")
                return false
            }
            scanouts[i].pixels?.deallocate()
            scanouts[i].pixels = .allocate(byteCount: need, alignment: 64)
            scanouts[i].capacity = need
        }
        scanouts[i].width = w; scanouts[i].height = h
        memset(scanouts[i].pixels!, 0, need)
        scanouts[i].shown = true
        outputs[i].scanoutChanged(frame: frame(i, scanouts[i].pixels!))
        return true
    }

    /// UPDATE: the rectangle's rows (packed, w × 4 bytes each) into the scanout's picture, then the flush.
    private func update(_ u: VhostUserGpuUpdate, pixels src: UnsafeRawPointer) -> Bool {
        let i = Int(u.scanout)
        let r = GpuRect(x: u.x, y: u.y, width: u.width, height: u.height)
        guard scanouts[i].shown, let pic = scanouts[i].pixels else {
            violation("UPDATE for scanout \(i), which shows nothing (no SCANOUT before)")
            return false
        }
        guard r.fits(scanouts[i].width, scanouts[i].height) else {
            violation("UPDATE (\(r.x),\(r.y)) \(r.width)x\(r.height) outside scanout \(i)'s \(scanouts[i].width)x\(scanouts[i].height)")
            return false
        }
        let rowBytes = Int(r.width) * 4, stride = Int(scanouts[i].width) * 4
        for row in 0..<Int(r.height) {
            (pic + (Int(r.y) + row) * stride + Int(r.x) * 4).copyMemory(from: src + row * rowBytes, byteCount: rowBytes)
        }
        updates &+= 1
        if !r.isEmpty { outputs[i].flush(frame: frame(i, pic), damage: r) }
        return true
    }

    private func cursorMessage(_ p: VhostUserGpuCursorPos, hide: Bool, hot: (UInt32, UInt32)?, image: UnsafeRawPointer?) -> Bool {
        let i = Int(p.scanout), x = p.x, y = p.y
        scanouts[i].cursorX = x; scanouts[i].cursorY = y
        if let hot, let image {
            if !scanouts[i].cursorKnown {
                // Once per connection and scanout (then every image change is silent): the cursor path works.
                Log.info("\(name): vhost-user-gpu display: scanout \(i) cursor image set, hot spot (\(hot.0), \(hot.1)) at (\(x), \(y))")
            }
            cursorUpdates &+= 1
            scanouts[i].hotX = hot.0; scanouts[i].hotY = hot.1
            scanouts[i].cursor.copyMemory(from: image, byteCount: Self.cursorBytes)
            scanouts[i].cursorKnown = true
            scanouts[i].cursorVisible = true
            presentCursor(i)
        } else if hide {
            if scanouts[i].cursorVisible {
                scanouts[i].cursorVisible = false
                outputs[i].cursorChanged(image: nil, hotX: 0, hotY: 0, x: x, y: y)
            }
        } else if scanouts[i].cursorKnown && !scanouts[i].cursorVisible {
            // CURSOR_POS shows the cursor at (x, y) (QEMU: dpy_mouse_set(..., visible)).
            scanouts[i].cursorVisible = true
            presentCursor(i)
        } else {
            outputs[i].cursorMoved(x: x, y: y)
        }
        return true
    }

    private func presentCursor(_ i: Int) {
        let side = UInt32(VirtioGPU.cursorSide)
        let c = scanouts[i]
        outputs[i].cursorChanged(image: GpuFrame(pixels: c.cursor, stride: VirtioGPU.cursorSide * 4, format: .b8g8r8a8,
                                                 rect: GpuRect(x: 0, y: 0, width: side, height: side)),
                                 hotX: c.hotX, hotY: c.hotY, x: c.cursorX, y: c.cursorY)
    }

    // MARK: dmabuf

    /// DMABUF_SCANOUT(2): the scanout shows a rectangle of the back-end's buffer, passed as an fd (none: off).
    /// Linear XRGB8888/ARGB8888 buffers are mapped read-only and copied into the host picture at DMABUF_UPDATE;
    /// anything else (another format, a tiled modifier, a buffer smaller than its stride × height, a memfd that
    /// could still shrink under the mapping) is refused with a log line: the scanout shows nothing, the
    /// connection stays.
    private func dmabufScanout(_ d: VhostUserGpuDmabufScanout, fd: Int32) -> Bool {
        defer { FD.close(fd) }
        let i = Int(d.scanout)
        let r = GpuRect(x: d.x, y: d.y, width: d.width, height: d.height)
        unmapDmabuf(i)
        guard fd >= 0, !d.disables else { return disable(i) }
        func refuse(_ why: String) -> Bool {
            Log.warning("\(name): vhost-user-gpu display: scanout \(i): dmabuf refused: \(why); the scanout shows nothing")
            return disable(i)
        }
        // DRM fourcc codes (drm_fourcc.h): XR24, AR24 = B8G8R8X8 / B8G8R8A8 in memory. The codec checked the
        // rectangle against the buffer and, for linear buffers, the stride against its width.
        guard d.fourcc == 0x3432_5258 || d.fourcc == 0x3432_5241 else {
            return refuse("format 0x\(String(UInt32(bitPattern: d.fourcc), radix: 16)), only XRGB8888/ARGB8888")
        }
        if let mod = d.modifier, mod != 0 { return refuse("modifier 0x\(String(mod, radix: 16)): only linear buffers can be mapped") }
        let length = UInt64(d.fdStride) * UInt64(d.fdHeight)
        let end = lseek(fd, 0, SEEK_END)
        guard end >= 0, UInt64(end) >= length, length <= UInt64(memoryBudget) else {
            return refuse("buffer of \(end) bytes for stride \(d.fdStride) × \(d.fdHeight) rows")
        }
        // A memfd (udmabuf's backing) could be truncated under the mapping (SIGBUS on the loop): only sealed.
        let seals = fcntl(fd, 1034 /* F_GET_SEALS */)
        if seals >= 0 && seals & 0x2 /* F_SEAL_SHRINK */ == 0 { return refuse("a memfd without F_SEAL_SHRINK") }
        let m = mmap(nil, Int(length), PROT_READ, MAP_SHARED, fd, 0)
        guard let m, m != MAP_FAILED else { return refuse("mmap: \(Errno.current)") }
        guard show(i, r.width, r.height) else { munmap(m, Int(length)); return false }
        scanouts[i].dmabuf = m; scanouts[i].dmabufLength = Int(length); scanouts[i].dmabufStride = Int(d.fdStride)
        scanouts[i].dmabufRect = r
        return true
    }

    private func unmapDmabuf(_ i: Int) {
        if let m = scanouts[i].dmabuf { munmap(m, scanouts[i].dmabufLength) }
        scanouts[i].dmabuf = nil; scanouts[i].dmabufLength = 0
    }

    /// DMABUF_UPDATE: copy the damaged rectangle out of the mapped buffer, flush, and always answer: the back-end
    /// waits for this reply before it processes the driver's next command (vg_wait_ok).
    private func dmabufUpdate(_ u: VhostUserGpuUpdate) -> Bool {
        let i = Int(u.scanout)
        let r = GpuRect(x: u.x, y: u.y, width: u.width, height: u.height)
        if let m = scanouts[i].dmabuf, let pic = scanouts[i].pixels, scanouts[i].shown {
            // The damage is in buffer coordinates; the picture is the scanout's rectangle of the buffer.
            let sr = scanouts[i].dmabufRect
            let d = r.intersection(sr)   // 64-bit arithmetic: any rectangle the back-end sends
            if !d.isEmpty {
                let stride = Int(scanouts[i].width) * 4
                for row in 0..<Int(d.height) {
                    let src = m + (Int(d.y) + row) * scanouts[i].dmabufStride + Int(d.x) * 4
                    let dst = pic + (Int(d.y - sr.y) + row) * stride + Int(d.x - sr.x) * 4
                    dst.copyMemory(from: src, byteCount: Int(d.width) * 4)
                }
                updates &+= 1
                outputs[i].flush(frame: frame(i, pic), damage: GpuRect(x: d.x - sr.x, y: d.y - sr.y, width: d.width, height: d.height))
            }
        }
        return send(.dmabufUpdateDone)
    }

    // MARK: replies

    /// Replies are small (at most 1,068 bytes) and the back-end waits for each before it sends anything else that
    /// needs one: one non-blocking send; a back-end whose socket buffer is full is not reading its replies and is
    /// dropped.
    private func send(_ r: VhostUserGpuReply) -> Bool {
        guard fd >= 0 else { return false }
        guard let n = r.encode(into: reply) else { violation("cannot encode the reply to \(r.request) (loopbackd bug)"); return false }
        let sent = lb_send_nowait(fd, reply.baseAddress, n)
        guard sent == n else {
            violation(sent < 0 ? "reply not sent: \(Errno.current)" : "reply not sent: the back-end does not read its replies")
            return false
        }
        return true
    }
}
