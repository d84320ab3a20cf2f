import XCTest
import Glibc
import CMallocCounter
@testable import Daemon
import Registry
import Transport

/// The forwarded gpu's display server allocates nothing per frame or cursor message: 10,000 UPDATEs of a 160x100
/// rectangle and 10,000 CURSOR_POS from a scripted back-end (prebuilt messages on the socketpair), each UPDATE
/// reaching a file output in "demand" mode (the flush is handed to the output; no file is written).
extension AllocationTests {
    func testGpuDisplayUpdatesDoNotAllocate() throws {
        let loop = try EventLoop()
        loop.startThread()
        let out = FileGpuOutput(path: "/tmp/loopbackd-alloc-gpudisplay-\(getpid()).ppm", when: .demand)
        let server = try GpuDisplayServer(name: "g", modes: [GpuMode(width: 320, height: 200)], outputs: [out],
                                          memoryBudget: 4 << 20, loop: loop)
        let started = loop.executeAndWait { () -> Result<[(request: VhostUserRequest, fds: [Int32])], DeviceError> in
            do throws(DeviceError) { return .success(try server.ringsStarting()) } catch { return .failure(error) }
        }
        let fd = try XCTUnwrap(try started.get().first?.fds.first)
        defer { close(fd); loop.executeAndWait { server.ringsStopped(backendGone: true) }; loop.stopAndJoin() }
        func le(_ vs: [UInt32]) -> [UInt8] { vs.flatMap { v in (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } } }
        func msg(_ r: UInt32, _ p: [UInt8]) -> [UInt8] { le([r, 0, UInt32(p.count)]) + p }
        let scanout = msg(7, le([0, 320, 200]))
        let update = msg(8, le([0, 10, 20, 160, 100]) + [UInt8](repeating: 0x5a, count: 160 * 100 * 4))
        let cursor = msg(4, le([0, 5, 6]))
        let ask = msg(1, [])
        var reply = [UInt8](repeating: 0, count: 20)
        func put(_ b: [UInt8]) {
            b.withUnsafeBytes { p in
                var done = 0
                while done < p.count { let r = send(fd, p.baseAddress! + done, p.count - done, Int32(MSG_NOSIGNAL)); if r <= 0 { return }; done += r }
            }
        }
        func sync() -> Bool {   // the reply to GET_PROTOCOL_FEATURES: everything before it was handled
            put(ask)
            var have = 0
            while have < 20 {
                let r = reply.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + have, 20 - have, 0) }
                if r <= 0 { return false }
                have += r
            }
            return true
        }
        put(scanout)
        for _ in 0..<200 { put(update); put(cursor) }
        XCTAssertTrue(sync())
        lb_malloc_count_start()
        for _ in 0..<10_000 { put(update); put(cursor) }
        let synced = sync()
        let n = lb_malloc_count_stop()
        XCTAssertTrue(synced)
        XCTAssertEqual(loop.executeAndWait { server.updates }, 10_200)
        XCTAssertEqual(loop.executeAndWait { out.flushes }, 10_200)
        print("allocations during 10,000 vhost-user-gpu UPDATE + CURSOR_POS messages: \(n)")
        XCTAssertLessThan(n, 100)
    }
}
