import XCTest
import Glibc
@testable import Transport
import CLinux

/// The checks of what the kernel hands the VDUSE transport (the transport itself runs in the guest case
/// loopbackd-vduse, 6.12).
final class VDUSETests: XCTestCase {
    func testQueueInfoChecks() {
        XCTAssertEqual(VDUSEChecks.queue(num: 64, desc: 0x4000_0000, driver: 0x4000_0400, device: 0x4000_1000, offered: 64),
                       QueueConfig(size: 64, desc: 0x4000_0000, avail: 0x4000_0400, used: 0x4000_1000))
        XCTAssertNil(VDUSEChecks.queue(num: 0, desc: 0, driver: 0, device: 0, offered: 64))
        XCTAssertNil(VDUSEChecks.queue(num: 128, desc: 0, driver: 0, device: 0, offered: 64), "larger than offered")
        XCTAssertNil(VDUSEChecks.queue(num: 48, desc: 0, driver: 0, device: 0, offered: 64), "not a power of two")
        XCTAssertNil(VDUSEChecks.queue(num: 1 << 16, desc: 0, driver: 0, device: 0, offered: .max), "does not fit 16 bits")
    }

    func testIOTLBEntryChecks() {
        let rw = UInt8(VDUSE_ACCESS_RW), page: UInt64 = 4096
        let ok = VDUSEChecks.entry(for: 0x400_1000, start: 0x400_0000, last: 0x400_2fff, offset: 0x400_0000, perm: rw, pageSize: page)
        XCTAssertEqual(ok?.start, 0x400_0000)
        XCTAssertEqual(ok?.size, 0x3000)
        // a ring's coherent allocation need not be a whole number of pages
        XCTAssertEqual(VDUSEChecks.entry(for: 0x400_0000, start: 0x400_0000, last: 0x400_1465, offset: 0x400_0000, perm: rw, pageSize: page)?.size, 0x1466)
        XCTAssertNil(VDUSEChecks.entry(for: 0x10, start: 0x1000, last: 0x1fff, offset: 0, perm: rw, pageSize: page), "does not hold the address")
        XCTAssertNil(VDUSEChecks.entry(for: 0x1000, start: 0x1000, last: 0x0fff, offset: 0, perm: rw, pageSize: page), "last before start")
        XCTAssertNil(VDUSEChecks.entry(for: 0, start: 0, last: .max, offset: 0, perm: rw, pageSize: page), "whole 64-bit space")
        XCTAssertNil(VDUSEChecks.entry(for: 0, start: 0, last: 1 << 40, offset: 0, perm: rw, pageSize: page), "larger than VDUSE's IOVA space")
        XCTAssertNil(VDUSEChecks.entry(for: 0x1800, start: 0x1800, last: 0x2fff, offset: 0, perm: rw, pageSize: page), "start not page aligned")
        XCTAssertNil(VDUSEChecks.entry(for: 0x1000, start: 0x1000, last: 0x1fff, offset: 0x800, perm: rw, pageSize: page), "offset not page aligned")
        XCTAssertNil(VDUSEChecks.entry(for: 0x1000, start: 0x1000, last: 0x1fff, offset: UInt64(Int64.max) - 0x100, perm: rw, pageSize: page), "offset + size past off_t")
        for p in [UInt8(0), UInt8(VDUSE_ACCESS_RO), UInt8(VDUSE_ACCESS_WO), 7] {
            XCTAssertNil(VDUSEChecks.entry(for: 0x1000, start: 0x1000, last: 0x1fff, offset: 0x1000, perm: p, pageSize: page), "perm \(p)")
        }
    }

    func testVDUSEAdmitsBlkAndNetOnly() {
        XCTAssertEqual(Set(VDUSEDevice.allowedDeviceIDs.keys), [1, 2])
    }
}
