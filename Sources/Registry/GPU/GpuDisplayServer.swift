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
/// Hostile back-end: every size is checked before anything is read into place (header `size` against the
/// request's fixed size; UPDATE: the rectangle inside the scanout's picture, computed in 64 bits, and `size` =
/// 20 + w·h·4 exactly); a scanout's picture is at most `maxSide` pixels a side and all pictures together stay
/// within `memoryBudget`; unknown requests, replies where requests belong, stray fds and truncated control data
/// end the display connection with a log line naming the cause. Reads are non-blocking and bounded per wake-up
/// (`readsPerEvent`), so a flood delays the loop's other devices by at most one bound. No allocation per
/// message: the receive buffer, payload buffer and reply buffer are allocated once; a picture only when a
/// scanout's size changes.
public final class GpuDisplayServer: VhostUserFrontendCompanion, EventHandler, GpuFrameSource {
    public let name: String
    public let modes: [GpuMode]
    public let outputs: [GpuOutput]
    public let memoryBudget: Int
    public let loop: EventLoop
    /// Largest scanout side accepted from the back-end (a driver's SET_SCANOUT rectangle may exceed the mode).
    public static let maxSide: UInt32 = 16384
    static let readsPerEvent = 16
    static let receiveBytes = 64 << 10

    // vhost-user-gpu.rst: header = le32 request, le32 flags, le32 size; flags bit 2 = reply.
    static let headerSize = 12
    static let replyFlag: UInt32 = 0x4
    // Protocol features (vhost-user-gpu.rst): EDID = bit 0, DMABUF2 = bit 1.
    static let protocolEDID: UInt64 = 1 << 0
    static let protocolDMABUF2: UInt64 = 1 << 1
    public static let offeredProtocolFeatures = protocolEDID | protocolDMABUF2

    enum Request: UInt32 {
        case getProtocolFeatures = 1, setProtocolFeatures, getDisplayInfo, cursorPos, cursorPosHide, cursorUpdate,
             scanout, update, dmabufScanout, dmabufUpdate, getEDID, dmabufScanout2
    }
    /// Payload sizes of the requests with fixed payloads (UPDATE: its 20-byte head; the pixels follow).
    static func payloadSize(_ r: Request) -> Int {
        switch r {
        case .getProtocolFeatures, .getDisplayInfo: return 0
        case .setProtocolFeatures: return 8
        case .cursorPos, .cursorPosHide, .scanout: return 12
        case .cursorUpdate: return 12 + 8 + cursorBytes
        case .update, .dmabufUpdate: return 20
        case .dmabufScanout: return 40
        case .dmabufScanout2: return 48
        case .getEDID: return 4
        }
    }
    static let cursorBytes = VirtioGPU.cursorSide * VirtioGPU.cursorSide * 4

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

    // Receive state: a header, then the fixed payload (or UPDATE's head), then UPDATE's pixels row by row.
    private enum Phase { case header, payload, pixels }
    private var phase = Phase.header
    private var request: Request = .getProtocolFeatures
    private var size = 0
    private let rbuf: UnsafeMutableRawPointer
    private let acc: UnsafeMutableRawPointer
    private var accLen = 0
    private let reply: UnsafeMutableRawPointer
    static let replyBytes = headerSize + VirtioGPU.edidResponseSize
    private var pendingFDs: [Int32] = []
    // UPDATE in progress.
    private var upScanout = 0
    private var upRect = GpuRect(x: 0, y: 0, width: 0, height: 0)
    private var upRow = 0, upCol = 0
    private var negotiated: UInt64 = 0
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
        rbuf = .allocate(byteCount: Self.receiveBytes, alignment: 16)
        acc = .allocate(byteCount: Self.payloadSize(.cursorUpdate), alignment: 16)
        reply = .allocate(byteCount: Self.replyBytes, alignment: 16)
    }

    deinit {
        closeConnection()
        if outputsStarted { for o in outputs { o.stop() } }
        for s in scanouts {
            s.pixels?.deallocate()
            s.cursor.deallocate()
            if let m = s.dmabuf { munmap(m, s.dmabufLength) }
        }
        rbuf.deallocate(); acc.deallocate(); reply.deallocate()
    }

    // MARK: VhostUserFrontendCompanion

    public func ringsStarting() throws(DeviceError) -> [(request: VhostUserRequest, fds: [Int32])] {
        if !outputsStarted {
            for (i, o) in outputs.enumerated() { try o.start(loop: loop, scanout: i, source: self) }
            outputsStarted = true
        }
        closeConnection()
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
        phase = .header; accLen = 0; negotiated = 0
        return [(.gpuSetSocket, [sv[1]])]
    }

    public func ringsStopped() {
        closeConnection()
    }

    /// Closes the display connection; every scanout and cursor shows nothing (the back-end's next conversation
    /// starts from SCANOUT again).
    private func closeConnection() {
        if fd >= 0 {
            if registration >= 0 { loop.unregister(fd: fd, registration: registration) }
            FD.close(fd)
        }
        fd = -1; registration = -1
        for f in pendingFDs { FD.close(f) }
        pendingFDs = []
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
        for _ in 0..<Self.readsPerEvent {
            guard fd >= 0 else { return }
            var fds: (Int32, Int32, Int32, Int32) = (-1, -1, -1, -1)
            var n: Int32 = 0, truncated: Int32 = 0
            let r = withUnsafeMutableBytes(of: &fds) {
                lb_recvmsg_fds(fd, rbuf, Self.receiveBytes, $0.baseAddress!.assumingMemoryBound(to: Int32.self), 4, &n, &truncated)
            }
            if n > 0 {
                withUnsafeBytes(of: &fds) { b in for k in 0..<Int(n) { pendingFDs.append(b.load(fromByteOffset: 4 * k, as: Int32.self)) } }
            }
            if truncated != 0 || pendingFDs.count > 2 { violation("file descriptors sent without a DMABUF_SCANOUT to take them"); return }
            if r == 0 {
                Log.info("\(name): vhost-user-gpu display: the back-end closed the display connection")
                closeConnection()
                return
            }
            if r < 0 {
                if errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR { return }
                Log.warning("\(name): vhost-user-gpu display: \(Errno.current); closing the display connection")
                closeConnection()
                return
            }
            guard consume(r) else { return }
            if r < Self.receiveBytes { return }
        }
    }

    /// Feeds `len` received bytes through the state machine; false once the connection was closed.
    private func consume(_ len: Int) -> Bool {
        var pos = 0
        while pos < len {
            switch phase {
            case .header:
                let k = min(Self.headerSize - accLen, len - pos)
                (acc + accLen).copyMemory(from: rbuf + pos, byteCount: k)
                accLen += k; pos += k
                if accLen == Self.headerSize {
                    accLen = 0
                    guard header() else { return false }
                }
            case .payload:
                let k = min(size - accLen, len - pos)
                (acc + accLen).copyMemory(from: rbuf + pos, byteCount: k)
                accLen += k; pos += k
                if accLen == size {
                    accLen = 0
                    phase = .header
                    guard dispatch() else { return false }
                }
            case .pixels:
                pos += pixels(rbuf + pos, len - pos)
            }
        }
        return true
    }

    /// A complete header in `acc`: checks it and starts the payload.
    private func header() -> Bool {
        let rq = le32(acc, 0), flags = le32(acc, 4), sz = le32(acc, 8)
        guard let r = Request(rawValue: rq) else { violation("unknown request \(rq) (size \(sz))"); return false }
        guard flags & Self.replyFlag == 0 else { violation("\(r) with the reply flag: a reply where a request belongs"); return false }
        let want = Self.payloadSize(r)
        if r == .update {
            guard Int(sz) >= want else { violation("UPDATE of \(sz) bytes: shorter than its 20-byte head"); return false }
        } else if Int(sz) != want {
            violation("\(r) with a \(sz)-byte payload; want \(want)")
            return false
        }
        request = r
        size = want
        messages &+= 1
        if want == 0 { return dispatch() }
        phase = .payload
        upTotal = UInt64(sz)
        return true
    }
    private var upTotal: UInt64 = 0

    /// UPDATE's pixels: copied row by row into the scanout's picture; the flush goes out after the last row.
    private func pixels(_ p: UnsafeRawPointer, _ n: Int) -> Int {
        let rowBytes = Int(upRect.width) * 4
        let stride = Int(scanouts[upScanout].width) * 4
        guard let pic = scanouts[upScanout].pixels else { return n }
        var used = 0
        while used < n && upRow < Int(upRect.height) {
            let k = min(rowBytes - upCol, n - used)
            let dst = pic + (Int(upRect.y) + upRow) * stride + Int(upRect.x) * 4 + upCol
            dst.copyMemory(from: p + used, byteCount: k)
            used += k; upCol += k
            if upCol == rowBytes { upCol = 0; upRow += 1 }
        }
        if upRow == Int(upRect.height) {
            phase = .header
            updateDone()
        }
        return used
    }

    private func updateDone() {
        updates &+= 1
        let s = upScanout
        guard scanouts[s].shown, let p = scanouts[s].pixels else { return }
        outputs[s].flush(frame: frame(s, p), damage: upRect)
    }

    // MARK: requests

    /// A whole message (fixed payload in `acc`). False once the connection was closed.
    private func dispatch() -> Bool {
        switch request {
        case .getProtocolFeatures:
            return send(.getProtocolFeatures, u64: Self.offeredProtocolFeatures)
        case .setProtocolFeatures:
            let f = le64(acc, 0)
            guard f & ~Self.offeredProtocolFeatures == 0 else {
                violation("SET_PROTOCOL_FEATURES 0x\(String(f, radix: 16)) beyond the offered 0x\(String(Self.offeredProtocolFeatures, radix: 16))")
                return false
            }
            negotiated = f
            return true
        case .getDisplayInfo:
            return sendDisplayInfo()
        case .getEDID:
            return sendEDID(Int(le32(acc, 0)))
        case .cursorPos, .cursorPosHide, .cursorUpdate:
            return cursorMessage()
        case .scanout:
            let s = le32(acc, 0), w = le32(acc, 4), h = le32(acc, 8)
            guard let i = scanoutIndex(s, "SCANOUT") else { return false }
            unmapDmabuf(i)
            if w == 0 || h == 0 { return disable(i) }
            return show(i, w, h)
        case .update:
            return startUpdate()
        case .dmabufScanout, .dmabufScanout2:
            return dmabufScanout()
        case .dmabufUpdate:
            return dmabufUpdate()
        }
    }

    private func scanoutIndex(_ s: UInt32, _ what: String) -> Int? {
        guard s < UInt32(scanouts.count) else { violation("\(what) for scanout \(s); \(scanouts.count) configured"); return nil }
        return Int(s)
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

    private func startUpdate() -> Bool {
        let s = le32(acc, 0)
        let r = GpuRect(x: le32(acc, 4), y: le32(acc, 8), width: le32(acc, 12), height: le32(acc, 16))
        guard let i = scanoutIndex(s, "UPDATE") else { return false }
        guard scanouts[i].shown else { violation("UPDATE for scanout \(i), which shows nothing (no SCANOUT before)"); return false }
        guard r.fits(scanouts[i].width, scanouts[i].height) else {
            violation("UPDATE (\(r.x),\(r.y)) \(r.width)x\(r.height) outside scanout \(i)'s \(scanouts[i].width)x\(scanouts[i].height)")
            return false
        }
        let want = 20 + UInt64(r.width) * UInt64(r.height) * 4
        guard upTotal == want else {
            violation("UPDATE \(r.width)x\(r.height) with \(upTotal) bytes; want \(want)")
            return false
        }
        upScanout = i; upRect = r; upRow = 0; upCol = 0
        if r.isEmpty { updateDone(); return true }
        phase = .pixels
        return true
    }

    private func cursorMessage() -> Bool {
        let s = le32(acc, 0), x = le32(acc, 4), y = le32(acc, 8)
        guard let i = scanoutIndex(s, "\(request)") else { return false }
        scanouts[i].cursorX = x; scanouts[i].cursorY = y
        switch request {
        case .cursorUpdate:
            cursorUpdates &+= 1
            scanouts[i].hotX = le32(acc, 12); scanouts[i].hotY = le32(acc, 16)
            scanouts[i].cursor.copyMemory(from: acc + 20, byteCount: Self.cursorBytes)
            scanouts[i].cursorKnown = true
            scanouts[i].cursorVisible = true
            presentCursor(i)
        case .cursorPosHide:
            if scanouts[i].cursorVisible {
                scanouts[i].cursorVisible = false
                outputs[i].cursorChanged(image: nil, hotX: 0, hotY: 0, x: x, y: y)
            }
        default:
            // CURSOR_POS shows the cursor at (x, y) (QEMU: dpy_mouse_set(..., visible)).
            if scanouts[i].cursorKnown && !scanouts[i].cursorVisible {
                scanouts[i].cursorVisible = true
                presentCursor(i)
            } else {
                outputs[i].cursorMoved(x: x, y: y)
            }
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
    private func dmabufScanout() -> Bool {
        let fd = pendingFDs.isEmpty ? -1 : pendingFDs.removeFirst()
        defer { FD.close(fd) }
        let s = le32(acc, 0)
        let r = GpuRect(x: le32(acc, 4), y: le32(acc, 8), width: le32(acc, 12), height: le32(acc, 16))
        let fw = le32(acc, 20), fh = le32(acc, 24), stride = le32(acc, 28), fourcc = le32(acc, 36)
        let modifier: UInt64 = request == .dmabufScanout2 ? le64(acc, 40) : 0
        guard let i = scanoutIndex(s, "\(request)") else { return false }
        unmapDmabuf(i)
        guard fd >= 0 else { return disable(i) }
        func refuse(_ why: String) -> Bool {
            Log.warning("\(name): vhost-user-gpu display: scanout \(i): dmabuf refused: \(why); the scanout shows nothing")
            return disable(i)
        }
        // DRM fourcc codes (drm_fourcc.h): XR24, AR24 = B8G8R8X8 / B8G8R8A8 in memory.
        guard fourcc == 0x3432_5258 || fourcc == 0x3432_5241 else { return refuse("format 0x\(String(fourcc, radix: 16)), only XRGB8888/ARGB8888") }
        guard modifier == 0 else { return refuse("modifier 0x\(String(modifier, radix: 16)): only linear buffers can be mapped") }
        guard !r.isEmpty, r.fits(fw, fh), UInt64(stride) >= UInt64(fw) * 4 else {
            return refuse("rectangle (\(r.x),\(r.y)) \(r.width)x\(r.height) in a \(fw)x\(fh) buffer of stride \(stride)")
        }
        let length = UInt64(stride) * UInt64(fh)
        let end = lseek(fd, 0, SEEK_END)
        guard end >= 0, UInt64(end) >= length, length <= UInt64(memoryBudget) else {
            return refuse("buffer of \(end) bytes for stride \(stride) × \(fh) rows")
        }
        // A memfd (udmabuf's backing) could be truncated under the mapping (SIGBUS on the loop): only sealed.
        let seals = fcntl(fd, 1034 /* F_GET_SEALS */)
        if seals >= 0 && seals & 0x2 /* F_SEAL_SHRINK */ == 0 { return refuse("a memfd without F_SEAL_SHRINK") }
        let m = mmap(nil, Int(length), PROT_READ, MAP_SHARED, fd, 0)
        guard let m, m != MAP_FAILED else { return refuse("mmap: \(Errno.current)") }
        guard show(i, r.width, r.height) else { munmap(m, Int(length)); return false }
        scanouts[i].dmabuf = m; scanouts[i].dmabufLength = Int(length); scanouts[i].dmabufStride = Int(stride)
        scanouts[i].dmabufRect = r
        return true
    }

    private func unmapDmabuf(_ i: Int) {
        if let m = scanouts[i].dmabuf { munmap(m, scanouts[i].dmabufLength) }
        scanouts[i].dmabuf = nil; scanouts[i].dmabufLength = 0
    }

    /// DMABUF_UPDATE: copy the damaged rectangle out of the mapped buffer, flush, and always answer: the back-end
    /// waits for this reply before it processes the driver's next command (vg_wait_ok).
    private func dmabufUpdate() -> Bool {
        let s = le32(acc, 0)
        let r = GpuRect(x: le32(acc, 4), y: le32(acc, 8), width: le32(acc, 12), height: le32(acc, 16))
        guard let i = scanoutIndex(s, "DMABUF_UPDATE") else { return false }
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
        return send(.dmabufUpdate, bytes: 0)
    }

    // MARK: replies

    private func putHeader(_ r: Request, _ size: Int) {
        put32(reply, 0, r.rawValue); put32(reply, 4, Self.replyFlag); put32(reply, 8, UInt32(size))
    }

    private func send(_ r: Request, u64 v: UInt64) -> Bool {
        putHeader(r, 8)
        put64(reply, 12, v)
        return sendReply(20)
    }

    private func send(_ r: Request, bytes: Int) -> Bool {
        putHeader(r, bytes)
        return sendReply(Self.headerSize + bytes)
    }

    /// virtio_gpu_resp_display_info (virtio 1.2 §5.7.6.8): header, then per scanout rect + enabled + flags.
    private func sendDisplayInfo() -> Bool {
        let body = VirtioGPU.displayInfoSize
        let p = reply + Self.headerSize
        memset(p, 0, body)
        put32(p, 0, VirtioGPU.respOKDisplayInfo)
        for (i, m) in modes.enumerated() {
            let o = VirtioGPU.hdrSize + 24 * i
            put32(p, o + 8, m.width); put32(p, o + 12, m.height); put32(p, o + 16, 1)
        }
        return send(.getDisplayInfo, bytes: body)
    }

    /// virtio_gpu_resp_edid (§5.7.6.8): header, le32 size, padding, 1024 bytes. A scanout out of range gets
    /// ERR_INVALID_SCANOUT_ID in the same-sized reply (the back-end waits for exactly that size).
    private func sendEDID(_ s: Int) -> Bool {
        let body = VirtioGPU.edidResponseSize
        let p = reply + Self.headerSize
        memset(p, 0, body)
        if s < modes.count {
            put32(p, 0, VirtioGPU.respOKEDID)
            put32(p, 24, UInt32(edids[s].count))
            edids[s].withUnsafeBytes { (p + 32).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        } else {
            put32(p, 0, VirtioGPU.respErrInvalidScanoutID)
        }
        return send(.getEDID, bytes: body)
    }

    /// Replies are small (at most 1,068 bytes) and the back-end waits for each: one non-blocking send; a back-end
    /// whose socket buffer is full is not reading its replies and is dropped.
    private func sendReply(_ n: Int) -> Bool {
        guard fd >= 0 else { return false }
        let r = lb_send_nowait(fd, reply, n)
        guard r == n else {
            violation(r < 0 ? "reply not sent: \(Errno.current)" : "reply not sent: the back-end does not read its replies")
            return false
        }
        return true
    }
}
