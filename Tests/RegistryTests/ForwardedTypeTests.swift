import XCTest
@testable import Registry
import Transport

/// Every device type of the product can be forwarded to a vhost-user back-end: the registry knows its device id,
/// queue count and config size (the spec's), the table may override them, `other` reaches unknown types.
final class ForwardedTypeTests: XCTestCase {
    private func parse(_ text: String) throws(ConfigError) -> DaemonConfig {
        try DaemonConfig.parse(TOML.parse(text, file: "t.conf"))
    }

    func testEverySeedTypeIsForwardable() throws {
        let expect: [(String, UInt32, Int, Int)] = [
            ("rng", 4, 1, 0), ("blk", 2, 1, 60), ("console", 3, 4, 12), ("input", 18, 2, 136), ("gpio", 41, 2, 8),
            ("i2c", 34, 1, 0), ("sound", 25, 4, 12), ("can", 36, 3, 2), ("vsock", 19, 3, 8), ("gpu", 16, 2, 16),
            ("scmi", 32, 2, 0), ("fs", 26, 2, 40),
        ]
        for (type, id, queues, config) in expect {
            let c = try parse("""
                [daemon]
                transport = "sim"
                [device.d0]
                type = "\(type)"
                backend = "vhost-user:/run/\(type).sock"
                """)
            let s = c.devices[0].shape
            XCTAssertEqual(s.deviceID, id, type)
            XCTAssertEqual(s.queueSizes.count, queues, type)
            XCTAssertEqual(s.configSize, config, type)
        }
    }

    func testOverridesAndOther() throws {
        let c = try parse("""
            [device.con]
            type = "console"
            backend = "vhost-user:/run/c.sock"
            queues = 6
            queue-size = 64
            [device.x]
            type = "other"
            backend = "vhost-user:/run/x.sock"
            device-id = 44
            queues = 3
            config-size = 20
            """)
        XCTAssertEqual(c.devices[0].shape.queueSizes, [64, 64, 64, 64, 64, 64])
        XCTAssertEqual(c.devices[1].shape, DeviceShape(deviceID: 44, queueSizes: [256, 256, 256], configSize: 20))
    }

    func testErrorsNameFileLineAndKey() {
        func fails(_ text: String, line: Int, _ needle: String, file: StaticString = #filePath, l: UInt = #line) {
            do { _ = try parse(text); XCTFail("accepted", file: file, line: l) } catch {
                XCTAssertEqual(error.line, line, "\(error)", file: file, line: l)
                XCTAssertTrue("\(error)".contains(needle), "\(error)", file: file, line: l)
                XCTAssertTrue("\(error)".contains("t.conf"), "\(error)", file: file, line: l)
            }
        }
        fails("[device.c]\ntype = \"fs\"\n", line: 2, "no in-process body")
        fails("[device.x]\ntype = \"other\"\nbackend = \"vhost-user:/s\"\n", line: 1, "device-id")
        fails("[device.x]\ntype = \"other\"\nbackend = \"vhost-user:/s\"\ndevice-id = 0\n", line: 4, "device-id")
        fails("[device.c]\ntype = \"console\"\nbackend = \"vhost-user:/s\"\nqueue-size = 100\n", line: 4, "power of two")
        fails("[device.c]\ntype = \"console\"\nbackend = \"vhost-user:/s\"\nqueues = 65\n", line: 4, "queues")
        fails("[device.c]\ntype = \"console\"\nbackend = \"vhost-user:/s\"\npath = \"/x\"\n", line: 4, "path")
    }
}
