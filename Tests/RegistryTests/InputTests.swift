import XCTest
import Glibc
@testable import Registry
import Transport

/// virtio-input on the fake source: config selectors, event ordering and grouping, the bounded host-side ring,
/// status events written back, unplug, and what a hostile driver can send.
final class InputTests: XCTestCase {
    var loop: EventLoop!
    var host: DeviceHost!
    var fake: FakeInputSource!
    var dev: InputDevice!
    var drv: SimDriver!
    var idx = 0

    override func setUp() {
        loop = try! EventLoop()
        host = DeviceHost(loop: loop)
    }
    override func tearDown() { loop.stopAndJoin() }

    /// Device on the fake, driver started with the given queue sizes (event, status).
    func start(queueSizes: [UInt16] = [16, 8], ringEvents: Int = 1024, activate: Bool = true) throws {
        fake = try FakeInputSource()
        dev = InputDevice(source: fake, queueSize: 16, ringEvents: ringEvents)
        idx = host.add(name: "in0", device: dev)
        loop.startThread()
        drv = try SimDriver(host: host, index: idx, ramSize: 1 << 20)
        if activate { try drv.start(queueSizes: queueSizes) }
    }

    /// Posts `n` 8-byte event buffers on queue 0; returns their addresses by head.
    @discardableResult
    func post(_ n: Int) throws -> [UInt16: UInt64] {
        let q = drv.queues[0]
        var out: [UInt16: UInt64] = [:]
        let old = q.availIdx
        for _ in 0..<n {
            let b = drv.alloc(8)
            memset(drv.host(b), 0xee, 8)
            let h = try XCTUnwrap(q.addChain(readable: [], writable: [(b, 8)]))
            out[h] = b
            q.pushAvail(h)
        }
        q.publish()
        q.kickIfNeeded(old: old)
        return out
    }

    /// Reaps `n` events from queue 0 (in used order), recycling their chains.
    func reap(_ n: Int, _ bufs: [UInt16: UInt64], file: StaticString = #filePath, line: UInt = #line) throws -> [InputEvent] {
        var out: [InputEvent] = []
        for _ in 0..<n {
            let u = try XCTUnwrap(drv.queues[0].waitUsed(timeoutMs: 2000), "no used entry", file: file, line: line)
            XCTAssertEqual(u.len, 8, file: file, line: line)
            let b = try XCTUnwrap(bufs[u.id], file: file, line: line)
            out.append(InputEvent(wire: UInt64(littleEndian: drv.host(b).loadUnaligned(as: UInt64.self))))
            drv.queues[0].recycle(u.id)
        }
        return out
    }

    /// Round trip through the loop so everything injected so far has been handled.
    func settle() { let d = dev!; _ = loop.executeAndWait { d.pendingEvents } ; usleep(2000); _ = loop.executeAndWait { d.pendingEvents } }

    func key(_ code: UInt16, _ v: Int32) -> InputEvent { InputEvent(type: VirtioInput.evKey, code: code, value: v) }
    func abs(_ code: UInt16, _ v: Int32) -> InputEvent { InputEvent(type: VirtioInput.evAbs, code: code, value: v) }
    let syn = InputEvent.synReport

    // MARK: config space

    /// Selects (select, subsel) and returns (size, the union's first `size` bytes).
    func cfg(_ select: UInt8, _ subsel: UInt8) throws -> (Int, [UInt8]) {
        XCTAssertTrue(drv.writeConfig(offset: 0, bytes: [select, subsel]))
        let all = try XCTUnwrap(drv.readConfig(offset: 0, count: VirtioInput.configSize))
        XCTAssertEqual(all[0], select); XCTAssertEqual(all[1], subsel)
        let size = Int(all[2])
        XCTAssertLessThanOrEqual(size, 128)
        // Bytes past `size` are zero (no stale answer leaks).
        XCTAssertTrue(all[(8 + size)...].allSatisfy { $0 == 0 }, "stale bytes after size \(size) for \(select)/\(subsel)")
        return (size, Array(all[8..<(8 + size)]))
    }

    func testConfigEverySelector() throws {
        try start()
        let c = FakeInputSource.keyboardAndTouch
        var (n, b) = try cfg(VirtioInput.cfgIDName, 0)
        XCTAssertEqual(String(decoding: b, as: UTF8.self), c.name); XCTAssertEqual(n, c.name.utf8.count)
        (n, b) = try cfg(VirtioInput.cfgIDSerial, 0)
        XCTAssertEqual(String(decoding: b, as: UTF8.self), "fake-0001")
        (n, b) = try cfg(VirtioInput.cfgIDDevids, 0)
        XCTAssertEqual(b, [0x06, 0, 0x6b, 0x1d, 0x04, 0x01, 1, 0])
        (n, b) = try cfg(VirtioInput.cfgPropBits, 0)
        XCTAssertEqual(b, [0x02])   // INPUT_PROP_DIRECT
        // EV_KEY: ESC(1)..4(5) → byte 0 bits 1-5; BS 14, ENTER 28, A 30, B 48, SPACE 57, BTN_TOUCH 330 (byte 41 bit 2).
        (n, b) = try cfg(VirtioInput.cfgEVBits, UInt8(VirtioInput.evKey))
        XCTAssertEqual(n, 42)
        XCTAssertEqual(b[0], 0b0011_1110); XCTAssertEqual(b[1], 1 << 6); XCTAssertEqual(b[3], 1 << 4 | 1 << 6)
        XCTAssertEqual(b[41], 1 << 2)
        (n, b) = try cfg(VirtioInput.cfgEVBits, UInt8(VirtioInput.evAbs))
        XCTAssertEqual(b, [0x03, 0, 0, 0, 0, 0x80, 0x60, 0x02])   // X, Y, MT_SLOT(47), MT_POSITION_X/Y(53, 54), MT_TRACKING_ID(57)
        (n, b) = try cfg(VirtioInput.cfgEVBits, UInt8(VirtioInput.evLed))
        XCTAssertEqual(b, [0x07])
        // Types the device does not have, EV_SYN, and types beyond EV_MAX: size 0.
        for t: UInt8 in [0, UInt8(VirtioInput.evRel), UInt8(VirtioInput.evSw), 0x20, 0x7f, 0xff] {
            XCTAssertEqual(try cfg(VirtioInput.cfgEVBits, t).0, 0, "EV_BITS \(t)")
        }
        (n, b) = try cfg(VirtioInput.cfgAbsInfo, 0x35)
        XCTAssertEqual(n, 20)
        let v = b.withUnsafeBytes { r in (0..<5).map { Int32(littleEndian: r.loadUnaligned(fromByteOffset: 4 * $0, as: Int32.self)) } }
        XCTAssertEqual(v, [0, 1919, 2, 0, 10])
        // Axes not set, beyond ABS_MAX: size 0.
        for a: UInt8 in [0x02, 0x30, 0x3f, 0x40, 0xff] { XCTAssertEqual(try cfg(VirtioInput.cfgAbsInfo, a).0, 0, "ABS_INFO \(a)") }
        // Unknown selects, and a subsel where the selector takes none: size 0.
        for (s, ss): (UInt8, UInt8) in [(0, 0), (0x04, 0), (0x13, 0), (0xff, 0xff), (VirtioInput.cfgIDName, 1),
                                        (VirtioInput.cfgIDDevids, 3), (VirtioInput.cfgPropBits, 1)] {
            XCTAssertEqual(try cfg(s, ss).0, 0, "select \(s) subsel \(ss)")
        }
        // Writes to size and the union are ignored (read-only), counted.
        _ = try cfg(VirtioInput.cfgIDName, 0)
        XCTAssertTrue(drv.writeConfig(offset: 2, bytes: [99, 1, 2, 3, 4, 5, 6, 7, 8]))
        let after = try XCTUnwrap(drv.readConfig(offset: 0, count: 12))
        XCTAssertEqual(Int(after[2]), c.name.utf8.count)
        XCTAssertEqual(Array(after[8..<12]), Array(c.name.utf8.prefix(4)))
        XCTAssertEqual(loop.executeAndWait { self.dev.badConfigWrites }, 9)
        // Out of range for the host: refused before the device sees it.
        XCTAssertNil(drv.readConfig(offset: 130, count: 8))
        XCTAssertFalse(drv.writeConfig(offset: 136, bytes: [1]))
    }

    // MARK: events

    func testEventsInOrderGroupedBySynReport() throws {
        try start()
        let bufs = try post(16)
        fake.inject([key(30, 1), syn, key(30, 0), syn, abs(0, 100), abs(1, 200), syn])
        XCTAssertEqual(try reap(7, bufs), [key(30, 1), syn, key(30, 0), syn, abs(0, 100), abs(1, 200), syn])
        // An open group (no SYN_REPORT yet) is not delivered...
        fake.inject([key(48, 1), abs(0, 5)])
        settle()
        XCTAssertNil(drv.queues[0].reap())
        // ...until its SYN_REPORT comes: then all of it at once.
        fake.inject([syn])
        XCTAssertEqual(try reap(3, bufs), [key(48, 1), abs(0, 5), syn])
    }

    func testGroupWaitsUntilEnoughBuffersForAllOfIt() throws {
        try start()
        var bufs = try post(2)
        fake.inject([abs(0x35, 1), abs(0x36, 2), key(330, 1), syn])   // 4 events, 2 buffers
        settle()
        XCTAssertNil(drv.queues[0].reap(), "a group must not be delivered in part")
        XCTAssertEqual(loop.executeAndWait { self.dev.pendingEvents }, 4)
        bufs.merge(try post(2)) { a, _ in a }
        XCTAssertEqual(try reap(4, bufs), [abs(0x35, 1), abs(0x36, 2), key(330, 1), syn])
    }

    func testNoBufferQueueingDropsOldestWholeGroups() throws {
        try start(ringEvents: 8)
        // Six 2-event groups, no buffers: the ring (8 events) keeps the newest four whole groups.
        for k in 0..<6 { fake.inject([key(UInt16(1 + k), 1), syn]) }
        settle()
        XCTAssertEqual(loop.executeAndWait { self.dev.droppedGroups }, 2)
        XCTAssertEqual(loop.executeAndWait { self.dev.droppedEvents }, 4)
        let bufs = try post(16)
        XCTAssertEqual(try reap(8, bufs), [key(3, 1), syn, key(4, 1), syn, key(5, 1), syn, key(6, 1), syn])
        settle()
        XCTAssertNil(drv.queues[0].reap())
        // One open group larger than the ring: dropped as it overflows, nothing half-delivered.
        for k in 0..<10 { fake.inject([abs(0, Int32(k))]) }
        fake.inject([syn])
        XCTAssertEqual(try reap(3, bufs), [abs(0, 8), abs(0, 9), syn])
    }

    /// Found by the input-event fuzz target: a group that fits the driver's buffers but waits behind a longer one
    /// must go out as soon as the longer one is dropped to make room, not when the next SYN_REPORT comes (or never:
    /// it would be the next group dropped).
    func testGroupBehindADroppedOneIsDeliveredAtOnce() throws {
        try start(ringEvents: 8)
        let bufs = try post(3)
        let long = (1...5).map { key(UInt16($0), 1) } + [syn]   // 6 events: waits for 6 buffers
        fake.inject(long)
        fake.inject([key(30, 1), syn])                          // fits the 3 buffers, waits behind `long`
        settle()
        XCTAssertNil(drv.queues[0].reap())
        fake.inject([abs(0, 7)])                                // ring full: `long` is dropped
        XCTAssertEqual(try reap(2, bufs), [key(30, 1), syn])
        XCTAssertEqual(loop.executeAndWait { self.dev.droppedEvents }, 6)
        XCTAssertEqual(loop.executeAndWait { self.dev.pendingEvents }, 1)
    }

    func testGroupLargerThanQueueIsDeliveredInPieces() throws {
        try start(queueSizes: [4, 8])
        var bufs = try post(4)
        let group = (0..<6).map { abs(0, Int32($0)) } + [syn]
        fake.inject(group)
        var got = try reap(4, bufs)
        bufs = try post(3)
        got += try reap(3, bufs)
        XCTAssertEqual(got, group)
    }

    func testEventsBeforeDriverOKAreDropped() throws {
        try start(activate: false)
        loop.executeAndWait { try! self.fake.start(loop: self.loop, sink: self.dev) }
        fake.inject([key(30, 1), syn])
        settle()
        XCTAssertEqual(loop.executeAndWait { self.dev.droppedInactive }, 2)
    }

    // MARK: status queue

    func status(_ readable: [(UInt64, UInt32)], _ writable: [(UInt64, UInt32)] = []) throws -> UInt32 {
        let q = drv.queues[1]
        let h = try XCTUnwrap(q.addChain(readable: readable, writable: writable))
        q.submit(h)
        let u = try XCTUnwrap(q.waitUsed(timeoutMs: 2000))
        XCTAssertEqual(u.id, h)
        q.recycle(h)
        return u.len
    }
    func statusBuffer(_ e: InputEvent) -> UInt64 {
        let b = drv.alloc(8)
        drv.host(b).storeBytes(of: e.wire.littleEndian, as: UInt64.self)
        return b
    }

    func testStatusEventsWrittenBackAndGarbageRefused() throws {
        try start()
        let led = InputEvent(type: VirtioInput.evLed, code: 1, value: 1)   // LED_CAPSL on
        XCTAssertEqual(try status([(statusBuffer(led), 8)]), 0)
        // Split over two descriptors: still one 8-byte event.
        let b = statusBuffer(InputEvent(type: VirtioInput.evLed, code: 0, value: 0))
        XCTAssertEqual(try status([(b, 4), (b + 4, 4)]), 0)
        XCTAssertEqual(loop.executeAndWait { self.fake.written }, [led, InputEvent(type: VirtioInput.evLed, code: 0, value: 0)])
        // Garbage: a key "status", an LED the device does not have, a sound/FF event it has no bit for, short, long,
        // writable-only, empty type 0.
        let bad: [[(UInt64, UInt32)]] = [
            [(statusBuffer(key(30, 1)), 8)],
            [(statusBuffer(InputEvent(type: VirtioInput.evLed, code: 9, value: 1)), 8)],
            [(statusBuffer(InputEvent(type: VirtioInput.evLed, code: 0xffff, value: -1)), 8)],
            [(statusBuffer(InputEvent(type: VirtioInput.evSnd, code: 1, value: 1)), 8)],
            [(statusBuffer(InputEvent(type: VirtioInput.evFF, code: 0, value: 1)), 8)],
            [(statusBuffer(InputEvent(type: 0xffff, code: 0xffff, value: 0)), 8)],
            [(statusBuffer(syn), 8)],
            [(statusBuffer(led), 4)],
            [(statusBuffer(led), 8), (drv.alloc(8), 8)],
        ]
        for r in bad { XCTAssertEqual(try status(r), 0) }
        XCTAssertEqual(try status([], [(drv.alloc(8), 8)]), 0)
        XCTAssertEqual(loop.executeAndWait { self.dev.badStatusEvents }, bad.count + 1)
        XCTAssertEqual(loop.executeAndWait { self.fake.written.count }, 2)
        // A host device that refuses the write: counted, the driver still gets its buffer back.
        loop.executeAndWait { self.fake.acceptsWrites = false }
        XCTAssertEqual(try status([(statusBuffer(led), 8)]), 0)
        XCTAssertEqual(loop.executeAndWait { self.dev.statusFailed }, 1)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
    }

    func testReplayHookAnswersAnLedOnWithTheKnownSequence() throws {
        try start()
        loop.executeAndWait { self.fake.replayOnLed = true }
        let bufs = try post(16)
        // LED off: written back, no replay; LED on: the 14-event sequence, in order.
        XCTAssertEqual(try status([(statusBuffer(InputEvent(type: VirtioInput.evLed, code: 0, value: 0)), 8)]), 0)
        settle()
        XCTAssertNil(drv.queues[0].reap())
        XCTAssertEqual(try status([(statusBuffer(InputEvent(type: VirtioInput.evLed, code: 1, value: 1)), 8)]), 0)
        XCTAssertEqual(try reap(14, bufs), FakeInputSource.replaySequence)
        XCTAssertEqual(loop.executeAndWait { self.fake.replays }, 1)
    }

    // MARK: hostile event buffers

    func testHostileEventBuffers() throws {
        try start()
        let q = drv.queues[0]
        // Readable-only, too short, and zero-length-only chains: completed empty at once, never held.
        let r = drv.alloc(8)
        let cases: [([(UInt64, UInt32)], [(UInt64, UInt32)])] = [([(r, 8)], []), ([], [(drv.alloc(4), 4)]),
                                                                 ([(r, 8)], [(drv.alloc(7), 7)])]
        for (readable, writable) in cases {
            let h = try XCTUnwrap(q.addChain(readable: readable, writable: writable))
            q.submit(h)
            let u = try XCTUnwrap(q.waitUsed(timeoutMs: 2000))
            XCTAssertEqual(u.id, h); XCTAssertEqual(u.len, 0)
            q.recycle(h)
        }
        XCTAssertEqual(loop.executeAndWait { self.dev.badEventChains }, 3)
        // An event split over 3 + 5 bytes, and a 64-byte buffer (one event in its first 8 bytes).
        let a = drv.alloc(8), big = drv.alloc(64)
        memset(drv.host(big), 0xee, 64)
        let h1 = try XCTUnwrap(q.addChain(readable: [], writable: [(a, 3), (a + 3, 5)]))
        let h2 = try XCTUnwrap(q.addChain(readable: [(r, 8)], writable: [(big, 64)]))
        q.submit(h1); q.submit(h2)
        fake.inject([InputEvent(type: VirtioInput.evAbs, code: 0x35, value: -123456), syn])
        let u1 = try XCTUnwrap(q.waitUsed(timeoutMs: 2000)), u2 = try XCTUnwrap(q.waitUsed(timeoutMs: 2000))
        XCTAssertEqual([u1.id, u2.id], [h1, h2]); XCTAssertEqual([u1.len, u2.len], [8, 8])
        XCTAssertEqual(InputEvent(wire: UInt64(littleEndian: drv.host(a).loadUnaligned(as: UInt64.self))),
                       InputEvent(type: VirtioInput.evAbs, code: 0x35, value: -123456))
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: drv.host(big), count: 16)),
                       [0, 0, 0, 0, 0, 0, 0, 0] + [UInt8](repeating: 0xee, count: 8))
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
        // A head out of range on the event queue latches NEEDS_RESET like any queue; events stop, nothing crashes.
        q.setDescriptor(0, addr: a, len: 8, flags: 2, next: 0)
        q.pushAvail(999); q.publish(); q.kick()
        for _ in 0..<200 where drv.status & DeviceStatus.needsReset == 0 { usleep(1000) }
        XCTAssertNotEqual(drv.status & DeviceStatus.needsReset, 0)
        fake.inject([key(30, 1), syn])
        settle()
    }

    // MARK: unplug, reset, quiesce

    func testUnplugKeepsDeviceRunningAndDropsOpenGroup() throws {
        try start()
        let bufs = try post(16)
        fake.inject([key(30, 1)])
        settle()
        loop.executeAndWait { self.fake.unplug() }
        XCTAssertTrue(loop.executeAndWait { self.dev.sourceLost })
        XCTAssertEqual(loop.executeAndWait { self.dev.pendingEvents }, 0)
        // The driver side keeps working (config reads, status writes), and events flow again after replug.
        XCTAssertEqual(try cfg(VirtioInput.cfgIDDevids, 0).0, 8)
        loop.executeAndWait { self.fake.replug() }
        fake.inject([key(48, 1), syn])
        XCTAssertEqual(try reap(2, bufs), [key(48, 1), syn])
        XCTAssertEqual(loop.executeAndWait { self.dev.unplugs }, 1)
    }

    func testQuiesceCompletesHeldBuffersWithEmptyReports() throws {
        try start()
        let bufs = try post(3)
        settle()
        XCTAssertEqual(loop.executeAndWait { self.dev.heldBuffers }, 3)
        loop.executeAndWait { self.dev.quiesce() }
        XCTAssertEqual(try reap(3, bufs), [syn, syn, syn])
        XCTAssertEqual(loop.executeAndWait { self.dev.heldBuffers }, 0)
    }

    func testResetForgetsHeldBuffersAndPendingEvents() throws {
        try start()
        _ = try post(4)
        fake.inject([key(30, 1)])
        settle()
        drv.reset()
        XCTAssertEqual(loop.executeAndWait { self.dev.heldBuffers }, 0)
        XCTAssertEqual(loop.executeAndWait { self.dev.pendingEvents }, 0)
        try drv.start(queueSizes: [16, 8])
        let bufs = try post(4)
        fake.inject([key(2, 1), syn])
        XCTAssertEqual(try reap(2, bufs), [key(2, 1), syn])
    }

    // MARK: the simulated workload and the evdev encoding

    func testWorkloadRoundTrips() throws {
        try start(queueSizes: [16, 8])
        let w = try XCTUnwrap(InputWorkload(drv))
        for _ in 0..<500 { XCTAssertTrue(w.runOne(spinNs: 0)) }
        XCTAssertEqual(w.mismatches, 0)
        XCTAssertEqual(loop.executeAndWait { self.dev.eventsDelivered }, 1000)
    }

    func testEvdevIoctlNumbersMatchLinuxHeader() {
        // Values printed by a C program including <linux/input.h> on x86_64 (asm-generic _IOC).
        XCTAssertEqual(Evdev.getName(255), 0x80ff4506)
        XCTAssertEqual(Evdev.getID, 0x80084502)
        XCTAssertEqual(Evdev.getProp(128), 0x80804509)
        XCTAssertEqual(Evdev.getBit(VirtioInput.evKey, 128), 0x80804521)
        XCTAssertEqual(Evdev.getAbs(0x35), 0x80184575)
        XCTAssertEqual(Evdev.grab, 0x40044590)
        XCTAssertEqual(Evdev.getUniq(255), 0x80ff4508)
        XCTAssertEqual(Evdev.eventSize, 24)
    }

    func testEvdevSourceRefusesWhatIsNotAnEvdevNode() {
        XCTAssertThrowsError(try EvdevSource(path: "/dev/null", name: nil, grab: false)) { e in
            XCTAssertTrue("\(e)".contains("EVIOCGNAME"), "\(e)")
        }
        XCTAssertThrowsError(try EvdevSource(path: nil, name: "no such device", grab: false))
    }

    func testConfigKeys() throws {
        func parse(_ body: String) throws -> DaemonConfig {
            try DaemonConfig.parse(TOML.parse("[device.k]\ntype = \"input\"\n" + body, file: "t.conf"))
        }
        func expect(_ body: String, line: Int, _ needle: String, file: StaticString = #filePath, l: UInt = #line) {
            XCTAssertThrowsError(try parse(body), file: file, line: l) { e in
                guard let e = e as? ConfigError else { return XCTFail("\(e)", file: file, line: l) }
                XCTAssertEqual(e.line, line, "\(e)", file: file, line: l)
                XCTAssertTrue(e.description.contains(needle), "\(e)", file: file, line: l)
            }
        }
        expect("", line: 1, "exactly one of")
        expect("path = \"dev/input/event0\"\n", line: 3, "absolute")
        expect("path = \"/dev/input/event0\"\nname = \"kbd\"\n", line: 4, "exactly one of")
        expect("simulated = true\nname = \"kbd\"\n", line: 4, "exactly one of")
        expect("name = \"\"\n", line: 3, "1-255")
        expect("simulated = true\nqueue-size = 48\n", line: 4, "power of two")
        expect("simulated = true\nqueue-size = 2048\n", line: 4, "between 2 and 1024")
        expect("simulated = true\ngrab = 1\n", line: 4, "boolean")
        expect("backend = \"vhost-user:/s.sock\"\npath = \"/dev/input/event0\"\n", line: 4, "forwarded")
        expect("simulated = true\nfoo = 1\n", line: 4, "unknown key")
        expect("path = \"/dev/input/event0\"\nsimulated-replay = true\n", line: 4, "needs simulated = true")
        XCTAssertNoThrow(try parse("simulated = true\nsimulated-replay = true\n"))
        let c = try parse("simulated = true\nqueue-size = 32\n")
        XCTAssertEqual(c.devices[0].shape, DeviceShape(deviceID: 18, queueSizes: [32, 32], configSize: 136))
        let f = try parse("backend = \"vhost-user:/s.sock\"\n")
        XCTAssertEqual(f.devices[0].shape, DeviceShape(deviceID: 18, queueSizes: [64, 64], configSize: 136))
        let p = try parse("path = \"/dev/input/event3\"\ngrab = true\n")
        XCTAssertThrowsError(try p.devices[0].make())   // no such node here: a start-up error, not a --check error
    }
}
