import XCTest
import CMallocCounter
@testable import Daemon
import Registry
import Transport

/// virtio-can allocates nothing per frame: 10,000 round trips on the simulated bus (a classic frame sent through
/// the transmit queue, the bus's echo read into a held receive buffer through the bus's eventfd on the loop).
extension AllocationTests {
    func testCanFramePathDoesNotAllocate() throws {
        let n = try run("can", { CANDevice(endpoint: FakeCANBus(echo: true), queueSize: 64) })
        print("allocations during 10,000 can frame round trips: \(n)")
        XCTAssertLessThan(n, 100)
    }
}
