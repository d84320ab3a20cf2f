import Glibc
import CLinux
import Transport

/// A served gpu's scanouts presented to the vhost-user front-end that sent VHOST_USER_GPU_SET_SOCKET, through the
/// vhost-user-gpu display protocol (QEMU docs/interop/vhost-user-gpu.rst; codec in Transport/VhostUser/GpuDisplay.swift).
/// It runs next to each scanout's configured output (`none` or `file`), which keeps working: the device calls both.
///
/// Order on a new socket (QEMU's contrib/vhost-user-gpu does the same): GET_PROTOCOL_FEATURES, then
/// SET_PROTOCOL_FEATURES with the features loopbackd uses (none: it sends no GET_EDID, the driver's EDID comes from
/// the configured modes, and no DMABUF), then GET_DISPLAY_INFO (QEMU answers with its consoles' sizes; logged).
/// Each reply must come within 5 s. Then, per scanout: SCANOUT (width × height of SET_SCANOUT's rectangle, 0 × 0 for
/// nothing) before any UPDATE of it (QEMU's UPDATE handler draws into the surface SCANOUT created), UPDATE with the
/// damaged rectangle's pixels, CURSOR_UPDATE (image, hot spot, position) / CURSOR_POS / CURSOR_POS_HIDE.
///
/// Pixels: UPDATE carries PIXMAN_x8r8g8b8, which QEMU composites into a surface of the same format: on this
/// little-endian host the bytes B, G, R, X, i.e. virtio-gpu's B8G8R8X8 / B8G8R8A8 (what Linux's driver uses for
/// XRGB8888 / ARGB8888), copied row by row; the six other formats are converted through `GpuFormat.rgbOffsets`
/// (X = 0xff). The cursor is PIXMAN_a8r8g8b8 (B, G, R, A bytes): B8G8R8A8 copied, others converted with their alpha
/// (0xff for X formats).
///
/// A slow or hostile peer cannot stall the loop or make memory grow: the socket is written with MSG_DONTWAIT from
/// one fixed 1 MiB buffer; nothing is queued per frame. What is due is state: per scanout "announce its size", one
/// damage rectangle (flushes merge into its bounding box: `coalesced` counts them) and the cursor's latest image and
/// position. Messages are made from that state when the buffer has room, with the pixels read at that moment (so
/// the peer always gets the latest picture; a whole frame is sent as bands of at most 1 MiB). A full socket waits
/// for EPOLLOUT (`blocked` counts the waits). Anything malformed from the peer, an unexpected message, or a missing
/// reply closes the socket with a log line; end of file (QEMU closes it whenever the device stops) closes it quietly.
/// The device goes on without a display either way.
public final class GpuDisplayLink: EventHandler {
    public enum Phase: String { case features, displayInfo, ready, closed }
    public private(set) var phase: Phase = .features
    public let name: String
    private let sock: FileRef
    private let loop: EventLoop
    private var registration = -1
    private unowned(unsafe) let source: GpuFrameSource
    private let sender = VhostUserGpuSender(capacity: GpuDisplayLink.bufferBytes)
    private let receiver: VhostUserGpuReceiver
    private var pending: VhostUserGpuRequest?
    private var timer: LoopTimer?
    private let replyTimeoutNs: UInt64
    private let count: Int
    private let state: UnsafeMutablePointer<DisplayScanout>
    /// One 64 × 64 a8r8g8b8 cursor image per scanout.
    private let cursors: UnsafeMutableRawPointer

    public static let bufferBytes = 1 << 20
    public static let replyTimeoutNs: UInt64 = 5_000_000_000

    /// Counters: UPDATE messages (bands) and their pixel bytes, flushes merged into pending damage, SCANOUT and cursor
    /// messages, waits for a full socket.
    public private(set) var updates = 0, pixelBytes: UInt64 = 0, coalesced = 0, scanoutsSent = 0, cursorsSent = 0
    public var blocked: Int { sender.wouldBlocks }
    /// The front-end's display sizes from GET_DISPLAY_INFO (enabled scanouts).
    public private(set) var peerModes: [GpuMode] = []
    /// Why the socket was closed (nil while open or when the peer closed it).
    public private(set) var closeReason: String?

    struct DisplayScanout {
        var announce = false
        var width: UInt32 = 0, height: UInt32 = 0
        var damage = GpuRect(x: 0, y: 0, width: 0, height: 0)   // scanout pixels
        var cursorImage = false, cursorPos = false, cursorVisible = false
        var cursorX: UInt32 = 0, cursorY: UInt32 = 0, hotX: UInt32 = 0, hotY: UInt32 = 0
    }

    /// Takes `fd` (made non-blocking) and sends GET_PROTOCOL_FEATURES; on failure the link is closed and says why.
    public init(name: String, fd: Int32, loop: EventLoop, scanouts: Int, source: GpuFrameSource,
                replyTimeoutNs: UInt64 = GpuDisplayLink.replyTimeoutNs) {
        self.name = name
        self.replyTimeoutNs = replyTimeoutNs
        sock = FileRef(adopting: fd)
        self.loop = loop
        self.source = source
        count = scanouts
        receiver = VhostUserGpuReceiver(limits: VhostUserGpuLimits(scanouts: scanouts, maxPayload: VhostUserGpuReply.edidBytes))
        state = .allocate(capacity: scanouts)
        state.initialize(repeating: DisplayScanout(), count: scanouts)
        cursors = .allocate(byteCount: scanouts * VhostUserGpuMessage.cursorImageBytes, alignment: 16)
        _ = lb_set_nonblocking(fd)
        do {
            // Edge-triggered: EPOLLOUT fires once the full socket drains; reads go until EAGAIN.
            registration = try loop.register(fd: fd, events: UInt32(LB_EPOLLIN | LB_EPOLLOUT | LB_EPOLLRDHUP) | (1 << 31), handler: self, token: 0)
            timer = try LoopTimer(loop: loop) { [unowned self] _ in self.close("no reply to \(self.pending.map { "\($0)" } ?? "?") within \(self.replyTimeoutNs / 1_000_000) ms") }
        } catch {
            close("cannot watch the display socket: \(error)")
            return
        }
        Log.info("\(name): display socket from the front-end (vhost-user-gpu); asking its protocol features")
        ask(.getProtocolFeatures)
    }
    deinit {
        close(nil, log: false)
        state.deinitialize(count: count); state.deallocate()
        cursors.deallocate()
    }

    public var isOpen: Bool { phase != .closed }

    /// Closes the socket: `reason` is logged as a warning; nil (the peer closed it, the front-end went) an info line.
    public func close(_ reason: String?, log: Bool = true) {
        guard phase != .closed else { return }
        phase = .closed
        if let reason {
            closeReason = reason
            Log.warning("\(name): display socket closed: \(reason); the device goes on without a display")
        } else if log {
            Log.info("\(name): display socket closed by the front-end")
        }
        if registration >= 0 { loop.unregister(fd: sock.raw, registration: registration); registration = -1 }
        timer?.cancel(); timer = nil
        sender.reset()
        _ = shutdown(sock.raw, Int32(SHUT_RDWR))
    }

    // MARK: what the device shows

    /// SET_SCANOUT, hot-plug, reset: scanout `s` now shows `frame` (nil: nothing).
    public func scanoutChanged(_ s: Int, frame: GpuFrame?) {
        guard s >= 0 && s < count, phase != .closed else { return }
        state[s].announce = true
        state[s].width = frame?.rect.width ?? 0
        state[s].height = frame?.rect.height ?? 0
        // A new surface on the peer's side is blank: all of it is due.
        state[s].damage = GpuRect(x: 0, y: 0, width: state[s].width, height: state[s].height)
        pump()
    }

    /// RESOURCE_FLUSH: `damage` (resource pixels inside `frame.rect`) changed.
    public func flush(_ s: Int, frame: GpuFrame, damage: GpuRect) {
        guard s >= 0 && s < count, phase != .closed else { return }
        let r = frame.rect
        let d = damage.intersection(r)
        guard !d.isEmpty else { return }
        if r.width != state[s].width || r.height != state[s].height {
            // Not announced at this size (cannot happen through GpuDevice: SET_SCANOUT comes first).
            scanoutChanged(s, frame: frame)
            return
        }
        let local = GpuRect(x: d.x - r.x, y: d.y - r.y, width: d.width, height: d.height)
        if state[s].damage.isEmpty { state[s].damage = local } else {
            coalesced &+= 1
            state[s].damage = GpuDisplayLink.union(state[s].damage, local)
        }
        pump()
    }

    /// UPDATE_CURSOR: the image (copied now, converted to a8r8g8b8) or hidden (nil), hot spot and position.
    public func cursorChanged(_ s: Int, image: GpuFrame?, hotX: UInt32, hotY: UInt32, x: UInt32, y: UInt32) {
        guard s >= 0 && s < count, phase != .closed else { return }
        state[s].cursorX = x; state[s].cursorY = y
        if let image, image.rect.width == UInt32(VhostUserGpuMessage.cursorSide), image.rect.height == UInt32(VhostUserGpuMessage.cursorSide) {
            GpuDisplayLink.convertCursor(image, into: cursors + s * VhostUserGpuMessage.cursorImageBytes)
            state[s].hotX = hotX; state[s].hotY = hotY
            state[s].cursorVisible = true
            state[s].cursorImage = true
        } else {
            state[s].cursorVisible = false
            state[s].cursorImage = false
            state[s].cursorPos = true
        }
        pump()
    }

    /// MOVE_CURSOR.
    public func cursorMoved(_ s: Int, x: UInt32, y: UInt32) {
        guard s >= 0 && s < count, phase != .closed else { return }
        state[s].cursorX = x; state[s].cursorY = y
        state[s].cursorPos = true
        pump()
    }

    // MARK: socket

    public func handleEvent(token: UInt32, events: UInt32) {
        // Raw masks, not an OptionSet array literal (that allocates an array per event in debug builds).
        if events & UInt32(LB_EPOLLIN | LB_EPOLLHUP | LB_EPOLLRDHUP | LB_EPOLLERR) != 0 { readReplies() }
        if phase != .closed && events & UInt32(LB_EPOLLOUT) != 0 { pump() }
    }

    private func readReplies() {
        while phase != .closed {
            let r: VhostUserGpuReceiver.Receive
            do throws(VhostUserGpuError) { r = try receiver.receive(sock.raw) } catch {
                if case .peerClosed(false) = error { close(nil) } else { close("\(error)") }
                return
            }
            guard case .message(let h) = r else { return }
            let reply: VhostUserGpuReply
            do throws(VhostUserGpuError) {
                reply = try VhostUserGpuReply.decode(h, payload: receiver.payload, fdCount: receiver.fdCount, pending: pending)
            } catch {
                receiver.consume()
                close("\(error)")
                return
            }
            receiver.consume()
            handle(reply)
        }
    }

    private func handle(_ r: VhostUserGpuReply) {
        pending = nil
        timer?.arm(afterNs: 0)
        switch r {
        case .protocolFeatures(let f):
            // loopbackd uses none of them (no GET_EDID, no DMABUF): it acknowledges the empty set.
            Log.debug("\(name): display protocol features offered 0x\(String(f, radix: 16)), using none")
            guard sender.append(.setProtocolFeatures(0)) else { close("send buffer full during the handshake"); return }
            phase = .displayInfo
            ask(.getDisplayInfo)
        case .displayInfo(_, let modes):
            peerModes = modes.filter { $0.enabled != 0 }.map { GpuMode(width: $0.width, height: $0.height) }
            Log.info("\(name): presenting to the front-end's display (its sizes: \(peerModes.map { "\($0.width)x\($0.height)" }.joined(separator: ", ")))")
            phase = .ready
            pump()
        case .edid, .dmabufUpdateDone:
            close("unexpected reply \(r.request)")   // never asked (decode checks `pending`)
        }
    }

    private func ask(_ q: VhostUserGpuRequest) {
        let m: VhostUserGpuMessage = q == .getProtocolFeatures ? .getProtocolFeatures : .getDisplayInfo
        guard sender.append(m) else { close("send buffer full during the handshake"); return }
        pending = q
        timer?.arm(afterNs: replyTimeoutNs)
        _ = write()
    }

    /// Writes what is buffered; false when the socket is full (or the link closed).
    private func write() -> Bool {
        do throws(VhostUserGpuError) {
            return try sender.flush(sock.raw) == .done
        } catch {
            if case .peerClosed = error { close(nil) } else { close("\(error)") }
            return false
        }
    }

    /// Makes messages from what is due while there is room, and writes them, until nothing is due or the socket is
    /// full. Bounded: each scanout's damage is at most its picture, sent once per call.
    private func pump() {
        guard phase == .ready else { return }
        while true {
            let done = produce()
            guard write() else { return }
            if done { return }
        }
    }

    /// Appends what fits; true when nothing is due any more.
    private func produce() -> Bool {
        for s in 0..<count {
            if state[s].announce {
                guard sender.append(.scanout(VhostUserGpuScanout(scanout: UInt32(s), width: state[s].width, height: state[s].height))) else { return false }
                state[s].announce = false
                scanoutsSent &+= 1
            }
            let pos = VhostUserGpuCursorPos(scanout: UInt32(s), x: state[s].cursorX, y: state[s].cursorY)
            if state[s].cursorImage {
                let m = VhostUserGpuMessage.cursorUpdate(pos, hotX: state[s].hotX, hotY: state[s].hotY)
                guard let b = sender.reserve(VhostUserGpuHeader.byteCount + VhostUserGpuMessage.cursorUpdateBytes), let n = m.encode(into: b) else { return false }
                (b.baseAddress! + n).copyMemory(from: cursors + s * VhostUserGpuMessage.cursorImageBytes, byteCount: VhostUserGpuMessage.cursorImageBytes)
                sender.commit(n + VhostUserGpuMessage.cursorImageBytes)
                state[s].cursorImage = false; state[s].cursorPos = false
                cursorsSent &+= 1
            } else if state[s].cursorPos {
                guard sender.append(state[s].cursorVisible ? .cursorPos(pos) : .cursorPosHide(pos)) else { return false }
                state[s].cursorPos = false
                cursorsSent &+= 1
            }
            while !state[s].damage.isEmpty {
                guard let f = source.currentFrame(s), f.rect.width == state[s].width, f.rect.height == state[s].height else {
                    state[s].damage = GpuRect(x: 0, y: 0, width: 0, height: 0)   // shows nothing (a SCANOUT is due then)
                    break
                }
                let d = state[s].damage
                let row = Int(d.width) * 4
                let rows = min(Int(d.height), max(1, (GpuDisplayLink.bufferBytes - 64) / row))
                let u = VhostUserGpuMessage.update(VhostUserGpuUpdate(scanout: UInt32(s), x: d.x, y: d.y, width: d.width, height: UInt32(rows)))
                let total = VhostUserGpuHeader.byteCount + VhostUserGpuUpdate.byteCount + row * rows
                guard let b = sender.reserve(total), let n = u.encode(into: b) else { return false }
                GpuDisplayLink.copyRows(f, x: Int(f.rect.x + d.x), y: Int(f.rect.y + d.y), width: Int(d.width), rows: rows, into: b.baseAddress! + n)
                sender.commit(total)
                state[s].damage.y += UInt32(rows); state[s].damage.height -= UInt32(rows)
                updates &+= 1
                pixelBytes &+= UInt64(row * rows)
            }
        }
        return true
    }

    // MARK: pixels

    /// Rows of the resource (resource pixels x, y) as x8r8g8b8 (B, G, R, X bytes).
    static func copyRows(_ f: GpuFrame, x: Int, y: Int, width: Int, rows: Int, into dst: UnsafeMutableRawPointer) {
        let row = width * 4
        var out = dst
        if f.format == .b8g8r8x8 || f.format == .b8g8r8a8 {
            for h in 0..<rows {
                out.copyMemory(from: f.pixels + (y + h) * f.stride + x * 4, byteCount: row)
                out += row
            }
            return
        }
        let (ro, go, bo) = f.format.rgbOffsets
        for h in 0..<rows {
            var src = f.pixels + (y + h) * f.stride + x * 4
            for _ in 0..<width {
                out.storeBytes(of: src.load(fromByteOffset: bo, as: UInt8.self), as: UInt8.self)
                out.storeBytes(of: src.load(fromByteOffset: go, as: UInt8.self), toByteOffset: 1, as: UInt8.self)
                out.storeBytes(of: src.load(fromByteOffset: ro, as: UInt8.self), toByteOffset: 2, as: UInt8.self)
                out.storeBytes(of: 0xff as UInt8, toByteOffset: 3, as: UInt8.self)
                out += 4; src += 4
            }
        }
    }

    /// A 64 × 64 cursor resource as a8r8g8b8 (B, G, R, A bytes).
    static func convertCursor(_ f: GpuFrame, into dst: UnsafeMutableRawPointer) {
        let side = VhostUserGpuMessage.cursorSide
        if f.format == .b8g8r8a8 {
            for h in 0..<side { (dst + h * side * 4).copyMemory(from: f.pixels + h * f.stride, byteCount: side * 4) }
            return
        }
        let (ro, go, bo) = f.format.rgbOffsets
        let ao: Int? = switch f.format {
        case .a8r8g8b8, .a8b8g8r8: 0
        case .r8g8b8a8, .b8g8r8a8: 3
        default: nil
        }
        var out = dst
        for h in 0..<side {
            var src = f.pixels + h * f.stride
            for _ in 0..<side {
                out.storeBytes(of: src.load(fromByteOffset: bo, as: UInt8.self), as: UInt8.self)
                out.storeBytes(of: src.load(fromByteOffset: go, as: UInt8.self), toByteOffset: 1, as: UInt8.self)
                out.storeBytes(of: src.load(fromByteOffset: ro, as: UInt8.self), toByteOffset: 2, as: UInt8.self)
                out.storeBytes(of: ao.map { src.load(fromByteOffset: $0, as: UInt8.self) } ?? 0xff, toByteOffset: 3, as: UInt8.self)
                out += 4; src += 4
            }
        }
    }

    /// The bounding box of two non-empty rectangles (both inside one scanout: no overflow).
    static func union(_ a: GpuRect, _ b: GpuRect) -> GpuRect {
        let x0 = min(a.x, b.x), y0 = min(a.y, b.y)
        let x1 = max(a.x + a.width, b.x + b.width), y1 = max(a.y + a.height, b.y + b.height)
        return GpuRect(x: x0, y: y0, width: x1 - x0, height: y1 - y0)
    }

    /// One line for `ctl device NAME info`.
    public var describe: String {
        "display=\(phase.rawValue) updates=\(updates) pixel-bytes=\(pixelBytes) coalesced=\(coalesced) scanout-msgs=\(scanoutsSent) cursor-msgs=\(cursorsSent) blocked=\(blocked)" +
            (closeReason.map { " closed: \($0)" } ?? "")
    }
}
