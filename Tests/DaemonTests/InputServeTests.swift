import XCTest
import Glibc
import CLinux
@testable import Daemon
@testable import Registry
@testable import Transport

/// virtio-input served as a vhost-user back-end (`serve`) and forwarded to it by loopbackd's own front-end
/// (`backend = "vhost-user:…"`), both built from config text with the daemon's wiring: the driver reads the
/// config space through the front-end (select/subsel written to the back-end, the answer read back), host events
/// injected into the back-end's source reach the driver in order and grouped, an LED status event reaches the
/// back-end's host device, and events keep flowing after the back-end restarts.
final class InputServeTests: XCTestCase {
    private func config(_ text: String) throws -> DaemonConfig { try DaemonConfig.parse(TOML.parse(text, file: "t.conf")) }

    func testForwardedToOwnServeEventsFlowEndToEnd() throws {
        let sock = "/tmp/lb-input-serve-\(getpid()).sock"
        unlink(sock)
        defer { unlink(sock) }
        let back = try config("[daemon]\ntransport = \"none\"\n[device.kbd]\ntype = \"input\"\nsimulated = true\nserve = \"\(sock)\"\n").devices[0]
        let front = try config("[device.kbd]\ntype = \"input\"\nbackend = \"vhost-user:\(sock)\"\n").devices[0]

        let backLoop = try EventLoop()
        let backHost = DeviceHost(loop: backLoop)
        backLoop.startThread()
        defer { backLoop.stopAndJoin() }
        func serve() throws -> (VhostUserBackendServer, InputDevice, FakeInputSource) {
            let dev = try XCTUnwrap(try back.make() as? InputDevice)
            let src = try XCTUnwrap(dev.source as? FakeInputSource)
            let s = try backLoop.executeAndWait { () -> Result<VhostUserBackendServer, DeviceError> in
                do throws(DeviceError) { return .success(try startServer(host: backHost, name: "kbd", device: dev, path: sock)) }
                catch { return .failure(error) }
            }.get()
            return (s, dev, src)
        }
        var (server, bdev, src) = try serve()

        let loop = try EventLoop()
        let host = DeviceHost(loop: loop)
        let fe = try XCTUnwrap(try makeFrontend(front, socket: sock, loop: loop) as? VhostUserFrontendDevice)
        let idx = host.add(name: "kbd", device: fe)
        loop.startThread()
        defer { loop.executeAndWait { host.shutdown(); fe.shutdown() }; loop.stopAndJoin() }
        let drv = try SimDriver(host: host, index: idx, ramSize: 4 << 20)
        try drv.start()
        XCTAssertEqual(drv.queues.count, 2)

        // Config space through the front-end: select ID_NAME, then EV_BITS(EV_LED), then ABS_INFO(ABS_MT_POSITION_X).
        func cfg(_ sel: UInt8, _ sub: UInt8) throws -> [UInt8] {
            XCTAssertTrue(drv.writeConfig(offset: 0, bytes: [sel, sub]))
            let c = try XCTUnwrap(drv.readConfig(offset: 0, count: 136))
            XCTAssertEqual(Array(c[0..<2]), [sel, sub])
            return Array(c[8..<(8 + Int(c[2]))])
        }
        XCTAssertEqual(String(decoding: try cfg(VirtioInput.cfgIDName, 0), as: UTF8.self), FakeInputSource.keyboardAndTouch.name)
        XCTAssertEqual(try cfg(VirtioInput.cfgEVBits, UInt8(VirtioInput.evLed)), [0x07])
        XCTAssertEqual(try cfg(VirtioInput.cfgAbsInfo, 0x35).count, 20)
        XCTAssertEqual(try cfg(0x77, 0), [])

        // Event buffers, then host events on the back-end's side.
        let q = drv.queues[0]
        var bufs: [UInt16: UInt64] = [:]
        func post(_ n: Int) throws {
            for _ in 0..<n {
                let b = drv.alloc(8)
                let h = try XCTUnwrap(q.addChain(readable: [], writable: [(b, 8)]))
                bufs[h] = b
                q.submit(h)
            }
        }
        func reap(_ n: Int) throws -> [InputEvent] {
            try (0..<n).map { _ in
                let u = try XCTUnwrap(q.waitUsed(timeoutMs: 5000), "no event")
                XCTAssertEqual(u.len, 8)
                q.recycle(u.id)
                return InputEvent(wire: UInt64(littleEndian: drv.host(bufs[u.id]!).loadUnaligned(as: UInt64.self)))
            }
        }
        try post(32)
        var want: [InputEvent] = []
        for k in 0..<10 {
            want += [InputEvent(type: VirtioInput.evAbs, code: 0x35, value: Int32(100 * k)),
                     InputEvent(type: VirtioInput.evKey, code: 330, value: Int32(k & 1)), .synReport]
        }
        src.inject(Array(want[0..<15]))
        XCTAssertEqual(try reap(15), Array(want[0..<15]))
        try post(15)
        src.inject(Array(want[15...]))
        XCTAssertEqual(try reap(15), Array(want[15...]))

        // LED on, from the driver's status queue to the back-end's host device.
        let s = drv.queues[1]
        let sb = drv.alloc(8)
        let led = InputEvent(type: VirtioInput.evLed, code: 0, value: 1)
        drv.host(sb).storeBytes(of: led.wire.littleEndian, as: UInt64.self)
        let sh = try XCTUnwrap(s.addChain(readable: [(sb, 8)], writable: []))
        s.submit(sh)
        XCTAssertEqual(try XCTUnwrap(s.waitUsed(timeoutMs: 5000)).id, sh)
        XCTAssertEqual(backLoop.executeAndWait { src.written }, [led])
        XCTAssertEqual(backLoop.executeAndWait { bdev.badStatusEvents }, 0)

        // The back-end restarts (a new process would have a new host device): the front-end reconnects, and events
        // flow again.
        backLoop.executeAndWait { server.stop() }
        (server, bdev, src) = try serve()
        let end = lb_now_ns() + 5_000_000_000
        var got: [InputEvent] = []
        while got.isEmpty && lb_now_ns() < end {
            src.inject([InputEvent(type: VirtioInput.evKey, code: 30, value: 1), .synReport])
            while let u = q.waitUsed(timeoutMs: 200) {
                q.recycle(u.id)
                let e = InputEvent(wire: UInt64(littleEndian: drv.host(bufs[u.id]!).loadUnaligned(as: UInt64.self)))
                try post(1)
                // The old back-end gave its held buffers back as empty reports (all-zero events) when it stopped.
                if e != .synReport { got.append(e) }
            }
        }
        XCTAssertEqual(got.first, InputEvent(type: VirtioInput.evKey, code: 30, value: 1), "events after the back-end restart")
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
        drv.reset()
        backLoop.executeAndWait { server.stop() }
    }
}
