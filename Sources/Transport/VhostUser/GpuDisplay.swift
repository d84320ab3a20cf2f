import Glibc
import CLinux

// The vhost-user-gpu display protocol: the socket a vhost-user front-end hands a gpu back-end with
// VHOST_USER_GPU_SET_SOCKET (vhost-user.rst), on which the BACK-END sends requests (scanouts, frame updates,
// cursor) and the FRONT-END answers the few that have replies. Reference: QEMU docs/interop/vhost-user-gpu.rst
// ("Wire format", "Payload types", "Protocol features", "Message types"); what QEMU's front-end does with each
// message: hw/display/vhost-user-gpu.c. Numbers are in the machine's byte order (the .rst's rule; loopbackd runs on
// little-endian hosts only, so the virtio structures carried inside are little-endian as the virtio spec wants).
//
// Both directions are here: `VhostUserGpuMessage` (back-end → front-end requests) and `VhostUserGpuReply`
// (front-end → back-end), each with an encoder into a caller's buffer and a decoder that checks every length against
// the header and the request (a hostile peer: sizes, counts, overflow), and `VhostUserGpuSender` /
// `VhostUserGpuReceiver`, fixed-buffer non-blocking I/O on the SOCK_STREAM socket (partial writes, EAGAIN).

/// Request numbers (vhost-user-gpu.rst "Message types", `:id:` fields).
public enum VhostUserGpuRequest: UInt32, Sendable, CaseIterable {
    case getProtocolFeatures = 1
    case setProtocolFeatures = 2
    case getDisplayInfo = 3
    case cursorPos = 4
    case cursorPosHide = 5
    case cursorUpdate = 6
    case scanout = 7
    case update = 8
    case dmabufScanout = 9
    case dmabufUpdate = 10
    case getEDID = 11
    case dmabufScanout2 = 12

    /// Requests the front-end answers (a reply with the same request number and the REPLY flag).
    public var hasReply: Bool {
        switch self {
        case .getProtocolFeatures, .getDisplayInfo, .getEDID, .dmabufUpdate: return true
        default: return false
        }
    }
}

/// Protocol feature bits (vhost-user-gpu.rst "Protocol features").
public struct VhostUserGpuProtocolFeatures: OptionSet, Sendable, Hashable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// GET_EDID may be sent.
    public static let edid = VhostUserGpuProtocolFeatures(rawValue: 1 << 0)
    /// DMABUF_SCANOUT2 (with the modifier) may be sent.
    public static let dmabuf2 = VhostUserGpuProtocolFeatures(rawValue: 1 << 1)
}

/// The 12-byte header: request u32, flags u32 (bit 2: reply), payload size u32 (vhost-user-gpu.rst "Header"). Unlike
/// vhost-user's header it has no version bits; QEMU sends replies with flags = REPLY and back-ends send requests with
/// flags = 0. Bits other than REPLY are ignored on receipt (the .rst defines none).
public struct VhostUserGpuHeader: Sendable, Equatable {
    public var request: UInt32
    public var flags: UInt32
    public var size: UInt32
    public init(request: UInt32, flags: UInt32, size: UInt32) { self.request = request; self.flags = flags; self.size = size }

    public static let byteCount = 12
    public static let replyFlag: UInt32 = 0x4
    public var isReply: Bool { flags & VhostUserGpuHeader.replyFlag != 0 }

    public init(from p: UnsafeRawPointer) {
        request = p.loadUnaligned(as: UInt32.self)
        flags = p.loadUnaligned(fromByteOffset: 4, as: UInt32.self)
        size = p.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
    }
    public func store(to p: UnsafeMutableRawPointer) {
        p.storeBytes(of: request, as: UInt32.self)
        p.storeBytes(of: flags, toByteOffset: 4, as: UInt32.self)
        p.storeBytes(of: size, toByteOffset: 8, as: UInt32.self)
    }
}

/// VhostUserGpuCursorPos: scanout, x, y (12 bytes).
public struct VhostUserGpuCursorPos: Sendable, Equatable {
    public var scanout: UInt32, x: UInt32, y: UInt32
    public init(scanout: UInt32, x: UInt32, y: UInt32) { self.scanout = scanout; self.x = x; self.y = y }
    public static let byteCount = 12
}

/// VhostUserGpuScanout: scanout, width, height (12 bytes); 0 × 0 disables the scanout.
public struct VhostUserGpuScanout: Sendable, Equatable {
    public var scanout: UInt32, width: UInt32, height: UInt32
    public init(scanout: UInt32, width: UInt32, height: UInt32) { self.scanout = scanout; self.width = width; self.height = height }
    public static let byteCount = 12
}

/// VhostUserGpuUpdate without its data: scanout, x, y, width, height (20 bytes). In UPDATE the rectangle's pixels
/// follow, width × height × 4 bytes, rows packed (stride width × 4), PIXMAN_x8r8g8b8: on little-endian hosts the
/// bytes B, G, R, X of each pixel (virtio-gpu's B8G8R8X8_UNORM). DMABUF_UPDATE carries no data.
public struct VhostUserGpuUpdate: Sendable, Equatable {
    public var scanout: UInt32, x: UInt32, y: UInt32, width: UInt32, height: UInt32
    public init(scanout: UInt32, x: UInt32, y: UInt32, width: UInt32, height: UInt32) {
        self.scanout = scanout; self.x = x; self.y = y; self.width = width; self.height = height
    }
    public static let byteCount = 20
    /// width × height × 4, nil if it does not fit a u32 payload.
    public var dataBytes: Int? {
        let (px, o1) = UInt64(width).multipliedReportingOverflow(by: UInt64(height))
        let (b, o2) = px.multipliedReportingOverflow(by: 4)
        guard !o1, !o2, b <= UInt64(UInt32.max) - UInt64(VhostUserGpuUpdate.byteCount) else { return nil }
        return Int(b)
    }
}

/// VhostUserGpuDMABUFScanout (40 bytes) and, with `modifier`, VhostUserGpuDMABUFScanout2 (48 bytes): the scanout's
/// rectangle inside a DMABUF of fdWidth × fdHeight (stride, flags, DRM fourcc), the DMABUF fd as ancillary data.
public struct VhostUserGpuDmabufScanout: Sendable, Equatable {
    public var scanout: UInt32, x: UInt32, y: UInt32, width: UInt32, height: UInt32
    public var fdWidth: UInt32, fdHeight: UInt32, fdStride: UInt32, fdFlags: UInt32
    public var fourcc: Int32
    /// DMABUF_SCANOUT2 only (nil: DMABUF_SCANOUT).
    public var modifier: UInt64?
    public init(scanout: UInt32, x: UInt32, y: UInt32, width: UInt32, height: UInt32, fdWidth: UInt32, fdHeight: UInt32,
                fdStride: UInt32, fdFlags: UInt32, fourcc: Int32, modifier: UInt64? = nil) {
        self.scanout = scanout; self.x = x; self.y = y; self.width = width; self.height = height
        self.fdWidth = fdWidth; self.fdHeight = fdHeight; self.fdStride = fdStride; self.fdFlags = fdFlags
        self.fourcc = fourcc; self.modifier = modifier
    }
    public static let byteCount = 40
    public static let byteCount2 = 48
    /// Disabling a scanout: width and height 0, no fd (vhost-user-gpu.rst DMABUF_SCANOUT).
    public var disables: Bool { width == 0 || height == 0 }
}

/// One scanout of `struct virtio_gpu_resp_display_info` (virtio 1.2 §5.7.6.8 `virtio_gpu_display_one`, 24 bytes).
public struct VhostUserGpuDisplayMode: Sendable, Equatable {
    public var x: UInt32, y: UInt32, width: UInt32, height: UInt32, enabled: UInt32, flags: UInt32
    public init(x: UInt32 = 0, y: UInt32 = 0, width: UInt32, height: UInt32, enabled: UInt32, flags: UInt32 = 0) {
        self.x = x; self.y = y; self.width = width; self.height = height; self.enabled = enabled; self.flags = flags
    }
}

/// Everything that makes the display connection unusable; the side that sees one closes the socket.
public enum VhostUserGpuError: Error, Equatable, Sendable, CustomStringConvertible {
    case unknownRequest(UInt32)
    case replyFlagInRequest(UInt32)
    case notAReply(UInt32)
    /// A reply that answers nothing asked (got), or not the request waiting for one (want).
    case unexpectedReply(got: UInt32, want: UInt32?)
    case payloadTooLarge(request: UInt32, size: UInt32, max: Int)
    case payloadSize(VhostUserGpuRequest, got: Int, want: String)
    case fdCount(VhostUserGpuRequest, got: Int, want: Int)
    case scanoutID(VhostUserGpuRequest, UInt32, scanouts: Int)
    case badValue(VhostUserGpuRequest, String)
    case tooManyFDs
    case peerClosed(midMessage: Bool)
    case io(Errno)
    case timeout(VhostUserGpuRequest)

    public var description: String {
        switch self {
        case .unknownRequest(let r): return "unknown request \(r)"
        case .replyFlagInRequest(let r): return "request \(r) has the REPLY flag"
        case .notAReply(let r): return "message \(r) without the REPLY flag where a reply was due"
        case .unexpectedReply(let g, let w): return "reply to \(g)" + (w.map { ", waiting for the reply to \($0)" } ?? " that nothing asked for")
        case .payloadTooLarge(let r, let s, let m): return "message \(r): payload \(s) bytes exceeds \(m)"
        case .payloadSize(let r, let g, let w): return "\(r): payload \(g) bytes, want \(w)"
        case .fdCount(let r, let g, let w): return "\(r): \(g) file descriptors, want \(w)"
        case .scanoutID(let r, let s, let n): return "\(r): scanout \(s) out of range (\(n) scanouts)"
        case .badValue(let r, let s): return "\(r): \(s)"
        case .tooManyFDs: return "too many file descriptors in one message"
        case .peerClosed(let mid): return mid ? "peer closed the socket in the middle of a message" : "peer closed the socket"
        case .io(let e): return "socket error: \(e)"
        case .timeout(let r): return "no reply to \(r) within the timeout"
        }
    }
}

/// What a decoder checks against.
public struct VhostUserGpuLimits: Sendable {
    /// Scanout ids must be below this (VIRTIO_GPU_MAX_SCANOUTS is 16).
    public var scanouts: Int
    /// Largest payload accepted (an UPDATE of a whole 1920 × 1080 scanout is 8,294,420 bytes).
    public var maxPayload: Int
    public init(scanouts: Int = 16, maxPayload: Int = 64 << 20) { self.scanouts = scanouts; self.maxPayload = maxPayload }
}

/// A back-end → front-end request, decoded and validated. Pixel data is not copied: UPDATE's pixels and
/// CURSOR_UPDATE's image stay in the payload after `fixedBytes` (`trailingBytes` long).
public enum VhostUserGpuMessage: Sendable, Equatable {
    case getProtocolFeatures
    case setProtocolFeatures(UInt64)
    case getDisplayInfo
    case cursorPos(VhostUserGpuCursorPos)
    case cursorPosHide(VhostUserGpuCursorPos)
    /// Followed by the 64 × 64 PIXMAN_a8r8g8b8 image (16,384 bytes; B, G, R, A per pixel on little-endian hosts).
    case cursorUpdate(VhostUserGpuCursorPos, hotX: UInt32, hotY: UInt32)
    case scanout(VhostUserGpuScanout)
    /// Followed by width × height × 4 bytes of PIXMAN_x8r8g8b8 pixels.
    case update(VhostUserGpuUpdate)
    /// DMABUF_SCANOUT, or DMABUF_SCANOUT2 when `modifier` is set; one fd unless it disables the scanout.
    case dmabufScanout(VhostUserGpuDmabufScanout)
    case dmabufUpdate(VhostUserGpuUpdate)
    case getEDID(scanout: UInt32)

    public static let cursorSide = 64
    public static let cursorImageBytes = 64 * 64 * 4
    public static let cursorUpdateBytes = VhostUserGpuCursorPos.byteCount + 8 + cursorImageBytes

    public var request: VhostUserGpuRequest {
        switch self {
        case .getProtocolFeatures: return .getProtocolFeatures
        case .setProtocolFeatures: return .setProtocolFeatures
        case .getDisplayInfo: return .getDisplayInfo
        case .cursorPos: return .cursorPos
        case .cursorPosHide: return .cursorPosHide
        case .cursorUpdate: return .cursorUpdate
        case .scanout: return .scanout
        case .update: return .update
        case .dmabufScanout(let d): return d.modifier == nil ? .dmabufScanout : .dmabufScanout2
        case .dmabufUpdate: return .dmabufUpdate
        case .getEDID: return .getEDID
        }
    }

    /// Payload bytes the encoder writes (everything but the trailing pixels).
    public var fixedBytes: Int {
        switch self {
        case .getProtocolFeatures, .getDisplayInfo: return 0
        case .setProtocolFeatures: return 8
        case .cursorPos, .cursorPosHide: return VhostUserGpuCursorPos.byteCount
        case .cursorUpdate: return VhostUserGpuCursorPos.byteCount + 8
        case .scanout: return VhostUserGpuScanout.byteCount
        case .update, .dmabufUpdate: return VhostUserGpuUpdate.byteCount
        case .dmabufScanout(let d): return d.modifier == nil ? VhostUserGpuDmabufScanout.byteCount : VhostUserGpuDmabufScanout.byteCount2
        case .getEDID: return 4
        }
    }

    /// Bytes that follow the fixed part (pixels), nil if an UPDATE's rectangle cannot be carried in a u32 payload.
    public var trailingBytes: Int? {
        switch self {
        case .cursorUpdate: return VhostUserGpuMessage.cursorImageBytes
        case .update(let u): return u.dataBytes
        default: return 0
        }
    }

    /// File descriptors the message carries.
    public var fdCount: Int {
        if case .dmabufScanout(let d) = self { return d.disables ? 0 : 1 }
        return 0
    }

    /// Writes the header (its size includes the trailing pixels) and the fixed payload into `buf`; returns the bytes
    /// written (the caller writes `trailingBytes` right after them), or nil when `buf` has no room for them or the
    /// message cannot be encoded (`trailingBytes` nil).
    public func encode(into buf: UnsafeMutableRawBufferPointer) -> Int? {
        guard let trailing = trailingBytes else { return nil }
        let fixed = fixedBytes
        let total = VhostUserGpuHeader.byteCount + fixed
        guard let p = buf.baseAddress, buf.count >= total else { return nil }
        VhostUserGpuHeader(request: request.rawValue, flags: 0, size: UInt32(fixed + trailing)).store(to: p)
        let o = p + VhostUserGpuHeader.byteCount
        func u32(_ off: Int, _ v: UInt32) { o.storeBytes(of: v, toByteOffset: off, as: UInt32.self) }
        switch self {
        case .getProtocolFeatures, .getDisplayInfo: break
        case .setProtocolFeatures(let v): o.storeBytes(of: v, as: UInt64.self)
        case .cursorPos(let c), .cursorPosHide(let c): u32(0, c.scanout); u32(4, c.x); u32(8, c.y)
        case .cursorUpdate(let c, let hx, let hy): u32(0, c.scanout); u32(4, c.x); u32(8, c.y); u32(12, hx); u32(16, hy)
        case .scanout(let s): u32(0, s.scanout); u32(4, s.width); u32(8, s.height)
        case .update(let u), .dmabufUpdate(let u): u32(0, u.scanout); u32(4, u.x); u32(8, u.y); u32(12, u.width); u32(16, u.height)
        case .dmabufScanout(let d):
            u32(0, d.scanout); u32(4, d.x); u32(8, d.y); u32(12, d.width); u32(16, d.height)
            u32(20, d.fdWidth); u32(24, d.fdHeight); u32(28, d.fdStride); u32(32, d.fdFlags); u32(36, UInt32(bitPattern: d.fourcc))
            if let m = d.modifier { o.storeBytes(of: m, toByteOffset: 40, as: UInt64.self) }
        case .getEDID(let s): u32(0, s)
        }
        return total
    }

    /// Decodes one back-end request (`payload` is exactly what followed `h`, `fdCount` the descriptors that came with
    /// it). Checks: no REPLY flag, a known request, the payload within `limits.maxPayload` and exactly the size the
    /// request has (UPDATE: 20 + width × height × 4, overflow-checked), scanout ids below `limits.scanouts`, DMABUF
    /// rectangles inside the DMABUF (64-bit sums), and the number of fds (1 for a DMABUF scanout that does not disable,
    /// else 0). The caller closes every fd it does not keep.
    public static func decode(_ h: VhostUserGpuHeader, payload p: UnsafeRawBufferPointer, fdCount: Int,
                              limits: VhostUserGpuLimits = VhostUserGpuLimits()) throws(VhostUserGpuError) -> VhostUserGpuMessage {
        guard !h.isReply else { throw .replyFlagInRequest(h.request) }
        guard let req = VhostUserGpuRequest(rawValue: h.request) else { throw .unknownRequest(h.request) }
        guard Int(h.size) <= limits.maxPayload else { throw .payloadTooLarge(request: h.request, size: h.size, max: limits.maxPayload) }
        let n = p.count
        guard n == Int(h.size) else { throw .payloadSize(req, got: n, want: "\(h.size) (header)") }
        func size(_ want: Int) throws(VhostUserGpuError) { guard n == want else { throw .payloadSize(req, got: n, want: "\(want)") } }
        func u32(_ o: Int) -> UInt32 { p.baseAddress!.loadUnaligned(fromByteOffset: o, as: UInt32.self) }
        func scanout(_ s: UInt32) throws(VhostUserGpuError) -> UInt32 {
            guard Int64(s) < Int64(limits.scanouts) else { throw .scanoutID(req, s, scanouts: limits.scanouts) }
            return s
        }
        func pos() throws(VhostUserGpuError) -> VhostUserGpuCursorPos { VhostUserGpuCursorPos(scanout: try scanout(u32(0)), x: u32(4), y: u32(8)) }
        func rect() throws(VhostUserGpuError) -> VhostUserGpuUpdate {
            VhostUserGpuUpdate(scanout: try scanout(u32(0)), x: u32(4), y: u32(8), width: u32(12), height: u32(16))
        }
        let m: VhostUserGpuMessage
        switch req {
        case .getProtocolFeatures: try size(0); m = .getProtocolFeatures
        case .setProtocolFeatures: try size(8); m = .setProtocolFeatures(p.baseAddress!.loadUnaligned(as: UInt64.self))
        case .getDisplayInfo: try size(0); m = .getDisplayInfo
        case .cursorPos: try size(VhostUserGpuCursorPos.byteCount); m = .cursorPos(try pos())
        case .cursorPosHide: try size(VhostUserGpuCursorPos.byteCount); m = .cursorPosHide(try pos())
        case .cursorUpdate: try size(cursorUpdateBytes); m = .cursorUpdate(try pos(), hotX: u32(12), hotY: u32(16))
        case .scanout:
            try size(VhostUserGpuScanout.byteCount)
            m = .scanout(VhostUserGpuScanout(scanout: try scanout(u32(0)), width: u32(4), height: u32(8)))
        case .update:
            guard n >= VhostUserGpuUpdate.byteCount else { throw .payloadSize(req, got: n, want: ">= 20") }
            let u = try rect()
            guard let data = u.dataBytes else { throw .badValue(req, "\(u.width)x\(u.height) pixels do not fit a message") }
            try size(VhostUserGpuUpdate.byteCount + data)
            m = .update(u)
        case .dmabufUpdate: try size(VhostUserGpuUpdate.byteCount); m = .dmabufUpdate(try rect())
        case .dmabufScanout, .dmabufScanout2:
            try size(req == .dmabufScanout ? VhostUserGpuDmabufScanout.byteCount : VhostUserGpuDmabufScanout.byteCount2)
            let d = VhostUserGpuDmabufScanout(scanout: try scanout(u32(0)), x: u32(4), y: u32(8), width: u32(12), height: u32(16),
                                              fdWidth: u32(20), fdHeight: u32(24), fdStride: u32(28), fdFlags: u32(32),
                                              fourcc: Int32(bitPattern: u32(36)),
                                              modifier: req == .dmabufScanout2 ? p.baseAddress!.loadUnaligned(fromByteOffset: 40, as: UInt64.self) : nil)
            if !d.disables {
                // The scanout's rectangle lies inside the DMABUF (u32 + u32 cannot wrap in 64 bits).
                guard UInt64(d.x) + UInt64(d.width) <= UInt64(d.fdWidth), UInt64(d.y) + UInt64(d.height) <= UInt64(d.fdHeight) else {
                    throw .badValue(req, "rectangle \(d.width)x\(d.height)+\(d.x)+\(d.y) outside the \(d.fdWidth)x\(d.fdHeight) DMABUF")
                }
                // Linear rows of at least 4 bytes per pixel (fdStride × fdHeight must be addressable).
                guard UInt64(d.fdStride) >= UInt64(d.fdWidth) * 4 || d.modifier.map({ $0 != 0 }) == true else {
                    throw .badValue(req, "stride \(d.fdStride) below \(d.fdWidth) × 4 bytes")
                }
            }
            m = .dmabufScanout(d)
        case .getEDID: try size(4); m = .getEDID(scanout: try scanout(u32(0)))
        }
        guard fdCount == m.fdCount else { throw .fdCount(req, got: fdCount, want: m.fdCount) }
        return m
    }
}

/// A front-end → back-end reply (flags REPLY, the request's number).
public enum VhostUserGpuReply: Sendable, Equatable {
    case protocolFeatures(UInt64)
    /// `struct virtio_gpu_resp_display_info`: the header's type (VIRTIO_GPU_RESP_OK_DISPLAY_INFO 0x1101) and 16 modes.
    case displayInfo(type: UInt32, modes: [VhostUserGpuDisplayMode])
    /// `struct virtio_gpu_resp_edid`: the header's type (VIRTIO_GPU_RESP_OK_EDID 0x1104) and `size` bytes of EDID.
    case edid(type: UInt32, data: [UInt8])
    /// The front-end presented a DMABUF_UPDATE (an empty payload: QEMU's "unblock").
    case dmabufUpdateDone

    public static let ctrlHeaderBytes = 24
    public static let displayInfoBytes = 24 + 16 * 24        // 408
    public static let edidBytes = 24 + 8 + 1024              // 1056
    public static let maxScanouts = 16
    public static let maxEDIDBytes = 1024

    public var request: VhostUserGpuRequest {
        switch self {
        case .protocolFeatures: return .getProtocolFeatures
        case .displayInfo: return .getDisplayInfo
        case .edid: return .getEDID
        case .dmabufUpdateDone: return .dmabufUpdate
        }
    }
    public var payloadBytes: Int {
        switch self {
        case .protocolFeatures: return 8
        case .displayInfo: return VhostUserGpuReply.displayInfoBytes
        case .edid: return VhostUserGpuReply.edidBytes
        case .dmabufUpdateDone: return 0
        }
    }

    /// Writes the whole reply into `buf`; returns its length, nil if there is no room or it cannot be encoded (more
    /// than 16 modes, more than 1,024 EDID bytes).
    public func encode(into buf: UnsafeMutableRawBufferPointer) -> Int? {
        let total = VhostUserGpuHeader.byteCount + payloadBytes
        guard let p = buf.baseAddress, buf.count >= total else { return nil }
        VhostUserGpuHeader(request: request.rawValue, flags: VhostUserGpuHeader.replyFlag, size: UInt32(payloadBytes)).store(to: p)
        let o = p + VhostUserGpuHeader.byteCount
        memset(o, 0, payloadBytes)
        switch self {
        case .protocolFeatures(let v): o.storeBytes(of: v, as: UInt64.self)
        case .displayInfo(let type, let modes):
            guard modes.count <= VhostUserGpuReply.maxScanouts else { return nil }
            o.storeBytes(of: type, as: UInt32.self)
            for (i, m) in modes.enumerated() {
                let e = VhostUserGpuReply.ctrlHeaderBytes + 24 * i
                for (k, v) in [m.x, m.y, m.width, m.height, m.enabled, m.flags].enumerated() {
                    o.storeBytes(of: v, toByteOffset: e + 4 * k, as: UInt32.self)
                }
            }
        case .edid(let type, let data):
            guard data.count <= VhostUserGpuReply.maxEDIDBytes else { return nil }
            o.storeBytes(of: type, as: UInt32.self)
            o.storeBytes(of: UInt32(data.count), toByteOffset: 24, as: UInt32.self)
            data.withUnsafeBytes { (o + 32).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        case .dmabufUpdateDone: break
        }
        return total
    }

    /// Decodes the reply to `pending` (the request the back-end sent and waits on; nil: none). Checks: the REPLY
    /// flag, the request number equal to `pending`, the exact size, no fds, an EDID size of at most 1,024 bytes.
    public static func decode(_ h: VhostUserGpuHeader, payload p: UnsafeRawBufferPointer, fdCount: Int,
                              pending: VhostUserGpuRequest?) throws(VhostUserGpuError) -> VhostUserGpuReply {
        guard h.isReply else { throw .notAReply(h.request) }
        guard let want = pending, h.request == want.rawValue else { throw .unexpectedReply(got: h.request, want: pending?.rawValue) }
        let n = p.count
        guard n == Int(h.size) else { throw .payloadSize(want, got: n, want: "\(h.size) (header)") }
        func size(_ s: Int) throws(VhostUserGpuError) { guard n == s else { throw .payloadSize(want, got: n, want: "\(s)") } }
        func u32(_ o: Int) -> UInt32 { p.baseAddress!.loadUnaligned(fromByteOffset: o, as: UInt32.self) }
        guard fdCount == 0 else { throw .fdCount(want, got: fdCount, want: 0) }
        switch want {
        case .getProtocolFeatures:
            try size(8)
            return .protocolFeatures(p.baseAddress!.loadUnaligned(as: UInt64.self))
        case .getDisplayInfo:
            try size(displayInfoBytes)
            var modes: [VhostUserGpuDisplayMode] = []
            modes.reserveCapacity(maxScanouts)
            for i in 0..<maxScanouts {
                let e = ctrlHeaderBytes + 24 * i
                modes.append(VhostUserGpuDisplayMode(x: u32(e), y: u32(e + 4), width: u32(e + 8), height: u32(e + 12),
                                                     enabled: u32(e + 16), flags: u32(e + 20)))
            }
            return .displayInfo(type: u32(0), modes: modes)
        case .getEDID:
            try size(edidBytes)
            let s = u32(24)
            guard s <= UInt32(maxEDIDBytes) else { throw .badValue(want, "EDID size \(s) exceeds \(maxEDIDBytes)") }
            return .edid(type: u32(0), data: Array(UnsafeRawBufferPointer(rebasing: p[32..<(32 + Int(s))])))
        case .dmabufUpdate:
            try size(0)
            return .dmabufUpdateDone
        default:
            throw .unexpectedReply(got: h.request, want: nil)   // requests without replies are never pending
        }
    }
}

/// A served device that presents through the display protocol (the gpu): the vhost-user back-end server hands it the
/// socket of VHOST_USER_GPU_SET_SOCKET. Both calls come on the loop thread.
public protocol VhostUserGpuDisplayTaker: AnyObject {
    /// Takes ownership of `fd` (a connected AF_UNIX stream socket; any earlier one is replaced).
    func takeDisplaySocket(_ fd: Int32, loop: EventLoop)
    /// The front-end that gave it went away: close the display socket.
    func dropDisplaySocket()
}

// MARK: non-blocking I/O

/// Outgoing bytes of a non-blocking SOCK_STREAM socket in one fixed buffer (allocated once): messages are appended
/// whole (`reserve` + `commit`, or `append`) and `flush` writes what the socket takes, keeping the rest for the next
/// EPOLLOUT. Nothing grows: a message that does not fit now waits (`reserve` returns nil) and the caller coalesces.
/// One fd may ride with a message (DMABUF_SCANOUT): it is sent with that message's first byte.
public final class VhostUserGpuSender {
    public let capacity: Int
    private let buf: UnsafeMutableRawPointer
    private var head = 0, tail = 0
    private var fd: Int32 = -1
    private var fdAt = 0
    /// Bytes written to the socket so far, and flushes that stopped on a full socket.
    public private(set) var bytesSent: UInt64 = 0
    public private(set) var wouldBlocks = 0

    public init(capacity: Int) {
        self.capacity = capacity
        buf = .allocate(byteCount: max(capacity, 64), alignment: 16)
    }
    deinit { buf.deallocate(); FD.close(fd) }

    public var pendingBytes: Int { tail - head }
    public var isEmpty: Bool { head == tail }

    /// Room for `n` contiguous bytes at the end, or nil (the buffer is compacted first when it helps).
    public func reserve(_ n: Int) -> UnsafeMutableRawBufferPointer? {
        guard n <= capacity - pendingBytes else { return nil }
        if capacity - tail < n {
            if tail > head { memmove(buf, buf + head, tail - head) }
            if fd >= 0 { fdAt -= head }
            tail -= head; head = 0
        }
        return UnsafeMutableRawBufferPointer(start: buf + tail, count: n)
    }
    /// Takes `n` bytes written into the last `reserve` as part of the stream.
    public func commit(_ n: Int) { tail += n }

    /// Appends a message without trailing data (and with its fd, taken over: closed once sent or when this goes).
    /// False when it does not fit now, or an fd is already waiting.
    public func append(_ m: VhostUserGpuMessage, fd passed: Int32 = -1) -> Bool {
        precondition(m.trailingBytes == 0 || m.trailingBytes == nil, "messages with pixels are written with reserve/commit")
        guard passed < 0 || fd < 0, let r = reserve(VhostUserGpuHeader.byteCount + m.fixedBytes), let n = m.encode(into: r) else { return false }
        if passed >= 0 { fd = passed; fdAt = tail }
        commit(n)
        return true
    }
    public func append(_ r: VhostUserGpuReply) -> Bool {
        guard let b = reserve(VhostUserGpuHeader.byteCount + r.payloadBytes), let n = r.encode(into: b) else { return false }
        commit(n)
        return true
    }

    public enum Flush: Equatable { case done, wouldBlock }
    /// Writes pending bytes until they are gone or the socket is full. MSG_DONTWAIT: never blocks, even if a peer
    /// holding the same file description cleared O_NONBLOCK.
    public func flush(_ sock: Int32) throws(VhostUserGpuError) -> Flush {
        while head < tail {
            var end = tail
            var r: Int
            if fd >= 0 && fdAt == head {
                var f = fd
                r = lb_sendmsg_fds_flags(sock, buf + head, tail - head, &f, 1, Int32(MSG_DONTWAIT))
                if r > 0 { FD.close(fd); fd = -1 }
            } else {
                if fd >= 0 && fdAt > head { end = fdAt }   // the bytes before the fd's message first
                r = lb_send_nowait(sock, buf + head, end - head)
            }
            if r > 0 { head += r; bytesSent &+= UInt64(r); continue }
            if r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { wouldBlocks += 1; return .wouldBlock }
            if r < 0 && (errno == EPIPE || errno == ECONNRESET) { throw .peerClosed(midMessage: false) }
            throw .io(r < 0 ? Errno.current : Errno(EIO))
        }
        head = 0; tail = 0
        return .done
    }
    /// Drops everything pending (the connection is gone).
    public func reset() { head = 0; tail = 0; FD.close(fd); fd = -1 }
}

/// Incoming messages of a non-blocking SOCK_STREAM socket into one buffer of 12 + `limits.maxPayload` bytes
/// (allocated once). `receive` reads no further than the end of the current message (descriptors belong to the
/// message whose bytes they came with, as every sender attaches them to a message's first byte) and returns once a
/// whole message is there; the header's size is checked before any payload is read.
public final class VhostUserGpuReceiver {
    public let limits: VhostUserGpuLimits
    private let buf: UnsafeMutableRawPointer
    private var have = 0
    private var header = VhostUserGpuHeader(request: 0, flags: 0, size: 0)
    private var fds: (Int32, Int32, Int32, Int32) = (-1, -1, -1, -1)
    public private(set) var fdCount = 0
    public static let maxFDs = 4

    public init(limits: VhostUserGpuLimits) {
        self.limits = limits
        buf = .allocate(byteCount: VhostUserGpuHeader.byteCount + limits.maxPayload, alignment: 16)
    }
    deinit { dropFDs(); buf.deallocate() }

    public enum Receive: Equatable { case message(VhostUserGpuHeader), wouldBlock }

    /// The complete message's payload (valid until `consume`).
    public var payload: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: buf + VhostUserGpuHeader.byteCount, count: Int(header.size))
    }
    /// Takes descriptor `i` of the complete message (the caller closes it); -1 if there is none.
    public func takeFD(_ i: Int) -> Int32 {
        guard i >= 0 && i < fdCount else { return -1 }
        return withUnsafeMutableBytes(of: &fds) { p in
            let f = p.load(fromByteOffset: 4 * i, as: Int32.self)
            p.storeBytes(of: -1, toByteOffset: 4 * i, as: Int32.self)
            return f
        }
    }
    /// Done with the complete message: closes its untaken descriptors, starts the next one.
    public func consume() { dropFDs(); have = 0 }
    private func dropFDs() {
        withUnsafeMutableBytes(of: &fds) { p in
            for i in 0..<VhostUserGpuReceiver.maxFDs {
                FD.close(p.load(fromByteOffset: 4 * i, as: Int32.self))
                p.storeBytes(of: -1, toByteOffset: 4 * i, as: Int32.self)
            }
        }
        fdCount = 0
    }

    /// Reads until one whole message is there (`.message`: its header; payload and fds until `consume`) or the
    /// socket has nothing more (`.wouldBlock`). Errors: end of file, a socket error, more than 4 fds, a payload
    /// larger than `limits.maxPayload`.
    public func receive(_ sock: Int32) throws(VhostUserGpuError) -> Receive {
        while true {
            let target = have < VhostUserGpuHeader.byteCount ? VhostUserGpuHeader.byteCount : VhostUserGpuHeader.byteCount + Int(header.size)
            if have == target { return .message(header) }
            var got: (Int32, Int32, Int32, Int32) = (-1, -1, -1, -1)
            var n: Int32 = 0, trunc: Int32 = 0
            let room = Int32(VhostUserGpuReceiver.maxFDs - fdCount)
            // MSG_DONTWAIT: never blocks, even if a peer holding the same file description cleared O_NONBLOCK.
            let r = withUnsafeMutableBytes(of: &got) { g in
                lb_recvmsg_fds_flags(sock, buf + have, target - have, g.baseAddress!.assumingMemoryBound(to: Int32.self), room,
                                     &n, &trunc, Int32(MSG_DONTWAIT))
            }
            let e = errno
            withUnsafeBytes(of: got) { g in
                withUnsafeMutableBytes(of: &fds) { p in
                    for k in 0..<Int(n) { p.storeBytes(of: g.load(fromByteOffset: 4 * k, as: Int32.self), toByteOffset: 4 * (fdCount + k), as: Int32.self) }
                }
            }
            fdCount += Int(n)
            if trunc != 0 { throw .tooManyFDs }
            if r == 0 { throw .peerClosed(midMessage: have > 0 || fdCount > 0) }
            if r < 0 {
                if e == EAGAIN || e == EWOULDBLOCK { return .wouldBlock }
                if e == ECONNRESET { throw .peerClosed(midMessage: have > 0) }
                throw .io(Errno(e))
            }
            have += r
            if have == VhostUserGpuHeader.byteCount {
                header = VhostUserGpuHeader(from: buf)
                guard Int(header.size) <= limits.maxPayload else {
                    throw .payloadTooLarge(request: header.request, size: header.size, max: limits.maxPayload)
                }
            }
        }
    }
}
