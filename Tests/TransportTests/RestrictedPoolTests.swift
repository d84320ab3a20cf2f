import XCTest
import Glibc
import CLinux
@testable import Transport

/// Restricted memory (kernel link, module extension RESTRICTED): a device's only memory is its pool, one region at
/// the pool's IOVA (`VirtioLoLink.mapPool`). Here the simulated driver's RAM is laid out exactly like that: a
/// descriptor inside the pool is served, one anywhere else (a physical address a fully mapped device would have
/// reached, just below or past the pool, wrapping) latches the queue with the existing fault mechanism.
final class RestrictedPoolTests: XCTestCase {
    let iova = UInt64(VIRTIO_LO_POOL_IOVA)
    let poolSize = 256 << 10
    var loop: EventLoop!
    var host: DeviceHost!
    var dev: EchoDevice!
    var drv: SimDriver!

    override func setUpWithError() throws {
        loop = try EventLoop()
        host = DeviceHost(loop: loop)
        dev = EchoDevice(queueSize: 8)
        let i = host.add(name: "pool", device: dev)
        loop.startThread()
        drv = try SimDriver(host: host, index: i, ramSize: poolSize, guestBase: iova)
        try drv.start()
    }
    override func tearDown() { loop?.stopAndJoin() }

    func testThePoolIsTheOnlyMemory() throws {
        let v = drv.memory.view
        XCTAssertEqual(v.count, 1)
        XCTAssertNotNil(v.translate(iova, UInt64(poolSize)))
        XCTAssertNil(v.translate(iova - 1, 1))
        XCTAssertNil(v.translate(iova + UInt64(poolSize), 1))
        XCTAssertNil(v.translate(0x1000_0000, 16), "a physical address is not in a pool-backed view")
    }

    func testDescriptorInsideThePoolIsServed() throws {
        let q = drv.queues[0]
        let buf = drv.alloc(16), out = drv.alloc(16)
        XCTAssertGreaterThanOrEqual(buf, iova)
        memset(drv.host(buf), 9, 16)
        let h = try XCTUnwrap(q.addChain(readable: [(buf, 16)], writable: [(out, 16)]))
        q.submit(h)
        let u = try XCTUnwrap(q.waitUsed(timeoutMs: 2000))
        XCTAssertEqual(u.len, 16)
        XCTAssertEqual(drv.host(out).load(as: UInt8.self), 9)
    }

    func testDescriptorOutsideThePoolLatchesTheQueue() throws {
        let end = iova + UInt64(poolSize)
        let cases: [(UInt64, UInt32)] = [(0x1000_0000, 16), (0, 16), (iova - 8, 16), (iova - 1, 1), (end - 8, 16), (end, 1),
                                         (UInt64.max - 4, 16)]
        for (addr, len) in cases {
            drv.reset()
            try drv.start()
            let q = drv.queues[0]
            q.setDescriptor(0, addr: addr, len: len, flags: 2, next: 0)
            q.pushAvail(0); q.publish(); q.kick()
            for _ in 0..<200 where drv.status & DeviceStatus.needsReset == 0 { usleep(10_000) }
            XCTAssertNotEqual(drv.status & DeviceStatus.needsReset, 0, "addr 0x\(String(addr, radix: 16)) len \(len): not latched")
            let host = self.host!, dev = self.dev!
            let f = loop.executeAndWait { () -> QueueFault? in host.isActive(0) ? dev.queues?[0].fault : nil }
            XCTAssertEqual(f, .bufferOutsideMemory, "addr 0x\(String(addr, radix: 16)) len \(len)")
        }
        // The loop still serves: a fresh start and a request inside the pool.
        drv.reset()
        try drv.start()
        try testDescriptorInsideThePoolIsServed()
    }

    /// GET_POOL's answer is checked before anything is mapped.
    func testPoolAnswerChecked() {
        let off = UInt64(VIRTIO_LO_POOL_MMAP_BASE)
        XCTAssertEqual(VirtioLoLink.checkPool(iova: iova, size: 4 << 20, mmapOffset: off), 4 << 20)
        XCTAssertNil(VirtioLoLink.checkPool(iova: 0, size: 4096, mmapOffset: off), "IOVA 0")
        XCTAssertNil(VirtioLoLink.checkPool(iova: iova, size: 0, mmapOffset: off), "empty")
        XCTAssertNil(VirtioLoLink.checkPool(iova: iova, size: 4097, mmapOffset: off), "not a page multiple")
        XCTAssertNil(VirtioLoLink.checkPool(iova: UInt64.max - 4095, size: 8192, mmapOffset: off), "IOVA wraps")
        XCTAssertNil(VirtioLoLink.checkPool(iova: iova, size: 4096, mmapOffset: UInt64(Int64.max) - 4095), "offset past off_t")
        XCTAssertNil(VirtioLoLink.checkPool(iova: iova, size: 4096, mmapOffset: off + 1), "offset not page aligned")
        XCTAssertNil(VirtioLoLink.checkPool(iova: iova, size: 4 << 30, mmapOffset: off), "larger than the module allows")
    }
}
