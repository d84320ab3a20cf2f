import XCTest
import Glibc
import CMallocCounter
@testable import Daemon
import Registry
import Transport

/// "No allocation per request", measured: heap allocations (all threads: the driver's and the loop's) during
/// 10,000 requests after a warm-up. A per-request allocation would show up as ≥ 10,000.
final class AllocationTests: XCTestCase {
    func run(_ type: String, _ make: () throws -> VirtioDevice, pollUs: Int = 0) throws -> UInt64 {
        let loop = try EventLoop(pollMicroseconds: pollUs)
        let host = DeviceHost(loop: loop)
        let i = host.add(name: type, device: try make())
        loop.startThread()
        defer { loop.executeAndWait { host.shutdown() }; loop.stopAndJoin() }
        let drv = try SimDriver(host: host, index: i, ramSize: 8 << 20)
        try drv.start(queueCount: 1)
        let w = try XCTUnwrap(makeWorkload(type: type, driver: drv, verify: false))
        for _ in 0..<1000 { XCTAssertTrue(w.runOne(spinNs: UInt64(pollUs) * 1000)) }
        lb_malloc_count_start()
        for _ in 0..<10_000 { _ = w.runOne(spinNs: UInt64(pollUs) * 1000) }
        let n = lb_malloc_count_stop()
        drv.reset()
        return n
    }

    func testCounterCountsAllocations() {
        // The counter itself works: a Swift array allocation is seen.
        lb_malloc_count_start()
        let a = [Int](repeating: 1, count: 1000 + Int(getpid() % 2))
        let n = lb_malloc_count_stop()
        XCTAssertGreaterThanOrEqual(n, 1, "malloc interposition not active")
        XCTAssertEqual(a.count > 0, true)
    }

    func testRngPathDoesNotAllocate() throws {
        let n = try run("rng", { RngDevice() })
        print("allocations during 10,000 rng requests: \(n)")
        XCTAssertLessThan(n, 100)
    }

    func testBlkPathDoesNotAllocate() throws {
        let path = "/tmp/loopbackd-alloc-\(getpid()).img"
        let fd = open(path, O_CREAT | O_RDWR, 0o600); ftruncate(fd, 8 << 20); close(fd)
        defer { unlink(path) }
        let n = try run("blk", { try BlockDevice(path: path, readOnly: false, queues: 1, queueSize: 64) })
        print("allocations during 10,000 blk requests: \(n)")
        XCTAssertLessThan(n, 100)
    }

    /// vsock ping-pong: RW out through the hybrid-vsock unix socket (writev), the host echo, RW back (readv into a
    /// held receive buffer): the connection table, park pool and RST queue are preallocated.
    func testVsockPathDoesNotAllocate() throws {
        let uds = "/tmp/loopbackd-alloc-vsock-\(getpid()).sock"
        let n = try run("vsock", { VsockDevice(guestCID: 3, host: try UnixVsockHost(path: uds, capacity: 64), queueSize: 64) })
        print("allocations during 10,000 vsock round trips: \(n)")
        XCTAssertLessThan(n, 100)
    }

    func testPolledPathDoesNotAllocate() throws {
        let n = try run("rng", { RngDevice() }, pollUs: 50)
        print("allocations during 10,000 polled rng requests: \(n)")
        XCTAssertLessThan(n, 100)
    }
}
