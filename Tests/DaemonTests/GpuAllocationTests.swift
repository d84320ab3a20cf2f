import XCTest
import Glibc
import CMallocCounter
@testable import Daemon
import Registry
import Transport
import CLinux

/// virtio-gpu allocates nothing per TRANSFER or FLUSH: 10,000 round trips of a full-frame TRANSFER_TO_HOST_2D
/// (1280x800 from 1,000 4 KiB backing entries) + RESOURCE_FLUSH reaching a file output in "demand" mode (the
/// flush is handed to the output; no file is written).
extension AllocationTests {
    func testGpuTransferAndFlushDoNotAllocate() throws {
        let n = try run("gpu", {
            GpuDevice(modes: [GpuMode(width: 1280, height: 800)],
                      outputs: [FileGpuOutput(path: "/tmp/loopbackd-alloc-gpu-\(getpid()).ppm", when: .demand)])
        })
        print("allocations during 10,000 gpu TRANSFER+FLUSH round trips: \(n)")
        XCTAssertLessThan(n, 100)
    }
}

/// The file output's writes allocate nothing either, on the loop (the copy into the writer's buffer) or on the
/// writer thread (conversion, write, rename): 10,000 round trips at 320x200 with a write after every flush
/// (interval 0; the writer takes the newest picture each time it is free).
extension AllocationTests {
    func testGpuFileOutputWritesDoNotAllocate() throws {
        let path = "/tmp/loopbackd-alloc-gpuw-\(getpid()).ppm"
        defer { unlink(path) }
        let out = FileGpuOutput(path: path, when: .flush(intervalNs: 0))
        let n = try run("gpu", { GpuDevice(modes: [GpuMode(width: 320, height: 200)], outputs: [out]) })
        print("allocations during 10,000 gpu TRANSFER+FLUSH round trips with a PPM write after each: \(n); \(out.writes) files written")
        XCTAssertGreaterThan(out.writes, 10)
        XCTAssertEqual(out.failures, 0)
        XCTAssertLessThan(n, 100)
    }
}

/// The same with a display socket attached (a served gpu, `GpuDisplayLink`): every flush also becomes UPDATE bands
/// of the damaged rows on the socket, read by a thread playing the front-end after the handshake. Nothing is
/// allocated per flush (damage state and one fixed send buffer).
extension AllocationTests {
    func testGpuFlushToADisplaySocketDoesNotAllocate() throws {
        let loop = try EventLoop()
        let host = DeviceHost(loop: loop)
        let dev = GpuDevice(modes: [GpuMode(width: 1280, height: 800)], outputs: [NullGpuOutput()])
        let i = host.add(name: "gpu", device: dev)
        loop.startThread()
        defer { loop.executeAndWait { host.shutdown() }; loop.stopAndJoin() }
        let drv = try SimDriver(host: host, index: i, ramSize: 8 << 20)
        try drv.start(queueCount: 1)
        var sv: [Int32] = [-1, -1]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv), 0)
        let fe = sv[1]
        defer { close(fe) }
        loop.executeAndWait { dev.takeDisplaySocket(sv[0], loop: loop) }
        // The handshake, by hand: GET_PROTOCOL_FEATURES → u64 0; SET_PROTOCOL_FEATURES + GET_DISPLAY_INFO → 408 bytes.
        func readN(_ n: Int) -> [UInt8] {
            var b = [UInt8](repeating: 0, count: n), have = 0
            while have < n { let r = b.withUnsafeMutableBytes { recv(fe, $0.baseAddress! + have, n - have, 0) }; if r <= 0 { break }; have += r }
            return b
        }
        func reply(_ r: VhostUserGpuReply) {
            var b = [UInt8](repeating: 0, count: 12 + r.payloadBytes)
            _ = b.withUnsafeMutableBytes { r.encode(into: $0) }
            XCTAssertEqual(send(fe, b, b.count, 0), b.count)
        }
        XCTAssertEqual(readN(12)[0], 1)
        reply(.protocolFeatures(0))
        XCTAssertEqual(readN(20 + 12)[20], 3)
        reply(.displayInfo(type: 0x1101, modes: [VhostUserGpuDisplayMode(width: 1280, height: 800, enabled: 1)]))
        final class Reader: @unchecked Sendable { var bytes = 0; var stop = false; let buf = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 16) }
        let rd = Reader()
        defer { rd.buf.deallocate() }
        let t = Transport.Thread.spawn {
            while !rd.stop { let r = recv(fe, rd.buf, 1 << 20, Int32(MSG_DONTWAIT)); if r > 0 { rd.bytes += r } else { _ = lb_poll_one(fe, 1, 10) } }
        }
        let w = try XCTUnwrap(makeWorkload(type: "gpu", driver: drv, verify: false))
        for _ in 0..<1000 { XCTAssertTrue(w.runOne(spinNs: 0)) }
        lb_malloc_count_start()
        for _ in 0..<10_000 { _ = w.runOne(spinNs: 0) }
        let n = lb_malloc_count_stop()
        rd.stop = true
        t.join()
        let (phase, updates) = loop.executeAndWait { (dev.display?.phase, dev.display?.updates ?? 0) }
        drv.reset()
        print("allocations during 10,000 gpu TRANSFER+FLUSH round trips with a display socket: \(n) (\(updates) UPDATE bands, \(rd.bytes >> 20) MiB read)")
        XCTAssertEqual(phase, .ready)
        XCTAssertGreaterThan(updates, 100, "the flushes reached the socket")
        XCTAssertLessThan(n, 100)
    }
}
