import XCTest
import Glibc
@testable import Registry
import Transport
import CLinux

/// virtio-gpio on the fake chip: every message type, malformed requests and event buffers, interrupt arm / fire /
/// disarm (edges latched while masked, levels not), one buffer per line, quiesce and reset, the simulated workload,
/// and config errors with FILE:LINE.
final class GpioTests: XCTestCase {
    var loop: EventLoop!
    var host: DeviceHost!
    var chip: FakeGpioChip!
    var dev: GpioDevice!
    var drv: SimDriver!
    var q: SimQueue { drv.queues[0] }
    var eq: SimQueue { drv.queues[1] }

    override func setUpWithError() throws {
        loop = try EventLoop()
        host = DeviceHost(loop: loop)
        chip = FakeGpioChip(lines: 8, names: ["led0", "", "relay", "", "button", "", "", "irq7"], loopback: true)
        dev = GpioDevice(chip: chip, queueSize: 64)
        let idx = host.add(name: "gpio0", device: dev)
        loop.startThread()
        drv = try SimDriver(host: host, index: idx, ramSize: 1 << 20)
        try drv.start()
    }
    override func tearDown() { loop.stopAndJoin() }

    /// One request with `room` writable bytes (split in two segments if `split`); returns (status, value, used len,
    /// the whole response).
    @discardableResult
    private func req(_ type: UInt16, _ line: UInt16 = 0, _ value: UInt32 = 0, room: Int = 2, readable: Int = 8,
                     split: Bool = false) throws -> (UInt8, UInt8, UInt32, [UInt8]) {
        let r = drv.alloc(max(readable, 8)), s = drv.alloc(max(room, 1))
        drv.host(r).storeBytes(of: type.littleEndian, as: UInt16.self)
        drv.host(r).storeBytes(of: line.littleEndian, toByteOffset: 2, as: UInt16.self)
        drv.host(r).storeBytes(of: value.littleEndian, toByteOffset: 4, as: UInt32.self)
        memset(drv.host(s), 0xee, max(room, 1))
        let readableSegs: [(UInt64, UInt32)] = split && readable > 1 ? [(r, UInt32(3)), (r + 3, UInt32(readable - 3))] : [(r, UInt32(readable))]
        let writableSegs: [(UInt64, UInt32)] = room == 0 ? [] : split && room > 1 ? [(s, UInt32(1)), (s + 1, UInt32(room - 1))] : [(s, UInt32(room))]
        let h = try XCTUnwrap(q.addChain(readable: readableSegs, writable: writableSegs))
        q.submit(h)
        let u = try XCTUnwrap(q.waitUsed(timeoutMs: 2000), "response")
        XCTAssertEqual(u.id, h)
        q.recycle(u.id)
        let bytes = Array(UnsafeRawBufferPointer(start: drv.host(s), count: max(room, 1)))
        return (bytes[0], room > 1 ? bytes[1] : 0, u.len, bytes)
    }
    private func ok(_ type: UInt16, _ line: UInt16 = 0, _ value: UInt32 = 0, file: StaticString = #filePath, l: UInt = #line) throws -> UInt8 {
        let r = try req(type, line, value)
        XCTAssertEqual(r.0, VirtioGpio.statusOK, "type \(type) line \(line) value \(value)", file: file, line: l)
        XCTAssertEqual(r.2, 2, file: file, line: l)
        return r.1
    }
    private func err(_ type: UInt16, _ line: UInt16 = 0, _ value: UInt32 = 0, file: StaticString = #filePath, l: UInt = #line) throws {
        XCTAssertEqual(try req(type, line, value).0, VirtioGpio.statusError, "type \(type) line \(line) value \(value)", file: file, line: l)
    }

    /// Posts an eventq buffer for `line` (readable bytes, writable status); returns its head and status address.
    private func post(_ line: UInt16, readable: Int = 2) throws -> (UInt16, UInt64) {
        let g = drv.alloc(4), s = drv.alloc(1)
        drv.host(g).storeBytes(of: line.littleEndian, as: UInt16.self)
        drv.host(s).storeBytes(of: 0xee, as: UInt8.self)
        let h = try XCTUnwrap(eq.addChain(readable: [(g, UInt32(readable))], writable: [(s, 1)]))
        eq.submit(h)
        return (h, s)
    }
    /// The next completed event buffer (head, status), or nil if none comes within `ms`.
    private func event(_ ms: Int32 = 2000) -> (UInt16, UInt8)? {
        guard let u = eq.waitUsed(timeoutMs: ms) else { return nil }
        XCTAssertEqual(u.len, 1)
        eq.recycle(u.id)
        return (u.id, statusOf[u.id].map { drv.host($0).load(as: UInt8.self) } ?? 0xff)
    }
    private var statusOf: [UInt16: UInt64] = [:]
    private func arm(_ line: UInt16, readable: Int = 2) throws -> UInt16 {
        let (h, s) = try post(line, readable: readable)
        statusOf[h] = s
        return h
    }
    private func drive(_ line: Int, _ v: Bool) { loop.executeAndWait { self.chip.drive(line, v) } }
    private var held: Int { loop.executeAndWait { self.dev.held } }

    func testConfigAndNames() throws {
        let cfg = try XCTUnwrap(drv.readConfig(offset: 0, count: 8))
        let block = Array("led0\0\0relay\0\0button\0\0\0irq7\0".utf8)
        XCTAssertEqual(cfg, [8, 0, 0, 0, UInt8(block.count), 0, 0, 0])
        XCTAssertTrue(drv.features.contains(VirtioGpio.fIRQ))
        let r = try req(VirtioGpio.msgGetNames, room: 1 + block.count, split: true)
        XCTAssertEqual(r.0, VirtioGpio.statusOK)
        XCTAssertEqual(r.2, UInt32(1 + block.count))
        XCTAssertEqual(Array(r.3.dropFirst()), block)
        // Too little room for the names block: ERR in the status byte.
        let short = try req(VirtioGpio.msgGetNames, room: block.count)
        XCTAssertEqual(short.0, VirtioGpio.statusError)
        XCTAssertEqual(short.2, 2)
    }

    func testDirectionAndValueRoundTrips() throws {
        // Unconfigured lines report the host's direction (input here).
        XCTAssertEqual(try ok(VirtioGpio.msgGetDirection, 0), GpioDirection.input.rawValue)
        // Linux's direction_output: SET_VALUE first, then SET_DIRECTION OUT: the line comes up driving 1.
        _ = try ok(VirtioGpio.msgSetValue, 0, 1)
        XCTAssertEqual(loop.executeAndWait { self.chip.direction[0] }, GpioDirection.none, "a value alone requests nothing")
        _ = try ok(VirtioGpio.msgSetDirection, 0, UInt32(GpioDirection.output.rawValue))
        XCTAssertEqual(loop.executeAndWait { self.chip.direction[0] }, .output)
        XCTAssertEqual(loop.executeAndWait { self.chip.level[0] }, true)
        XCTAssertEqual(try ok(VirtioGpio.msgGetDirection, 0), GpioDirection.output.rawValue)
        XCTAssertEqual(try ok(VirtioGpio.msgGetValue, 0), 1)
        for k in 0..<100 {
            _ = try ok(VirtioGpio.msgSetValue, 0, UInt32(k & 1))
            XCTAssertEqual(try ok(VirtioGpio.msgGetValue, 0), UInt8(k & 1))
            // Line 0 is wired to line 4: an input reads it.
            XCTAssertEqual(try ok(VirtioGpio.msgGetValue, 4), UInt8(k & 1))
        }
        // An input reads what the outside world drives.
        _ = try ok(VirtioGpio.msgSetDirection, 5, UInt32(GpioDirection.input.rawValue))
        drive(5, true)
        XCTAssertEqual(try ok(VirtioGpio.msgGetValue, 5), 1)
        drive(5, false)
        XCTAssertEqual(try ok(VirtioGpio.msgGetValue, 5), 0)
        // Direction NONE releases the host line and forgets the value.
        _ = try ok(VirtioGpio.msgSetDirection, 0, UInt32(GpioDirection.none.rawValue))
        XCTAssertEqual(loop.executeAndWait { self.chip.direction[0] }, GpioDirection.none)
        // A host refusal is an ERR, not a crash.
        loop.executeAndWait { self.chip.failing = [6] }
        try err(VirtioGpio.msgSetDirection, 6, UInt32(GpioDirection.output.rawValue))
        try err(VirtioGpio.msgGetValue, 6)
        XCTAssertEqual(loop.executeAndWait { self.dev.hostErrors }, 2)
        XCTAssertEqual(loop.executeAndWait { self.dev.badRequests }, 0)
    }

    func testMalformedRequestsAnswerERRAndNothingLatches() throws {
        try err(0)                                             // unknown type 0
        try err(7)                                             // unknown type 7
        try err(VirtioGpio.msgGetValue, 8)                     // line == ngpio
        try err(VirtioGpio.msgGetDirection, 0xffff)
        try err(VirtioGpio.msgSetDirection, 1, 3)              // direction enum
        try err(VirtioGpio.msgSetValue, 1, 2)                  // value enum
        try err(VirtioGpio.msgSetValue, 1, 0x1_0000)
        try err(VirtioGpio.msgIRQType, 4, 5)                   // not an interrupt type
        try err(VirtioGpio.msgIRQType, 4, 16)
        XCTAssertEqual(try req(VirtioGpio.msgGetValue, 1, readable: 6).0, VirtioGpio.statusError, "short request")
        XCTAssertEqual(try req(VirtioGpio.msgGetValue, 1, readable: 12).0, VirtioGpio.statusError, "long request")
        let small = try req(VirtioGpio.msgGetValue, 1, room: 1)
        XCTAssertEqual(small.0, VirtioGpio.statusError, "no room for status + value")
        XCTAssertEqual(small.2, 1)
        XCTAssertEqual(try req(VirtioGpio.msgGetValue, 1, room: 0).2, 0, "no room at all: completed empty")
        // An interrupt on an output line, and making an interrupt line an output.
        _ = try ok(VirtioGpio.msgSetDirection, 1, UInt32(GpioDirection.output.rawValue))
        try err(VirtioGpio.msgIRQType, 1, UInt32(VirtioGpio.irqEdgeRising))
        _ = try ok(VirtioGpio.msgIRQType, 4, UInt32(VirtioGpio.irqEdgeRising))
        try err(VirtioGpio.msgSetDirection, 4, UInt32(GpioDirection.output.rawValue))
        XCTAssertEqual(loop.executeAndWait { self.dev.badRequests }, 15)
        // Still serving, no NEEDS_RESET.
        XCTAssertEqual(try ok(VirtioGpio.msgGetDirection, 1), GpioDirection.output.rawValue)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
    }

    func testEdgeInterruptArmFireLatchDisarm() throws {
        _ = try ok(VirtioGpio.msgSetDirection, 5, UInt32(GpioDirection.input.rawValue))
        _ = try ok(VirtioGpio.msgIRQType, 5, UInt32(VirtioGpio.irqEdgeRising))
        XCTAssertEqual(loop.executeAndWait { self.chip.edges[5] }, 1, "host detects rising edges")
        let h1 = try arm(5)
        XCTAssertNil(event(100), "armed, nothing yet")
        XCTAssertEqual(held, 1)
        drive(5, true)
        XCTAssertEqual(event()?.1, VirtioGpio.irqStatusValid)
        XCTAssertEqual(event(50)?.0, nil)
        _ = h1
        // Falling edge on a rising-only line: nothing, even with a buffer.
        _ = try arm(5)
        drive(5, false)
        XCTAssertNil(event(100))
        drive(5, true)
        XCTAssertEqual(event()?.1, VirtioGpio.irqStatusValid)
        // Masked (no buffer): the edge is latched and fires as soon as the buffer comes.
        drive(5, false)
        drive(5, true)
        _ = try arm(5)
        XCTAssertEqual(event()?.1, VirtioGpio.irqStatusValid, "latched edge")
        // Disabling returns the held buffer INVALID and discards a latch.
        _ = try arm(5)
        _ = try ok(VirtioGpio.msgIRQType, 5, UInt32(VirtioGpio.irqNone))
        XCTAssertEqual(event()?.1, VirtioGpio.irqStatusInvalid)
        XCTAssertEqual(held, 0)
        XCTAssertEqual(loop.executeAndWait { self.chip.edges[5] }, 0)
        XCTAssertEqual(loop.executeAndWait { self.chip.direction[5] }, .input, "still an input")
        // Both edges through the wired pair: line 1 drives line 5.
        _ = try ok(VirtioGpio.msgIRQType, 5, UInt32(VirtioGpio.irqEdgeBoth))
        _ = try ok(VirtioGpio.msgSetDirection, 1, UInt32(GpioDirection.output.rawValue))
        for k in 0..<50 {
            _ = try arm(5)
            _ = try ok(VirtioGpio.msgSetValue, 1, UInt32((k + 1) & 1))
            XCTAssertEqual(event()?.1, VirtioGpio.irqStatusValid, "edge \(k)")
        }
        XCTAssertEqual(loop.executeAndWait { self.dev.interrupts }, 53)
        XCTAssertEqual(loop.executeAndWait { self.dev.badEvents }, 0)
    }

    func testLevelInterruptIsNotLatched() throws {
        _ = try ok(VirtioGpio.msgSetDirection, 6, UInt32(GpioDirection.input.rawValue))
        drive(6, true)
        _ = try ok(VirtioGpio.msgIRQType, 6, UInt32(VirtioGpio.irqLevelHigh))
        // The level holds: every buffer completes at once.
        for _ in 0..<3 {
            _ = try arm(6)
            XCTAssertEqual(event()?.1, VirtioGpio.irqStatusValid)
        }
        drive(6, false)
        _ = try arm(6)
        XCTAssertNil(event(100), "level low: held")
        drive(6, true)
        XCTAssertEqual(event()?.1, VirtioGpio.irqStatusValid)
        // A level that came and went while masked is not latched.
        drive(6, false)
        drive(6, true)
        drive(6, false)
        _ = try arm(6)
        XCTAssertNil(event(100))
        _ = try ok(VirtioGpio.msgSetDirection, 6, UInt32(GpioDirection.none.rawValue))
        XCTAssertEqual(event()?.1, VirtioGpio.irqStatusInvalid, "direction NONE disarms")
        XCTAssertEqual(loop.executeAndWait { self.chip.direction[6] }, GpioDirection.none)
        // Level low.
        _ = try ok(VirtioGpio.msgSetDirection, 6, UInt32(GpioDirection.input.rawValue))
        _ = try ok(VirtioGpio.msgIRQType, 6, UInt32(VirtioGpio.irqLevelLow))
        _ = try arm(6)
        XCTAssertEqual(event()?.1, VirtioGpio.irqStatusValid)
    }

    func testOneBufferPerLineAndBadEventBuffers() throws {
        _ = try ok(VirtioGpio.msgSetDirection, 3, UInt32(GpioDirection.input.rawValue))
        _ = try ok(VirtioGpio.msgIRQType, 3, UInt32(VirtioGpio.irqEdgeFalling))
        let first = try arm(3)
        let second = try arm(3)
        let e = try XCTUnwrap(event())
        XCTAssertEqual(e.0, second, "the second buffer for a line goes back")
        XCTAssertEqual(e.1, VirtioGpio.irqStatusInvalid)
        XCTAssertEqual(held, 1)
        // Line beyond ngpio, line without an interrupt, wrong request size.
        for (line, readable) in [(UInt16(8), 2), (UInt16(2), 2), (UInt16(3), 3), (UInt16(3), 1)] {
            _ = try arm(line, readable: readable)
            XCTAssertEqual(event()?.1, VirtioGpio.irqStatusInvalid, "line \(line)")
        }
        let (h, s) = try post(3, readable: 4)
        statusOf[h] = s
        XCTAssertEqual(event()?.1, VirtioGpio.irqStatusInvalid, "4-byte request")
        XCTAssertEqual(held, 1, "the first buffer is still armed")
        drive(3, true); drive(3, false)
        let f = try XCTUnwrap(event())
        XCTAssertEqual(f.0, first)
        XCTAssertEqual(f.1, VirtioGpio.irqStatusValid)
        XCTAssertEqual(loop.executeAndWait { self.dev.badEvents }, 6)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
    }

    func testQuiesceReturnsHeldBuffersAndResetReleasesTheChip() throws {
        for line: UInt16 in [4, 5, 7] {
            _ = try ok(VirtioGpio.msgSetDirection, line, UInt32(GpioDirection.input.rawValue))
            _ = try ok(VirtioGpio.msgIRQType, line, UInt32(VirtioGpio.irqEdgeBoth))
            _ = try arm(line)
        }
        _ = try ok(VirtioGpio.msgSetDirection, 0, UInt32(GpioDirection.output.rawValue))
        XCTAssertEqual(held, 3)
        // A vhost-user ring stop: every held buffer completes (INVALID), so the used ring matches the base.
        loop.executeAndWait { self.dev.quiesce() }
        for _ in 0..<3 { XCTAssertEqual(event()?.1, VirtioGpio.irqStatusInvalid) }
        XCTAssertEqual(held, 0)
        _ = try arm(4)
        XCTAssertEqual(held, 1)
        // Driver reset: held buffers are forgotten, every line the driver configured is released on the host.
        drv.reset()
        XCTAssertEqual(held, 0)
        XCTAssertEqual(loop.executeAndWait { self.chip.direction }, [GpioDirection](repeating: .none, count: 8))
        XCTAssertEqual(loop.executeAndWait { self.chip.edges }, [UInt8](repeating: 0, count: 8))
        // An edge after the reset reaches nothing (and does not crash).
        drive(4, true)
        // The driver comes back: lines start over.
        try drv.start()
        XCTAssertEqual(try ok(VirtioGpio.msgGetDirection, 0), GpioDirection.input.rawValue)
    }

    func testSimulatedWorkloadRoundTripsAndEventRate() throws {
        let w = try XCTUnwrap(GpioWorkload(drv, verify: true))
        for k in 0..<200 { XCTAssertTrue(w.runOne(spinNs: 0), "round trip \(k)") }
        let n = 2000
        let t0 = lb_now_ns()
        for _ in 0..<n { guard w.runOne(spinNs: 0) else { XCTFail("round trip failed"); return } }
        let dt = Double(lb_now_ns() - t0) / 1e9
        print("gpio: \(n) SET_VALUE+GET_VALUE+interrupt round trips in \(String(format: "%.3f", dt)) s: \(Int(Double(n) / dt)) interrupts/s (debug build, fake chip)")
        XCTAssertEqual(loop.executeAndWait { self.dev.interrupts }, UInt64(n + 200))
        XCTAssertEqual(loop.executeAndWait { self.dev.badRequests + self.dev.badEvents }, 0)
        // bench and ab start the requestq only: value round trips then.
        drv.reset()
        try drv.start(queueCount: 1)
        let v = try XCTUnwrap(GpioWorkload(drv, verify: false))
        XCTAssertTrue(v.requestKind.contains("requestq only"))
        for k in 0..<200 { XCTAssertTrue(v.runOne(spinNs: 0), "value round trip \(k)") }
    }

    func testConfigErrorsNameFileLineAndKey() throws {
        func parse(_ text: String) throws(ConfigError) -> DaemonConfig { try DaemonConfig.parse(TOML.parse(text, file: "t.conf")) }
        func fails(_ text: String, line: Int, _ needle: String, file: StaticString = #filePath, l: UInt = #line) {
            do { _ = try parse(text); XCTFail("accepted", file: file, line: l) } catch {
                XCTAssertEqual(error.line, line, "\(error)", file: file, line: l)
                XCTAssertTrue("\(error)".contains(needle), "\(error)", file: file, line: l)
                XCTAssertTrue("\(error)".hasPrefix("t.conf:\(line)"), "\(error)", file: file, line: l)
            }
        }
        fails("[device.g]\ntype = \"gpio\"\n", line: 1, "exactly one of chip")
        fails("[device.g]\ntype = \"gpio\"\nchip = \"/dev/gpiochip0\"\nsimulated = true\n", line: 4, "exactly one of chip")
        fails("[device.g]\ntype = \"gpio\"\nchip = \"/dev/gpiochip0\"\nlines = \"7-3\"\n", line: 4, "backwards")
        fails("[device.g]\ntype = \"gpio\"\nchip = \"/dev/gpiochip0\"\nlines = \"0-3,2\"\n", line: 4, "twice")
        fails("[device.g]\ntype = \"gpio\"\nchip = \"/dev/gpiochip0\"\nlines = \"x\"\n", line: 4, "line offset")
        fails("[device.g]\ntype = \"gpio\"\nchip = \"/dev/gpiochip0\"\nlines = \"0-2000\"\n", line: 4, "more than 1024")
        fails("[device.g]\ntype = \"gpio\"\nchip = \"/dev/gpiochip0\"\nlines = \"0-3\"\nnames = [\"a\", \"b\"]\n", line: 5, "2 names for 4 lines")
        fails("[device.g]\ntype = \"gpio\"\nchip = \"dev/gpiochip0\"\n", line: 3, "absolute path")
        fails("[device.g]\ntype = \"gpio\"\nsimulated = true\nqueue-size = 48\n", line: 4, "power of two")
        fails("[device.g]\ntype = \"gpio\"\nbackend = \"vhost-user:/s\"\nchip = \"gpiochip0\"\n", line: 4, "only queue-size")
        fails("[device.g]\ntype = \"gpio\"\nsimulated = true\nnoise = 1\n", line: 4, "noise")
        // Accepted: a label, ranges in order, one name per line; forwarded with queue-size.
        let c = try parse("[device.g]\ntype = \"gpio\"\nchip = \"gpio-sim.0-node0\"\nlines = \"0-3, 8\"\nnames = [\"a\", \"\", \"c\", \"d\", \"e\"]\n[device.f]\ntype = \"gpio\"\nbackend = \"vhost-user:/s\"\nqueue-size = 32\n")
        XCTAssertEqual(c.devices[0].shape, DeviceShape(deviceID: 41, queueSizes: [64, 64], configSize: 8))
        XCTAssertEqual(c.devices[1].shape.queueSizes, [32, 32])
        XCTAssertEqual(try XCTUnwrap(try? DeviceType.parseLines("0-3, 8").get()), [0, 1, 2, 3, 8])
    }

    func testRealChipOpenFailsCleanly() {
        // No gpiochip on this machine kind: the error names the chip (and the kernel ABI when it is the cause).
        XCTAssertThrowsError(try GpiodChip(chip: "/nonexistent/gpiochip9", lines: [0])) { e in
            XCTAssertTrue("\(e)".contains("/nonexistent/gpiochip9"), "\(e)")
        }
    }
}
