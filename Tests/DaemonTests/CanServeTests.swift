import XCTest
import Glibc
import CLinux
@testable import Daemon
@testable import Registry
@testable import Transport

/// virtio-can served as a vhost-user back-end (`serve`) and forwarded to it by loopbackd's own front-end
/// (`backend = "vhost-user:…"`), both built from config text with the daemon's wiring (no QEMU has a vhost-user
/// CAN front-end): the features and config space come from the back-end, the controller starts, 2,000 frames go out
/// and come back through the back-end's simulated bus in order and intact (the workload checks each). A restarted
/// back-end is a new controller that never saw the driver's START: the front-end's replay resumes the rings, the
/// back-end announces bus-off (config status, CONFIG_CHANGE_MSG), the driver's START (what the CAN core's restart
/// sends) is accepted and frames flow again on the same rings.
final class CanServeTests: XCTestCase {
    private func config(_ text: String) throws -> DaemonConfig { try DaemonConfig.parse(TOML.parse(text, file: "t.conf")) }

    func testForwardedToOwnServeFramesFlowBothWays() throws {
        let sock = "/tmp/lb-can-serve-\(getpid()).sock"
        unlink(sock)
        defer { unlink(sock) }
        let back = try config("[daemon]\ntransport = \"none\"\n[device.c]\ntype = \"can\"\nsimulated = true\nserve = \"\(sock)\"\n").devices[0]
        let front = try config("[device.c]\ntype = \"can\"\nbackend = \"vhost-user:\(sock)\"\n").devices[0]

        let backLoop = try EventLoop()
        let backHost = DeviceHost(loop: backLoop)
        backLoop.startThread()
        defer { backLoop.stopAndJoin() }
        func serve() throws -> (VhostUserBackendServer, CANDevice) {
            let dev = try XCTUnwrap(try back.make() as? CANDevice)
            let s = try backLoop.executeAndWait { () -> Result<VhostUserBackendServer, DeviceError> in
                do throws(DeviceError) { return .success(try startServer(host: backHost, name: "c", device: dev, path: sock)) }
                catch { return .failure(error) }
            }.get()
            return (s, dev)
        }
        let (server, bdev) = try serve()

        let loop = try EventLoop()
        let host = DeviceHost(loop: loop)
        let fe = try XCTUnwrap(try makeFrontend(front, socket: sock, loop: loop) as? VhostUserFrontendDevice)
        let idx = host.add(name: "c", device: fe)
        loop.startThread()
        defer { loop.executeAndWait { host.shutdown(); fe.shutdown() }; loop.stopAndJoin() }
        let drv = try SimDriver(host: host, index: idx, ramSize: 4 << 20)
        try drv.start()
        XCTAssertEqual(drv.queues.count, 3, "tx, rx and control through the front-end")
        XCTAssertTrue(drv.features.contains(VirtioCAN.fClassic))
        XCTAssertEqual(drv.readConfig(offset: 0, count: 2), [0, 0], "status: not bus-off")

        let w = try XCTUnwrap(makeWorkload(type: "can", driver: drv, verify: true), "the can workload runs through a front-end")
        var sent = 0
        for _ in 0..<2000 { guard w.runOne(spinNs: 0) else { break }; sent += 1 }
        XCTAssertEqual(sent, 2000, "frames sent and received back intact")
        XCTAssertGreaterThanOrEqual(backLoop.executeAndWait { bdev.stats.rxFrames }, 2000, "frames crossed the back-end's bus")
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)

        // The back-end goes away and a new one (a new controller) takes the socket; the front-end reconnects.
        backLoop.executeAndWait { server.stop() }
        let (server2, bdev2) = try serve()
        var status: [UInt8] = [0, 0]
        for _ in 0..<500 {
            status = drv.readConfig(offset: 0, count: 2) ?? [0, 0]
            if status[0] & UInt8(VirtioCAN.statusBusOff) != 0 { break }
            usleep(10_000)
        }
        XCTAssertEqual(status[0] & UInt8(VirtioCAN.statusBusOff), UInt8(VirtioCAN.statusBusOff),
                       "the restarted back-end tells the driver its controller is not running")
        XCTAssertFalse(backLoop.executeAndWait { bdev2.started })
        XCTAssertGreaterThanOrEqual(loop.executeAndWait { fe.reconnects }, 1)
        // The driver restarts the controller (virtio_can's do_set_mode(CAN_MODE_START) sends START).
        let ctl = drv.queues[VirtioCAN.controlQueue]
        let cOut = drv.alloc(2), cIn = drv.alloc(1)
        drv.host(cOut).storeBytes(of: VirtioCAN.ctrlStart.littleEndian, as: UInt16.self)
        drv.host(cIn).storeBytes(of: 0xff, as: UInt8.self)
        let ch = try XCTUnwrap(ctl.addChain(readable: [(cOut, 2)], writable: [(cIn, 1)]))
        ctl.submit(ch)
        XCTAssertNotNil(ctl.waitUsed(timeoutMs: 3000))
        XCTAssertEqual(drv.host(cIn).load(as: UInt8.self), VirtioCAN.resultOK)
        // The front-end learns the cleared status from the back-end's CONFIG_CHANGE_MSG, asynchronously.
        for _ in 0..<300 where drv.readConfig(offset: 0, count: 2) != [0, 0] { usleep(10_000) }
        XCTAssertEqual(drv.readConfig(offset: 0, count: 2), [0, 0], "bus-off cleared by START")
        // The old back-end gave the receive buffers back empty when its rings stopped (quiesce); a driver reposts
        // them (virtio_can drops a short packet and refills).
        let rxq = drv.queues[VirtioCAN.rxQueue]
        var empties = 0
        while let u = rxq.waitUsed(timeoutMs: 100) { XCTAssertEqual(u.len, 0); rxq.submit(u.id); empties += 1 }
        XCTAssertGreaterThan(empties, 0)
        sent = 0
        for _ in 0..<200 { guard w.runOne(spinNs: 0) else { break }; sent += 1 }
        XCTAssertEqual(sent, 200, "frames flow again after the restart, on the same rings")
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
        drv.reset()
        backLoop.executeAndWait { server2.stop() }
    }
}
