import XCTest
import Glibc
import CLinux
import Synchronization
@testable import Registry
@testable import Transport

/// `GpuDisplayServer` against a scripted back-end on the SET_SOCKET socketpair: the requests a well-behaved
/// vhost-user-gpu sends (vhost-user-gpu.rst), the replies it waits for (byte-exact), the pictures and cursors the
/// outputs get, and a hostile back-end (every check closes the display connection with a reason, never a crash;
/// a flood leaves the loop responsive). The real back-end runs in GpuForwardPeerTests.
final class GpuDisplayServerTests: XCTestCase {
    final class Recorder: GpuOutput {
        var events: [String] = []
        var lastFrame: [UInt32] = []
        var cursorImage: [UInt32] = []
        var describe: String { "recorder" }
        func start(loop: EventLoop, scanout: Int, source: GpuFrameSource) throws(DeviceError) { events.append("start \(scanout)") }
        func stop() { events.append("stop") }
        func copy(_ f: GpuFrame) -> [UInt32] {
            var out: [UInt32] = []
            for y in 0..<Int(f.rect.height) { for x in 0..<Int(f.rect.width) {
                out.append(f.pixels.load(fromByteOffset: (Int(f.rect.y) + y) * f.stride + (Int(f.rect.x) + x) * 4, as: UInt32.self))
            } }
            return out
        }
        func scanoutChanged(frame: GpuFrame?) {
            events.append(frame.map { "scanout \($0.rect.width)x\($0.rect.height) \($0.format)" } ?? "scanout off")
            if let frame { lastFrame = copy(frame) }
        }
        func flush(frame: GpuFrame, damage: GpuRect) {
            events.append("flush \(damage.x),\(damage.y) \(damage.width)x\(damage.height)")
            lastFrame = copy(frame)
        }
        func cursorChanged(image: GpuFrame?, hotX: UInt32, hotY: UInt32, x: UInt32, y: UInt32) {
            events.append(image == nil ? "cursor hidden at \(x),\(y)" : "cursor \(hotX),\(hotY) at \(x),\(y)")
            if let image { cursorImage = copy(image) }
        }
        func cursorMoved(x: UInt32, y: UInt32) { events.append("cursor moved \(x),\(y)") }
        func snapshot() -> String { "" }
    }

    var loop: EventLoop!
    var server: GpuDisplayServer!
    var outs: [Recorder] = []
    var peer: Int32 = -1

    func start(modes: [GpuMode] = [GpuMode(width: 64, height: 48), GpuMode(width: 640, height: 480)], budget: Int = 1 << 20) throws {
        loop = try EventLoop()
        loop.startThread()
        outs = modes.map { _ in Recorder() }
        server = try GpuDisplayServer(name: "g", modes: modes, outputs: outs, memoryBudget: budget, loop: loop)
        let srv = server!
        let r = loop.executeAndWait { () -> Result<[(request: VhostUserRequest, fds: [Int32])], DeviceError> in
            do throws(DeviceError) { return .success(try srv.ringsStarting()) } catch { return .failure(error) }
        }
        let msgs = try r.get()
        XCTAssertEqual(msgs.count, 1)
        XCTAssertEqual(msgs[0].request, .gpuSetSocket)
        XCTAssertEqual(msgs[0].fds.count, 1)
        peer = msgs[0].fds[0]
    }

    override func tearDown() {
        if let loop {
            if let server { loop.executeAndWait { server.ringsStopped(backendGone: true) } }
            loop.stopAndJoin()
        }
        loop = nil
        server = nil
        FD.close(peer)
        peer = -1
    }

    func le(_ vs: [UInt32]) -> [UInt8] { vs.flatMap { v in (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } } }
    func msg(_ req: UInt32, _ payload: [UInt8], flags: UInt32 = 0) -> [UInt8] { le([req, flags, UInt32(payload.count)]) + payload }

    func write(_ b: [UInt8], fd: Int32 = -1) {
        b.withUnsafeBytes { p in
            if fd >= 0 {
                var f = fd
                XCTAssertEqual(lb_sendmsg_fds(peer, p.baseAddress, p.count, &f, 1), p.count)
                return
            }
            var done = 0
            while done < p.count {
                let r = send(peer, p.baseAddress! + done, p.count - done, Int32(MSG_NOSIGNAL))
                if r <= 0 { XCTFail("write: \(Errno.current)"); return }
                done += r
            }
        }
    }

    /// Reads exactly `n` bytes (a reply) within 2 s; nil on EOF or timeout.
    func read(_ n: Int) -> [UInt8]? {
        var b = [UInt8](repeating: 0, count: n), have = 0
        let end = lb_now_ns() + 2_000_000_000
        while have < n && lb_now_ns() < end {
            guard lb_poll_one(peer, Int32(POLLIN), 100) > 0 else { continue }
            let r = b.withUnsafeMutableBytes { Glibc.read(peer, $0.baseAddress! + have, n - have) }
            if r <= 0 { return nil }
            have += r
        }
        return have == n ? b : nil
    }

    func u32(_ b: [UInt8], _ o: Int) -> UInt32 { b[o..<o + 4].enumerated().reduce(0) { $0 | UInt32($1.element) << (8 * $1.offset) } }

    /// Waits for the loop to have handled everything sent so far (a GET_PROTOCOL_FEATURES round trip).
    func sync() {
        write(msg(1, []))
        XCTAssertEqual(read(20).map { u32($0, 0) }, 1)
    }

    func waitClosed() -> Bool {
        let end = lb_now_ns() + 2_000_000_000
        while lb_now_ns() < end {
            if !loop.executeAndWait({ self.server.isConnected }) { return true }
            usleep(2_000)
        }
        return false
    }

    func testHandshakeDisplayInfoAndEDID() throws {
        try start()
        write(msg(1, []))
        let pf = try XCTUnwrap(read(20))
        XCTAssertEqual([u32(pf, 0), u32(pf, 4), u32(pf, 8), u32(pf, 12), u32(pf, 16)], [1, 4, 8, 3, 0], "EDID | DMABUF2, reply flag")
        write(msg(2, le([1, 0])))
        write(msg(3, []))
        let di = try XCTUnwrap(read(12 + VirtioGPU.displayInfoSize))
        XCTAssertEqual([u32(di, 0), u32(di, 4), u32(di, 8)], [3, 4, UInt32(VirtioGPU.displayInfoSize)])
        XCTAssertEqual(u32(di, 12), VirtioGPU.respOKDisplayInfo)
        let p = 12 + 24
        XCTAssertEqual((0..<6).map { u32(di, p + 4 * $0) }, [0, 0, 64, 48, 1, 0])
        XCTAssertEqual((0..<6).map { u32(di, p + 24 + 4 * $0) }, [0, 0, 640, 480, 1, 0])
        XCTAssertEqual(u32(di, p + 48 + 16), 0, "a third scanout is not enabled")
        write(msg(11, le([1])))
        let e = try XCTUnwrap(read(12 + VirtioGPU.edidResponseSize))
        XCTAssertEqual([u32(e, 0), u32(e, 4), u32(e, 8)], [11, 4, UInt32(VirtioGPU.edidResponseSize)])
        XCTAssertEqual([u32(e, 12), u32(e, 36)], [VirtioGPU.respOKEDID, 128])
        XCTAssertEqual(Array(e[44..<172]), GpuEDID.block(mode: GpuMode(width: 640, height: 480), scanout: 1))
        // A scanout the display does not have: an error of the same size (the back-end waits for that size).
        write(msg(11, le([7])))
        let bad = try XCTUnwrap(read(12 + VirtioGPU.edidResponseSize))
        XCTAssertEqual(u32(bad, 12), VirtioGPU.respErrInvalidScanoutID)
        XCTAssertTrue(loop.executeAndWait { self.server.isConnected })
    }

    func testScanoutUpdateAndCursorReachTheOutputs() throws {
        try start()
        // Flags of requests are ignored: QEMU 7.2's back-end leaves UPDATE's uninitialized (REPLY bit included).
        write(msg(7, le([0, 64, 48]), flags: 0xffff_ffff))
        // An UPDATE of (2, 3) 4×2 with pixels 1...8, sent a few bytes at a time.
        let px: [UInt32] = Array(1...8)
        let m = msg(8, le([0, 2, 3, 4, 2] + px), flags: 0xdead_beef)
        for chunk in stride(from: 0, to: m.count, by: 5) { write(Array(m[chunk..<min(chunk + 5, m.count)])); usleep(200) }
        sync()
        loop.executeAndWait {
            XCTAssertEqual(self.outs[0].events, ["start 0", "scanout 64x48 b8g8r8x8", "flush 2,3 4x2"])
            var want = [UInt32](repeating: 0, count: 64 * 48)
            for k in 0..<8 { want[(3 + k / 4) * 64 + 2 + k % 4] = UInt32(k + 1) }
            XCTAssertEqual(self.outs[0].lastFrame, want)
            XCTAssertNotNil(self.server.currentFrame(0))
            XCTAssertNil(self.server.currentFrame(1))
        }
        // Cursor: CURSOR_UPDATE (scanout 0 at 10,11, hot 1,2), CURSOR_POS, CURSOR_POS_HIDE, CURSOR_POS (shown again).
        let img = (0..<UInt32(64 * 64)).map { $0 * 3 }
        write(msg(6, le([0, 10, 11, 1, 2] + img)))
        write(msg(4, le([0, 20, 21])))
        write(msg(5, le([0, 22, 23])))
        write(msg(4, le([0, 24, 25])))
        write(msg(7, le([0, 0, 0])))
        sync()
        loop.executeAndWait {
            XCTAssertEqual(Array(self.outs[0].events.dropFirst(3)), ["cursor 1,2 at 10,11", "cursor moved 20,21", "cursor hidden at 22,23",
                                                                    "cursor 1,2 at 24,25", "scanout off"])
            XCTAssertEqual(self.outs[0].cursorImage, img)
            XCTAssertEqual(self.server.violations, 0)
        }
        // A driver reset keeps the display connection (the same back-end holds its socket) and blanks the
        // outputs; the next ring set-up sends no second SET_SOCKET; the back-end's next SCANOUT shows again.
        write(msg(7, le([0, 64, 48])))
        sync()
        let srv = server!
        let again = loop.executeAndWait { () -> Int in
            srv.ringsStopped(backendGone: false)
            return (try? srv.ringsStarting().count) ?? -1
        }
        XCTAssertEqual(again, 0)
        loop.executeAndWait {
            XCTAssertTrue(self.server.isConnected)
            XCTAssertEqual(Array(self.outs[0].events.suffix(3)), ["scanout 64x48 b8g8r8x8", "scanout off", "cursor hidden at 24,25"])
        }
        write(msg(7, le([0, 32, 16])))
        sync()
        XCTAssertEqual(loop.executeAndWait { self.outs[0].events.last }, "scanout 32x16 b8g8r8x8")
    }

    func testDmabufScanoutMappedFromASealedMemfdAndUpdateAlwaysAnswered() throws {
        try start()
        // A linear 16×8 XRGB8888 buffer of stride 80 in a sealed memfd (what udmabuf takes); scanout = (4, 2) 8×4.
        let fd = lb_memfd("dmabuf", 1)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { FD.close(fd) }
        XCTAssertEqual(ftruncate(fd, 80 * 8), 0)
        let words = (0..<UInt32(20 * 8)).map { $0 &* 2654435761 }
        _ = words.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        XCTAssertEqual(lb_seal_size(fd), 0)
        write(msg(12, le([0, 4, 2, 8, 4, 16, 8, 80, 0, 0x3432_5258, 0, 0])), fd: fd)
        write(msg(10, le([0, 0, 0, 16, 8])))
        let r = try XCTUnwrap(read(12))
        XCTAssertEqual([u32(r, 0), u32(r, 4), u32(r, 8)], [10, 4, 0], "DMABUF_UPDATE answered")
        loop.executeAndWait {
            var want: [UInt32] = []
            for y in 0..<4 { for x in 0..<8 { want.append(words[(2 + y) * 20 + 4 + x]) } }
            XCTAssertEqual(self.outs[0].lastFrame, want)
            XCTAssertEqual(Array(self.outs[0].events.suffix(2)), ["scanout 8x4 b8g8r8x8", "flush 0,0 8x4"])
        }
        // Refused (tiled modifier; an unsealed memfd): the scanout shows nothing, DMABUF_UPDATE is still answered.
        write(msg(12, le([0, 0, 0, 8, 4, 16, 8, 80, 0, 0x3432_5258, 1, 0])), fd: fd)
        write(msg(10, le([0, 0, 0, 16, 8])))
        XCTAssertEqual(read(12).map { u32($0, 0) }, 10)
        let loose = lb_memfd("loose", 1)
        defer { FD.close(loose) }
        XCTAssertEqual(ftruncate(loose, 80 * 8), 0)
        write(msg(9, le([1, 0, 0, 8, 4, 16, 8, 80, 0, 0x3432_5258])), fd: loose)
        write(msg(10, le([1, 0, 0, 16, 8])))
        XCTAssertEqual(read(12).map { u32($0, 0) }, 10)
        loop.executeAndWait {
            XCTAssertEqual(self.outs[0].events.last, "scanout off")
            XCTAssertEqual(self.outs[1].events, ["start 1"])
            XCTAssertEqual(self.server.violations, 0)
            XCTAssertTrue(self.server.isConnected)
        }
    }

    /// Each hostile message closes the display connection with its reason; the server takes a new one after.
    func testHostileBackEndClosesTheDisplayConnection() throws {
        let cases: [(String, [UInt8], String)] = [
            ("unknown request", msg(99, []), "unknown request 99"),
            ("wrong size", msg(4, le([0, 1])), "payload 8 bytes, want 12"),
            ("scanout id", msg(7, le([9, 64, 48])), "scanout 9 out of range (2 scanouts)"),
            ("too big", msg(7, le([1, 20000, 10])), "more than 16384 pixels a side"),
            ("budget", msg(7, le([1, 4000, 4000])), "over the display budget"),
            ("update without scanout", msg(8, le([1, 0, 0, 1, 1, 0])), "shows nothing"),
            ("update outside", msg(7, le([0, 64, 48])) + msg(8, le([0, 60, 0, 8, 1] + [UInt32](repeating: 0, count: 8))), "outside scanout 0"),
            ("update wrapping", msg(7, le([0, 64, 48])) + msg(8, le([0, 0xffff_fff0, 0, 0x20, 1] + [UInt32](repeating: 0, count: 0x20))), "outside scanout 0"),
            ("update size", msg(7, le([0, 64, 48])) + msg(8, le([0, 0, 0, 2, 2, 0, 0, 0])), "payload 32 bytes, want 36"),
            ("short update", msg(8, le([0, 0])), "want >= 20"),
            ("huge update", le([8, 0, 0x7fff_ffff]), "exceeds"),
            ("dmabuf outside", msg(9, le([0, 10, 0, 8, 4, 16, 8, 80, 0, 0x3432_5258])), "outside the 16x8 DMABUF"),
            ("protocol features", msg(2, le([0x10, 0])), "beyond the offered"),
        ]
        for (what, bytes, reason) in cases {
            try start()
            write(bytes)
            XCTAssertTrue(waitClosed(), "\(what): connection not closed")
            let why = loop.executeAndWait { self.server.lastViolation } ?? ""
            XCTAssertTrue(why.contains(reason), "\(what): \(why)")
            tearDown()
        }
        // A stray fd (with a message that takes none).
        try start()
        let f = lb_eventfd(0, 1)
        write(msg(4, le([0, 1, 1])), fd: f)
        FD.close(f)
        XCTAssertTrue(waitClosed(), "stray fd")
        XCTAssertTrue(loop.executeAndWait { self.server.lastViolation }?.contains("1 file descriptors, want 0") ?? false)
    }

    /// A back-end flooding valid messages as fast as it can write does not starve the loop: each wake-up reads
    /// at most `readsPerEvent` buffers, and a task queued on the loop runs within milliseconds meanwhile.
    func testFloodDoesNotStarveTheLoop() throws {
        try start(budget: 4 << 20)
        write(msg(7, le([1, 640, 480])))
        let full = msg(8, le([1, 0, 0, 640, 480] + [UInt32](repeating: 7, count: 640 * 480)))
        let fd = peer
        let stop = Atomic<Bool>(false)
        let t = Thread.spawn {
            while !stop.load(ordering: .relaxed) {
                let r = full.withUnsafeBytes { p -> Int in
                    var done = 0
                    while done < p.count { let r = send(fd, p.baseAddress! + done, p.count - done, Int32(MSG_NOSIGNAL)); if r <= 0 { return -1 }; done += r }
                    return done
                }
                if r < 0 { break }
            }
        }
        usleep(100_000)
        var worst: UInt64 = 0
        for _ in 0..<20 {
            let t0 = lb_now_ns()
            loop.executeAndWait { }
            worst = max(worst, lb_now_ns() - t0)
            usleep(10_000)
        }
        stop.store(true, ordering: .relaxed)
        let updates = loop.executeAndWait { self.server.updates }
        loop.executeAndWait { self.server.ringsStopped(backendGone: true) }   // the writer sees EPIPE
        pthread_join(t.handle, nil)
        XCTAssertGreaterThan(updates, 5, "full frames were applied during the flood")
        XCTAssertLessThan(worst, 200_000_000, "a loop task waited \(worst / 1_000_000) ms during the flood")
        XCTAssertEqual(loop.executeAndWait { self.server.violations }, 0)
    }
}
