import XCTest
import Glibc
import CMallocCounter
@testable import Daemon
import Registry
import Transport

/// The console's hot path (a 64-byte echo round trip: TX chain written, RX buffer held and filled), through the
/// fake echo endpoint and through a real pty: heap allocations on all threads during 10,000 round trips.
final class ConsoleAllocationTests: XCTestCase {
    func run(_ make: () throws -> ConsoleEndpoint) throws -> UInt64 {
        let loop = try EventLoop()
        let host = DeviceHost(loop: loop)
        let i = host.add(name: "con0", device: ConsoleDevice(ports: [ConsolePortConfig(id: 0, isConsole: true, endpoint: try make())], queueSize: 64))
        loop.startThread()
        defer { loop.executeAndWait { host.shutdown() }; loop.stopAndJoin() }
        let drv = try SimDriver(host: host, index: i, ramSize: 8 << 20)
        try drv.start(queueCount: 1)
        let w = try XCTUnwrap(makeWorkload(type: "console", driver: drv, verify: false))
        for _ in 0..<1000 { XCTAssertTrue(w.runOne(spinNs: 0)) }
        lb_malloc_count_start()
        var ok = 0
        for _ in 0..<10_000 { if w.runOne(spinNs: 0) { ok += 1 } }
        let n = lb_malloc_count_stop()
        XCTAssertEqual(ok, 10_000)
        drv.reset()
        return n
    }

    func testConsoleEchoPathDoesNotAllocate() throws {
        let n = try run { FakeConsoleEndpoint(echo: true, capacity: 1 << 16) }
        print("allocations during 10,000 console echo round trips: \(n)")
        XCTAssertLessThan(n, 100)
    }

    func testConsolePtyPathDoesNotAllocate() throws {
        let n = try run { try PtyEndpoint(link: nil) }
        print("allocations during 10,000 console pty round trips: \(n)")
        XCTAssertLessThan(n, 100)
    }
}
