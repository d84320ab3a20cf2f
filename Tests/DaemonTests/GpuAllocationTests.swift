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

/// The file output's writes allocate nothing either, on the loop (the copy into the writer's buffer) or on the
/// writer thread (conversion, write, rename): 10,000 round trips at 320x200 with a write after every flush
/// (interval 0; the writer takes the newest picture each time it is free).
extension AllocationTests {
    func testGpuFileOutputWritesDoNotAllocate() throws {
        let path = "/tmp/loopbackd-alloc-gpuw-\(getpid()).ppm"
        defer { unlink(path) }
        let out = FileGpuOutput(path: path, when: .flush(intervalNs: 0))
        let n = try run("gpu", { GpuDevice(modes: [GpuMode(width: 320, height: 200)], outputs: [out]) })
        print("allocations during 10,000 gpu TRANSFER+FLUSH round trips with a PPM write after each: \(n); \(out.writes) files written")
        XCTAssertGreaterThan(out.writes, 10)
        XCTAssertEqual(out.failures, 0)
        XCTAssertLessThan(n, 100)
    }
}
