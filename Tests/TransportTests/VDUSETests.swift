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

/// The in-flight record a restarted device process resumes from (`SplitQueue.attachInflightLog`), on hand-made
/// rings: out-of-order completions and a process killed inside `pop` and inside `publish`.
final class InflightRecordTests: XCTestCase {
    let size: UInt16 = 8
    let descAt: UInt64 = 0x1000, availAt: UInt64 = 0x2000, usedAt: UInt64 = 0x3000, bufAt: UInt64 = 0x8000

    func ring(_ mem: GuestMemory) -> (QueueConfig, UnsafeMutableRawPointer) {
        let base = mem.view.translate(0, 0x10000)!
        // one 16-byte readable descriptor per head, each with its own buffer
        for h in 0..<Int(size) {
            let d = base + Int(descAt) + 16 * h
            d.storeBytes(of: bufAt + UInt64(h) * 64, as: UInt64.self)
            d.storeBytes(of: UInt32(16), toByteOffset: 8, as: UInt32.self)
            d.storeBytes(of: UInt16(0), toByteOffset: 12, as: UInt16.self)
        }
        return (QueueConfig(size: size, desc: descAt, avail: availAt, used: usedAt), base)
    }
    func makeAvailable(_ base: UnsafeMutableRawPointer, _ heads: [UInt16]) {
        var idx = (base + Int(availAt) + 2).load(as: UInt16.self)
        for h in heads { (base + Int(availAt) + 4 + 2 * Int(idx & (size - 1))).storeBytes(of: h, as: UInt16.self); idx &+= 1 }
        (base + Int(availAt) + 2).storeBytes(of: idx, as: UInt16.self)
    }

    func testResumeReplaysExactlyTheUncompletedHeads() throws {
        let mem = try GuestMemory.memfdRAM(size: 1 << 16)
        let (c, base) = ring(mem)
        let log = UnsafeMutableRawPointer.allocate(byteCount: SplitQueue.inflightLogBytes(size: size), alignment: 8)
        defer { log.deallocate() }
        do {
            var q = try SplitQueue(config: c, maxSize: size, memory: mem.view, features: [.version1], interrupt: .none)
            XCTAssertTrue(q.attachInflightLog(log, resume: false))
            makeAvailable(base, [0, 1, 2, 3])
            for want in [UInt16(0), 1, 2] { XCTAssertEqual(q.pop()?.head, want) }
            q.addUsed(head: 2, written: 0)   // out of order
            q.addUsed(head: 0, written: 0)
            q.publish()
            XCTAssertEqual(q.pop()?.head, 3)
            q.addUsed(head: 1, written: 0)
            q.publish()
            // killed inside publish (used.idx stored, heads not yet cleared) and inside pop (head 3 flagged, the
            // avail index not yet stored)
            log.storeBytes(of: 1, toByteOffset: 8 + 1, as: UInt8.self)
            log.storeBytes(of: UInt16(2), toByteOffset: 2, as: UInt16.self)
            log.storeBytes(of: UInt16(3), as: UInt16.self)
        }
        var r = try SplitQueue(config: c, maxSize: size, memory: mem.view, features: [.version1], interrupt: .none, usedFromRing: true)
        XCTAssertTrue(r.attachInflightLog(log, resume: true))
        XCTAssertEqual(r.lastAvail, 4)
        XCTAssertEqual(r.replayCount, 1, "only head 3 was taken and never completed")
        XCTAssertTrue(r.hasAvailable)
        XCTAssertEqual(r.pop()?.head, 3)
        r.undoPop()                      // a device that cannot take it now: it stays first
        XCTAssertEqual(r.replayCount, 1)
        XCTAssertEqual(r.pop()?.head, 3)
        XCTAssertNil(r.pop(), "nothing else: 0, 1, 2 were completed")
        r.addUsed(head: 3, written: 0)
        r.publish()
        XCTAssertEqual((base + Int(usedAt) + 2).load(as: UInt16.self), 4)
        makeAvailable(base, [5])
        XCTAssertEqual(r.pop()?.head, 5)
    }

    func testARecordForAnotherRingIsResetNotTrusted() throws {
        let mem = try GuestMemory.memfdRAM(size: 1 << 16)
        let (c, base) = ring(mem)
        let log = UnsafeMutableRawPointer.allocate(byteCount: SplitQueue.inflightLogBytes(size: 16), alignment: 8)
        defer { log.deallocate() }
        log.storeBytes(of: UInt32(16), toByteOffset: 4, as: UInt32.self)   // a 16-entry queue's record
        makeAvailable(base, [0])
        var r = try SplitQueue(config: c, maxSize: size, memory: mem.view, features: [.version1], interrupt: .none, usedFromRing: true)
        XCTAssertFalse(r.attachInflightLog(log, resume: true))
        XCTAssertEqual(r.replayCount, 0)
        XCTAssertEqual(log.load(fromByteOffset: 4, as: UInt32.self), UInt32(size), "reset for this ring")
        // indexes further apart than the ring: not trusted either
        log.storeBytes(of: UInt16(100), as: UInt16.self)
        var s = try SplitQueue(config: c, maxSize: size, memory: mem.view, features: [.version1], interrupt: .none, usedFromRing: true)
        XCTAssertFalse(s.attachInflightLog(log, resume: true))
        XCTAssertEqual(s.pop()?.head, 0)
    }
}
