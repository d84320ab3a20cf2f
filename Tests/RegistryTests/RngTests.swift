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
