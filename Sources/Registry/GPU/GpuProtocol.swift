import Transport

/// virtio-gpu (virtio 1.2 §5.7), 2D only: queue 0 controlq, queue 1 cursorq. Every request starts with the
/// 24-byte `virtio_gpu_ctrl_hdr` (le32 type, le32 flags, le64 fence_id, le32 ctx_id, u8 ring_idx, 3 bytes padding)
/// and every controlq response with one. Config (§5.7.4): le32 events_read, le32 events_clear (write to clear),
/// le32 num_scanouts, le32 num_capsets. All fields little-endian.
public enum VirtioGPU {
    public static let deviceID: UInt32 = 16
    public static let configSize = 16
    /// VIRTIO_GPU_F_EDID (§5.7.3): GET_EDID is supported. (VIRGL, RESOURCE_UUID, RESOURCE_BLOB, CONTEXT_INIT are
    /// not offered.)
    public static let fEDID = VirtioFeatures(rawValue: 1 << 1)
    /// VIRTIO_GPU_MAX_SCANOUTS.
    public static let maxScanouts = 16
    /// VIRTIO_GPU_EVENT_DISPLAY: the display configuration changed (config events_read).
    public static let eventDisplay: UInt32 = 1

    public static let hdrSize = 24
    /// VIRTIO_GPU_FLAG_FENCE: the response echoes fence_id and ctx_id with this flag (§5.7.6.7).
    public static let flagFence: UInt32 = 1 << 0

    // Commands (§5.7.6.7).
    public static let cmdGetDisplayInfo: UInt32 = 0x0100
    public static let cmdResourceCreate2D: UInt32 = 0x0101
    public static let cmdResourceUnref: UInt32 = 0x0102
    public static let cmdSetScanout: UInt32 = 0x0103
    public static let cmdResourceFlush: UInt32 = 0x0104
    public static let cmdTransferToHost2D: UInt32 = 0x0105
    public static let cmdResourceAttachBacking: UInt32 = 0x0106
    public static let cmdResourceDetachBacking: UInt32 = 0x0107
    public static let cmdGetCapsetInfo: UInt32 = 0x0108
    public static let cmdGetCapset: UInt32 = 0x0109
    public static let cmdGetEDID: UInt32 = 0x010a
    public static let cmdUpdateCursor: UInt32 = 0x0300
    public static let cmdMoveCursor: UInt32 = 0x0301

    // Responses.
    public static let respOKNoData: UInt32 = 0x1100
    public static let respOKDisplayInfo: UInt32 = 0x1101
    public static let respOKEDID: UInt32 = 0x1104
    public static let respErrUnspec: UInt32 = 0x1200
    public static let respErrOutOfMemory: UInt32 = 0x1201
    public static let respErrInvalidScanoutID: UInt32 = 0x1202
    public static let respErrInvalidResourceID: UInt32 = 0x1203
    public static let respErrInvalidContextID: UInt32 = 0x1204
    public static let respErrInvalidParameter: UInt32 = 0x1205

    /// Request sizes (header included): the driver's readable part must hold at least this many bytes.
    public static let getEDIDSize = 32            // hdr + le32 scanout + padding
    public static let resourceCreate2DSize = 40   // hdr + resource_id, format, width, height
    public static let resourceUnrefSize = 32      // hdr + resource_id + padding
    public static let setScanoutSize = 48         // hdr + rect + scanout_id + resource_id
    public static let resourceFlushSize = 48      // hdr + rect + resource_id + padding
    public static let transferToHost2DSize = 56   // hdr + rect + le64 offset + resource_id + padding
    public static let attachBackingSize = 32      // hdr + resource_id + nr_entries; then nr_entries mem entries
    public static let memEntrySize = 16           // le64 addr, le32 length, le32 padding
    public static let detachBackingSize = 32
    public static let cursorSize = 56             // hdr + cursor_pos (scanout, x, y, padding) + resource_id, hot_x, hot_y, padding

    /// Response sizes: display info = hdr + 16 × (rect, le32 enabled, le32 flags); EDID = hdr + le32 size +
    /// padding + 1024 bytes.
    public static let displayInfoSize = hdrSize + maxScanouts * 24
    public static let edidResponseSize = hdrSize + 8 + 1024

    /// The cursor image is a 64×64 resource (what Linux and QEMU use).
    public static let cursorSide = 64
}

/// The 2D formats Linux's virtio-gpu uses (`virtio_gpu_translate_format`), named like the spec: by the order of
/// the bytes in memory (B8G8R8X8 = byte 0 blue, 1 green, 2 red, 3 unused). All are 4 bytes per pixel.
public enum GpuFormat: UInt32, Sendable, CaseIterable {
    case b8g8r8a8 = 1, b8g8r8x8 = 2, a8r8g8b8 = 3, x8r8g8b8 = 4
    case r8g8b8a8 = 67, x8b8g8r8 = 68, a8b8g8r8 = 121, r8g8b8x8 = 134

    public static let bytesPerPixel = 4

    /// Byte offsets of red, green and blue inside one pixel (the conversion to RGB a PPM, KMS or a display
    /// protocol needs).
    public var rgbOffsets: (r: Int, g: Int, b: Int) {
        switch self {
        case .b8g8r8a8, .b8g8r8x8: return (2, 1, 0)
        case .a8r8g8b8, .x8r8g8b8: return (1, 2, 3)
        case .r8g8b8a8, .r8g8b8x8: return (0, 1, 2)
        case .x8b8g8r8, .a8b8g8r8: return (3, 2, 1)
        }
    }
}

/// A rectangle in resource pixels (virtio_gpu_rect: le32 x, y, width, height).
public struct GpuRect: Sendable, Equatable {
    public var x: UInt32, y: UInt32, width: UInt32, height: UInt32
    public init(x: UInt32, y: UInt32, width: UInt32, height: UInt32) { self.x = x; self.y = y; self.width = width; self.height = height }
    public var isEmpty: Bool { width == 0 || height == 0 }
    /// Inside a `w`×`h` resource, computed in 64 bits (no wrap of x + width).
    @inline(__always)
    public func fits(_ w: UInt32, _ h: UInt32) -> Bool {
        UInt64(x) + UInt64(width) <= UInt64(w) && UInt64(y) + UInt64(height) <= UInt64(h)
    }
    /// The common part of two rectangles that each fit the same resource (empty if none).
    public func intersection(_ o: GpuRect) -> GpuRect {
        let x0 = max(x, o.x), y0 = max(y, o.y)
        let x1 = min(UInt64(x) + UInt64(width), UInt64(o.x) + UInt64(o.width))
        let y1 = min(UInt64(y) + UInt64(height), UInt64(o.y) + UInt64(o.height))
        guard x1 > UInt64(x0), y1 > UInt64(y0) else { return GpuRect(x: 0, y: 0, width: 0, height: 0) }
        return GpuRect(x: x0, y: y0, width: UInt32(x1 - UInt64(x0)), height: UInt32(y1 - UInt64(y0)))
    }
    @inline(__always)
    static func load(_ p: UnsafeRawPointer, _ off: Int) -> GpuRect {
        GpuRect(x: le32(p, off), y: le32(p, off + 4), width: le32(p, off + 8), height: le32(p, off + 12))
    }
}

@inline(__always) func le32(_ p: UnsafeRawPointer, _ off: Int) -> UInt32 { UInt32(littleEndian: p.loadUnaligned(fromByteOffset: off, as: UInt32.self)) }
@inline(__always) func le64(_ p: UnsafeRawPointer, _ off: Int) -> UInt64 { UInt64(littleEndian: p.loadUnaligned(fromByteOffset: off, as: UInt64.self)) }
@inline(__always) func put32(_ p: UnsafeMutableRawPointer, _ off: Int, _ v: UInt32) { p.storeBytes(of: v.littleEndian, toByteOffset: off, as: UInt32.self) }
@inline(__always) func put64(_ p: UnsafeMutableRawPointer, _ off: Int, _ v: UInt64) { p.storeBytes(of: v.littleEndian, toByteOffset: off, as: UInt64.self) }

/// A mode the device reports for a scanout (display info and the EDID's preferred timing).
public struct GpuMode: Sendable, Equatable {
    public var width: UInt32, height: UInt32
    public init(width: UInt32, height: UInt32) { self.width = width; self.height = height }
    public static let widthRange: ClosedRange<Int64> = 64...4095   // the EDID timing's 12-bit active fields
    public static let heightRange: ClosedRange<Int64> = 64...4095

    /// "1280x800" → a mode within the ranges; nil otherwise.
    public static func parse(_ s: String) -> GpuMode? {
        let p = s.split(separator: "x", maxSplits: 1, omittingEmptySubsequences: false)
        guard p.count == 2, let w = Int64(p[0]), let h = Int64(p[1]), widthRange.contains(w), heightRange.contains(h) else { return nil }
        return GpuMode(width: UInt32(w), height: UInt32(h))
    }
}

/// EDID 1.4 base block (VESA E-EDID; 128 bytes, no extensions) for one scanout: manufacturer "LBD", product 1,
/// serial = scanout index + 1, the configured mode as the preferred detailed timing (reduced-blanking-like
/// timings at 60 Hz, or lower when the pixel clock would exceed the field's 655.35 MHz), 96 dpi physical size,
/// sRGB chromaticity, monitor name "loopbackd" and a serial string; the last byte makes the sum 0 mod 256.
public enum GpuEDID {
    public static func block(mode: GpuMode, scanout: Int) -> [UInt8] {
        var e = [UInt8](repeating: 0, count: 128)
        e[0] = 0; for k in 1...6 { e[k] = 0xff }; e[7] = 0
        // Manufacturer: three letters, 5 bits each ('A' = 1), big-endian.
        let id = UInt16(12) << 10 | UInt16(2) << 5 | UInt16(4)   // L B D
        e[8] = UInt8(id >> 8); e[9] = UInt8(id & 0xff)
        e[10] = 1; e[11] = 0                                     // product code
        let serial = UInt32(scanout + 1)
        for k in 0..<4 { e[12 + k] = UInt8(truncatingIfNeeded: serial >> (8 * UInt32(k))) }
        e[16] = 1; e[17] = UInt8(2026 - 1990)                   // week 1 of 2026
        e[18] = 1; e[19] = 4                                    // EDID 1.4
        e[20] = 0xa0                                            // digital input, 8 bits per colour
        let wmm = Int(mode.width) * 254 / 960, hmm = Int(mode.height) * 254 / 960   // 96 dpi
        e[21] = UInt8(max(1, min(255, (wmm + 5) / 10))); e[22] = UInt8(max(1, min(255, (hmm + 5) / 10)))
        e[23] = 120                                             // gamma 2.2
        e[24] = 0x06                                            // sRGB default, preferred timing is native
        // Chromaticity: sRGB primaries and D65 white, 10-bit fractions of 1024.
        let c = [0.640, 0.330, 0.300, 0.600, 0.150, 0.060, 0.3127, 0.3290].map { Int(($0 * 1024).rounded()) }
        e[25] = UInt8((c[0] & 3) << 6 | (c[1] & 3) << 4 | (c[2] & 3) << 2 | (c[3] & 3))
        e[26] = UInt8((c[4] & 3) << 6 | (c[5] & 3) << 4 | (c[6] & 3) << 2 | (c[7] & 3))
        for k in 0..<8 { e[27 + k] = UInt8(c[k] >> 2) }
        // No established timings (35-37); standard timings unused (01 01).
        for k in stride(from: 38, to: 54, by: 2) { e[k] = 1; e[k + 1] = 1 }
        // Descriptor 1: the preferred detailed timing.
        let hA = Int(mode.width), vA = Int(mode.height)
        let hFront = 48, hSync = 32, hBlank = 160, vFront = 3, vSync = 5, vBlank = 23
        let total = (hA + hBlank) * (vA + vBlank)
        let refresh = min(60, max(1, 655_350_000 / total))
        let clock10k = total * refresh / 10_000
        let d = 54
        e[d] = UInt8(clock10k & 0xff); e[d + 1] = UInt8(clock10k >> 8)
        e[d + 2] = UInt8(hA & 0xff); e[d + 3] = UInt8(hBlank & 0xff); e[d + 4] = UInt8((hA >> 8) << 4 | (hBlank >> 8))
        e[d + 5] = UInt8(vA & 0xff); e[d + 6] = UInt8(vBlank & 0xff); e[d + 7] = UInt8((vA >> 8) << 4 | (vBlank >> 8))
        e[d + 8] = UInt8(hFront & 0xff); e[d + 9] = UInt8(hSync & 0xff); e[d + 10] = UInt8((vFront & 0xf) << 4 | (vSync & 0xf))
        e[d + 11] = UInt8((hFront >> 8) << 6 | (hSync >> 8) << 4 | (vFront >> 4) << 2 | (vSync >> 4))
        e[d + 12] = UInt8(wmm & 0xff); e[d + 13] = UInt8(hmm & 0xff); e[d + 14] = UInt8((wmm >> 8) << 4 | (hmm >> 8))
        e[d + 17] = 0x1e                                        // digital separate sync, +hsync +vsync
        // Descriptor 2: display range limits (vertical 1-75 Hz, horizontal 1-255 kHz, max clock; range limits only).
        let r = 72
        e[r + 3] = 0xfd; e[r + 5] = 1; e[r + 6] = 75; e[r + 7] = 1; e[r + 8] = 255
        e[r + 9] = UInt8(min(255, (clock10k / 100 + 9) / 10 + 1)); e[r + 10] = 1
        e[r + 11] = 0x0a; for k in 12..<18 { e[r + k] = 0x20 }
        // Descriptor 3: monitor name; descriptor 4: serial string.
        func text(_ at: Int, _ tag: UInt8, _ s: String) {
            e[at + 3] = tag
            var b = Array(s.utf8.prefix(13))
            if b.count < 13 { b.append(0x0a); while b.count < 13 { b.append(0x20) } }
            for k in 0..<13 { e[at + 5 + k] = b[k] }
        }
        text(90, 0xfc, "loopbackd")
        text(108, 0xff, "LBD-\(scanout)")
        e[126] = 0                                              // no extension blocks
        let sum = e[0..<127].reduce(0) { ($0 + Int($1)) & 0xff }
        e[127] = UInt8((256 - sum) & 0xff)
        return e
    }
}
