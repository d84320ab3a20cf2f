import XCTest
@testable import Transport

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
}
