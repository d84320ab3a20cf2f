import XCTest
import Glibc
import CLinux
@testable import Transport

/// Memory hot-plug on the kernel link: RAM the driver's kernel onlines after loopbackd mapped System RAM is mapped
/// when a buffer is first found in it (`GuestMemory.onMiss`, set by `VirtioLoLink.mapMemory`), appended to the
/// live region table, so running queues serve it without a restart. The guest case `loopbackd-memory-hotplug`
/// does it with a real hot-plugged DIMM; here the simulated driver's RAM plays the part.
final class MemoryHotplugTests: XCTestCase {
    /// 1 MiB of shared memory, as a hot-added DIMM's RAM.
    func sharedMiB() throws -> UnsafeMutableRawPointer {
        let fd = lb_memfd("hotplug-test", 1)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        XCTAssertEqual(ftruncate(fd, 1 << 20), 0)
        let p = try XCTUnwrap(mmap(nil, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0))
        XCTAssertNotEqual(p, MAP_FAILED)
        return p
    }

    func testUnmappedPartsOfARange() {
        func reg(_ b: UInt64, _ n: UInt64) -> RegionInfo {
            RegionInfo(guestBase: b, size: n, host: UnsafeMutableRawPointer(bitPattern: 0x1000)!, fd: -1, fdOffset: 0, userAddr: 0)
        }
        let mapped = [reg(0x10_0000, 0x10_0000), reg(0x40_0000, 0x10_0000)]
        func parts(_ s: UInt64, _ n: UInt64) -> [UInt64] { VirtioLoLink.unmappedParts(start: s, size: n, of: mapped).flatMap { [$0.0, $0.1] } }
        XCTAssertEqual(parts(0x10_0000, 0x10_0000), [], "already mapped")
        XCTAssertEqual(parts(0x80_0000, 0x1000), [0x80_0000, 0x1000], "entirely new")
        XCTAssertEqual(parts(0x0, 0x60_0000), [0, 0x10_0000, 0x20_0000, 0x20_0000, 0x50_0000, 0x10_0000], "the gaps around two ranges")
        XCTAssertEqual(parts(0x18_0000, 0x10_0000), [0x20_0000, 0x8_0000], "a range extended past its end")
        XCTAssertEqual(parts(UInt64.max - 0xfff, 0x2000), [], "a wrapping range is refused")
        XCTAssertEqual(parts(0x1000, 0), [])
    }

    func testAViewTakenBeforeAnAppendSeesTheNewRegion() throws {
        let m = try GuestMemory.memfdRAM(size: 1 << 20, guestBase: 0x100_0000)
        let v = m.view
        XCTAssertNil(v.translate(0x800_0000, 16))
        let map = try sharedMiB()
        try m.append(RegionInfo(guestBase: 0x800_0000, size: 1 << 20, host: map, fd: -1, fdOffset: 0, userAddr: 0), mapping: (map, 1 << 20))
        XCTAssertEqual(v.count, 2)
        XCTAssertEqual(v.translate(0x800_0010, 16), map + 0x10)
        XCTAssertNil(v.translate(0x80f_fff8, 16), "not past the appended region's end")
        // Overlapping or empty regions are refused (and their mapping is released).
        let map2 = mmap(nil, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        XCTAssertThrowsError(try m.append(RegionInfo(guestBase: 0x80f_f000, size: 4096, host: map2, fd: -1, fdOffset: 0, userAddr: 0), mapping: (map2, 4096)))
        XCTAssertEqual(v.count, 2)
    }

    /// A running queue meets a buffer in memory the device has not mapped: the miss hook maps it and the request
    /// is served; without the hook (or when it maps nothing) the queue latches, as before.
    func testBufferInHotAddedMemoryIsServedByARunningQueue() throws {
        let loop = try EventLoop()
        defer { loop.stopAndJoin() }
        let host = DeviceHost(loop: loop)
        let dev = EchoDevice(queueSize: 8)
        let i = host.add(name: "hotplug", device: dev)
        loop.startThread()
        let drv = try SimDriver(host: host, index: i, ramSize: 1 << 20, guestBase: 0x1000_0000)
        try drv.start()
        // "Hot-added" RAM: 1 MiB at 0x4000_0000, which the device's memory does not hold yet.
        let extra = try sharedMiB()
        let hotBase: UInt64 = 0x4000_0000
        var asked: [UInt64] = []
        drv.memory.onMiss = { [memory = drv.memory] addr in
            asked.append(addr)
            guard addr >= hotBase, addr < hotBase + (1 << 20), memory.isFree(hotBase, 1 << 20) else { return false }
            try? memory.append(RegionInfo(guestBase: hotBase, size: 1 << 20, host: extra, fd: -1, fdOffset: 0, userAddr: 0),
                               mapping: (extra, 1 << 20))
            return true
        }
        let q = drv.queues[0]
        let out = drv.alloc(16)
        memset(extra + 0x100, 7, 16)
        let h = try XCTUnwrap(q.addChain(readable: [(hotBase + 0x100, 16)], writable: [(out, 16)]))
        q.submit(h)
        let u = try XCTUnwrap(q.waitUsed(timeoutMs: 2000), "served after the hook mapped the new RAM")
        XCTAssertEqual(u.len, 16)
        XCTAssertEqual(drv.host(out).load(as: UInt8.self), 7)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
        XCTAssertEqual(asked, [hotBase + 0x100], "asked once; the second buffer in the same RAM needs no refresh")
        // A second request in the same RAM: no miss.
        let h2 = try XCTUnwrap(q.addChain(readable: [(hotBase + 0x200, 16)], writable: [(out, 16)]))
        q.submit(h2)
        XCTAssertNotNil(q.waitUsed(timeoutMs: 2000))
        XCTAssertEqual(asked.count, 1)
        // Memory nobody added: the hook maps nothing and the queue latches (one question, no retry loop).
        let h3 = try XCTUnwrap(q.addChain(readable: [(0x7000_0000, 16)], writable: [(out, 16)]))
        q.submit(h3)
        for _ in 0..<200 where drv.status & DeviceStatus.needsReset == 0 { usleep(10_000) }
        XCTAssertNotEqual(drv.status & DeviceStatus.needsReset, 0, "a buffer outside all RAM still latches")
        XCTAssertEqual(asked.last, 0x7000_0000)
        drv.memory.onMiss = nil
    }
}
