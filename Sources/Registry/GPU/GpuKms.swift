import Glibc
import CLinux
import Transport

/// `output = "kms:/dev/dri/cardN[:CONNECTOR]"`: a DRM/KMS device of the host shows the scanout; loopbackd is the
/// compositor of that output (DRM master of the card). The card is opened when the device is built (before a
/// `[daemon] user` privilege drop); the connector is the named one ("HDMI-A-1", "Virtual-1": the kernel's names)
/// or the first connected one; its mode is the scanout's configured size when the connector offers it, else the
/// connector's preferred mode. The picture (the scanout's rectangle of the resource) is centred on the mode: a
/// smaller one gets a black border, a larger one is clipped on both sides (its centre is shown).
///
/// Two XRGB8888 dumb buffers of the mode's size, shown by page flips (DRM_MODE_PAGE_FLIP_EVENT; the completion is
/// read on the event loop, never waited for): a flush paints its damage plus the damage the other buffer took
/// last time into the back buffer and flips; flushes arriving while a flip is pending are merged and painted when
/// it completes (the newest picture wins). A driver that refuses page flips gets one buffer, painted in place,
/// and DIRTYFB with the damage (ENOSYS from DIRTYFB: the driver scans the buffer out directly; not called again).
/// Conversion: red, green and blue at the format's byte offsets (`GpuFormat.rgbOffsets`) into XRGB8888 (bytes B,
/// G, R, X); B8G8R8X8/A8 rows are copied as they are. A scanout showing nothing (no resource, unplugged, reset)
/// shows black. The cursor: a 64×64 ARGB8888 dumb buffer through CURSOR2 when the driver takes it (a cursor
/// plane or legacy cursor); otherwise the cursor is not shown (logged once). Painting runs on the loop thread:
/// a full 1280×800 frame is a 4 MB copy into the card's memory.
public final class KmsGpuOutput: GpuOutput, EventHandler {
    public let card: String
    public let connectorName: String?
    public let wanted: GpuMode
    private var fd: Int32 = -1
    private var target = lb_kms_target()
    private var bufs = (lb_kms_buf(), lb_kms_buf())
    private var cursorBuf = lb_kms_buf()
    private var bufCount = 0
    private var front = 0, flipTarget = 0
    private var flipMode = true
    private var flipping = false
    private var crtcOn = false
    private var dirtyWanted = true
    private var cursorOK = true
    private var pending: Box?
    private var prevDamage: Box?
    private var geometry = Geometry(ox: 0, oy: 0)
    private weak var loop: EventLoop?
    private var registration = -1
    private var scanout = 0
    private unowned(unsafe) var source: GpuFrameSource?
    /// Counters (loop thread): pictures painted, page flips completed, DIRTYFB calls, failed kernel calls.
    public private(set) var presents = 0, flips = 0, dirties = 0, failures = 0

    /// A rectangle in display (mode) pixels, half-open.
    struct Box: Equatable { var x0: Int, y0: Int, x1: Int, y1: Int
        var isEmpty: Bool { x1 <= x0 || y1 <= y0 }
        func union(_ o: Box?) -> Box {
            guard let o, !o.isEmpty else { return self }
            if isEmpty { return o }
            return Box(x0: min(x0, o.x0), y0: min(y0, o.y0), x1: max(x1, o.x1), y1: max(y1, o.y1))
        }
        func clip(_ o: Box) -> Box { Box(x0: max(x0, o.x0), y0: max(y0, o.y0), x1: min(x1, o.x1), y1: min(y1, o.y1)) }
    }
    /// Where the scanout's rectangle lands on the mode: its top left corner (negative: clipped).
    struct Geometry { var ox: Int, oy: Int }

    public init(card: String, connector: String?, mode: GpuMode) {
        self.card = card; connectorName = connector; wanted = mode
    }
    deinit { release() }

    public var describe: String {
        fd < 0 ? "kms:\(card)" + (connectorName.map { ":\($0)" } ?? "")
            : "kms:\(card):\(connectorString) \(target.mode_w)x\(target.mode_h)@\(target.vrefresh)"
    }
    private var connectorString: String {
        withUnsafeBytes(of: target.connector) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    }

    /// Opens the card, becomes master, picks connector, CRTC and mode, creates the buffers. Called when the
    /// device is built (so before a privilege drop); `start` calls it if nobody did.
    public func open() throws(DeviceError) {
        if fd >= 0 { return }
        let f = card.withCString { lb_kms_open($0) }
        guard f >= 0 else {
            throw DeviceError("gpu output kms:\(card): \(Errno(-f))" + (f == -EACCES || f == -EPERM ? " (another DRM master, e.g. a compositor, holds the card, or no permission)" : ""))
        }
        fd = f
        var err = [CChar](repeating: 0, count: 1024)
        let r = { () -> Int32 in
            if let c = connectorName { return c.withCString { lb_kms_pick(f, $0, wanted.width, wanted.height, &target, &err, err.count) } }
            return lb_kms_pick(f, nil, wanted.width, wanted.height, &target, &err, err.count)
        }()
        guard r == 0 else {
            let why = err.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
            release()
            let what = r == -ENOENT ? (connectorName.map { "no connector \($0)" } ?? "no connected connector with modes")
                : r == -ENODEV ? "\(connectorName ?? "") is not connected" : r == -ENXIO ? "no CRTC for the connector" : "\(Errno(-r))"
            throw DeviceError("gpu output kms:\(card): \(what); \(why)")
        }
        for i in 0..<2 {
            var b = lb_kms_buf()
            let c = lb_kms_buf_create(f, target.mode_w, target.mode_h, 1, &b)
            if c != 0 {
                if i == 0 { release(); throw DeviceError("gpu output kms:\(card): dumb buffer \(target.mode_w)x\(target.mode_h): \(Errno(-c))") }
                break   // one buffer: no page flips
            }
            lb_kms_fill_black(b.map, Int(b.pitch), b.width, b.height)
            if i == 0 { bufs.0 = b } else { bufs.1 = b }
            bufCount += 1
        }
        flipMode = bufCount == 2
        if lb_kms_buf_create(f, UInt32(VirtioGPU.cursorSide), UInt32(VirtioGPU.cursorSide), 0, &cursorBuf) != 0 { cursorOK = false }
        Log.info("gpu: kms:\(card): connector \(connectorString), mode \(target.mode_w)x\(target.mode_h)@\(target.vrefresh)"
                 + (target.exact != 0 ? "" : " (the connector has no \(wanted.width)x\(wanted.height): the picture is centred, clipped if larger)")
                 + ", \(bufCount) buffer\(bufCount == 1 ? "" : "s")")
    }

    private func release() {
        if fd < 0 { return }
        if bufs.0.handle != 0 { lb_kms_buf_destroy(fd, &bufs.0) }
        if bufs.1.handle != 0 { lb_kms_buf_destroy(fd, &bufs.1) }
        if cursorBuf.handle != 0 { lb_kms_buf_destroy(fd, &cursorBuf) }
        close(fd)   // drops master: the kernel's console (fbcon) takes the display back
        fd = -1; bufCount = 0; crtcOn = false
    }

    public func start(loop: EventLoop, scanout: Int, source: GpuFrameSource) throws(DeviceError) {
        try open()
        self.scanout = scanout
        self.source = source
        self.loop = loop
        if registration < 0 {
            do { registration = try loop.register(fd: fd, handler: self, token: 0) }
            catch { throw DeviceError("gpu output kms:\(card): \(error)") }
        }
        // Black until the driver shows something.
        present(nil, full)
    }

    public func stop() {
        if registration >= 0 { loop?.unregister(fd: fd, registration: registration); registration = -1 }
        release()
        source = nil
    }

    private var full: Box { Box(x0: 0, y0: 0, x1: Int(target.mode_w), y1: Int(target.mode_h)) }

    private func buf(_ i: Int) -> lb_kms_buf { i == 0 ? bufs.0 : bufs.1 }

    public func scanoutChanged(frame: GpuFrame?) {
        if let f = frame {
            geometry = Geometry(ox: (Int(target.mode_w) - Int(f.rect.width)) / 2, oy: (Int(target.mode_h) - Int(f.rect.height)) / 2)
        }
        present(frame, full)
    }

    public func flush(frame: GpuFrame, damage: GpuRect) {
        let g = Geometry(ox: (Int(target.mode_w) - Int(frame.rect.width)) / 2, oy: (Int(target.mode_h) - Int(frame.rect.height)) / 2)
        if g.ox != geometry.ox || g.oy != geometry.oy { geometry = g; present(frame, full); return }
        let x = Int(damage.x) - Int(frame.rect.x) + g.ox, y = Int(damage.y) - Int(frame.rect.y) + g.oy
        let b = Box(x0: x, y0: y, x1: x + Int(damage.width), y1: y + Int(damage.height)).clip(full)
        if !b.isEmpty { present(frame, b) }
    }

    /// Shows `region` (display pixels) of `f` (nil: black): painted into the back buffer and flipped, or into
    /// the only buffer with DIRTYFB.
    private func present(_ f: GpuFrame?, _ region: Box) {
        guard fd >= 0, bufCount > 0 else { return }
        presents &+= 1
        if !flipMode {
            paint(buf(front), region, f)
            if !crtcOn { setCrtc(front); return }
            if dirtyWanted {
                dirties &+= 1
                let r = lb_kms_dirty(fd, buf(front).fb_id, UInt32(region.x0), UInt32(region.y0), UInt32(region.x1), UInt32(region.y1))
                if r == -ENOSYS { dirtyWanted = false } else if r != 0 { fail("DIRTYFB", r) }
            }
            return
        }
        if flipping { pending = region.union(pending); return }
        let back = crtcOn ? 1 - front : front
        // The back buffer last showed the picture before the other buffer's last paint: it takes that damage too.
        paint(buf(back), region.union(prevDamage), f)
        prevDamage = region
        if !crtcOn { setCrtc(back); return }
        let r = lb_kms_flip(fd, target.crtc_id, buf(back).fb_id)
        if r == 0 { flipping = true; flipTarget = back; return }
        if r == -EINVAL || r == -ENOSYS || r == -EOPNOTSUPP {
            // No page flips on this driver: the back buffer is complete; show it and paint in place from now on.
            flipMode = false
            Log.info("gpu: kms:\(card): page flips refused (\(Errno(-r))): one buffer with DIRTYFB")
            setCrtc(back)
            return
        }
        fail("PAGE_FLIP", r)
    }

    private func setCrtc(_ i: Int) {
        let r = withUnsafePointer(to: &target) { lb_kms_set_crtc(fd, $0, buf(i).fb_id) }
        if r == 0 { crtcOn = true; front = i } else { fail("SETCRTC", r) }
    }

    private func fail(_ what: String, _ r: Int32) {
        failures &+= 1
        if failures == 1 { Log.warning("gpu: kms:\(card): \(what): \(Errno(-r)); further failures are counted, not logged") }
    }

    /// Paints `region` of buffer `b`: the picture where it covers the region, black elsewhere.
    private func paint(_ b: lb_kms_buf, _ region: Box, _ f: GpuFrame?) {
        let r = region.clip(full)
        if r.isEmpty { return }
        let pitch = Int(b.pitch)
        var pic = Box(x0: 0, y0: 0, x1: 0, y1: 0)
        if let f { pic = Box(x0: geometry.ox, y0: geometry.oy, x1: geometry.ox + Int(f.rect.width), y1: geometry.oy + Int(f.rect.height)) }
        let inside = r.clip(pic)
        if inside != r {
            lb_kms_fill_black(b.map + r.y0 * pitch + r.x0 * 4, pitch, UInt32(r.x1 - r.x0), UInt32(r.y1 - r.y0))
        }
        guard let f, !inside.isEmpty else { return }
        let sx = Int(f.rect.x) + inside.x0 - geometry.ox, sy = Int(f.rect.y) + inside.y0 - geometry.oy
        let o = f.format.rgbOffsets
        lb_kms_copy(b.map + inside.y0 * pitch + inside.x0 * 4, pitch, f.pixels + sy * f.stride + sx * 4, f.stride,
                    UInt32(inside.x1 - inside.x0), UInt32(inside.y1 - inside.y0), Int32(o.r), Int32(o.g), Int32(o.b))
    }

    /// The card's fd is readable: flip completions.
    public func handleEvent(token: UInt32, events: UInt32) {
        guard fd >= 0 else { return }
        let n = lb_kms_events(fd)
        if n < 0 { fail("read events", n); return }
        guard n > 0, flipping else { return }
        flips &+= Int(n)
        flipping = false
        front = flipTarget
        if let p = pending {
            pending = nil
            present(source?.currentFrame(scanout), p)
        }
    }

    public func cursorChanged(image: GpuFrame?, hotX: UInt32, hotY: UInt32, x: UInt32, y: UInt32) {
        guard fd >= 0, cursorOK, crtcOn else { return }
        var r: Int32
        if let img = image {
            let o = img.format.rgbOffsets
            lb_kms_copy_argb(cursorBuf.map, Int(cursorBuf.pitch), img.pixels + Int(img.rect.y) * img.stride + Int(img.rect.x) * 4,
                             img.stride, cursorBuf.width, cursorBuf.height, Int32(o.r), Int32(o.g), Int32(o.b), Int32(img.format.alphaOffset))
            r = lb_kms_cursor_set(fd, target.crtc_id, cursorBuf.handle, cursorBuf.width, cursorBuf.height, Int32(hotX), Int32(hotY))
            if r == 0 { cursorMoved(x: x, y: y); return }
        } else {
            r = lb_kms_cursor_set(fd, target.crtc_id, 0, 0, 0, 0, 0)
        }
        if r != 0 {
            cursorOK = false
            Log.info("gpu: kms:\(card): the driver takes no cursor (CURSOR2: \(Errno(-r))): the cursor is not shown")
        }
    }

    /// MOVE_CURSOR: (x, y) is the image's top left in scanout pixels (what Linux's virtio-gpu sends: the cursor
    /// plane's crtc_x/y), moved by the picture's offset on the mode.
    public func cursorMoved(x: UInt32, y: UInt32) {
        guard fd >= 0, cursorOK, crtcOn else { return }
        let r = lb_kms_cursor_move(fd, target.crtc_id, Int32(truncatingIfNeeded: Int(x) + geometry.ox), Int32(truncatingIfNeeded: Int(y) + geometry.oy))
        if r != 0 { fail("CURSOR2 move", r) }
    }

    public func snapshot() -> String {
        guard fd >= 0 else { return "kms:\(card): not open" }
        return "\(describe): \(presents) pictures, \(flips) page flips, \(dirties) DIRTYFB, \(failures) failed calls"
            + (flipMode ? "" : " (one buffer)") + (cursorOK ? "" : ", no cursor")
    }
}

extension GpuFormat {
    /// Byte offset of alpha inside one pixel; -1 for the X formats (opaque).
    var alphaOffset: Int {
        switch self {
        case .b8g8r8a8, .r8g8b8a8: return 3
        case .a8r8g8b8, .a8b8g8r8: return 0
        case .b8g8r8x8, .x8r8g8b8, .x8b8g8r8, .r8g8b8x8: return -1
        }
    }
}

/// Several outputs for one scanout (`output = "kms:/dev/dri/card0+file:/tmp/gpu0"`): every call goes to each.
public final class TeeGpuOutput: GpuOutput {
    public let outputs: [GpuOutput]
    public init(_ outputs: [GpuOutput]) { self.outputs = outputs }
    public var describe: String { outputs.map { $0.describe }.joined(separator: "+") }
    public func start(loop: EventLoop, scanout: Int, source: GpuFrameSource) throws(DeviceError) {
        for o in outputs { try o.start(loop: loop, scanout: scanout, source: source) }
    }
    public func stop() { for o in outputs { o.stop() } }
    public func scanoutChanged(frame: GpuFrame?) { for o in outputs { o.scanoutChanged(frame: frame) } }
    public func flush(frame: GpuFrame, damage: GpuRect) { for o in outputs { o.flush(frame: frame, damage: damage) } }
    public func cursorChanged(image: GpuFrame?, hotX: UInt32, hotY: UInt32, x: UInt32, y: UInt32) {
        for o in outputs { o.cursorChanged(image: image, hotX: hotX, hotY: hotY, x: x, y: y) }
    }
    public func cursorMoved(x: UInt32, y: UInt32) { for o in outputs { o.cursorMoved(x: x, y: y) } }
    public func snapshot() -> String { outputs.map { $0.snapshot() }.joined(separator: "; ") }
}
