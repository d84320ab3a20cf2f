import XCTest
import Glibc
@testable import Registry
import Transport
import CLinux

/// An output that records what the device told it (loop thread).
final class RecordingGpuOutput: GpuOutput {
    var flushes: [GpuRect] = []
    var scanoutChanges: [GpuRect?] = []
    var cursor: (visible: Bool, hotX: UInt32, hotY: UInt32, x: UInt32, y: UInt32, firstPixel: UInt32)?
    var moves: [(UInt32, UInt32)] = []
    var lastFlushFirstPixel: UInt32 = 0
    var describe: String { "recording" }
    func start(loop: EventLoop, scanout: Int, source: GpuFrameSource) throws(DeviceError) {}
    func stop() {}
    func scanoutChanged(frame: GpuFrame?) { scanoutChanges.append(frame?.rect) }
    func flush(frame: GpuFrame, damage: GpuRect) {
        flushes.append(damage)
        lastFlushFirstPixel = frame.pixels.load(fromByteOffset: Int(frame.rect.y) * frame.stride + Int(frame.rect.x) * 4, as: UInt32.self)
    }
    func cursorChanged(image: GpuFrame?, hotX: UInt32, hotY: UInt32, x: UInt32, y: UInt32) {
        cursor = (image != nil, hotX, hotY, x, y, image?.pixels.load(as: UInt32.self) ?? 0)
    }
    func cursorMoved(x: UInt32, y: UInt32) { moves.append((x, y)) }
    func snapshot() -> String { "recorded" }
}

/// virtio-gpu 2D on the simulated driver: the whole 2D flow with the pixels checked in the PPM the file output
/// writes (every format Linux uses), partial transfers with offsets, EDID, fences, the cursor queue, hot-plug,
/// reset, and every command's hostile cases; config errors with FILE:LINE.
final class GpuTests: XCTestCase {
    var loop: EventLoop!
    var host: DeviceHost!
    var dev: GpuDevice!
    var drv: SimDriver!
    var rec: RecordingGpuOutput!
    var file: FileGpuOutput!
    let dir = "/tmp/loopbackd-gputest-\(getpid())"
    var q: SimQueue { drv.queues[0] }
    var cq: SimQueue { drv.queues[1] }

    override func setUpWithError() throws {
        mkdir(dir, 0o755)
        loop = try EventLoop()
        host = DeviceHost(loop: loop)
        rec = RecordingGpuOutput()
        file = FileGpuOutput(path: dir + "/shot-0.ppm", when: .demand)
        dev = GpuDevice(modes: [GpuMode(width: 640, height: 480), GpuMode(width: 1024, height: 768)], outputs: [file, rec],
                        memoryBudget: 4 << 20)
        let idx = host.add(name: "gpu0", device: dev)
        loop.startThread()
        drv = try SimDriver(host: host, index: idx, ramSize: 16 << 20)
        try drv.start()
    }
    override func tearDown() {
        loop.executeAndWait { self.host.shutdown() }
        loop.stopAndJoin()
        for f in ["shot-0.ppm", "shot-0.ppm.tmp", "f-0.ppm"] { unlink(dir + "/" + f) }
        rmdir(dir)
    }

    // MARK: request helpers

    /// A request: header (type, flags, fence 0x1122334455667788 when fenced, ctx 7) + le32 fields.
    func msg(_ type: UInt32, fence: Bool = false, _ fields: [UInt32] = []) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 24)
        func p32(_ v: UInt32, _ at: Int) { for k in 0..<4 { b[at + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(k))) } }
        p32(type, 0); p32(fence ? VirtioGPU.flagFence : 0, 4)
        if fence { for k in 0..<8 { b[8 + k] = UInt8(truncatingIfNeeded: UInt64(0x1122_3344_5566_7788) >> (8 * UInt64(k))) } }
        p32(7, 16)
        for f in fields { b += withUnsafeBytes(of: f.littleEndian) { Array($0) } }
        return b
    }

    struct Resp { var type: UInt32; var flags: UInt32; var fence: UInt64; var ctx: UInt32; var len: UInt32; var bytes: [UInt8] }

    /// Sends `bytes` (plus extra readable segments) on queue `queue` with `room` writable bytes.
    @discardableResult
    func send(_ bytes: [UInt8], extra: [(UInt64, UInt32)] = [], room: Int = 24, queue: Int = 0) throws -> Resp {
        let sq = drv.queues[queue]
        let r = drv.alloc(max(bytes.count, 1)), s = drv.alloc(max(room, 1))
        bytes.withUnsafeBytes { if !bytes.isEmpty { drv.host(r).copyMemory(from: $0.baseAddress!, byteCount: bytes.count) } }
        memset(drv.host(s), 0xee, max(room, 1))
        let readable: [(UInt64, UInt32)] = (bytes.isEmpty ? [] : [(r, UInt32(bytes.count))]) + extra
        let writable: [(UInt64, UInt32)] = room == 0 ? [] : [(s, UInt32(room))]
        let h = try XCTUnwrap(sq.addChain(readable: readable, writable: writable))
        sq.submit(h)
        let u = try XCTUnwrap(sq.waitUsed(timeoutMs: 3000), "response")
        XCTAssertEqual(u.id, h)
        sq.recycle(u.id)
        let out = Array(UnsafeRawBufferPointer(start: drv.host(s), count: max(room, 1)))
        func g32(_ o: Int) -> UInt32 { out.count >= o + 4 ? UInt32(out[o]) | UInt32(out[o + 1]) << 8 | UInt32(out[o + 2]) << 16 | UInt32(out[o + 3]) << 24 : 0 }
        let fence = UInt64(g32(8)) | UInt64(g32(12)) << 32
        return Resp(type: g32(0), flags: g32(4), fence: fence, ctx: g32(16), len: u.len, bytes: out)
    }
    func expect(_ want: UInt32, _ bytes: [UInt8], extra: [(UInt64, UInt32)] = [], room: Int = 24, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try send(bytes, extra: extra, room: room)
        XCTAssertEqual(String(r.type, radix: 16), String(want, radix: 16), file: file, line: line)
        XCTAssertEqual(r.len, 24, file: file, line: line)
    }
    func ok(_ bytes: [UInt8], extra: [(UInt64, UInt32)] = [], file: StaticString = #filePath, line: UInt = #line) throws {
        try expect(VirtioGPU.respOKNoData, bytes, extra: extra, file: file, line: line)
    }
    func create(_ id: UInt32, _ format: GpuFormat = .b8g8r8x8, _ w: UInt32, _ h: UInt32) throws {
        try ok(msg(VirtioGPU.cmdResourceCreate2D, [id, format.rawValue, w, h]))
    }
    /// Driver memory for a resource's backing, attached in entries of `chunk` bytes (the last may be shorter);
    /// returns its guest address.
    @discardableResult
    func attach(_ id: UInt32, bytes: Int, chunk: Int = 4096) throws -> UInt64 {
        let g = drv.alloc(bytes, align: 4096)
        let n = (bytes + chunk - 1) / chunk
        let e = drv.alloc(16 * n)
        for k in 0..<n {
            drv.host(e).storeBytes(of: (g + UInt64(k * chunk)).littleEndian, toByteOffset: 16 * k, as: UInt64.self)
            drv.host(e).storeBytes(of: UInt32(min(chunk, bytes - k * chunk)).littleEndian, toByteOffset: 16 * k + 8, as: UInt32.self)
            drv.host(e).storeBytes(of: UInt32(0), toByteOffset: 16 * k + 12, as: UInt32.self)
        }
        try ok(msg(VirtioGPU.cmdResourceAttachBacking, [id, UInt32(n)]), extra: [(e, UInt32(16 * n))])
        return g
    }
    func rect(_ x: UInt32, _ y: UInt32, _ w: UInt32, _ h: UInt32) -> [UInt32] { [x, y, w, h] }
    func transfer(_ id: UInt32, _ r: [UInt32], offset: UInt64 = 0) -> [UInt8] {
        msg(VirtioGPU.cmdTransferToHost2D, r + [UInt32(truncatingIfNeeded: offset), UInt32(truncatingIfNeeded: offset >> 32), id, 0])
    }
    func setScanout(_ s: UInt32, _ id: UInt32, _ r: [UInt32]) -> [UInt8] { msg(VirtioGPU.cmdSetScanout, r + [s, id]) }
    func flush(_ id: UInt32, _ r: [UInt32]) -> [UInt8] { msg(VirtioGPU.cmdResourceFlush, r + [id, 0]) }

    /// The PPM the file output wrote: (width, height, RGB bytes).
    func readPPM(_ path: String) throws -> (Int, Int, [UInt8]) {
        let fd = open(path, O_RDONLY)
        XCTAssertGreaterThanOrEqual(fd, 0, path)
        defer { close(fd) }
        var all: [UInt8] = [], buf = [UInt8](repeating: 0, count: 1 << 16)
        while true { let n = read(fd, &buf, buf.count); if n <= 0 { break }; all += buf[0..<n] }
        // "P6\nW H\n255\n"
        var fields: [String] = [], i = 0, cur = ""
        while fields.count < 4 && i < all.count {
            let c = all[i]; i += 1
            if c == 0x0a || c == 0x20 { if !cur.isEmpty { fields.append(cur); cur = "" } } else { cur.append(Character(UnicodeScalar(c))) }
        }
        XCTAssertEqual(fields.first, "P6")
        XCTAssertEqual(fields.last, "255")
        return (Int(fields[1])!, Int(fields[2])!, Array(all[i...]))
    }

    // MARK: tests

    func testConfigDisplayInfoAndEDID() throws {
        let cfg = try XCTUnwrap(drv.readConfig(offset: 0, count: 16))
        XCTAssertEqual(cfg, [0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0])
        XCTAssertTrue(drv.features.contains(VirtioGPU.fEDID))
        let r = try send(msg(VirtioGPU.cmdGetDisplayInfo), room: VirtioGPU.displayInfoSize)
        XCTAssertEqual(r.type, VirtioGPU.respOKDisplayInfo)
        XCTAssertEqual(r.len, UInt32(VirtioGPU.displayInfoSize))
        func f(_ s: Int, _ k: Int) -> UInt32 { let o = 24 + 24 * s + 4 * k; return UInt32(r.bytes[o]) | UInt32(r.bytes[o + 1]) << 8 | UInt32(r.bytes[o + 2]) << 16 }
        XCTAssertEqual([f(0, 0), f(0, 1), f(0, 2), f(0, 3), f(0, 4)], [0, 0, 640, 480, 1])
        XCTAssertEqual([f(1, 2), f(1, 3), f(1, 4)], [1024, 768, 1])
        XCTAssertEqual([f(2, 2), f(2, 4)], [0, 0])
        // A response buffer too small for display info: ERR_UNSPEC in the header.
        try expect(VirtioGPU.respErrUnspec, msg(VirtioGPU.cmdGetDisplayInfo), room: 100)
        for s in 0..<2 {
            let e = try send(msg(VirtioGPU.cmdGetEDID, [UInt32(s), 0]), room: VirtioGPU.edidResponseSize)
            XCTAssertEqual(e.type, VirtioGPU.respOKEDID)
            XCTAssertEqual(e.len, UInt32(VirtioGPU.edidResponseSize))
            XCTAssertEqual(Array(e.bytes[24..<28]), [128, 0, 0, 0])
            let edid = Array(e.bytes[32..<160])
            XCTAssertEqual(Array(edid[0..<8]), [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0])
            XCTAssertEqual(edid.reduce(0) { ($0 + Int($1)) & 0xff }, 0, "checksum")
            XCTAssertEqual(edid[18], 1); XCTAssertEqual(edid[19], 4)
            // Preferred detailed timing = the configured mode.
            let w = Int(edid[56]) | Int(edid[58] >> 4) << 8, h = Int(edid[59]) | Int(edid[61] >> 4) << 8
            XCTAssertEqual([w, h], s == 0 ? [640, 480] : [1024, 768])
            let clock = (Int(edid[54]) | Int(edid[55]) << 8) * 10_000
            let total = (w + (Int(edid[57]) | Int(edid[58] & 0xf) << 8)) * (h + (Int(edid[60]) | Int(edid[61] & 0xf) << 8))
            XCTAssertEqual(Double(clock) / Double(total), 60, accuracy: 0.5)
            XCTAssertTrue(String(decoding: edid[95..<108], as: UTF8.self).hasPrefix("loopbackd\n"))
            XCTAssertEqual(edid[126], 0)
            XCTAssertTrue(edid[1..<126].contains(0xfc))
        }
        try expect(VirtioGPU.respErrInvalidScanoutID, msg(VirtioGPU.cmdGetEDID, [2, 0]), room: VirtioGPU.edidResponseSize)
        try expect(VirtioGPU.respErrUnspec, msg(VirtioGPU.cmdGetEDID, []), room: VirtioGPU.edidResponseSize)
        // Big modes stay within the EDID's pixel clock field.
        let big = GpuEDID.block(mode: GpuMode(width: 4095, height: 4095), scanout: 0)
        XCTAssertEqual(big.reduce(0) { ($0 + Int($1)) & 0xff }, 0)
        XCTAssertEqual(Int(big[56]) | Int(big[58] >> 4) << 8, 4095)
    }

    /// The whole 2D flow, for every format Linux uses: the PPM holds the converted pixels exactly.
    func testFull2DFlowEveryFormatPixelsInThePPM() throws {
        let w: UInt32 = 61, h: UInt32 = 37   // odd sizes: rows cross the 4 KiB entries anywhere
        for (n, fmt) in GpuFormat.allCases.enumerated() {
            let id = UInt32(10 + n)
            try create(id, fmt, w, h)
            let g = try attach(id, bytes: Int(w * h * 4), chunk: 4096)
            // Pixel (x, y): R = x*4, G = y*6, B = (x + y) ^ n, A/X = 0x5a, placed at the format's offsets.
            let (ro, go, bo) = fmt.rgbOffsets
            let other = 6 - ro - go - bo   // the fourth byte
            for y in 0..<Int(h) { for x in 0..<Int(w) {
                let p = drv.host(g) + (y * Int(w) + x) * 4
                p.storeBytes(of: UInt8(truncatingIfNeeded: x * 4), toByteOffset: ro, as: UInt8.self)
                p.storeBytes(of: UInt8(truncatingIfNeeded: y * 6), toByteOffset: go, as: UInt8.self)
                p.storeBytes(of: UInt8(truncatingIfNeeded: (x + y) ^ n), toByteOffset: bo, as: UInt8.self)
                p.storeBytes(of: UInt8(0x5a), toByteOffset: other, as: UInt8.self)
            } }
            try ok(transfer(id, rect(0, 0, w, h), offset: 0), extra: [])
            // The scanout shows a sub-rectangle (x 3, y 2, 50 × 30).
            try ok(setScanout(0, id, rect(3, 2, 50, 30)))
            try ok(flush(id, rect(0, 0, w, h)))
            let said = loop.executeAndWait { self.dev.command(["snapshot", "0"]) }
            XCTAssertTrue(said.ok && said.text.contains("wrote"), said.text)
            let (pw, ph, rgb) = try readPPM(dir + "/shot-0.ppm")
            XCTAssertEqual([pw, ph], [50, 30], "\(fmt)")
            XCTAssertEqual(rgb.count, 50 * 30 * 3)
            var bad = 0
            for y in 0..<30 { for x in 0..<50 {
                let sx = x + 3, sy = y + 2, o = (y * 50 + x) * 3
                if rgb[o] != UInt8(truncatingIfNeeded: sx * 4) || rgb[o + 1] != UInt8(truncatingIfNeeded: sy * 6)
                    || rgb[o + 2] != UInt8(truncatingIfNeeded: (sx + sy) ^ n) { bad += 1 }
            } }
            XCTAssertEqual(bad, 0, "\(fmt): pixels differ")
        }
        XCTAssertEqual(loop.executeAndWait { self.file.writes }, GpuFormat.allCases.count)
    }

    /// Partial transfers: the rectangle's rows come from offset + stride × row; the rest of the host copy stays.
    func testPartialTransferWithOffset() throws {
        try create(1, .b8g8r8x8, 100, 50)
        let g = try attach(1, bytes: 100 * 50 * 4, chunk: 1000)   // entries not a multiple of a row or a pixel
        let b = drv.host(g).assumingMemoryBound(to: UInt32.self)
        for k in 0..<(100 * 50) { b[k] = UInt32(k) }
        // Linux's offset for (x, y): y * stride + x * 4.
        try ok(transfer(1, rect(10, 5, 20, 7), offset: UInt64(5 * 400 + 10 * 4)))
        try ok(setScanout(1, 1, rect(0, 0, 100, 50)))
        try ok(flush(1, rect(10, 5, 20, 7)))
        let (pix, flushes) = loop.executeAndWait { () -> ([UInt32], [GpuRect]) in
            let f = self.dev.currentFrame(1)!
            let p = f.pixels.assumingMemoryBound(to: UInt32.self)
            return (Array(UnsafeBufferPointer(start: p, count: 100 * 50)), self.rec.flushes)
        }
        var bad = 0
        for y in 0..<50 { for x in 0..<100 {
            let inside = x >= 10 && x < 30 && y >= 5 && y < 12
            if pix[y * 100 + x] != (inside ? UInt32(y * 100 + x) : 0) { bad += 1 }
        } }
        XCTAssertEqual(bad, 0)
        XCTAssertEqual(flushes, [GpuRect(x: 10, y: 5, width: 20, height: 7)])
        // A flush outside the scanout's rectangle reaches no output; an empty one is fine.
        try ok(setScanout(1, 1, rect(50, 0, 50, 50)))
        try ok(flush(1, rect(0, 0, 40, 50)))
        try ok(flush(1, rect(0, 0, 0, 0)))
        XCTAssertEqual(loop.executeAndWait { self.rec.flushes.count }, 1)
        // Offset at the very end of the backing: the last row's last pixel.
        try ok(transfer(1, rect(99, 49, 1, 1), offset: UInt64(100 * 50 * 4 - 4)))
    }

    func testFencesAreEchoed() throws {
        let r = try send(msg(VirtioGPU.cmdResourceCreate2D, fence: true, [5, 1, 8, 8]))
        XCTAssertEqual(r.type, VirtioGPU.respOKNoData)
        XCTAssertEqual(r.flags & VirtioGPU.flagFence, VirtioGPU.flagFence)
        XCTAssertEqual(r.fence, 0x1122_3344_5566_7788)
        XCTAssertEqual(r.ctx, 7)
        // An error response is fenced too (the driver's fence must still signal).
        let e = try send(msg(VirtioGPU.cmdResourceCreate2D, fence: true, [5, 1, 8, 8]))
        XCTAssertEqual(e.type, VirtioGPU.respErrInvalidResourceID)
        XCTAssertEqual(e.fence, 0x1122_3344_5566_7788)
        let n = try send(msg(VirtioGPU.cmdResourceUnref, [5, 0]))
        XCTAssertEqual([n.flags, UInt32(truncatingIfNeeded: n.fence), n.ctx], [0, 0, 0])
        // Many fenced commands in one kick complete in order.
        var heads: [UInt16] = []
        let resp = drv.alloc(24 * 16)
        for k in 0..<16 {
            var m = msg(VirtioGPU.cmdGetDisplayInfo, fence: true)
            m[8] = UInt8(k)
            let a = drv.alloc(24)
            m.withUnsafeBytes { drv.host(a).copyMemory(from: $0.baseAddress!, byteCount: 24) }
            heads.append(try XCTUnwrap(q.addChain(readable: [(a, 24)], writable: [(resp + UInt64(24 * k), 24)])))
        }
        for h in heads { q.pushAvail(h) }
        q.publish()
        q.kick()
        var seen: [UInt16] = []
        while seen.count < 16, let u = q.waitUsed(timeoutMs: 2000) { seen.append(u.id); q.recycle(u.id) }
        XCTAssertEqual(seen, heads)
        for k in 0..<16 { XCTAssertEqual(drv.host(resp + UInt64(24 * k) + 8).load(as: UInt8.self), UInt8(k)) }
    }

    func testCursorQueue() throws {
        try create(20, .b8g8r8a8, 64, 64)
        let g = try attach(20, bytes: 64 * 64 * 4)
        drv.host(g).storeBytes(of: UInt32(0xff11_2233), as: UInt32.self)
        try ok(transfer(20, rect(0, 0, 64, 64)))
        func cursor(_ type: UInt32, _ s: UInt32, _ x: UInt32, _ y: UInt32, _ id: UInt32, _ hx: UInt32 = 3, _ hy: UInt32 = 4, room: Int = 0) throws -> Resp {
            try send(msg(type, [s, x, y, 0, id, hx, hy, 0]), room: room, queue: 1)
        }
        var r = try cursor(VirtioGPU.cmdUpdateCursor, 1, 100, 200, 20)
        XCTAssertEqual(r.len, 0, "Linux gives the cursor queue no room for a response")
        var c = try XCTUnwrap(loop.executeAndWait { self.rec.cursor })
        XCTAssertTrue(c.visible); XCTAssertEqual([c.hotX, c.hotY, c.x, c.y, c.firstPixel], [3, 4, 100, 200, 0xff11_2233])
        r = try cursor(VirtioGPU.cmdMoveCursor, 1, 300, 400, 0)
        XCTAssertEqual(loop.executeAndWait { self.rec.moves.last.map { [$0.0, $0.1] } }, [300, 400])
        XCTAssertTrue(loop.executeAndWait { self.dev.command(["info"]) }.text.contains("cursor=20@300,400"))
        // With room, a response is written: errors for a bad scanout, a resource that is not 64×64, a bad hot spot.
        try create(21, .b8g8r8a8, 32, 32)
        XCTAssertEqual(try cursor(VirtioGPU.cmdUpdateCursor, 9, 0, 0, 20, room: 24).type, VirtioGPU.respErrInvalidScanoutID)
        XCTAssertEqual(try cursor(VirtioGPU.cmdUpdateCursor, 1, 0, 0, 21, room: 24).type, VirtioGPU.respErrInvalidParameter)
        XCTAssertEqual(try cursor(VirtioGPU.cmdUpdateCursor, 1, 0, 0, 20, 64, 0, room: 24).type, VirtioGPU.respErrInvalidParameter)
        XCTAssertEqual(try cursor(VirtioGPU.cmdUpdateCursor, 1, 0, 0, 99, room: 24).type, VirtioGPU.respErrInvalidResourceID)
        XCTAssertEqual(try cursor(VirtioGPU.cmdGetDisplayInfo, 1, 0, 0, 0, room: 24).type, VirtioGPU.respErrUnspec)
        XCTAssertEqual(try send(msg(VirtioGPU.cmdMoveCursor, [1]), room: 24, queue: 1).type, VirtioGPU.respErrUnspec, "short")
        XCTAssertEqual(try cursor(VirtioGPU.cmdMoveCursor, 1, 5, 6, 0, room: 24).type, VirtioGPU.respOKNoData)
        // Unref of the cursor's resource hides it; resource 0 hides it too.
        try ok(msg(VirtioGPU.cmdResourceUnref, [20, 0]))
        c = try XCTUnwrap(loop.executeAndWait { self.rec.cursor })
        XCTAssertFalse(c.visible)
        _ = try cursor(VirtioGPU.cmdUpdateCursor, 1, 0, 0, 0)
        XCTAssertFalse(try XCTUnwrap(loop.executeAndWait { self.rec.cursor }).visible)
    }

    func testHotPlugRaisesTheDisplayEvent() throws {
        let irq = drv.configInterruptFD.raw
        _ = FD.drain(irq)
        let said = loop.executeAndWait { self.dev.command(["scanout", "1", "off"]) }
        XCTAssertTrue(said.ok, said.text)
        XCTAssertGreaterThan(FD.wait(irq, timeoutMs: 2000), 0, "config interrupt")
        XCTAssertEqual(try XCTUnwrap(drv.readConfig(offset: 0, count: 4)), [1, 0, 0, 0], "events_read DISPLAY")
        let r = try send(msg(VirtioGPU.cmdGetDisplayInfo), room: VirtioGPU.displayInfoSize)
        XCTAssertEqual(r.bytes[24 + 24 + 16], 0, "scanout 1 disabled")
        XCTAssertEqual(r.bytes[24 + 16], 1, "scanout 0 still enabled")
        // events_clear clears the bit; a write elsewhere changes nothing.
        drv.writeConfig(offset: 8, bytes: [9, 0, 0, 0])
        drv.writeConfig(offset: 4, bytes: [1, 0, 0, 0])
        XCTAssertEqual(try XCTUnwrap(drv.readConfig(offset: 0, count: 16)), [0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0])
        // Plugging in again: another event; the same state twice: none.
        XCTAssertTrue(loop.executeAndWait { self.dev.command(["scanout", "1", "on"]) }.ok)
        XCTAssertGreaterThan(FD.wait(irq, timeoutMs: 2000), 0)
        XCTAssertTrue(loop.executeAndWait { self.dev.command(["scanout", "1", "on"]) }.ok)
        XCTAssertEqual(loop.executeAndWait { self.dev.displayEvents }, 2)
        let r2 = try send(msg(VirtioGPU.cmdGetDisplayInfo), room: VirtioGPU.displayInfoSize)
        XCTAssertEqual(r2.bytes[24 + 24 + 16], 1)
        for bad in [["scanout", "2", "off"], ["scanout", "x", "on"], ["scanout", "0", "maybe"], ["frobnicate"], ["snapshot", "5"]] {
            XCTAssertFalse(loop.executeAndWait { self.dev.command(bad) }.ok, "\(bad)")
        }
        XCTAssertTrue(loop.executeAndWait { self.dev.command(["info"]) }.text.contains("scanout 1 mode=1024x768 connected=yes"))
        XCTAssertTrue(loop.executeAndWait { self.dev.command(["info"]) }.text.contains("resource=0 rect=0x0+0+0 cursor=0@0,0 output=recording"))
    }

    func testResetFreesEveryResource() throws {
        try create(1, .b8g8r8x8, 256, 256)
        try attach(1, bytes: 256 * 256 * 4)
        try create(2, .r8g8b8a8, 64, 64)
        try ok(setScanout(0, 1, rect(0, 0, 256, 256)))
        XCTAssertEqual(loop.executeAndWait { self.dev.resourceCount }, 2)
        XCTAssertGreaterThan(loop.executeAndWait { self.dev.memoryUsed }, 256 * 256 * 4)
        drv.reset()
        XCTAssertEqual(loop.executeAndWait { self.dev.resourceCount }, 0)
        XCTAssertEqual(loop.executeAndWait { self.dev.memoryUsed }, 0)
        XCTAssertNil(loop.executeAndWait { self.dev.currentFrame(0) })
        try drv.start()
        try create(1, .b8g8r8x8, 16, 16)   // the id is free again
        // Unref also frees, and a scanout showing the resource shows nothing afterwards.
        try ok(setScanout(1, 1, rect(0, 0, 16, 16)))
        try ok(msg(VirtioGPU.cmdResourceUnref, [1, 0]))
        XCTAssertNil(loop.executeAndWait { self.dev.currentFrame(1) })
        XCTAssertEqual(loop.executeAndWait { self.dev.memoryUsed }, 0)
        // Many creates and unrefs in mixed order keep the table consistent (backward-shift deletion).
        var live = Set<UInt32>()
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<600 {
            let id = UInt32.random(in: 1...200, using: &rng)
            if live.contains(id) { try ok(msg(VirtioGPU.cmdResourceUnref, [id, 0])); live.remove(id) }
            else { try create(id, .b8g8r8x8, 4, 4); live.insert(id) }
        }
        XCTAssertEqual(loop.executeAndWait { self.dev.resourceCount }, live.count)
        for id in live { try ok(msg(VirtioGPU.cmdResourceUnref, [id, 0])) }
        XCTAssertEqual(loop.executeAndWait { self.dev.resourceCount }, 0)
    }

    func testHostileCommands() throws {
        let E = (unspec: VirtioGPU.respErrUnspec, oom: VirtioGPU.respErrOutOfMemory, scanout: VirtioGPU.respErrInvalidScanoutID,
                 res: VirtioGPU.respErrInvalidResourceID, param: VirtioGPU.respErrInvalidParameter)
        // Short requests: every command type with fewer bytes than its struct.
        for (type, size) in [(VirtioGPU.cmdResourceCreate2D, 40), (VirtioGPU.cmdResourceUnref, 32), (VirtioGPU.cmdSetScanout, 48),
                             (VirtioGPU.cmdResourceFlush, 48), (VirtioGPU.cmdTransferToHost2D, 56),
                             (VirtioGPU.cmdResourceAttachBacking, 32), (VirtioGPU.cmdResourceDetachBacking, 32), (VirtioGPU.cmdGetEDID, 32)] {
            var m = msg(type, [UInt32](repeating: 1, count: 8))
            m = Array(m.prefix(size - 4))
            try expect(E.unspec, m)
        }
        try expect(E.unspec, Array(msg(VirtioGPU.cmdGetDisplayInfo).prefix(20)), room: VirtioGPU.displayInfoSize)
        try expect(E.unspec, [0])
        // Unknown, 3D and capset commands.
        for t: UInt32 in [0, 0x0108, 0x0109, 0x010c, 0x0200, 0x0207, 0xffff_ffff, VirtioGPU.cmdUpdateCursor] { try expect(E.unspec, msg(t, [0, 0, 0, 0])) }
        // No room even for a header: nothing written, counted.
        let none = try send(msg(VirtioGPU.cmdGetDisplayInfo), room: 10)
        XCTAssertEqual(none.len, 0)
        XCTAssertEqual(try send(msg(VirtioGPU.cmdGetDisplayInfo), room: 0).len, 0)
        XCTAssertEqual(loop.executeAndWait { self.dev.malformed }, 2)
        // Long requests: extra bytes are ignored.
        try ok(msg(VirtioGPU.cmdResourceCreate2D, [1, 1, 16, 16, 0xdead, 0xbeef]))
        // CREATE: id 0, duplicate, bad format, zero size, overflow, budget (4 MiB).
        try expect(E.res, msg(VirtioGPU.cmdResourceCreate2D, [0, 1, 16, 16]))
        try expect(E.res, msg(VirtioGPU.cmdResourceCreate2D, [1, 1, 16, 16]))
        for f: UInt32 in [0, 5, 66, 100, 0xffff_ffff] { try expect(E.param, msg(VirtioGPU.cmdResourceCreate2D, [2, f, 16, 16])) }
        try expect(E.param, msg(VirtioGPU.cmdResourceCreate2D, [2, 1, 0, 16]))
        try expect(E.param, msg(VirtioGPU.cmdResourceCreate2D, [2, 1, 16, 0]))
        try expect(E.oom, msg(VirtioGPU.cmdResourceCreate2D, [2, 1, 0xffff_ffff, 0xffff_ffff]))
        try expect(E.oom, msg(VirtioGPU.cmdResourceCreate2D, [2, 1, 1025, 1024]))      // just over 4 MiB
        try ok(msg(VirtioGPU.cmdResourceCreate2D, [2, 1, 1000, 1000]))
        try expect(E.oom, msg(VirtioGPU.cmdResourceCreate2D, [3, 1, 300, 300]))      // 360,000 > what is left
        try ok(msg(VirtioGPU.cmdResourceUnref, [2, 0]))
        try ok(msg(VirtioGPU.cmdResourceCreate2D, [3, 1, 300, 300]))                  // freed memory is usable again
        // UNREF / DETACH of unknown ids; DETACH without backing.
        try expect(E.res, msg(VirtioGPU.cmdResourceUnref, [99, 0]))
        try expect(E.res, msg(VirtioGPU.cmdResourceUnref, [0, 0]))
        try expect(E.res, msg(VirtioGPU.cmdResourceDetachBacking, [99, 0]))
        try expect(E.unspec, msg(VirtioGPU.cmdResourceDetachBacking, [1, 0]))
        // TRANSFER without backing, unknown resource.
        try expect(E.unspec, transfer(1, rect(0, 0, 16, 16)))
        try expect(E.res, transfer(99, rect(0, 0, 16, 16)))
        // ATTACH: unknown id, 0 entries, too many, entries not all sent, outside memory, zero length, attached twice.
        let e = drv.alloc(16 * 4)
        func entries(_ list: [(UInt64, UInt32)]) {
            for (k, x) in list.enumerated() {
                drv.host(e).storeBytes(of: x.0.littleEndian, toByteOffset: 16 * k, as: UInt64.self)
                drv.host(e).storeBytes(of: x.1.littleEndian, toByteOffset: 16 * k + 8, as: UInt32.self)
            }
        }
        let page = drv.alloc(4096, align: 4096)
        entries([(page, 1024)])
        try expect(E.res, msg(VirtioGPU.cmdResourceAttachBacking, [99, 1]), extra: [(e, 16)])
        try expect(E.param, msg(VirtioGPU.cmdResourceAttachBacking, [1, 0]), extra: [(e, 16)])
        try expect(E.param, msg(VirtioGPU.cmdResourceAttachBacking, [1, UInt32(GpuDevice.maxEntries + 1)]), extra: [(e, 16)])
        try expect(E.param, msg(VirtioGPU.cmdResourceAttachBacking, [1, 0xffff_ffff]), extra: [(e, 16)])
        try expect(E.unspec, msg(VirtioGPU.cmdResourceAttachBacking, [1, 2]), extra: [(e, 16)])
        let end = 0x1000_0000 + UInt64(16 << 20)
        for bad: (UInt64, UInt32) in [(0x10, 16), (end - 8, 16), (end, 4), (0xffff_ffff_ffff_fff0, 0x20), (0, 0xffff_ffff)] {
            entries([(page, 512), bad])
            try expect(E.unspec, msg(VirtioGPU.cmdResourceAttachBacking, [1, 2]), extra: [(e, 32)])
        }
        entries([(page, 512), (page + 512, 0)])
        try expect(E.param, msg(VirtioGPU.cmdResourceAttachBacking, [1, 2]), extra: [(e, 32)])
        XCTAssertEqual(loop.executeAndWait { self.dev.resourceCount }, 2)
        // 16 × 16 × 4 = 1024 bytes of backing in two entries.
        entries([(page, 512), (page + 512, 512)])
        try ok(msg(VirtioGPU.cmdResourceAttachBacking, [1, 2]), extra: [(e, 32)])
        try expect(E.unspec, msg(VirtioGPU.cmdResourceAttachBacking, [1, 2]), extra: [(e, 32)])
        // TRANSFER: rectangles outside the resource (wrapping sums included), offset/stride beyond the backing.
        for r in [rect(0, 0, 17, 16), rect(0, 0, 16, 17), rect(16, 0, 1, 1), rect(0xffff_fff0, 0, 0x20, 1),
                  rect(1, 1, 0xffff_ffff, 1), rect(0, 0xffff_ffff, 1, 2)] {
            try expect(E.param, transfer(1, r))
        }
        try ok(transfer(1, rect(0, 0, 16, 16), offset: 0))
        try expect(E.param, transfer(1, rect(0, 0, 16, 16), offset: 4))
        try expect(E.param, transfer(1, rect(0, 15, 16, 1), offset: 1021))
        try expect(E.param, transfer(1, rect(0, 0, 1, 1), offset: 0xffff_ffff_ffff_fffc))
        try expect(E.param, transfer(1, rect(0, 0, 2, 2), offset: 0xffff_ffff_ffff_ffc0))
        try ok(transfer(1, rect(0, 0, 0, 0), offset: 0xffff_ffff_ffff_ffc0))   // empty: nothing to copy
        // Backing larger than the resource is fine; backing shorter limits what a transfer may read.
        try ok(msg(VirtioGPU.cmdResourceDetachBacking, [1, 0]))
        entries([(page, 512)])
        try ok(msg(VirtioGPU.cmdResourceAttachBacking, [1, 1]), extra: [(e, 16)])
        try ok(transfer(1, rect(0, 0, 16, 8)))
        try expect(E.param, transfer(1, rect(0, 0, 16, 9)))
        // SET_SCANOUT: bad scanout, unknown resource, empty or outside rectangle; resource 0 disables.
        try expect(E.scanout, setScanout(2, 1, rect(0, 0, 16, 16)))
        try expect(E.scanout, setScanout(0xffff_ffff, 0, rect(0, 0, 0, 0)))
        try expect(E.res, setScanout(0, 99, rect(0, 0, 16, 16)))
        try expect(E.param, setScanout(0, 1, rect(0, 0, 0, 16)))
        try expect(E.param, setScanout(0, 1, rect(1, 0, 16, 16)))
        try expect(E.param, setScanout(0, 1, rect(0xffff_ffff, 0, 2, 16)))
        try ok(setScanout(0, 1, rect(0, 0, 16, 16)))
        try ok(setScanout(0, 0, rect(0, 0, 0, 0)))
        // FLUSH: unknown resource, outside rectangle.
        try expect(E.res, flush(99, rect(0, 0, 1, 1)))
        try expect(E.param, flush(1, rect(0, 0, 17, 1)))
        try expect(E.param, flush(1, rect(0xffff_ffff, 0, 2, 1)))
        // GET_EDID without the feature negotiated: see testNoEDID. The device still answers normally.
        XCTAssertEqual(try send(msg(VirtioGPU.cmdGetDisplayInfo), room: VirtioGPU.displayInfoSize).type, VirtioGPU.respOKDisplayInfo)
        XCTAssertNil(loop.executeAndWait { self.host.queueStates(0).first?.fault })
    }

    func testNoEDIDWhenNotNegotiated() throws {
        drv.reset()
        try drv.start(accept: { $0.subtracting(VirtioGPU.fEDID) })
        try expect(VirtioGPU.respErrUnspec, msg(VirtioGPU.cmdGetEDID, [0, 0]), room: VirtioGPU.edidResponseSize)
    }

    /// The file output in flush mode: at most one write per interval, and the last flush always reaches the file.
    func testFileOutputRateLimitKeepsTheLastFrame() throws {
        let out = FileGpuOutput(path: dir + "/f-0.ppm", when: .flush(intervalNs: 50_000_000))
        let d = GpuDevice(modes: [GpuMode(width: 64, height: 64)], outputs: [out])
        let l2 = try EventLoop()
        let h2 = DeviceHost(loop: l2)
        let i = h2.add(name: "g", device: d)
        l2.startThread()
        let dr = try SimDriver(host: h2, index: i, ramSize: 1 << 20)
        try dr.start()
        defer { l2.executeAndWait { h2.shutdown() }; l2.stopAndJoin() }
        let saved = drv
        drv = dr
        defer { drv = saved }
        try create(1, .x8r8g8b8, 8, 8)
        let g = try attach(1, bytes: 256)
        try ok(setScanout(0, 1, rect(0, 0, 8, 8)))
        let start = lb_now_ns()
        for k in 0..<200 {
            drv.host(g).storeBytes(of: UInt32(k << 16).bigEndian, as: UInt32.self)   // bytes X, R = k, G, B
            try ok(transfer(1, rect(0, 0, 8, 8)))
            try ok(flush(1, rect(0, 0, 8, 8)))
        }
        let took = Double(lb_now_ns() - start) / 1e9
        usleep(150_000)
        let writes = l2.executeAndWait { out.writes }
        XCTAssertGreaterThanOrEqual(writes, 2)
        XCTAssertLessThanOrEqual(Double(writes), took / 0.05 + 3, "rate limit: \(writes) writes in \(took) s")
        let (w, hgt, rgb) = try readPPM(dir + "/f-0.ppm")
        XCTAssertEqual([w, hgt], [8, 8])
        XCTAssertEqual(Array(rgb.prefix(3)), [199, 0, 0], "the last frame")
    }

    /// The bench workload (verify mode): every round trip's transfer lands in the host copy.
    func testWorkloadTransfersReachTheHostCopy() throws {
        let w = try XCTUnwrap(GpuWorkload(drv, verify: true))
        XCTAssertEqual([w.width, w.height], [640, 480])
        for k in 0..<20 {
            XCTAssertTrue(w.runOne(spinNs: 0))
            let first = loop.executeAndWait { self.dev.currentFrame(0)!.pixels.load(as: UInt32.self) }
            XCTAssertEqual(first, UInt32(k + 2))
        }
        XCTAssertEqual(loop.executeAndWait { self.dev.transfers }, 20)
        XCTAssertEqual(loop.executeAndWait { self.dev.flushes }, 20)
        XCTAssertEqual(loop.executeAndWait { self.dev.errors }, 0)
    }

    func testConfigErrorsNameFileLineAndKey() throws {
        func parse(_ text: String) throws(ConfigError) -> DaemonConfig { try DaemonConfig.parse(TOML.parse(text, file: "t.conf")) }
        func fails(_ text: String, line: Int, _ needle: String, file: StaticString = #filePath, l: UInt = #line) {
            do { _ = try parse(text); XCTFail("accepted", file: file, line: l) } catch {
                XCTAssertEqual(error.line, line, "\(error)", file: file, line: l)
                XCTAssertTrue("\(error)".contains(needle), "\(error)", file: file, line: l)
            }
        }
        let t = "[device.g]\ntype = \"gpu\"\n"
        fails(t + "mode = \"10x10\"\n", line: 3, "WxH")
        fails(t + "mode = \"1280\"\n", line: 3, "WxH")
        fails(t + "scanouts = 17\n", line: 3, "scanouts")
        fails(t + "scanouts = 2\nmodes = [\"640x480\"]\n", line: 4, "one per scanout")
        fails(t + "mode = \"640x480\"\nmodes = [\"640x480\"]\n", line: 4, "not both")
        fails(t + "output = \"file:relative\"\n", line: 3, "absolute")
        fails(t + "output = \"kms:card0\"\n", line: 3, "card node")
        fails(t + "output = \"kms:/dev/dri/card0:\"\n", line: 3, "connector")
        fails(t + "output = \"kms:/dev/dri/card0:HDMI A\"\n", line: 3, "connector")
        fails(t + "output = \"kms:/dev/dri/card0+kms:/dev/dri/card1\"\n", line: 3, "one kms output")
        fails(t + "output = \"vnc:0\"\n", line: 3, "kms:/dev/dri/cardN")
        fails(t + "output = \"file:/tmp/a+file:rel\"\n", line: 3, "absolute")
        fails(t + "scanouts = 1\noutputs = [\"none\", \"none\"]\n", line: 4, "one per scanout")
        fails(t + "file-write = \"sometimes\"\n", line: 3, "file-write")
        fails(t + "memory-budget-mib = 0\n", line: 3, "memory-budget-mib")
        fails(t + "queues = 2\n", line: 3, "forwarded")
        // Forwarded: the display options configure loopbackd's side of the display protocol; edid and
        // file-write "demand" do not apply.
        fails(t + "backend = \"vhost-user:/s\"\nedid = false\n", line: 4, "back-end offers")
        fails(t + "backend = \"vhost-user:/s\"\nfile-write = \"demand\"\n", line: 4, "snapshot")
        fails(t + "backend = \"vhost-user:/s\"\nmode = \"10x10\"\n", line: 4, "WxH")
        let c = try parse(t + "scanouts = 2\nmodes = [\"640x480\", \"1920x1080\"]\noutputs = [\"none\", \"file:/tmp/x\"]\nfile-write = \"demand\"\n")
        XCTAssertEqual(c.devices[0].shape, DeviceShape(deviceID: 16, queueSizes: [64, 64], configSize: 16))
        XCTAssertNil(c.devices[0].shape.companion)
        let f = try parse(t + "backend = \"vhost-user:/s\"\nqueues = 2\nqueue-size = 256\n")
        let fs = f.devices[0].shape
        XCTAssertEqual([fs.deviceID, UInt32(fs.configSize)], [16, 16])
        XCTAssertEqual(fs.queueSizes, [256, 256])
        XCTAssertNotNil(fs.companion, "a forwarded gpu always serves the display protocol")
        let g = try parse(t + "backend = \"vhost-user:/s\"\nscanouts = 2\nmode = \"640x480\"\noutput = \"file:/tmp/x\"\n")
        XCTAssertNotEqual(g.devices[0].shape.companion, fs.companion)
        XCTAssertTrue(g.devices[0].shape.companion?.what.contains("640x480") ?? false)
    }

    /// `output` values: kms with and without a connector, several joined by "+" (a "+" inside a file prefix stays).
    func testOutputSpecs() throws {
        func spec(_ s: String) -> GpuOutputSpec? { if case .success(let o) = GpuOutputSpec.parse(s) { return o } else { return nil } }
        XCTAssertEqual(spec("kms:/dev/dri/card0"), .kms(card: "/dev/dri/card0", connector: nil))
        XCTAssertEqual(spec("kms:/dev/dri/card1:HDMI-A-1"), .kms(card: "/dev/dri/card1", connector: "HDMI-A-1"))
        XCTAssertEqual(spec("kms:/dev/dri/card0:Virtual-1+file:/tmp/g"),
                       .tee([.kms(card: "/dev/dri/card0", connector: "Virtual-1"), .file(prefix: "/tmp/g")]))
        XCTAssertEqual(spec("file:/tmp/a+b"), .file(prefix: "/tmp/a+b"))
        XCTAssertEqual(spec("file:/tmp/a+b+none"), .tee([.file(prefix: "/tmp/a+b"), .none]))
        let tee = GpuOutputSpec.tee([.none, .file(prefix: "/tmp/g")]).make(scanout: 2, when: .demand)
        XCTAssertEqual(tee.describe, "none+file:/tmp/g-2.ppm")
    }

    /// A kms output on something that is not a usable card is a start-up error naming it (no DRM device here).
    func testKmsOutputOnANonCardFails() {
        for (card, needle) in [("/nonexistent/card0", "No such file"), ("/dev/null", "kms:/dev/null")] {
            let o = KmsGpuOutput(card: card, connector: nil, mode: GpuMode(width: 640, height: 480))
            do { try o.open(); XCTFail("\(card) opened") } catch {
                XCTAssertTrue("\(error)".contains(needle), "\(error)")
            }
            XCTAssertEqual(o.describe, "kms:\(card)")
        }
    }

    /// The writer thread: pictures handed over faster than it writes coalesce to the newest; stop() writes what
    /// is pending and joins, so the file holds the last picture.
    func testFileWriterCoalescesAndStopWritesTheLast() throws {
        let path = dir + "/w-0.ppm"
        let w = 1280, h = 800
        let src = UnsafeMutableRawPointer.allocate(byteCount: w * h * 4, alignment: 16)
        defer { src.deallocate() }
        let out = FileGpuOutput(path: path, when: .flush(intervalNs: 0))
        let l2 = try EventLoop()
        final class Src: GpuFrameSource { func currentFrame(_ scanout: Int) -> GpuFrame? { nil } }
        let s = Src()
        try out.start(loop: l2, scanout: 0, source: s)
        let rect = GpuRect(x: 0, y: 0, width: UInt32(w), height: UInt32(h))
        var took: [UInt64] = []
        for k in 0..<50 {
            // A fast fill (the stdlib's, optimized): pictures come faster than a write takes.
            src.initializeMemory(as: UInt32.self, repeating: UInt32(k) << 16 | 0x0307, count: w * h)
            let t0 = lb_now_ns()
            out.flush(frame: GpuFrame(pixels: src, stride: w * 4, format: .b8g8r8x8, rect: rect), damage: rect)
            took.append(lb_now_ns() - t0)
        }
        out.stop()
        took.sort()
        print("file output 1280x800: the loop's part of a write (copy into the writer's buffer) p50 \(took[25] / 1000) us, max \(took[49] / 1000) us; \(out.writes) of 50 pictures written")
        XCTAssertLessThan(out.writes, 50, "no coalescing")
        XCTAssertGreaterThanOrEqual(out.writes, 1)
        XCTAssertEqual(out.failures, 0)
        let (pw, ph, rgb) = try readPPM(path)
        XCTAssertEqual([pw, ph], [w, h])
        XCTAssertEqual(Array(rgb.prefix(3)), [49, 3, 7], "the last picture")
        XCTAssertEqual(Array(rgb.suffix(3)), [49, 3, 7], "the last picture")
    }
}
