import XCTest
import Glibc
import Synchronization
@testable import Transport

/// The front-end's in-flight tracker on hand-made rings (no sockets): who is blamed when tracking is lost, and a
/// head the driver made available again before it came back (held twice by the back-end, replayed twice).
final class FrontendInflightTests: XCTestCase {
    private let size: UInt16 = 8
    private var avail: UnsafeMutableRawPointer!, shadow: UnsafeMutableRawPointer!, used: UnsafeMutableRawPointer!
    private var a: UInt16 = 0, u: UInt16 = 0

    override func setUp() {
        avail = .allocate(byteCount: QueueConfig.availBytes(Int(size)), alignment: 8)
        shadow = .allocate(byteCount: QueueConfig.availBytes(Int(size)), alignment: 8)
        used = .allocate(byteCount: QueueConfig.usedBytes(Int(size)), alignment: 8)
        memset(avail, 0, QueueConfig.availBytes(Int(size)))
        memset(used, 0, QueueConfig.usedBytes(Int(size)))
        a = 0; u = 0
    }
    override func tearDown() { avail.deallocate(); shadow.deallocate(); used.deallocate() }

    private func idx(_ r: UnsafeMutableRawPointer, _ v: UInt16) {
        (r + 2).assumingMemoryBound(to: Atomic<UInt16>.self).pointee.store(v, ordering: .releasing)
    }
    private func offer(_ heads: UInt16...) {
        for h in heads { (avail + 4 + 2 * Int(a & (size - 1))).storeBytes(of: h, as: UInt16.self); a &+= 1 }
        idx(avail, a)
    }
    private func complete(_ ids: UInt32...) {
        for id in ids { (used + 4 + 8 * Int(u & (size - 1))).storeBytes(of: id, as: UInt32.self); u &+= 1 }
        idx(used, u)
    }
    private func slot(_ p: UInt16) -> UInt16 { (shadow + 4 + 2 * Int(p & (size - 1))).load(as: UInt16.self) }
    private func tracker() -> InflightTracker {
        InflightTracker(size: size, avail: avail, shadow: shadow, used: used, lastAvail: 0, eventIdx: false)
    }

    /// The daemon's old demo driver: a request timed out while the back-end was away and the same head was made
    /// available again (twice). The back-end holds it three times; the replay hands it over three times (exactly what
    /// the old back-end had), and the driver is named, not the device.
    func testHeadMadeAvailableAgainWhileInFlightIsReplayedAsOften() {
        let t = tracker()
        offer(0, 1)
        t.pump()
        complete(1)
        offer(0)
        offer(0)
        t.pump()
        XCTAssertTrue(t.isTracking, "not garbage: tracking stays exact")
        XCTAssertEqual(t.planReplay(), 3)
        XCTAssertEqual(t.repeatedHead?.head, 0)
        XCTAssertEqual(t.repeatedHead?.times, 3)
        XCTAssertEqual(t.replay(k: 3), 1)
        XCTAssertEqual([slot(1), slot(2), slot(3)], [0, 0, 0])
        complete(0, 0, 0)
        t.pump()
        XCTAssertEqual(t.planReplay(), 0)
        XCTAssertNil(t.repeatedHead)
    }

    /// A used id out of range, or a head returned more often than it was handed over: the back-end is blamed.
    func testBackendFaultsNameTheBackend() {
        let t = tracker()
        offer(2, 3)
        t.pump()
        complete(42)                // and head 3 still in flight (else tracking resynchronises at once)
        t.pump()
        XCTAssertEqual(t.lost, .backendUsedHeadInvalid)
        XCTAssertEqual(t.lossReason, .usedIDOutOfRange(id: 42, size: size))
        XCTAssertTrue(t.lossReason!.description.hasPrefix("back-end returned an invalid head"), t.lossReason!.description)
        XCTAssertTrue(t.lossReason!.description.contains("back-end bug"))
        XCTAssertNil(t.planReplay())

        setUp()
        let t2 = tracker()
        offer(2, 3)
        t2.pump()
        complete(3, 3)              // head 3 twice, head 2 never
        t2.pump()
        XCTAssertNil(t2.planReplay())
        XCTAssertEqual(t2.lossReason, .usedHeadNotHeld(head: 3))
        XCTAssertTrue(t2.lossReason!.description.contains("back-end returned head 3, which it did not hold"))

        setUp()
        let t3 = tracker()
        offer(1)
        t3.pump()
        complete(1, 1)              // used.idx past everything handed over
        t3.pump()
        XCTAssertEqual(t3.lossReason, .usedBeyondHandedOver(extra: 1))
        XCTAssertTrue(t3.lossReason!.description.contains("back-end bug"))
    }

    /// A head out of range or an avail.idx jump: the driver is blamed.
    func testDriverFaultsNameTheDriver() {
        let t = tracker()
        offer(9)
        t.pump()
        XCTAssertEqual(t.lossReason, .availHeadOutOfRange(head: 9, size: size))
        XCTAssertEqual(t.lost, .headOutOfRange)
        XCTAssertTrue(t.lossReason!.description.contains("driver bug"))

        setUp()
        let t2 = tracker()
        idx(avail, 20)
        t2.pump()
        XCTAssertEqual(t2.lossReason?.fault, .availIndexJump)
        XCTAssertTrue(t2.lossReason!.description.hasPrefix("driver's avail.idx moved by 20"), t2.lossReason!.description)
    }
}
