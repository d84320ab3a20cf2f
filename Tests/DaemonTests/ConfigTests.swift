import XCTest
import Glibc
@testable import Daemon
@testable import Registry
import Transport

/// The shipped config, the embedded default, and the config errors a user sees.
final class ConfigTests: XCTestCase {
    static let repo: String = {
        var p = #filePath
        for _ in 0..<3 { p = String(p[..<p.lastIndex(of: "/")!]) }
        return p
    }()
    var shipped: String { ConfigTests.repo + "/etc/loopbackd.conf" }

    func tmpFile(_ text: String) -> String {
        let path = "/tmp/loopbackd-conf-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).conf"
        let fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0o600)
        var t = text
        t.withUTF8 { _ = write(fd, $0.baseAddress, $0.count) }
        close(fd)
        addTeardownBlock { unlink(path) }
        return path
    }

    func testShippedFileIsValidAndEqualsEmbeddedDefault() throws {
        XCTAssertEqual(Daemon.main(arguments: ["--check", "-c", shipped]), 0)
        let fd = open(shipped, O_RDONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        var bytes = [UInt8](repeating: 0, count: 1 << 16)
        let n = read(fd, &bytes, bytes.count)
        close(fd)
        XCTAssertEqual(String(decoding: bytes[0..<n], as: UTF8.self), embeddedDefaultConfig,
                       "etc/loopbackd.conf and Sources/Daemon/DefaultConfig.swift differ")
        let c = try DaemonConfig.parse(TOML.parse(embeddedDefaultConfig, file: "x"))
        XCTAssertEqual(c.transport, .sim)
        XCTAssertEqual(c.devices.map(\.type), ["rng", "blk"])
    }

    /// Parses `text`, expecting an error on `line` whose message contains `needle`.
    func expectError(_ text: String, line: Int, _ needle: String, file: StaticString = #filePath, l: UInt = #line) {
        XCTAssertThrowsError(try DaemonConfig.parse(TOML.parse(text, file: "t.conf")), file: file, line: l) { e in
            guard let e = e as? ConfigError else { return XCTFail("not a ConfigError: \(e)", file: file, line: l) }
            XCTAssertEqual(e.line, line, "\(e)", file: file, line: l)
            XCTAssertTrue(e.description.contains(needle), "\(e)", file: file, line: l)
            XCTAssertTrue(e.description.hasPrefix("t.conf:"), "\(e)", file: file, line: l)
        }
    }

    func testErrors() {
        let rng = "[device.r]\ntype = \"rng\"\n"
        expectError("[daemon]\ntransport = \"usb\"\n" + rng, line: 2, "must be one of")
        expectError("[daemon]\npoll-us = -1\n" + rng, line: 2, "between 0 and 1000000")
        expectError("[daemon]\nfoo = 1\n" + rng, line: 2, "unknown key")
        expectError("[daemon]\ndevice-node = \"dev/x\"\n" + rng, line: 2, "absolute")
        expectError("[dameon]\n" + rng, line: 1, "unknown table")
        expectError("x = 1\n" + rng, line: 1, "inside a table")
        expectError("[device.r]\ntype = \"gpx\"\n", line: 2, "unknown device type")
        expectError("[device.r]\nbackend = \"inproc\"\n", line: 1, "missing required key")
        expectError("[device.r]\ntype = \"rng\"\nsource = 3\n", line: 3, "expected a string")
        expectError("[device.r]\ntype = \"rng\"\nbogus = true\n", line: 3, "unknown key")
        expectError("[device.r]\ntype = \"rng\"\nbackend = \"vhost-user:rel.sock\"\n", line: 3, "vhost-user:/absolute")
        expectError("[device.r]\ntype = \"rng\"\nqueue-size = 100\n", line: 3, "power of two")
        expectError("[device.\"a b\"]\ntype = \"rng\"\n", line: 1, "must be 1-32")
        expectError("[device.d]\ntype = \"blk\"\n", line: 1, "'device.d.path'")
        expectError("[device.d]\ntype = \"blk\"\npath = \"/x\"\nqueues = 0\n", line: 4, "between 1 and 16")
        expectError("[device.d]\ntype = \"blk\"\npath = \"/x\"\nqueue-size = 48\n", line: 4, "power of two")
        expectError("[device.d]\ntype = \"blk\"\npath = \"/x\"\nreadonly = \"yes\"\n", line: 4, "expected a boolean")
        expectError("[device.a]\ntype = \"rng\"\nserve = \"/s\"\n[device.b]\ntype = \"rng\"\nserve = \"/s\"\n", line: 4, "already used")
        expectError("[daemon]\ntransport = \"none\"\n" + rng, line: 3, "serve")
        expectError("[device.r]\ntype = \"rng\"\nreconnect = \"reset\"\n", line: 3, "only for backend")
        expectError("[device.r]\ntype = \"rng\"\nbackend = \"vhost-user:/s\"\nreconnect = \"later\"\n", line: 4, "must be one of")
        expectError("[daemon]\n", line: 0, "no [device.NAME]")
    }

    func testReconnectOption() throws {
        let c = try DaemonConfig.parse(TOML.parse("[device.r]\ntype = \"rng\"\nbackend = \"vhost-user:/s\"\nreconnect = \"reset\"\n", file: "t"))
        XCTAssertEqual(c.devices[0].reconnectReplay, false)
        let d = try DaemonConfig.parse(TOML.parse("[device.r]\ntype = \"rng\"\nbackend = \"vhost-user:/s\"\n", file: "t"))
        XCTAssertEqual(d.devices[0].reconnectReplay, true)
        XCTAssertEqual(d.devices[0].shape.deviceID, 4)
    }

    func testRestrictedMemoryOptions() throws {
        let c = try DaemonConfig.parse(TOML.parse("[daemon]\ntransport = \"virtio-lo\"\nrestricted-memory = true\n"
            + "[device.r]\ntype = \"rng\"\n[device.d]\ntype = \"blk\"\npath = \"/x\"\nrestricted-memory = false\npool-kib = 2048\n",
            file: "t"))
        XCTAssertTrue(c.restrictedMemory)
        XCTAssertNil(c.devices[0].restrictedMemory, "unset: the [daemon] default applies")
        XCTAssertEqual(c.devices[0].poolKiB, 0, "0: the module's default")
        XCTAssertEqual(c.devices[1].restrictedMemory, false)
        XCTAssertEqual(c.devices[1].poolKiB, 2048)
        XCTAssertFalse(try DaemonConfig.parse(TOML.parse("[device.r]\ntype = \"rng\"\n", file: "t")).restrictedMemory, "off by default")
        expectError("[device.r]\ntype = \"rng\"\npool-kib = 8\n", line: 3, "between 16 and 1048576")
        expectError("[device.r]\ntype = \"rng\"\npool-kib = 2097152\n", line: 3, "between 16 and 1048576")
        expectError("[device.r]\ntype = \"rng\"\nrestricted-memory = \"yes\"\n", line: 3, "expected a boolean")
        expectError("[daemon]\nrestricted-memory = 1\n[device.r]\ntype = \"rng\"\n", line: 2, "expected a boolean")
    }

    func testBrokenCopyExitsTwoWithFileAndLine() {
        // The "done when" check: a broken copy of the shipped file exits 2 with FILE:LINE.
        let fd = open(shipped, O_RDONLY)
        var bytes = [UInt8](repeating: 0, count: 1 << 16)
        let n = read(fd, &bytes, bytes.count)
        close(fd)
        let broken = String(decoding: bytes[0..<n], as: UTF8.self).replacingOccurrences("queue-size = 256", "queue-size = 250")
        let path = tmpFile(broken)
        XCTAssertEqual(Daemon.main(arguments: ["--check", "-c", path]), 2)
        XCTAssertThrowsError(try DaemonConfig.load(path: path)) { e in
            XCTAssertTrue("\(e)".hasPrefix("\(path):"), "\(e)")
        }
        XCTAssertEqual(Daemon.main(arguments: ["--check", "-c", "/nonexistent.conf"]), 2)
    }

    func testCommandLine() throws {
        XCTAssertEqual(try Options.parse(["-c", "f", "--check"]).command, .check)
        XCTAssertEqual(try Options.parse(["bench", "--requests", "1000", "--json"]).requests, 1000)
        XCTAssertEqual(try Options.parse(["ab", "--device", "d", "--poll"]).poll, true)
        for bad in [["-c"], ["--requests", "x"], ["--requests", "5"], ["--frob"], ["serve"], ["--log-level", "loud"], ["--duration", "0"]] {
            XCTAssertThrowsError(try Options.parse(bad), "\(bad)")
            XCTAssertEqual(Daemon.main(arguments: bad), 2, "\(bad)")
        }
        XCTAssertEqual(Daemon.main(arguments: ["--version"]), 0)
    }

    /// `bench --concurrent`: every device of the file at once on one loop; each one serves its driver (no device
    /// starved: every one completes requests) and the run reports no errors.
    func testBenchConcurrentServesEveryDevice() throws {
        let dir = "/tmp/loopbackd-conc-\(getpid())"
        mkdir(dir, 0o700)
        defer { for f in ["d.img", "c.conf"] { unlink("\(dir)/\(f)") }; rmdir(dir) }
        let path = "\(dir)/c.conf"
        let text = "[daemon]\ntransport = \"sim\"\n[device.r0]\ntype = \"rng\"\n[device.r1]\ntype = \"rng\"\n"
            + "[device.d0]\ntype = \"blk\"\npath = \"\(dir)/d.img\"\ncreate-mib = 4\n[device.i0]\ntype = \"i2c\"\nsimulated = true\n"
        let fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0o600)
        XCTAssertEqual(text.utf8.count, text.withCString { write(fd, $0, strlen($0)) })
        close(fd)
        XCTAssertEqual(try Options.parse(["bench", "--concurrent"]).concurrent, true)
        XCTAssertEqual(Daemon.main(arguments: ["bench", "--concurrent", "-c", path, "--seconds", "1", "--json"]), 0)
    }

    func testRunStopsAfterDurationWithWorkingDevices() throws {
        // The sim transport end to end through the daemon's own wiring (the demo a person sees).
        let img = "/tmp/loopbackd-test-\(getpid()).img"
        defer { unlink(img) }
        let path = tmpFile("""
        [daemon]
        transport = "sim"
        [device.r]
        type = "rng"
        [device.d]
        type = "blk"
        path = "\(img)"
        create-mib = 4
        """)
        XCTAssertEqual(Daemon.main(arguments: ["-c", path, "--duration", "1", "--log-level", "error"]), 0)
        var st = stat()
        XCTAssertEqual(stat(img, &st), 0)
        XCTAssertEqual(st.st_size, 4 << 20)
    }

    func testBenchSmoke() throws {
        let img = "/tmp/loopbackd-bench-\(getpid()).img"
        defer { unlink(img) }
        let path = tmpFile("[device.r]\ntype = \"rng\"\n[device.d]\ntype = \"blk\"\npath = \"\(img)\"\ncreate-mib = 4\n")
        XCTAssertEqual(Daemon.main(arguments: ["bench", "-c", path, "--requests", "200", "--json"]), 0)
    }
}

extension String {
    func replacingOccurrences(_ a: String, _ b: String) -> String {
        var out = ""
        var rest = Substring(self)
        while let r = rest.range(of: a) { out += rest[..<r.lowerBound] + b; rest = rest[r.upperBound...] }
        return out + rest
    }
}
