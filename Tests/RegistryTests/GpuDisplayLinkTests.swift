import XCTest
import Glibc
@testable import Registry
import Transport
import CLinux

/// The served gpu's display link (Sources/Registry/GPU/GpuDisplayOutput.swift) against a front-end played by the test
/// on a socketpair, with the simulated driver drawing (GpuTests' fixture: scanout 0 is 640x480, scanout 1 1024x768):
/// the handshake in the protocol's order, SCANOUT before UPDATE, the pixels (converted), the cursor; a peer that does
/// not read (the device keeps answering, flushes coalesce, the latest picture arrives once it reads); a measured
/// rate to a reading peer; hostile and silent peers close the socket and the device goes on.
extension GpuTests {
    /// The front-end's end: whole messages, decoded, with their payload.
    final class FakeFrontEnd {
        let fd: Int32
        let rx = VhostUserGpuReceiver(limits: VhostUserGpuLimits(maxPayload: 8 << 20))
        let tx = VhostUserGpuSender(capacity: 4096)
        init(_ fd: Int32) { self.fd = fd }
        deinit { close(fd) }
        /// The next message within `ms` (nil: none, or the socket closed).
        func next(_ ms: Int32 = 3000) -> (VhostUserGpuMessage, [UInt8])? {
            let end = lb_now_ns() + UInt64(ms) * 1_000_000
            while lb_now_ns() < end {
                do throws(VhostUserGpuError) {
                    if case .message(let h) = try rx.receive(fd) {
                        defer { rx.consume() }
                        let m = try VhostUserGpuMessage.decode(h, payload: rx.payload, fdCount: rx.fdCount)
                        return (m, Array(rx.payload))
                    }
                } catch { return nil }
                _ = lb_poll_one(fd, 1, 50)
            }
            return nil
        }
        func reply(_ r: VhostUserGpuReply) {
            XCTAssertTrue(tx.append(r))
            XCTAssertEqual(try tx.flush(fd), .done)
        }
        /// Answers the handshake: GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES(0), GET_DISPLAY_INFO.
        func handshake(file: StaticString = #filePath, line: UInt = #line) {
            XCTAssertEqual(next()?.0, .getProtocolFeatures, file: file, line: line)
            reply(.protocolFeatures(3))   // EDID | DMABUF2, as QEMU 10 offers
            XCTAssertEqual(next()?.0, .setProtocolFeatures(0), "loopbackd uses no protocol feature", file: file, line: line)
            XCTAssertEqual(next()?.0, .getDisplayInfo, file: file, line: line)
            reply(.displayInfo(type: 0x1101, modes: [VhostUserGpuDisplayMode(width: 1280, height: 800, enabled: 1)]))
        }
        /// True once the link closed its end (end of file here).
        func closedByPeer(_ ms: Int32 = 3000) -> Bool {
            let end = lb_now_ns() + UInt64(ms) * 1_000_000
            var b = [UInt8](repeating: 0, count: 1 << 16)
            while lb_now_ns() < end {
                let r = recv(fd, &b, b.count, Int32(MSG_DONTWAIT))
                if r == 0 { return true }
                if r < 0 && errno != EAGAIN { return true }
                if r < 0 { _ = lb_poll_one(fd, 1, 50) }
            }
            return false
        }
    }

    private func socketPair() -> (Int32, Int32) {
        var sv: [Int32] = [-1, -1]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &sv), 0)
        return (sv[0], sv[1])
    }
    /// Gives the device a display socket; returns the front-end's end.
    private func attachDisplay(timeoutMs: UInt64 = 5000) -> FakeFrontEnd {
        let (a, b) = socketPair()
        let l = loop!, d = dev!
        loop.executeAndWait { d.displayReplyTimeoutNs = timeoutMs * 1_000_000; d.takeDisplaySocket(a, loop: l) }
        return FakeFrontEnd(b)
    }
    private func link() -> GpuDisplayLink? { loop.executeAndWait { self.dev.display } }
    private func cursorCmd(_ type: UInt32, _ s: UInt32, _ x: UInt32, _ y: UInt32, _ id: UInt32, _ hx: UInt32, _ hy: UInt32) throws {
        _ = try send(msg(type, [s, x, y, 0, id, hx, hy, 0]), room: 0, queue: 1)
    }
    private func u32(_ b: [UInt8], _ o: Int) -> UInt32 { b.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: o, as: UInt32.self) } }

    func testDisplayHandshakeScanoutUpdatesConvertedPixelsAndCursor() throws {
        let fe = attachDisplay()
        fe.handshake()
        XCTAssertEqual(link()?.phase, .ready)
        XCTAssertEqual(link()?.peerModes, [GpuMode(width: 1280, height: 800)])
        // R8G8B8A8 (converted to x8r8g8b8: B, G, R, 0xff), 64 x 32, pixel (x, y) = R x*3, G y*5, B x^y, A 0x11.
        let w: UInt32 = 64, h: UInt32 = 32
        try create(1, .r8g8b8a8, w, h)
        let g = try attach(1, bytes: Int(w * h * 4))
        for y in 0..<Int(h) { for x in 0..<Int(w) {
            let p = drv.host(g) + (y * Int(w) + x) * 4
            p.storeBytes(of: UInt8(truncatingIfNeeded: x * 3), as: UInt8.self)
            p.storeBytes(of: UInt8(truncatingIfNeeded: y * 5), toByteOffset: 1, as: UInt8.self)
            p.storeBytes(of: UInt8(truncatingIfNeeded: x ^ y), toByteOffset: 2, as: UInt8.self)
            p.storeBytes(of: UInt8(0x11), toByteOffset: 3, as: UInt8.self)
        } }
        try ok(transfer(1, rect(0, 0, w, h)))
        // The scanout shows (4, 2) 48 x 24 of it; then a flush of (10, 6) 8 x 4 (resource pixels).
        try ok(setScanout(0, 1, rect(4, 2, 48, 24)))
        try ok(flush(1, rect(10, 6, 8, 4)))
        func checkUpdate(_ m: (VhostUserGpuMessage, [UInt8])?, _ want: VhostUserGpuUpdate, line: UInt = #line) {
            XCTAssertEqual(m?.0, .update(want), line: line)
            guard let p = m?.1 else { return }
            var bad = 0
            for y in 0..<Int(want.height) { for x in 0..<Int(want.width) {
                let rx = Int(want.x) + x + 4, ry = Int(want.y) + y + 2, o = 20 + (y * Int(want.width) + x) * 4
                if p[o] != UInt8(truncatingIfNeeded: rx ^ ry) || p[o + 1] != UInt8(truncatingIfNeeded: ry * 5)
                    || p[o + 2] != UInt8(truncatingIfNeeded: rx * 3) || p[o + 3] != 0xff { bad += 1 }
            } }
            XCTAssertEqual(bad, 0, "pixels differ", line: line)
        }
        XCTAssertEqual(fe.next()?.0, .scanout(VhostUserGpuScanout(scanout: 0, width: 48, height: 24)))
        checkUpdate(fe.next(), VhostUserGpuUpdate(scanout: 0, x: 0, y: 0, width: 48, height: 24))   // the new surface, whole
        checkUpdate(fe.next(), VhostUserGpuUpdate(scanout: 0, x: 6, y: 4, width: 8, height: 4))    // the flush, in scanout pixels
        // The configured outputs still get everything.
        XCTAssertEqual(loop.executeAndWait { self.rec.flushes }, [])   // scanout 0's output is the file; scanout 1 untouched
        // Cursor: a B8G8R8A8 64 x 64 image (copied as is), hot spot (3, 4) at (10, 20); moved; hidden.
        try create(2, .b8g8r8a8, 64, 64)
        let cg = try attach(2, bytes: 64 * 64 * 4)
        for k in 0..<(64 * 64) { drv.host(cg).storeBytes(of: UInt32(0x8000_0000 | UInt32(k)), toByteOffset: 4 * k, as: UInt32.self) }
        try ok(transfer(2, rect(0, 0, 64, 64)))
        try cursorCmd(VirtioGPU.cmdUpdateCursor, 0, 10, 20, 2, 3, 4)
        let cu = fe.next()
        XCTAssertEqual(cu?.0, .cursorUpdate(VhostUserGpuCursorPos(scanout: 0, x: 10, y: 20), hotX: 3, hotY: 4))
        if let p = cu?.1 {
            XCTAssertEqual(p.count, VhostUserGpuMessage.cursorUpdateBytes)
            XCTAssertEqual(u32(p, 20), 0x8000_0000); XCTAssertEqual(u32(p, 20 + 4 * 4095), 0x8000_0000 | 4095)
        }
        try cursorCmd(VirtioGPU.cmdMoveCursor, 0, 30, 40, 0, 0, 0)
        XCTAssertEqual(fe.next()?.0, .cursorPos(VhostUserGpuCursorPos(scanout: 0, x: 30, y: 40)))
        try cursorCmd(VirtioGPU.cmdUpdateCursor, 0, 30, 40, 0, 0, 0)
        XCTAssertEqual(fe.next()?.0, .cursorPosHide(VhostUserGpuCursorPos(scanout: 0, x: 30, y: 40)))
        // SET_SCANOUT 0 (disable): SCANOUT 0 x 0.
        try ok(setScanout(0, 0, rect(0, 0, 0, 0)))
        XCTAssertEqual(fe.next()?.0, .scanout(VhostUserGpuScanout(scanout: 0, width: 0, height: 0)))
        let info = loop.executeAndWait { self.dev.command(["info"]) }
        XCTAssertTrue(info.text.contains("display=ready updates=2 "), info.text)
        // The front-end goes (vhost-user connection closed): the socket is closed, quietly.
        loop.executeAndWait { self.dev.dropDisplaySocket() }
        XCTAssertTrue(fe.closedByPeer())
        XCTAssertNil(link())
    }

    func testDisplayPeerThatDoesNotReadNeverStallsTheDeviceAndGetsTheLatestPicture() throws {
        let fe = attachDisplay()
        var small: Int32 = 4096
        setsockopt(fe.fd, SOL_SOCKET, SO_RCVBUF, &small, 4)
        fe.handshake()
        let w: UInt32 = 640, h: UInt32 = 480
        try create(1, .b8g8r8x8, w, h)
        let g = try attach(1, bytes: Int(w * h * 4), chunk: 1 << 16)
        try ok(setScanout(0, 1, rect(0, 0, w, h)))
        // 100 full-frame transfers + flushes (1.2 MB each) while the front-end reads nothing: each answered at once.
        let t0 = lb_now_ns()
        for n in 0..<100 {
            memset(drv.host(g), Int32(n), Int(w * h * 4))
            try ok(transfer(1, rect(0, 0, w, h)))
            try ok(flush(1, rect(0, 0, w, h)))
        }
        let ms = Double(lb_now_ns() - t0) / 1e6
        let l = try XCTUnwrap(link())
        let (updates, coalesced, blocked, phase) = loop.executeAndWait { (l.updates, l.coalesced, l.blocked, l.phase) }
        XCTAssertEqual(phase, .ready)
        XCTAssertGreaterThan(blocked, 0, "the full socket made it wait")
        XCTAssertGreaterThan(coalesced, 50, "flushes merged while the socket was full")
        XCTAssertLessThan(updates, 100)
        XCTAssertLessThan(ms, 10_000)
        // Now it reads: everything that comes is whole, and the last UPDATE band ends with the last picture (99).
        var last: [UInt8] = []
        var rows = 0
        while let m = fe.next(500) {
            if case .update(let u) = m.0 { last = m.1; rows = Int(u.y + u.height) }
        }
        XCTAssertEqual(rows, Int(h), "the last band reaches the bottom")
        XCTAssertEqual(last.last, 99)
        XCTAssertTrue(last.dropFirst(20).allSatisfy { $0 == 99 }, "the last band holds the latest picture")
        print("GPU-DISPLAY-SLOW-PEER 100 flushes of 640x480 in \(Int(ms)) ms while the peer did not read: \(updates) update bands sent, \(coalesced) flushes coalesced, \(blocked) waits for EPOLLOUT")
    }

    /// Full-frame flushes per second at 1024x768 (scanout 1) to a front-end that reads as fast as it can (a thread
    /// here: QEMU reads on its own thread too), and how many pixels reached it.
    func testDisplayRateToAReadingPeer() throws {
        let fe = attachDisplay()
        fe.handshake()
        let w: UInt32 = 1024, h: UInt32 = 768
        try create(1, .b8g8r8x8, w, h)
        _ = try attach(1, bytes: Int(w * h * 4), chunk: 1 << 16)
        try ok(transfer(1, rect(0, 0, w, h)))
        try ok(setScanout(1, 1, rect(0, 0, w, h)))
        final class Count: @unchecked Sendable { var bytes = 0; var stop = false }
        let c = Count()
        let fd = fe.fd
        let reader = Transport.Thread.spawn {
            var b = [UInt8](repeating: 0, count: 1 << 20)
            while !c.stop {
                let r = recv(fd, &b, b.count, Int32(MSG_DONTWAIT))
                if r > 0 { c.bytes += r } else { _ = lb_poll_one(fd, 1, 20) }
            }
        }
        // Flushes for 1 s, as fast as the driver can send them.
        var n = 0
        let t0 = lb_now_ns()
        while lb_now_ns() - t0 < 1_000_000_000 { try ok(flush(1, rect(0, 0, w, h))); n += 1 }
        let secs = Double(lb_now_ns() - t0) / 1e9
        c.stop = true
        reader.join()
        let l = try XCTUnwrap(link())
        let (updates, bytes, coalesced) = loop.executeAndWait { (l.updates, l.pixelBytes, l.coalesced) }
        XCTAssertGreaterThan(c.bytes, Int(w * h * 4), "at least one whole frame arrived")
        let frames = Double(bytes) / Double(w * h * 4)
        print("GPU-DISPLAY-RATE 1024x768: \(n) full-frame flushes answered in \(Int(secs * 1000)) ms (\(Int(Double(n) / secs))/s); \(Int(frames / secs)) frames/s of pixels sent to the peer (\(updates) bands, \(coalesced) flushes coalesced, \(c.bytes / (1 << 20)) MiB read)")
    }

    func testDisplayHostileOrSilentPeersCloseTheSocketAndTheDeviceGoesOn() throws {
        try create(1, .b8g8r8x8, 64, 64)
        _ = try attach(1, bytes: 64 * 64 * 4)
        try ok(setScanout(0, 1, rect(0, 0, 64, 64)))
        func closed(_ fe: FakeFrontEnd, _ why: String, line: UInt = #line) {
            XCTAssertTrue(fe.closedByPeer(), "socket still open", line: line)
            let l = link()
            XCTAssertEqual(l?.phase, .closed, line: line)
            XCTAssertTrue(l?.closeReason?.contains(why) ?? false, "reason: \(String(describing: l?.closeReason))", line: line)
            // The device still answers and flushes (to its file output).
            XCTAssertNoThrow(try ok(flush(1, rect(0, 0, 64, 64))), line: line)
        }
        // A reply to something else than what was asked.
        var fe = attachDisplay()
        XCTAssertEqual(fe.next()?.0, .getProtocolFeatures)
        fe.reply(.displayInfo(type: 0x1101, modes: []))
        closed(fe, "reply to 3, waiting for the reply to 1")
        // A request (no REPLY flag) where a reply is due.
        fe = attachDisplay()
        XCTAssertEqual(fe.next()?.0, .getProtocolFeatures)
        var b = [UInt8](repeating: 0, count: 12)
        b.withUnsafeMutableBytes { VhostUserGpuHeader(request: 1, flags: 0, size: 0).store(to: $0.baseAddress!) }
        XCTAssertEqual(Glibc.send(fe.fd, b, 12, 0), 12)
        closed(fe, "without the REPLY flag")
        // A reply of the wrong size.
        fe = attachDisplay()
        XCTAssertEqual(fe.next()?.0, .getProtocolFeatures)
        b = [UInt8](repeating: 0, count: 16)
        b.withUnsafeMutableBytes { VhostUserGpuHeader(request: 1, flags: 4, size: 4).store(to: $0.baseAddress!) }
        XCTAssertEqual(Glibc.send(fe.fd, b, 16, 0), 16)
        closed(fe, "payload 4 bytes, want 8")
        // A header announcing a huge payload: refused before reading it.
        fe = attachDisplay()
        XCTAssertEqual(fe.next()?.0, .getProtocolFeatures)
        b = [UInt8](repeating: 0, count: 12)
        b.withUnsafeMutableBytes { VhostUserGpuHeader(request: 1, flags: 4, size: 0xffff_fff0).store(to: $0.baseAddress!) }
        XCTAssertEqual(Glibc.send(fe.fd, b, 12, 0), 12)
        closed(fe, "exceeds 1056")
        // A reply nobody asked for once the link runs (GET_EDID's).
        fe = attachDisplay()
        fe.handshake()
        XCTAssertEqual(fe.next()?.0, .scanout(VhostUserGpuScanout(scanout: 0, width: 64, height: 64)))
        fe.reply(.edid(type: 0x1104, data: [0]))
        closed(fe, "reply to 11 that nothing asked for")
        // No reply at all: closed after the (shortened) timeout.
        fe = attachDisplay(timeoutMs: 200)
        XCTAssertEqual(fe.next()?.0, .getProtocolFeatures)
        closed(fe, "no reply to getProtocolFeatures within 200 ms")
        // End of file: closed quietly (no reason), and a new socket works again.
        fe = attachDisplay()
        XCTAssertEqual(fe.next()?.0, .getProtocolFeatures)
        shutdown(fe.fd, Int32(SHUT_WR))
        XCTAssertTrue(fe.closedByPeer())
        XCTAssertEqual(link()?.phase, .closed)
        XCTAssertNil(link()?.closeReason)
        fe = attachDisplay()
        fe.handshake()
        XCTAssertEqual(fe.next()?.0, .scanout(VhostUserGpuScanout(scanout: 0, width: 64, height: 64)), "the current picture is presented on a new socket")
        if case .update(let u)? = fe.next()?.0 { XCTAssertEqual(u, VhostUserGpuUpdate(scanout: 0, x: 0, y: 0, width: 64, height: 64)) } else { XCTFail("no UPDATE") }
    }
}
