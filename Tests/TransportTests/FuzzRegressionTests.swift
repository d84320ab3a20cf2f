import XCTest
import Glibc
import Synchronization
import CLinux
@testable import Transport

/// Crashes and hangs found by the libFuzzer targets (Fuzz/, scripts/fuzz.sh), each reduced to a unit test.
/// The minimized inputs are kept in Fuzz/crashes/<target>/.
final class FuzzRegressionTests: XCTestCase {
    /// Fuzz/crashes/split-ring/drain-spins-used-flags-over-avail-idx (split-ring target, libFuzzer timeout).
    ///
    /// A driver may place the used ring so that `used.flags` is the same two bytes as `avail.idx` (here: avail at
    /// 0x302, used at 0x304; alignment and bounds are valid, nothing checks that the rings are disjoint). Without
    /// EVENT_IDX, `drain` then writes avail.idx itself: `disableNotifications` stores NO_NOTIFY (1) = "one chain
    /// available", `pop` takes it, `enableNotifications` stores 0 and re-reads avail.idx = 0 != lastAvail, so the
    /// no-lost-kick loop goes round again, forever. On the loop thread that hangs every device; a vhost-user
    /// front-end reaches it with SET_VRING_ADDR. Expected: `drain` returns (rings overlapping each other rejected at
    /// init, or the re-check loop bounded / the queue latched).
    func testDrainReturnsWhenUsedFlagsOverlapAvailIndex() throws {
        let memory = try GuestMemory.memfdRAM(size: 4096, guestBase: 0)
        let ram = memory.regions[0].host
        // Descriptor 0: a 16-byte writable buffer at 0x800.
        ram.storeBytes(of: UInt64(0x800), toByteOffset: 0x200, as: UInt64.self)
        ram.storeBytes(of: UInt32(16), toByteOffset: 0x208, as: UInt32.self)
        ram.storeBytes(of: UInt16(2), toByteOffset: 0x20C, as: UInt16.self)
        let config = QueueConfig(size: 1, desc: 0x200, avail: 0x302, used: 0x304)
        // Rings that overlap in the driver's address space are refused when the queue starts.
        do {
            _ = try SplitQueue(config: config, maxSize: 256, memory: memory.view, features: [.version1], interrupt: .none)
            XCTFail("overlapping rings accepted")
        } catch { XCTAssertEqual(error, .ringsOverlap) }
        // The same aliasing through two regions that map the same memory (a vhost-user front-end can send that):
        // the addresses are disjoint, the bytes are not. The no-lost-kick re-check is bounded and the queue yields.
        let fd = memory.regions[0].fd
        let second = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)!
        let aliased = try GuestMemory(regions: [memory.regions[0],
            RegionInfo(guestBase: 0x10000, size: 4096, host: second, fd: -1, fdOffset: 0, userAddr: 0)],
            mappings: [(second, 4096)], fds: [])
        var queue = try SplitQueue(config: QueueConfig(size: 1, desc: 0x200, avail: 0x302, used: 0x10304), maxSize: 256,
                                   memory: aliased.view, features: [.version1], interrupt: .none)

        // Watchdog: if drain has not returned after a second, break the spin from outside (an avail.idx jump
        // latches the queue) so the test fails instead of hanging the suite.
        let flags = WatchdogFlags()
        let idx = UInt(bitPattern: ram + 0x304)
        let watchdog = Transport.Thread.spawn {
            let start = lb_now_ns()
            while !flags.done.load(ordering: .acquiring) {
                if lb_now_ns() - start > 1_000_000_000 {
                    flags.spun.store(true, ordering: .releasing)
                    UnsafeMutablePointer<Atomic<UInt16>>(bitPattern: idx)!.pointee.store(0x8000, ordering: .relaxed)
                } else {
                    sched_yield()
                }
            }
        }
        var chains = 0
        queue.drain { _ in chains += 1; return 0 }
        flags.done.store(true, ordering: .releasing)
        watchdog.join()
        XCTAssertFalse(flags.spun.load(ordering: .acquiring), "SplitQueue.drain spun for over a second (used.flags overlaps avail.idx)")
        XCTAssertLessThanOrEqual(chains, 1)
        XCTAssertTrue(queue.yielded, "stopped at the re-check bound: the host runs it again on a later turn")
    }
    /// Reported by the fuzz work: a region whose mmap offset is odd puts the rings at misaligned host addresses
    /// although the guest addresses are aligned; avail.idx and used.idx are atomics. Refused at start.
    func testRingsMisalignedInHostMemoryAreRefused() throws {
        let memory = try GuestMemory.memfdRAM(size: 8192, guestBase: 0)
        let base = memory.regions[0].host
        // The same memory seen one byte further on: guest 0x1000 is host base + 0x1001.
        let shifted = try GuestMemory(regions: [RegionInfo(guestBase: 0x1000, size: 4096, host: base + 0x1001, fd: -1,
                                                           fdOffset: 0x1001, userAddr: 0)], mappings: [], fds: [])
        do {
            _ = try SplitQueue(config: QueueConfig(size: 4, desc: 0x1000, avail: 0x1100, used: 0x1200), maxSize: 256,
                               memory: shifted.view, features: [.version1], interrupt: .none)
            XCTFail("misaligned host rings accepted")
        } catch { XCTAssertEqual(error, .ringMisaligned) }
        withExtendedLifetime(memory) {}
    }
}

private final class WatchdogFlags: Sendable {
    let done = Atomic<Bool>(false)
    let spun = Atomic<Bool>(false)
}
