import XCTest
import CMallocCounter
@testable import Daemon
import Registry
import Transport

/// virtio-gpio allocates nothing per request: 10,000 SET_VALUE + GET_VALUE round trips (requestq only), and
/// 10,000 SET_VALUE + edge interrupt round trips (a held eventq buffer completed by the fake chip's edge and posted
/// again).
extension AllocationTests {
    func testGpioRequestPathDoesNotAllocate() throws {
        let n = try run("gpio", { GpioDevice(chip: FakeGpioChip(lines: 8, loopback: true), queueSize: 64) })
        print("allocations during 10,000 gpio value round trips: \(n)")
        XCTAssertLessThan(n, 100)
    }

    func testGpioInterruptPathDoesNotAllocate() throws {
        let loop = try EventLoop()
        let host = DeviceHost(loop: loop)
        let i = host.add(name: "gpio", device: GpioDevice(chip: FakeGpioChip(lines: 8, loopback: true), queueSize: 64))
        loop.startThread()
        defer { loop.executeAndWait { host.shutdown() }; loop.stopAndJoin() }
        let drv = try SimDriver(host: host, index: i, ramSize: 8 << 20)
        try drv.start()
        let w = try XCTUnwrap(GpioWorkload(drv, verify: false))
        XCTAssertTrue(w.requestKind.contains("interrupt"))
        for _ in 0..<1000 { XCTAssertTrue(w.runOne(spinNs: 0)) }
        lb_malloc_count_start()
        for _ in 0..<10_000 { _ = w.runOne(spinNs: 0) }
        let n = lb_malloc_count_stop()
        drv.reset()
        print("allocations during 10,000 gpio SET_VALUE + interrupt round trips: \(n)")
        XCTAssertLessThan(n, 100)
    }
}
