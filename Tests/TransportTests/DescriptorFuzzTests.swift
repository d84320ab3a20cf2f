import XCTest
import Glibc
import CLinux
@testable import Transport

/// Random descriptor tables, avail entries and indices from a hostile driver, many rounds: the device side must
/// never crash, hang or touch memory outside the driver's RAM. The RAM sits between two PROT_NONE guard pages, so
/// an access just past either end faults (and fails the run) instead of silently reading a neighbour.
final class DescriptorFuzzTests: XCTestCase {
    struct Rng { var s: UInt64; mutating func next() -> UInt64 { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s } }

    func testRandomRingsNeverCrashOrOverrun() throws {
        let page = 4096, ramSize = 256 * 1024, base: UInt64 = 0x4000_0000
        // [guard][ram][guard]
        let total = ramSize + 2 * page
        let fd = lb_memfd("fuzz-ram", 0)
        XCTAssertGreaterThanOrEqual(fd, 0)
        XCTAssertEqual(ftruncate(fd, off_t(ramSize)), 0)
        let area = try XCTUnwrap(mmap(nil, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        XCTAssertNotEqual(area, MAP_FAILED)
        let ram = try XCTUnwrap(mmap(area + page, ramSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0))
        XCTAssertEqual(ram, area + page)
        let region = RegionInfo(guestBase: base, size: UInt64(ramSize), host: ram, fd: fd, fdOffset: 0,
                                userAddr: UInt64(UInt(bitPattern: ram)))
        let memory = try GuestMemory(regions: [region], mappings: [(area, total)], fds: [fd])

        let loop = try EventLoop()
        let host = DeviceHost(loop: loop)
        let dev = EchoDevice(queueSize: 16)
        let i = host.add(name: "fuzz", device: dev)
        loop.startThread()
        defer { loop.stopAndJoin() }
        XCTAssertTrue(loop.executeAndWait { host.setFeatures(i, [.version1, .eventIdx, .indirectDesc]) })

        var r = Rng(s: 0x1234_5678_9abc_def1)
        let n = 16
        let desc = base, avail = base + 0x1000, used = base + 0x2000
        let d = ram, a = ram + 0x1000
        var latched = 0, served = 0
        for round in 0..<3000 {
            // Fresh queue each round (a latched queue stays broken until reset).
            let kick = try FD.eventfd().release()
            memset(ram, 0, 0x3000)
            // Random descriptors: addresses near, inside and outside RAM; lengths small, huge, odd; any flags.
            for k in 0..<n {
                let p = d + 16 * k
                let choice = r.next() % 6
                let addr: UInt64
                switch choice {
                case 0: addr = base + 0x3000 + r.next() % UInt64(ramSize - 0x3000)        // inside
                case 1: addr = base + UInt64(ramSize) - r.next() % 64                    // at the end
                case 2: addr = base - r.next() % 64                                      // before the start
                case 3: addr = r.next()                                                  // anywhere
                case 4: addr = base + 0x3000 + (r.next() % 64) * 16                      // indirect tables here
                default: addr = UInt64.max - r.next() % 4096                             // wraps
                }
                let len: UInt32 = r.next() % 4 == 0 ? UInt32(truncatingIfNeeded: r.next()) : UInt32(r.next() % 2048)
                p.storeBytes(of: addr, as: UInt64.self)
                p.storeBytes(of: len, toByteOffset: 8, as: UInt32.self)
                p.storeBytes(of: UInt16(r.next() % 8), toByteOffset: 12, as: UInt16.self)
                p.storeBytes(of: UInt16(r.next() % 20), toByteOffset: 14, as: UInt16.self)
            }
            // Random bytes in the area indirect tables point at.
            for k in 0..<(64 * 16 / 8) {
                (ram + 0x3000 + 8 * k).storeBytes(of: r.next() % 3 == 0 ? base + 0x3000 + r.next() % 4096 : r.next(), as: UInt64.self)
            }
            for k in 0..<n { (a + 4 + 2 * k).storeBytes(of: UInt16(r.next() % 20), as: UInt16.self) }
            let idx = UInt16(truncatingIfNeeded: r.next() % 24)
            (a + 2).storeBytes(of: idx, as: UInt16.self)
            let cfg = QueueConfig(size: UInt16(n), desc: desc, avail: avail, used: used)
            let err = loop.executeAndWait { () -> DeviceError? in
                do throws(DeviceError) {
                    try host.activate(i, queues: [cfg], kickFDs: [kick], interrupts: [.none], configInterrupt: .none, memory: memory)
                    return nil
                } catch { return error }
            }
            XCTAssertNil(err, "round \(round)")
            let (st, handled) = loop.executeAndWait { () -> (UInt8, Int) in
                host.kick(i, 0)
                return (host.status(i), dev.handled)
            }
            if st & DeviceStatus.needsReset != 0 { latched += 1 } else if handled > served { served = handled }
            loop.executeAndWait {
                host.reset(i)
                _ = host.setFeatures(i, [.version1, .eventIdx, .indirectDesc])
            }
        }
        print("fuzz: 3000 rounds, \(latched) latched, \(served) chains served")
        XCTAssertGreaterThan(latched, 100, "the fuzzer should hit the validation rules")
        XCTAssertGreaterThan(served, 10, "the fuzzer should also produce valid chains")
    }
}
