import XCTest
import Glibc
import CMallocCounter
@testable import Daemon
import Registry
import Transport

/// virtio-gpu allocates nothing per TRANSFER or FLUSH: 10,000 round trips of a full-frame TRANSFER_TO_HOST_2D
/// (1280x800 from 1,000 4 KiB backing entries) + RESOURCE_FLUSH reaching a file output in "demand" mode (the
/// flush is handed to the output; no file is written).
extension AllocationTests {
    func testGpuTransferAndFlushDoNotAllocate() throws {
        let n = try run("gpu", {
            GpuDevice(modes: [GpuMode(width: 1280, height: 800)],
                      outputs: [FileGpuOutput(path: "/tmp/loopbackd-alloc-gpu-\(getpid()).ppm", when: .demand)])
        })
        print("allocations during 10,000 gpu TRANSFER+FLUSH round trips: \(n)")
        XCTAssertLessThan(n, 100)
    }
}
