import XCTest
import Glibc
import CLinux
@testable import Daemon
@testable import Registry
@testable import Transport

/// virtio-console served as a vhost-user back-end (`serve`) and forwarded to it by loopbackd's own front-end
/// (`backend = "vhost-user:…"`), both from config text with the daemon's wiring: the multiport handshake
/// (DEVICE_READY → PORT_ADD → PORT_READY → CONSOLE_PORT, PORT_OPEN) crosses the socket hop, and 256 KiB written by
/// the driver come back byte-identical through the back-end's echo endpoint, in order.
final class ConsoleServeTests: XCTestCase {
    private func config(_ text: String) throws -> DaemonConfig { try DaemonConfig.parse(TOML.parse(text, file: "t.conf")) }

    func testForwardedToOwnServeDataFlowsEndToEnd() throws {
        let sock = "/tmp/lb-console-serve-\(getpid()).sock"
        unlink(sock)
        defer { unlink(sock) }
        let back = try config("[daemon]\ntransport = \"none\"\n[device.con0]\ntype = \"console\"\nconsole = \"echo\"\nserve = \"\(sock)\"\n").devices[0]
        let front = try config("[device.con0]\ntype = \"console\"\nbackend = \"vhost-user:\(sock)\"\n").devices[0]
        XCTAssertEqual(back.shape, front.shape)

        let backLoop = try EventLoop()
        let backHost = DeviceHost(loop: backLoop)
        backLoop.startThread()
        defer { backLoop.stopAndJoin() }
        let dev = try XCTUnwrap(try back.make() as? ConsoleDevice)
        let server = try backLoop.executeAndWait { () -> Result<VhostUserBackendServer, DeviceError> in
            do throws(DeviceError) { return .success(try startServer(host: backHost, name: "con0", device: dev, path: sock)) }
            catch { return .failure(error) }
        }.get()
        defer { backLoop.executeAndWait { server.stop() } }

        let loop = try EventLoop()
        let host = DeviceHost(loop: loop)
        let fe = try XCTUnwrap(try makeFrontend(front, socket: sock, loop: loop) as? VhostUserFrontendDevice)
        let idx = host.add(name: "con0", device: fe)
        loop.startThread()
        defer { loop.executeAndWait { host.shutdown(); fe.shutdown() }; loop.stopAndJoin() }
        let drv = try SimDriver(host: host, index: idx, ramSize: 8 << 20)
        try drv.start()
        XCTAssertEqual(drv.queues.count, 4)
        XCTAssertTrue(drv.features.contains(VirtioConsole.fMultiport))
        // max_nr_ports through the front-end's config (GET_CONFIG).
        XCTAssertEqual(drv.readConfig(offset: 4, count: 4), [1, 0, 0, 0])

        // Control: buffers for the device's messages, then the Linux driver's handshake.
        let cin = drv.queues[VirtioConsole.controlRx], cout = drv.queues[VirtioConsole.controlTx]
        var cbufs: [UInt16: UInt64] = [:]
        for _ in 0..<8 {
            let b = drv.alloc(64)
            let h = try XCTUnwrap(cin.addChain(readable: [], writable: [(b, 64)]))
            cbufs[h] = b
            cin.submit(h)
        }
        func send(_ id: UInt32, _ e: VirtioConsole.Event, _ v: UInt16) throws {
            let b = drv.alloc(8)
            drv.host(b).storeBytes(of: id.littleEndian, as: UInt32.self)
            drv.host(b).storeBytes(of: e.rawValue.littleEndian, toByteOffset: 4, as: UInt16.self)
            drv.host(b).storeBytes(of: v.littleEndian, toByteOffset: 6, as: UInt16.self)
            let h = try XCTUnwrap(cout.addChain(readable: [(b, 8)], writable: []))
            cout.submit(h)
            XCTAssertEqual(cout.waitUsed(timeoutMs: 5000)?.id, h)
            cout.recycle(h)
        }
        func receive(_ n: Int) throws -> [String] {
            try (0..<n).map { _ in
                let u = try XCTUnwrap(cin.waitUsed(timeoutMs: 5000), "no control message")
                let p = drv.host(cbufs[u.id]!)
                defer { cin.submit(u.id) }
                return "\(p.loadUnaligned(as: UInt32.self)):\(p.loadUnaligned(fromByteOffset: 4, as: UInt16.self)):\(p.loadUnaligned(fromByteOffset: 6, as: UInt16.self))"
            }
        }
        try send(0, .deviceReady, 1)
        XCTAssertEqual(try receive(1), ["0:1:0"])                   // PORT_ADD 0
        try send(0, .portReady, 1)
        XCTAssertEqual(try receive(2), ["0:4:1", "0:6:1"])          // CONSOLE_PORT, PORT_OPEN (host side there)
        try send(0, .portOpen, 1)                                   // as Linux's init_port_console does

        // 256 KiB in 4 KiB writes; receive buffers of 4 KiB; everything comes back, in order.
        let rxq = drv.queues[0], txq = drv.queues[1]
        var rbufs: [UInt16: UInt64] = [:]
        for _ in 0..<16 {
            let b = drv.alloc(4096)
            let h = try XCTUnwrap(rxq.addChain(readable: [], writable: [(b, 4096)]))
            rbufs[h] = b
            rxq.submit(h)
        }
        var out = [UInt8](repeating: 0, count: 256 << 10)
        var s: UInt64 = 5
        for i in out.indices { s = s &* 6364136223846793005 &+ 1; out[i] = UInt8(truncatingIfNeeded: s >> 40) }
        let tb = drv.alloc(4096)
        var back_: [UInt8] = []
        var sent = 0
        let end = lb_now_ns() + 30_000_000_000
        while back_.count < out.count && lb_now_ns() < end {
            if sent < out.count {
                out.withUnsafeBytes { drv.host(tb).copyMemory(from: $0.baseAddress! + sent, byteCount: 4096) }
                let h = try XCTUnwrap(txq.addChain(readable: [(tb, 4096)], writable: []))
                txq.submit(h)
                XCTAssertEqual(txq.waitUsed(timeoutMs: 5000)?.id, h)
                txq.recycle(h)
                sent += 4096
            }
            while let u = rxq.waitUsed(timeoutMs: sent < out.count ? 0 : 1000) {
                back_ += Array(UnsafeRawBufferPointer(start: drv.host(rbufs[u.id]!), count: Int(u.len)))
                rxq.submit(u.id)
            }
        }
        XCTAssertEqual(back_.count, out.count)
        XCTAssertTrue(back_ == out, "echoed bytes differ")
        XCTAssertEqual(backLoop.executeAndWait { dev.stats.droppedBytes }, 0)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
        drv.reset()
    }
}
