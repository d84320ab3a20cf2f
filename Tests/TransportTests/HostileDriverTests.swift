import XCTest
import Glibc
import Synchronization
@testable import Transport

/// A device that copies the readable bytes of a chain into its writable part: enough to see exactly what the
/// queue handed over.
final class EchoDevice: VirtioDevice {
    let deviceID: UInt32 = 0x7f
    let queueMaxSizes: [UInt16]
    var offeredFeatures: VirtioFeatures = [.version1, .eventIdx, .indirectDesc]
    let configSize = 8
    var config = [UInt8](repeating: 0, count: 8)
    var queues: UnsafeMutablePointer<SplitQueue>?
    var handled = 0
    var resets = 0
    init(queueSize: UInt16 = 8) { queueMaxSizes = [queueSize] }
    func ackFeatures(_ features: VirtioFeatures) {}
    func readConfig(offset: Int, into b: UnsafeMutableRawBufferPointer) {
        for i in 0..<b.count { b[i] = config[offset + i] }
    }
    func writeConfig(offset: Int, from b: UnsafeRawBufferPointer) {
        for i in 0..<b.count { config[offset + i] = b[i] }
    }
    func activate(_ c: DeviceContext) throws(DeviceError) { queues = c.queues }
    func reset() { queues = nil; resets += 1 }
    func queueNotified(_ index: Int) {
        guard let q = queues else { return }
        q[index].drain { chain in
            handled += 1
            var tmp = [UInt8](repeating: 0, count: Int(chain.readableBytes))
            let n = tmp.withUnsafeMutableBytes { chain.read(into: $0.baseAddress!, length: $0.count) }
            return UInt32(tmp.withUnsafeBytes { chain.write(from: $0.baseAddress!, length: n) })
        }
    }
}

final class HostileDriverTests: XCTestCase {
    var loop: EventLoop!
    var host: DeviceHost!
    var dev: EchoDevice!
    var drv: SimDriver!

    func start(features: VirtioFeatures? = nil, queueSize: UInt16 = 8, ram: Int = 1 << 20) throws {
        loop = try EventLoop()
        host = DeviceHost(loop: loop)
        dev = EchoDevice(queueSize: queueSize)
        let i = host.add(name: "echo", device: dev)
        loop.startThread()
        drv = try SimDriver(host: host, index: i, ramSize: ram)
        try drv.start(accept: { features ?? $0 })
    }
    override func tearDown() { loop?.stopAndJoin() }

    var q: SimQueue { drv.queues[0] }

    /// Publishes `head` and kicks unconditionally (a hostile driver ignores suppression).
    func post(_ head: UInt16) { q.pushAvail(head); q.publish(); q.kick() }

    /// Waits until the device latched the queue (NEEDS_RESET) or gives up after 2 s.
    func waitNeedsReset(file: StaticString = #filePath, line: UInt = #line) {
        for _ in 0..<200 {
            if drv.status & DeviceStatus.needsReset != 0 { break }
            usleep(10_000)
        }
        XCTAssertNotEqual(drv.status & DeviceStatus.needsReset, 0, "queue not latched", file: file, line: line)
        // The config interrupt told the driver.
        XCTAssertNotEqual(FD.wait(drv.configInterruptFD.raw, timeoutMs: 1000), 0, "no config interrupt", file: file, line: line)
    }
    func fault() -> QueueFault? {
        let host = self.host!
        return loop.executeAndWait { () -> QueueFault? in
            guard host.isActive(0) else { return nil }
            return self.dev.queues?[0].fault
        }
    }
    /// After a latch the loop still serves: reset and a fresh start work.
    func assertRecovers(file: StaticString = #filePath, line: UInt = #line) throws {
        drv.reset()
        try drv.start()
        let buf = drv.alloc(16)
        let out = drv.alloc(16)
        memset(drv.host(buf), 7, 16)
        let h = try XCTUnwrap(q.addChain(readable: [(buf, 16)], writable: [(out, 16)]), file: file, line: line)
        q.submit(h)
        let u = try XCTUnwrap(q.waitUsed(timeoutMs: 2000), file: file, line: line)
        XCTAssertEqual(u.len, 16, file: file, line: line)
        XCTAssertEqual(drv.host(out).load(as: UInt8.self), 7, file: file, line: line)
    }

    // MARK: - chain walking

    func testDescriptorLoop() throws {
        try start()
        let b = drv.alloc(64)
        q.setDescriptor(0, addr: b, len: 8, flags: 1, next: 1)
        q.setDescriptor(1, addr: b, len: 8, flags: 1, next: 0)   // 0 → 1 → 0 → ...
        post(0)
        waitNeedsReset()
        XCTAssertEqual(fault(), .chainTooLong)
        XCTAssertEqual(q.usedIdx, 0)
        try assertRecovers()
    }

    func testSelfLoop() throws {
        try start()
        let b = drv.alloc(64)
        q.setDescriptor(3, addr: b, len: 8, flags: 1, next: 3)
        post(3)
        waitNeedsReset()
        XCTAssertEqual(fault(), .chainTooLong)
    }

    func testHeadOutOfRange() throws {
        try start()
        post(8)   // queue size 8: valid heads are 0...7
        waitNeedsReset()
        XCTAssertEqual(fault(), .headOutOfRange)
        try assertRecovers()
    }

    func testNextOutOfRange() throws {
        try start()
        let b = drv.alloc(64)
        q.setDescriptor(0, addr: b, len: 8, flags: 1, next: 0xffff)
        post(0)
        waitNeedsReset()
        XCTAssertEqual(fault(), .nextOutOfRange)
    }

    func testBufferOutsideMemory() throws {
        try start()
        let base: UInt64 = 0x1000_0000, ram: UInt64 = 1 << 20
        for (addr, len) in [(UInt64(0), UInt32(16)), (base + ram - 8, 16), (base + ram, 1), (UInt64.max - 4, 16), (base - 1, 2)] {
            drv.reset()
            try drv.start()
            q.setDescriptor(0, addr: addr, len: len, flags: 2, next: 0)
            post(0)
            waitNeedsReset()
            XCTAssertEqual(fault(), .bufferOutsideMemory, "addr \(addr) len \(len)")
        }
        try assertRecovers()
    }

    func testReadableAfterWritable() throws {
        try start()
        let b = drv.alloc(64)
        q.setDescriptor(0, addr: b, len: 8, flags: 2 | 1, next: 1)
        q.setDescriptor(1, addr: b + 8, len: 8, flags: 0, next: 0)
        post(0)
        waitNeedsReset()
        XCTAssertEqual(fault(), .readableAfterWritable)
    }

    func testZeroLengthDescriptorsAreSkipped() throws {
        try start()
        let b = drv.alloc(64), o = drv.alloc(64)
        memset(drv.host(b), 9, 8)
        q.setDescriptor(0, addr: b, len: 0, flags: 1, next: 1)
        q.setDescriptor(1, addr: b, len: 8, flags: 1, next: 2)
        q.setDescriptor(2, addr: o, len: 0, flags: 2 | 1, next: 3)
        q.setDescriptor(3, addr: o, len: 8, flags: 2, next: 0)
        post(0)
        let u = try XCTUnwrap(q.waitUsed(timeoutMs: 2000))
        XCTAssertEqual(u.id, 0)
        XCTAssertEqual(u.len, 8)
        XCTAssertEqual(drv.host(o).load(as: UInt8.self), 9)
        XCTAssertNil(fault())
    }

    func testChainTotalLengthOver4GiB() throws {
        // 70 indirect entries of 64 MiB each = 4.4 GiB > 2^32 - 1 (virtio 1.2 §2.7.5.2). The RAM is a sparse memfd.
        try start(ram: 64 << 20)
        let table = drv.alloc(16 * 70)
        let big = drv.alloc(1 << 20)
        let t = drv.host(table)
        for i in 0..<70 {
            let d = t + 16 * i
            d.storeBytes(of: UInt64(0x1000_0000), as: UInt64.self)
            d.storeBytes(of: UInt32(64 << 20), toByteOffset: 8, as: UInt32.self)
            d.storeBytes(of: UInt16(2 | (i < 69 ? 1 : 0)), toByteOffset: 12, as: UInt16.self)
            d.storeBytes(of: UInt16(i + 1), toByteOffset: 14, as: UInt16.self)
        }
        _ = big
        q.setDescriptor(0, addr: table, len: 16 * 70, flags: 4, next: 0)
        post(0)
        waitNeedsReset()
        XCTAssertEqual(fault(), .chainTooLarge)
    }

    // MARK: - indirect tables

    func writeIndirect(_ table: UInt64, _ entries: [(UInt64, UInt32, UInt16, UInt16)]) {
        let t = drv.host(table)
        for (i, e) in entries.enumerated() {
            let d = t + 16 * i
            d.storeBytes(of: e.0, toByteOffset: 0, as: UInt64.self)
            d.storeBytes(of: e.1, toByteOffset: 8, as: UInt32.self)
            d.storeBytes(of: e.2, toByteOffset: 12, as: UInt16.self)
            d.storeBytes(of: e.3, toByteOffset: 14, as: UInt16.self)
        }
    }

    func testIndirectChainServed() throws {
        try start()
        let b = drv.alloc(64), o = drv.alloc(64), table = drv.alloc(48)
        memset(drv.host(b), 5, 32)
        writeIndirect(table, [(b, 16, 1, 1), (b + 16, 16, 1, 2), (o, 32, 2, 0)])
        q.setDescriptor(0, addr: table, len: 48, flags: 4, next: 0)
        post(0)
        let u = try XCTUnwrap(q.waitUsed(timeoutMs: 2000))
        XCTAssertEqual(u.len, 32)
        XCTAssertEqual(drv.host(o + 31).load(as: UInt8.self), 5)
    }

    func testMisalignedIndirectTableIsReadSafely() throws {
        // The spec sets no alignment for indirect tables; an odd address must be read correctly, not trap.
        try start()
        let b = drv.alloc(64), o = drv.alloc(64), table = drv.alloc(64) + 3
        memset(drv.host(b), 6, 16)
        writeIndirect(table, [(b, 16, 1, 1), (o, 16, 2, 0)])
        q.setDescriptor(0, addr: table, len: 32, flags: 4, next: 0)
        post(0)
        let u = try XCTUnwrap(q.waitUsed(timeoutMs: 2000))
        XCTAssertEqual(u.len, 16)
        XCTAssertEqual(drv.host(o).load(as: UInt8.self), 6)
    }

    func testNestedIndirect() throws {
        try start()
        let inner = drv.alloc(32), table = drv.alloc(32)
        writeIndirect(table, [(inner, 32, 4, 0)])
        q.setDescriptor(0, addr: table, len: 16, flags: 4, next: 0)
        post(0)
        waitNeedsReset()
        XCTAssertEqual(fault(), .nestedIndirect)
    }

    func testIndirectLengthRules() throws {
        try start()
        for len: UInt32 in [0, 8, 24, 17] {
            drv.reset()
            try drv.start()
            q.setDescriptor(0, addr: drv.alloc(64), len: len, flags: 4, next: 0)
            post(0)
            waitNeedsReset()
            XCTAssertEqual(fault(), .badIndirectLength, "len \(len)")
        }
    }

    func testIndirectWithNextFlag() throws {
        try start()
        let table = drv.alloc(32)
        writeIndirect(table, [(drv.alloc(16), 16, 2, 0)])
        q.setDescriptor(0, addr: table, len: 16, flags: 4 | 1, next: 1)
        post(0)
        waitNeedsReset()
        XCTAssertEqual(fault(), .indirectWithNext)
    }

    func testIndirectLoopAndRange() throws {
        try start()
        let b = drv.alloc(16), table = drv.alloc(48)
        writeIndirect(table, [(b, 8, 1, 1), (b, 8, 1, 0)])   // 0 → 1 → 0 inside the table
        q.setDescriptor(0, addr: table, len: 32, flags: 4, next: 0)
        post(0)
        waitNeedsReset()
        XCTAssertEqual(fault(), .chainTooLong)
        drv.reset()
        try drv.start()
        writeIndirect(table, [(b, 8, 1, 5)])                  // next beyond the table's 2 entries
        q.setDescriptor(0, addr: table, len: 32, flags: 4, next: 0)
        post(0)
        waitNeedsReset()
        XCTAssertEqual(fault(), .nextOutOfRange)
        drv.reset()
        try drv.start()
        q.setDescriptor(0, addr: 0x10, len: 32, flags: 4, next: 0)   // table outside memory
        post(0)
        waitNeedsReset()
        XCTAssertEqual(fault(), .bufferOutsideMemory)
    }

    func testIndirectWithoutFeature() throws {
        try start(features: [.version1, .eventIdx])
        let table = drv.alloc(32)
        writeIndirect(table, [(drv.alloc(16), 16, 2, 0)])
        q.setDescriptor(0, addr: table, len: 16, flags: 4, next: 0)
        post(0)
        waitNeedsReset()
        XCTAssertEqual(fault(), .indirectNotNegotiated)
    }

    // MARK: - ring indices

    func testAvailIndexJump() throws {
        try start()
        q.publish(availIndex: 9)   // 9 > queue size 8 outstanding
        q.kick()
        waitNeedsReset()
        XCTAssertEqual(fault(), .availIndexJump)
        XCTAssertEqual(loop.executeAndWait { self.dev.handled }, 0, "nothing may be processed from a broken ring")
        try assertRecovers()
    }

    func testIndexWrapAround() throws {
        // 70,000 requests through a 4-entry ring: avail.idx and used.idx wrap past 65535.
        try start(queueSize: 4)
        let b = drv.alloc(8), o = drv.alloc(8)
        let heads = (0..<2).map { _ in q.addChain(readable: [(b, 8)], writable: [(o, 8)])! }
        var done = 0
        var k = 0
        while done < 70_000 {
            for h in heads { q.submit(h) }
            for _ in heads {
                guard let u = q.waitUsed(timeoutMs: 2000) else { return XCTFail("stalled at \(done)") }
                XCTAssertEqual(u.len, 8)
                done += 1
            }
            k += 1
        }
        XCTAssertNil(fault())
        XCTAssertEqual(q.usedIdx, UInt16(truncatingIfNeeded: done))
        XCTAssertEqual(loop.executeAndWait { self.dev.handled }, done)
    }

    // MARK: - ring geometry at DRIVER_OK

    func testRingGeometryChecked() throws {
        loop = try EventLoop()
        host = DeviceHost(loop: loop)
        dev = EchoDevice()
        let i = host.add(name: "echo", device: dev)
        let mem = try GuestMemory.memfdRAM(size: 1 << 16, guestBase: 0x10000)
        let bad: [(QueueConfig, String)] = [
            (QueueConfig(size: 6, desc: 0x10000, avail: 0x11000, used: 0x12000), "size"),
            (QueueConfig(size: 16, desc: 0x10000, avail: 0x11000, used: 0x12000), "max"),
            (QueueConfig(size: 0, desc: 0x10000, avail: 0x11000, used: 0x12000), "zero"),
            (QueueConfig(size: 8, desc: 0x10008, avail: 0x11000, used: 0x12000), "desc align"),
            (QueueConfig(size: 8, desc: 0x10000, avail: 0x11001, used: 0x12000), "avail align"),
            (QueueConfig(size: 8, desc: 0x10000, avail: 0x11000, used: 0x12002), "used align"),
            (QueueConfig(size: 8, desc: 0x0, avail: 0x11000, used: 0x12000), "desc outside"),
            (QueueConfig(size: 8, desc: 0x10000, avail: 0x11000, used: 0x1fff0), "used crosses end"),
            (QueueConfig(size: 8, desc: UInt64.max & ~15, avail: 0x11000, used: 0x12000), "wraps"),
        ]
        XCTAssertTrue(host.setFeatures(i, [.version1]))
        for (c, what) in bad {
            let k = try FD.eventfd().release()
            XCTAssertThrowsError(try host.activate(i, queues: [c], kickFDs: [k], interrupts: [.none],
                                                   configInterrupt: .none, memory: mem), what)
            XCTAssertFalse(host.isActive(i), what)
        }
        // Features not offered are refused.
        XCTAssertFalse(host.setFeatures(i, [.version1, .ringPacked]))
    }

    func testConfigRangeChecked() throws {
        try start()
        XCTAssertNotNil(drv.readConfig(offset: 0, count: 8))
        XCTAssertNil(drv.readConfig(offset: 4, count: 8))
        XCTAssertNil(drv.readConfig(offset: 9, count: 0))
        XCTAssertNil(drv.readConfig(offset: -1, count: 1))
        XCTAssertFalse(drv.writeConfig(offset: 7, bytes: [1, 2]))
        XCTAssertTrue(drv.writeConfig(offset: 6, bytes: [1, 2]))
        XCTAssertEqual(drv.readConfig(offset: 6, count: 2), [1, 2])
    }

    // MARK: - notification suppression

    func testEventIdxSuppressesInterruptsAndKicks() throws {
        try start()
        let b = drv.alloc(8), o = drv.alloc(8)
        let h = try XCTUnwrap(q.addChain(readable: [(b, 8)], writable: [(o, 8)]))
        // Driver does not want an interrupt until used.idx passes 100.
        q.disableInterrupts()
        (drv.host(q.availGPA) + 4 + 2 * 8).storeBytes(of: UInt16(100), as: UInt16.self)
        q.submit(h)
        XCTAssertEqual(q.kicks, 1, "first request must kick: avail_event starts at 0")
        XCTAssertEqual(FD.wait(q.interruptFD.raw, timeoutMs: 200), 0, "interrupt despite used_event")
        XCTAssertNotNil(q.reap())
        // Device re-enabled kicks at avail_event = 1: the next submit kicks again.
        q.submit(h)
        XCTAssertEqual(q.kicks, 2)
        // Now ask for an interrupt at the next used entry.
        q.enableInterrupts()
        XCTAssertNotNil(q.waitUsed(timeoutMs: 2000))
    }

    func testFlagSuppressionWithoutEventIdx() throws {
        try start(features: [.version1])
        let b = drv.alloc(8), o = drv.alloc(8)
        let h = try XCTUnwrap(q.addChain(readable: [(b, 8)], writable: [(o, 8)]))
        q.disableInterrupts()   // VRING_AVAIL_F_NO_INTERRUPT
        q.submit(h)
        XCTAssertEqual(FD.wait(q.interruptFD.raw, timeoutMs: 200), 0, "interrupt despite NO_INTERRUPT")
        XCTAssertNotNil(q.reap())
        XCTAssertEqual(q.usedFlags & 1, 0, "NO_NOTIFY left set after draining")
    }
}
