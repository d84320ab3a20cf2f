import XCTest
@testable import Daemon
import Registry
import Transport

/// virtio-input's event path (fake source → host-side ring → held buffers → used ring, and the driver giving the
/// buffers back) allocates nothing per event: 10,000 two-event groups.
extension AllocationTests {
    func testInputPathDoesNotAllocate() throws {
        let n = try run("input", { InputDevice(source: try FakeInputSource(), queueSize: 64) })
        print("allocations during 10,000 input event groups: \(n)")
        XCTAssertLessThan(n, 100)
    }
}
