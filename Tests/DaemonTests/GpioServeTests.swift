import XCTest
import Glibc
import CLinux
@testable import Daemon
@testable import Registry
@testable import Transport

/// virtio-gpio served as a vhost-user back-end (`serve`) and forwarded to it by loopbackd's own front-end
/// (`backend = "vhost-user:…"`), both built from config text with the daemon's wiring: the config space is read
/// from the back-end (GET_CONFIG), names, directions and values round-trip, edge interrupts raised on the back-end's
/// chip reach the driver's eventq through the front-end, and requests and interrupts work again after the back-end
/// restarts.
final class GpioServeTests: XCTestCase {
    private func config(_ text: String) throws -> DaemonConfig { try DaemonConfig.parse(TOML.parse(text, file: "t.conf")) }

    func testForwardedToOwnServeRequestsAndInterruptsFlowEndToEnd() throws {
        let sock = "/tmp/lb-gpio-serve-\(getpid()).sock"
        unlink(sock)
        defer { unlink(sock) }
        let back = try config("[daemon]\ntransport = \"none\"\n[device.g]\ntype = \"gpio\"\nsimulated = true\nnames = [\"a\", \"b\", \"c\", \"d\", \"e\", \"f\", \"g\", \"h\"]\nserve = \"\(sock)\"\n").devices[0]
        let front = try config("[device.g]\ntype = \"gpio\"\nbackend = \"vhost-user:\(sock)\"\n").devices[0]

        let backLoop = try EventLoop()
        let backHost = DeviceHost(loop: backLoop)
        backLoop.startThread()
        defer { backLoop.stopAndJoin() }
        func serve() throws -> (VhostUserBackendServer, GpioDevice, FakeGpioChip) {
            let dev = try XCTUnwrap(try back.make() as? GpioDevice)
            let chip = try XCTUnwrap(dev.chip as? FakeGpioChip)
            let s = try backLoop.executeAndWait { () -> Result<VhostUserBackendServer, DeviceError> in
                do throws(DeviceError) { return .success(try startServer(host: backHost, name: "g", device: dev, path: sock)) }
                catch { return .failure(error) }
            }.get()
            return (s, dev, chip)
        }
        var (server, bdev, chip) = try serve()

        let loop = try EventLoop()
        let host = DeviceHost(loop: loop)
        let fe = try XCTUnwrap(try makeFrontend(front, socket: sock, loop: loop) as? VhostUserFrontendDevice)
        let idx = host.add(name: "g", device: fe)
        loop.startThread()
        defer { loop.executeAndWait { host.shutdown(); fe.shutdown() }; loop.stopAndJoin() }
        let drv = try SimDriver(host: host, index: idx, ramSize: 4 << 20)
        try drv.start()
        XCTAssertEqual(drv.queues.count, 2)
        XCTAssertTrue(drv.features.contains(VirtioGpio.fIRQ), "F_IRQ offered through the front-end")
        let block = Array("a\0b\0c\0d\0e\0f\0g\0h\0".utf8)
        XCTAssertEqual(drv.readConfig(offset: 0, count: 8), [8, 0, 0, 0, UInt8(block.count), 0, 0, 0])

        let q = drv.queues[0], eq = drv.queues[1]
        func req(_ type: UInt16, _ line: UInt16, _ value: UInt32 = 0, room: Int = 2) throws -> [UInt8] {
            let r = drv.alloc(8), s = drv.alloc(room)
            drv.host(r).storeBytes(of: type.littleEndian, as: UInt16.self)
            drv.host(r).storeBytes(of: line.littleEndian, toByteOffset: 2, as: UInt16.self)
            drv.host(r).storeBytes(of: value.littleEndian, toByteOffset: 4, as: UInt32.self)
            let h = try XCTUnwrap(q.addChain(readable: [(r, 8)], writable: [(s, UInt32(room))]))
            q.submit(h)
            let u = try XCTUnwrap(q.waitUsed(timeoutMs: 5000), "response")
            XCTAssertEqual(u.id, h)
            q.recycle(u.id)
            return Array(UnsafeRawBufferPointer(start: drv.host(s), count: room))
        }
        func ok(_ type: UInt16, _ line: UInt16, _ value: UInt32 = 0) throws -> UInt8 {
            let r = try req(type, line, value)
            XCTAssertEqual(r[0], VirtioGpio.statusOK, "type \(type) line \(line)")
            return r[1]
        }
        var evStatus: [UInt16: UInt64] = [:]
        func arm(_ line: UInt16) throws {
            let g = drv.alloc(2), s = drv.alloc(1)
            drv.host(g).storeBytes(of: line.littleEndian, as: UInt16.self)
            let h = try XCTUnwrap(eq.addChain(readable: [(g, 2)], writable: [(s, 1)]))
            evStatus[h] = s
            eq.submit(h)
        }
        func event(_ ms: Int32 = 5000) -> UInt8? {
            guard let u = eq.waitUsed(timeoutMs: ms) else { return nil }
            eq.recycle(u.id)
            return drv.host(evStatus[u.id]!).load(as: UInt8.self)
        }

        XCTAssertEqual(Array(try req(VirtioGpio.msgGetNames, 0, room: 1 + block.count).dropFirst()), block)
        // Line 1 drives line 5 on the back-end's simulated chip; line 5 interrupts on both edges.
        func setUp() throws {
            _ = try ok(VirtioGpio.msgSetDirection, 1, UInt32(GpioDirection.output.rawValue))
            _ = try ok(VirtioGpio.msgSetDirection, 5, UInt32(GpioDirection.input.rawValue))
            _ = try ok(VirtioGpio.msgIRQType, 5, UInt32(VirtioGpio.irqEdgeBoth))
        }
        try setUp()
        for k in 0..<20 {
            try arm(5)
            _ = try ok(VirtioGpio.msgSetValue, 1, UInt32((k + 1) & 1))
            XCTAssertEqual(event(), VirtioGpio.irqStatusValid, "interrupt \(k)")
            XCTAssertEqual(try ok(VirtioGpio.msgGetValue, 5), UInt8((k + 1) & 1))
        }
        // An edge from the back-end's outside world (not caused by the driver).
        try arm(5)
        let now = backLoop.executeAndWait { chip.level[5] }
        _ = try ok(VirtioGpio.msgSetDirection, 1, UInt32(GpioDirection.none.rawValue))   // stop driving line 5
        backLoop.executeAndWait { chip.drive(5, !now) }
        XCTAssertEqual(event(), VirtioGpio.irqStatusValid, "external edge")
        XCTAssertEqual(backLoop.executeAndWait { bdev.interrupts }, 21)
        XCTAssertEqual(backLoop.executeAndWait { bdev.badRequests + bdev.badEvents }, 0)

        // A malformed request through the front-end is answered ERR by the back-end.
        XCTAssertEqual(try req(VirtioGpio.msgSetDirection, 9, 1)[0], VirtioGpio.statusError)

        // Armed buffer outstanding, then the back-end restarts: the old one gives held buffers back (INVALID) when
        // its rings stop; the new one (a new process would start with every line free) serves again.
        try arm(5)
        backLoop.executeAndWait { server.stop() }
        (server, bdev, chip) = try serve()
        var statuses: [UInt8] = []
        let end = lb_now_ns() + 10_000_000_000
        var done = false
        while !done && lb_now_ns() < end {
            if let r = try? req(VirtioGpio.msgGetDirection, 1), r[0] == VirtioGpio.statusOK { done = true } else { usleep(100_000) }
        }
        XCTAssertTrue(done, "requests after the back-end restart")
        while let s = event(200) { statuses.append(s) }
        XCTAssertEqual(statuses.filter { $0 == VirtioGpio.irqStatusValid }, [], "nothing fired on its own")
        try setUp()
        try arm(5)
        _ = try ok(VirtioGpio.msgSetValue, 1, 1)
        XCTAssertEqual(event(), VirtioGpio.irqStatusValid, "interrupts after the restart")
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
        drv.reset()
        backLoop.executeAndWait { server.stop() }
    }
}
