import XCTest
import Glibc
@testable import Registry
import Transport

final class RngTests: XCTestCase {
    var loop: EventLoop!
    var host: DeviceHost!

    override func setUp() {
        loop = try! EventLoop()
        host = DeviceHost(loop: loop)
    }
    override func tearDown() { loop.stopAndJoin() }

    func testFillsBuffersFromGetrandom() throws {
        let rng = RngDevice()
        let idx = host.add(name: "rng0", device: rng)
        loop.startThread()
        let drv = try SimDriver(host: host, index: idx, ramSize: 1 << 20)
        try drv.start(queueSizes: [8])
        let q = drv.queues[0]
        var seen = Set<[UInt8]>()
        for _ in 0..<100 {
            let buf = drv.alloc(64)
            memset(drv.host(buf), 0, 64)
            let head = try XCTUnwrap(q.addChain(readable: [], writable: [(buf, 64)]))
            q.submit(head)
            let used = try XCTUnwrap(q.waitUsed())
            XCTAssertEqual(used.id, head)
            XCTAssertEqual(used.len, 64)
            q.recycle(head)
            let bytes = Array(UnsafeRawBufferPointer(start: drv.host(buf), count: 64))
            XCTAssertNotEqual(bytes, [UInt8](repeating: 0, count: 64))
            seen.insert(bytes)
        }
        XCTAssertEqual(seen.count, 100, "random buffers repeat")
    }

    /// Small requests come from the 512-byte getrandom pool, larger ones straight from getrandom: every length is
    /// filled exactly, and no bytes are handed out twice across refills.
    func testPooledAndDirectRequestsNeverRepeat() throws {
        let rng = RngDevice()
        let idx = host.add(name: "rng0", device: rng)
        loop.startThread()
        let drv = try SimDriver(host: host, index: idx, ramSize: 1 << 20)
        try drv.start(queueSizes: [8])
        let q = drv.queues[0]
        var seen = Set<[UInt8]>()
        for (k, size) in ([1, 16, 63, 64, 127, 128, 129, 300, 512, 4096] + Array(repeating: 64, count: 40)).enumerated() {
            let buf = drv.alloc(size)
            memset(drv.host(buf), 0, size)
            let head = try XCTUnwrap(q.addChain(readable: [], writable: [(buf, UInt32(size))]))
            q.submit(head)
            let used = try XCTUnwrap(q.waitUsed())
            XCTAssertEqual(used.len, UInt32(size), "request \(k)")
            q.recycle(head)
            guard size >= 16 else { continue }
            let bytes = Array(UnsafeRawBufferPointer(start: drv.host(buf), count: 16))
            XCTAssertTrue(seen.insert(bytes).inserted, "request \(k) (\(size) bytes) repeats earlier bytes")
        }
    }

    /// A device activated while the loop is inside a poll window starts polled: its driver does not kick while the
    /// loop polls. Before the fix one bench run in two had the driver kick every request (the window's
    /// setPolling(true) ran before the queues existed, so every drain re-enabled kicks).
    func testDeviceActivatedInsidePollWindowIsPolled() throws {
        loop.stopAndJoin()
        loop = try EventLoop(pollMicroseconds: 2_000_000)   // a window that outlasts the driver's start-up steps
        host = DeviceHost(loop: loop)
        let rng = RngDevice()
        let idx = host.add(name: "rng0", device: rng)
        loop.startThread()
        let drv = try SimDriver(host: host, index: idx, ramSize: 1 << 20)
        try drv.start(queueSizes: [8])   // each step is loop work: the window opens before the queues exist
        let q = drv.queues[0]
        let buf = drv.alloc(64)
        let head = try XCTUnwrap(q.addChain(readable: [], writable: [(buf, 64)]))
        let k0 = q.kicks
        for _ in 0..<200 {
            q.submit(head)
            let used = try XCTUnwrap(q.waitUsed(spinNs: 1_000_000))
            XCTAssertEqual(used.len, 64)
        }
        XCTAssertLessThanOrEqual(q.kicks - k0, 1, "the driver kicked while the loop polled its queue")
    }

    func testReadOnlyChainCompletesWithZeroBytes() throws {
        let rng = RngDevice()
        let idx = host.add(name: "rng0", device: rng)
        loop.startThread()
        let drv = try SimDriver(host: host, index: idx, ramSize: 1 << 20)
        try drv.start(queueSizes: [8])
        let q = drv.queues[0]
        let buf = drv.alloc(64)
        let head = try XCTUnwrap(q.addChain(readable: [(buf, 64)], writable: []))
        q.submit(head)
        let used = try XCTUnwrap(q.waitUsed())
        XCTAssertEqual(used.len, 0)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
        XCTAssertEqual(loop.executeAndWait { rng.badChains }, 1)
    }

    func testSourceFile() throws {
        // A source file of known bytes: the device copies exactly those.
        let path = "/tmp/loopbackd-rng-src-\(getpid())"
        let fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0o600)
        defer { unlink(path) }
        var pattern = [UInt8](repeating: 0xA5, count: 32)
        pattern[0] = 1
        _ = write(fd, &pattern, 32)
        lseek(fd, 0, SEEK_SET)
        let rng = RngDevice(sourceFD: fd)
        let idx = host.add(name: "rng0", device: rng)
        loop.startThread()
        let drv = try SimDriver(host: host, index: idx, ramSize: 1 << 20)
        try drv.start(queueSizes: [8])
        let q = drv.queues[0]
        let buf = drv.alloc(32)
        let head = try XCTUnwrap(q.addChain(readable: [], writable: [(buf, 16), (buf + 16, 16)]))
        q.submit(head)
        XCTAssertEqual(try XCTUnwrap(q.waitUsed()).len, 32)
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: drv.host(buf), count: 32)), pattern)
        // EOF: the next request completes short (0 bytes), it does not hang.
        let h2 = try XCTUnwrap(q.addChain(readable: [], writable: [(buf, 16)]))
        q.submit(h2)
        XCTAssertEqual(try XCTUnwrap(q.waitUsed()).len, 0)
    }
}
