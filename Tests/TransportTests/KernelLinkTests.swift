import XCTest
import Glibc
@testable import Transport
import CLinux

/// The parts of the kernel link that run without the module (the module itself is tested in the guest suite).
final class KernelLinkTests: XCTestCase {
    func testIomemParsing() throws {
        let text = """
        00000000-00000fff : Reserved
        00001000-0009fbff : System RAM
        000f0000-000fffff : Reserved
          000f0000-000fffff : System ROM
        00100000-1ffdffff : System RAM
          01000000-01e00816 : Kernel code
        fd000000-fdffffff : 0000:00:02.0
        """
        let r = try VirtioLoLink.parseIomem(text)
        XCTAssertEqual(r.count, 2)
        XCTAssertEqual(r[0].start, 0x1000)
        XCTAssertEqual(r[0].size, 0x9f000 - 0x1000)   // end 0x9fc00 rounded down to a page
        XCTAssertEqual(r[1].start, 0x100000)
        XCTAssertEqual(r[1].size, 0x1ffe0000 - 0x100000)
    }

    func testIomemWithoutPrivilegeIsAnError() {
        // Unprivileged readers see zeros: that must be a clear error, not a map of page 0.
        XCTAssertThrowsError(try VirtioLoLink.parseIomem("00000000-00000000 : System RAM\n"))
        XCTAssertThrowsError(try VirtioLoLink.parseIomem("garbage\n-\n : System RAM\n"))
    }

    func testMissingNodeGivesClearError() throws {
        let host = DeviceHost(loop: try EventLoop())
        XCTAssertThrowsError(try VirtioLoLink(host: host, devicePath: "/nonexistent/virtio-lo")) { e in
            XCTAssertTrue("\(e)".contains("/nonexistent/virtio-lo"), "\(e)")
        }
    }

    // MARK: hostile values (nothing may trap; bad values are rejected, not truncated)

    func testIomemWrappingAndHugeRangesDoNotTrap() throws {
        // Start rounding would wrap: skipped. End = 2^64-1 cannot be +1'd: its partial last page is dropped.
        XCTAssertThrowsError(try VirtioLoLink.parseIomem("fffffffffffff001-ffffffffffffffff : System RAM\n"))
        let r = try VirtioLoLink.parseIomem("""
        0000000000000000-ffffffffffffffff : System RAM
        00001000-00000fff : System RAM
        zz-10 : System RAM
        1-2-3 : System RAM
        -1000 : System RAM
        10000000000000000-10000000000001000 : System RAM
        00100000-001fffff : System RAM
        """)
        XCTAssertEqual(r.count, 2)
        XCTAssertEqual(r[0].start, 0)
        XCTAssertEqual(r[0].size, 0xffff_ffff_ffff_f000)
        XCTAssertEqual(r[1].start, 0x100000)
        XCTAssertEqual(r[1].size, 0x100000)
        // The whole-address-space range cannot be an mmap offset: rejected with a reason, the good one kept.
        let c = VirtioLoLink.checkRAMRanges(r)
        XCTAssertEqual(c.ranges.count, 1)
        XCTAssertEqual(c.ranges.first?.start, 0x100000)
        XCTAssertEqual(c.rejected.count, 1)
        XCTAssertTrue(c.rejected[0].contains("mmap offset"), c.rejected[0])
    }

    func testIomemPageSize() throws {
        let r = try VirtioLoLink.parseIomem("00001000-0001ffff : System RAM\n", pageSize: 0x10000)
        XCTAssertEqual(r.count, 1)
        XCTAssertEqual(r[0].start, 0x10000)
        XCTAssertEqual(r[0].size, 0x10000)
        XCTAssertThrowsError(try VirtioLoLink.parseIomem("00001000-0001ffff : System RAM\n", pageSize: 3000))
    }

    func testRAMRangeChecks() {
        let c = VirtioLoLink.checkRAMRanges([
            (0x1000, 0x9f000),                  // fine
            (0, 0),                             // empty: dropped silently
            (0x1001, 0x1000),                   // unaligned start
            (0x2000, 0x1001),                   // unaligned size
            (0xffff_ffff_ffff_f000, 0x2000),    // wraps
            (0x7fff_ffff_ffff_f000, 0x2000),    // past off_t
            (0, UInt64(1) << 63),               // larger than Int.max
            (UInt64(1) << 62, UInt64(1) << 61), // huge but representable: fine
        ])
        XCTAssertEqual(c.ranges.map { $0.start }, [0x1000, UInt64(1) << 62])
        XCTAssertEqual(c.rejected.count, 5, "\(c.rejected)")
        XCTAssertTrue(c.rejected.contains { $0.contains("not page aligned") })
        XCTAssertTrue(c.rejected.contains { $0.contains("wraps") })
        XCTAssertEqual(VirtioLoLink.checkRAMRanges([(0x1000, 0x1000)], pageSize: 0).rejected.count, 1)
    }

    func testRAMListCount() {
        // The module says it wrote more than the buffer holds: read only the buffer.
        XCTAssertEqual(VirtioLoLink.ramListCount(returned: 1000, total: 3, capacity: 64).read, 64)
        XCTAssertNil(VirtioLoLink.ramListCount(returned: 1000, total: 3, capacity: 64).retryWith)
        // More ranges exist: ask again with room for all of them, up to the limit.
        XCTAssertEqual(VirtioLoLink.ramListCount(returned: 64, total: 100, capacity: 64).retryWith, 100)
        XCTAssertNil(VirtioLoLink.ramListCount(returned: 64, total: UInt32.max, capacity: 64).retryWith)
        XCTAssertNil(VirtioLoLink.ramListCount(returned: 100, total: 100, capacity: 100).retryWith)
    }

    func testDecodeQueues() throws {
        let q0 = KernelQueueInfo(size: 256, desc: 0x10_0000, avail: 0x10_1000, used: 0x10_2000)
        let q1 = KernelQueueInfo(size: 128, desc: 0x20_0000, avail: 0x20_0800, used: 0x20_1000)
        let off = KernelQueueInfo(size: 0, desc: 0, avail: 0, used: 0)
        XCTAssertEqual(try VirtioLoLink.decodeQueues([q0, q1], offered: [256, 256]).map { $0.size }, [256, 128])
        // Only the leading set-up queues are active.
        XCTAssertEqual(try VirtioLoLink.decodeQueues([q0, off, q1], offered: [256, 256, 256]).count, 1)
        XCTAssertEqual(try VirtioLoLink.decodeQueues([off, q0], offered: [256, 256]).count, 0)
        // Rejected, never truncated: 65536+16 would become 16 in a UInt16.
        var big = q0; big.size = 65536 + 16
        XCTAssertThrowsError(try VirtioLoLink.decodeQueues([big], offered: [32768]))
        var more = q0; more.size = 512
        XCTAssertThrowsError(try VirtioLoLink.decodeQueues([more], offered: [256]))
        var odd = q0; odd.size = 100
        XCTAssertThrowsError(try VirtioLoLink.decodeQueues([odd], offered: [256]))
        var noRing = q0; noRing.used = 0
        XCTAssertThrowsError(try VirtioLoLink.decodeQueues([noRing], offered: [256]))
        var wraps = q0; wraps.desc = UInt64.max - 100
        XCTAssertThrowsError(try VirtioLoLink.decodeQueues([wraps], offered: [256]))
        XCTAssertThrowsError(try VirtioLoLink.decodeQueues([q0], offered: [256, 256]))
    }

    func testProbeClassification() {
        // Upstream virtio-lo answers the extension ioctls with EINVAL; ENOTTY is accepted too.
        XCTAssertEqual(KernelFlavor.classify(probeErrno: EINVAL, version: 0, extensions: 0), .upstream)
        XCTAssertEqual(KernelFlavor.classify(probeErrno: ENOTTY, version: 0, extensions: 0), .upstream)
        XCTAssertFalse(KernelFlavor.upstream.deleteWithDELDEV)
        XCTAssertEqual(KernelFlavor.upstream.extensions, 0)
        let ours = KernelFlavor.classify(probeErrno: 0, version: 1, extensions: 0x7f)
        XCTAssertTrue(ours.deleteWithDELDEV)
        XCTAssertEqual(ours.extensions, 0x7f)
        let odd = KernelFlavor.classify(probeErrno: EFAULT, version: 1, extensions: 0x7f)
        XCTAssertFalse(odd.deleteWithDELDEV)
        XCTAssertEqual(odd.extensions, 0)
    }

    /// Random /proc/iomem text and queue tables: the decoders return or throw, never trap.
    func testDecodersSurviveRandomInput() {
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        func next() -> UInt64 { x &+= 0x9E37_79B9_7F4A_7C15; var z = x; z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9; z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB; return z ^ (z >> 31) }
        let interesting: [UInt64] = [0, 1, 4095, 4096, 0x7fff_ffff_ffff_ffff, 0x8000_0000_0000_0000, UInt64.max, UInt64.max - 4095]
        func pick() -> UInt64 { next() % 3 == 0 ? interesting[Int(next() % UInt64(interesting.count))] : next() >> (next() % 64) }
        for _ in 0..<2000 {
            var text = ""
            for _ in 0..<(next() % 6) {
                text += String(pick(), radix: 16) + "-" + String(pick(), radix: 16) + (next() % 4 == 0 ? " : Reserved\n" : " : System RAM\n")
            }
            if let r = try? VirtioLoLink.parseIomem(text) {
                for (s, n) in VirtioLoLink.checkRAMRanges(r).ranges {
                    XCTAssertFalse(s.addingReportingOverflow(n).overflow)
                    XCTAssertNotNil(Int(exactly: n))
                }
            }
            _ = VirtioLoLink.checkRAMRanges([(pick(), pick()), (pick(), pick())], pageSize: pick())
            let n = Int(next() % 4) + 1
            let table = (0..<n).map { _ in KernelQueueInfo(size: UInt32(truncatingIfNeeded: pick()), desc: pick(), avail: pick(), used: pick()) }
            let offered = (0..<n).map { _ in UInt16(truncatingIfNeeded: pick()) }
            if let qs = try? VirtioLoLink.decodeQueues(table, offered: offered) {
                for (i, q) in qs.enumerated() { XCTAssertTrue(q.size > 0 && q.size <= offered[i] && q.size & (q.size - 1) == 0) }
            }
            _ = VirtioLoLink.ramListCount(returned: UInt32(truncatingIfNeeded: pick()), total: UInt32(truncatingIfNeeded: pick()), capacity: 64)
        }
    }

    // MARK: SYNC_CONFIG

    /// CFG_GET's (offset, length) is applied only if it lies inside the config space and the buffer; anything else
    /// (empty, past the end, wrapping, larger than the buffer) is refused, and the caller acks without applying.
    func testConfigWriteRangeCheck() {
        XCTAssertEqual(VirtioLoLink.checkConfigWrite(offset: 0, length: 1, capacity: 136, configSize: 136), 0..<1)
        XCTAssertEqual(VirtioLoLink.checkConfigWrite(offset: 1, length: 1, capacity: 136, configSize: 136), 1..<2)
        XCTAssertEqual(VirtioLoLink.checkConfigWrite(offset: 128, length: 8, capacity: 136, configSize: 136), 128..<136)
        XCTAssertNil(VirtioLoLink.checkConfigWrite(offset: 0, length: 0, capacity: 136, configSize: 136))
        XCTAssertNil(VirtioLoLink.checkConfigWrite(offset: 130, length: 8, capacity: 136, configSize: 136))
        XCTAssertNil(VirtioLoLink.checkConfigWrite(offset: 137, length: 1, capacity: 136, configSize: 136))
        XCTAssertNil(VirtioLoLink.checkConfigWrite(offset: UInt32.max, length: UInt32.max, capacity: 136, configSize: 136))
        XCTAssertNil(VirtioLoLink.checkConfigWrite(offset: 0, length: 8, capacity: 4, configSize: 136))
        XCTAssertNil(VirtioLoLink.checkConfigWrite(offset: 0, length: 1, capacity: 1, configSize: 0))
        var x: UInt64 = 0x1234_5678_9ABC_DEF1
        for _ in 0..<10_000 {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            let off = UInt32(truncatingIfNeeded: x), len = UInt32(truncatingIfNeeded: x >> 32) >> (x % 32)
            let size = Int(x % 4097), cap = Int((x >> 12) % 4097)
            if let r = VirtioLoLink.checkConfigWrite(offset: off, length: len, capacity: cap, configSize: size) {
                XCTAssertTrue(r.lowerBound >= 0 && r.upperBound <= size && r.count <= cap && !r.isEmpty)
            }
        }
    }

    /// Only devices that ask for it are added with SYNC_CONFIG: the protocol's default is false.
    /// A driver reload (rmmod/insmod of the virtio driver): the loop may see the reset and the new probe's
    /// DRIVER_OK in separate wake-ups with the same reset count; the device must come back on the new rings.
    func testDriverReloadSeenInTwoStepsReactivates() {
        typealias S = (handled: Bool, stop: Bool, start: Bool, reprobing: Bool)
        func eq(_ a: S, _ b: S, _ m: String, line: UInt = #line) {
            XCTAssertTrue(a.handled == b.handled && a.stop == b.stop && a.start == b.start && a.reprobing == b.reprobing,
                          "\(m): \(a) want \(b)", line: line)
        }
        // running, nothing changed: a config write
        eq(VirtioLoLink.statusChange(driverOK: true, resetCount: 1, seen: 1, active: true, reprobing: false), (false, false, false, false), "steady")
        // reset seen (status ACK after remove(), count +1): stop, wait for DRIVER_OK
        eq(VirtioLoLink.statusChange(driverOK: false, resetCount: 2, seen: 1, active: true, reprobing: false), (true, true, false, true), "reset")
        // the new probe's intermediate statuses: keep waiting
        eq(VirtioLoLink.statusChange(driverOK: false, resetCount: 2, seen: 2, active: false, reprobing: true), (true, false, false, true), "probing")
        // DRIVER_OK with the same count: start on the new rings (this was lost before: the device stayed stopped)
        eq(VirtioLoLink.statusChange(driverOK: true, resetCount: 2, seen: 2, active: false, reprobing: true), (true, false, true, false), "driver ok")
        // reset and DRIVER_OK in one wake-up: stop and start
        eq(VirtioLoLink.statusChange(driverOK: true, resetCount: 3, seen: 2, active: true, reprobing: false), (true, true, true, false), "both")
        // the first probe (ADDDEV; with SYNC_CONFIG the kick is watched during it): never started from here
        eq(VirtioLoLink.statusChange(driverOK: false, resetCount: 0, seen: 0, active: false, reprobing: false), (true, false, false, false), "first probe")
        eq(VirtioLoLink.statusChange(driverOK: true, resetCount: 0, seen: 0, active: false, reprobing: false), (false, false, false, false), "first DRIVER_OK")
    }

    func testConfigReadsDependOnWritesDefaultsToFalse() {
        XCTAssertFalse(EchoDevice().configReadsDependOnWrites)
        // The ABI constants the link uses are the header's (the single source of truth).
        XCTAssertEqual(lb_vlo_cfg_get(), 0xC018_5045)
        XCTAssertEqual(lb_vlo_cfg_ack(), 0x4018_5046)
        XCTAssertEqual(MemoryLayout<virtio_lo_cfgwrite>.size, 24)
        XCTAssertEqual(MemoryLayout<virtio_lo_devinfo>.size, 56)
        XCTAssertEqual(UInt64(VIRTIO_LO_EXT_SYNC_CONFIG), 1 << 7)
    }
}
