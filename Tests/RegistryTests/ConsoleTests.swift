import XCTest
import Glibc
@testable import Registry
import Transport
import CLinux

/// virtio-console on the fake endpoint: data both ways in order under back-pressure, multiport control, port
/// open/close, and every driver-controlled control field validated.
final class ConsoleTests: XCTestCase {
    var loop: EventLoop!
    var host: DeviceHost!
    var dev: ConsoleDevice!
    var drv: SimDriver!

    override func tearDown() { loop?.stopAndJoin() }

    /// Starts a console with `ports` on a simulated driver (`multiport`: all queues, MULTIPORT accepted).
    func start(_ ports: [ConsolePortConfig], multiport: Bool, queueSize: UInt16 = 64) throws {
        loop = try EventLoop()
        host = DeviceHost(loop: loop)
        dev = ConsoleDevice(ports: ports, queueSize: queueSize)
        let i = host.add(name: "con0", device: dev)
        loop.startThread()
        drv = try SimDriver(host: host, index: i, ramSize: 16 << 20)
        if multiport { try drv.start() } else {
            try drv.start(accept: { $0.subtracting(VirtioConsole.fMultiport) }, queueCount: 2)
        }
    }
    func onLoop<T>(_ f: @escaping () -> T) -> T { loop.executeAndWait(f) }
    func bytes(_ gpa: UInt64, _ n: Int) -> [UInt8] { Array(UnsafeRawBufferPointer(start: drv.host(gpa), count: n)) }
    func pattern(_ n: Int, seed: UInt64) -> [UInt8] {
        var s = seed, out = [UInt8](repeating: 0, count: n)
        for i in 0..<n { s = s &* 6364136223846793005 &+ 1442695040888963407; out[i] = UInt8(truncatingIfNeeded: s >> 33) }
        return out
    }

    // MARK: data path

    /// 1 MiB each way, at the same time, through a slow reader (random room) and few receive buffers: both arrive
    /// byte-identical, the port stalls (parks a chain) instead of dropping or blocking.
    func testOneMiBEachWayUnderBackPressureIsByteIdentical() throws {
        let fake = FakeConsoleEndpoint(capacity: 2 << 20, writeRoom: 0)
        try start([ConsolePortConfig(id: 0, isConsole: true, endpoint: fake)], multiport: false)
        let rxq = drv.queues[0], txq = drv.queues[1]
        let out = pattern(1 << 20, seed: 1), inn = pattern(1 << 20, seed: 2)
        // Host → driver: all of it queued at the host side at once; the driver has 8 buffers of 3000 bytes.
        _ = onLoop { inn.withUnsafeBytes { fake.feed($0) } }
        var rxBufs: [UInt16: UInt64] = [:]
        for _ in 0..<8 {
            let b = drv.alloc(3000)
            let h = try XCTUnwrap(rxq.addChain(readable: [], writable: [(b, 1000), (b + 1000, 2000)]))
            rxBufs[h] = b
            rxq.submit(h)
        }
        var received: [UInt8] = [], written: [UInt8] = []
        var sent = 0, inFlight: [UInt16: Int] = [:], stalls = 0
        var rng = SplitMix(state: 7)
        let deadline = lb_now_ns() + 60_000_000_000
        while (received.count < inn.count || written.count < out.count) && lb_now_ns() < deadline {
            // Driver: keep up to 16 transmit chains of up to 5000 bytes (two segments) in flight.
            while sent < out.count && inFlight.count < 16 {
                let n = min(out.count - sent, 1 + Int(rng.next() % 5000))
                let b = drv.alloc(n)
                out.withUnsafeBytes { drv.host(b).copyMemory(from: $0.baseAddress! + sent, byteCount: n) }
                let cut = n / 2
                let segs: [(UInt64, UInt32)] = cut > 0 ? [(b, UInt32(cut)), (b + UInt64(cut), UInt32(n - cut))] : [(b, UInt32(n))]
                let h = try XCTUnwrap(txq.addChain(readable: segs, writable: []))
                inFlight[h] = n
                txq.submit(h)
                sent += n
            }
            // Host: a slow reader takes what came and opens a little room.
            let (got, stalled) = onLoop { () -> ([UInt8], Bool) in
                let s = self.dev.portState(0)!.stalled
                let o = fake.takeOutput()
                fake.setRoom(Int(rng.next() % 20000))
                return (o, s)
            }
            if stalled { stalls += 1 }
            written += got
            while let u = txq.reap() { XCTAssertNotNil(inFlight.removeValue(forKey: u.id)); txq.recycle(u.id) }
            while let u = rxq.reap() {
                let b = try XCTUnwrap(rxBufs[u.id])
                received += bytes(b, Int(u.len))
                rxq.submit(u.id)
            }
        }
        XCTAssertEqual(written.count, out.count)
        XCTAssertTrue(written == out, "driver → host bytes differ")
        XCTAssertEqual(received.count, inn.count)
        XCTAssertTrue(received == inn, "host → driver bytes differ")
        XCTAssertGreaterThan(stalls, 0, "the slow reader never stalled the port")
        XCTAssertGreaterThan(fake.writeBlocks, 0)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
        let s = onLoop { self.dev.stats }
        XCTAssertEqual(s.droppedBytes, 0)
        XCTAssertEqual(s.bytesFromDriver, UInt64(out.count))
        XCTAssertEqual(s.bytesToDriver, UInt64(inn.count))
    }

    /// Linux's hvc writer waits for each transmit chain with the hvc lock held, and the receive interrupt (run
    /// synchronously in the device's thread over virtio-loopback) takes that lock: while a console port's output
    /// is parked on a full endpoint, no input is completed (it waits at the endpoint); when the output goes out,
    /// the input follows, byte-identical.
    func testConsoleInputWaitsWhileItsOutputIsParked() throws {
        let fake = FakeConsoleEndpoint(writeRoom: 0)
        try start([ConsolePortConfig(id: 0, isConsole: true, endpoint: fake)], multiport: false)
        let rxq = drv.queues[0], txq = drv.queues[1]
        let b = drv.alloc(4096)
        let rh = try XCTUnwrap(rxq.addChain(readable: [], writable: [(b, 4096)]))
        rxq.submit(rh)
        // One put_chars: the endpoint is full, the chain parks.
        let out = pattern(300, seed: 3), inn = pattern(200, seed: 4)
        let t = drv.alloc(300)
        out.withUnsafeBytes { drv.host(t).copyMemory(from: $0.baseAddress!, byteCount: 300) }
        let th = try XCTUnwrap(txq.addChain(readable: [(t, 300)], writable: []))
        txq.submit(th)
        XCTAssertTrue(wait { self.onLoop { self.dev.portState(0)!.heldTx } == 1 })
        _ = onLoop { fake.feed(inn) }
        usleep(50_000)
        XCTAssertNil(rxq.reap(), "input completed while the console's output was parked")
        XCTAssertEqual(onLoop { fake.pendingInput }, 200)
        // Room: the output goes, then the input.
        onLoop { fake.setRoom(Int.max) }
        var tu = txq.reap()
        XCTAssertTrue(wait { tu = tu ?? txq.reap(); return tu != nil })
        XCTAssertEqual(tu?.id, th)
        XCTAssertEqual(onLoop { fake.takeOutput() }, out)
        var u = rxq.reap()
        let deadline = lb_now_ns() + 5_000_000_000
        while u == nil && lb_now_ns() < deadline { usleep(1000); u = rxq.reap() }
        let ru = try XCTUnwrap(u)
        XCTAssertEqual(ru.id, rh)
        XCTAssertEqual(bytes(b, Int(ru.len)), inn)
    }
    func wait(_ f: () -> Bool) -> Bool {
        let deadline = lb_now_ns() + 5_000_000_000
        while !f() { if lb_now_ns() > deadline { return false }; usleep(1000) }
        return true
    }

    /// Echo endpoint: what the driver writes comes back in its receive buffer, request after request, in order.
    func testEchoRoundTrips() throws {
        try start([ConsolePortConfig(id: 0, isConsole: true, endpoint: FakeConsoleEndpoint(echo: true))], multiport: false)
        let w = try XCTUnwrap(ConsoleWorkload(drv, verify: true))
        for _ in 0..<500 { XCTAssertTrue(w.runOne(spinNs: 0)) }
    }

    /// EMERG_WRITE: a config write of emerg_wr puts its character on port 0's endpoint.
    func testEmergencyWrite() throws {
        let fake = FakeConsoleEndpoint()
        try start([ConsolePortConfig(id: 0, isConsole: true, endpoint: fake)], multiport: false)
        XCTAssertTrue(drv.features.contains(VirtioConsole.fEmergWrite))
        XCTAssertTrue(drv.writeConfig(offset: 8, bytes: [0x41, 0, 0, 0]))
        XCTAssertTrue(drv.writeConfig(offset: 8, bytes: [0x42]))
        XCTAssertEqual(onLoop { fake.takeOutput() }, [0x41, 0x42])
        // max_nr_ports reads 1; cols/rows of a fake without a size 0.
        XCTAssertEqual(drv.readConfig(offset: 0, count: 12), [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    }

    // MARK: multiport

    /// The driver's side of the control queues, as Linux's virtio_console drives them.
    final class Control {
        let t: ConsoleTests
        var bufs: [UInt16: UInt64] = [:]
        init(_ t: ConsoleTests, buffers: Int = 32, size: UInt32 = 256) throws {
            self.t = t
            let q = t.drv.queues[VirtioConsole.controlRx]
            for _ in 0..<buffers {
                let b = t.drv.alloc(Int(size))
                let h = try XCTUnwrap(q.addChain(readable: [], writable: [(b, size)]))
                bufs[h] = b
                q.submit(h)
            }
        }
        /// Sends one driver → device message of raw bytes and waits until the device took it.
        func sendRaw(_ m: [UInt8]) {
            let q = t.drv.queues[VirtioConsole.controlTx]
            let b = t.drv.alloc(max(m.count, 1))
            m.withUnsafeBytes { if !m.isEmpty { t.drv.host(b).copyMemory(from: $0.baseAddress!, byteCount: m.count) } }
            let h = q.addChain(readable: [(b, UInt32(max(m.count, 1)))], writable: [])!
            q.submit(h)
            let u = q.waitUsed(timeoutMs: 2000)
            XCTAssertEqual(u?.id, h)
            q.recycle(h)
        }
        func send(_ id: UInt32, _ e: VirtioConsole.Event, _ v: UInt16) { sendRaw(Control.encode(id, e.rawValue, v)) }
        static func encode(_ id: UInt32, _ e: UInt16, _ v: UInt16) -> [UInt8] {
            withUnsafeBytes(of: id.littleEndian, Array.init) + withUnsafeBytes(of: e.littleEndian, Array.init) + withUnsafeBytes(of: v.littleEndian, Array.init)
        }
        /// Device → driver messages received within `ms` (id, event, value, payload).
        func receive(expect n: Int, ms: Int32 = 2000) -> [(UInt32, UInt16, UInt16, [UInt8])] {
            let q = t.drv.queues[VirtioConsole.controlRx]
            var out: [(UInt32, UInt16, UInt16, [UInt8])] = []
            while out.count < n, let u = q.waitUsed(timeoutMs: ms) {
                let b = bufs[u.id]!
                let m = t.bytes(b, Int(u.len))
                XCTAssertGreaterThanOrEqual(m.count, 8)
                out.append((m[0..<4].withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) },
                            m[4..<6].withUnsafeBytes { $0.loadUnaligned(as: UInt16.self) },
                            m[6..<8].withUnsafeBytes { $0.loadUnaligned(as: UInt16.self) }, Array(m[8...])))
                q.submit(u.id)
            }
            return out
        }
    }

    func testMultiportHandshakeNamesAndOpenClose() throws {
        let con = FakeConsoleEndpoint(), a = FakeConsoleEndpoint(), b = FakeConsoleEndpoint(connected: false)
        try start([ConsolePortConfig(id: 0, isConsole: true, endpoint: con),
                   ConsolePortConfig(id: 1, name: "org.test.a", isConsole: false, endpoint: a),
                   ConsolePortConfig(id: 2, name: "org.test.b", isConsole: false, endpoint: b)], multiport: true)
        XCTAssertEqual(drv.queues.count, 8)
        XCTAssertEqual(drv.readConfig(offset: 4, count: 4), [3, 0, 0, 0])
        let c = try Control(self)
        c.send(0, .deviceReady, 1)
        let adds = c.receive(expect: 3)
        XCTAssertEqual(adds.map(\.0), [0, 1, 2])
        XCTAssertTrue(adds.allSatisfy { $0.1 == VirtioConsole.Event.portAdd.rawValue })
        for id in UInt32(0)..<3 { c.send(id, .portReady, 1) }
        let m = c.receive(expect: 6)
        func ev(_ e: VirtioConsole.Event) -> UInt16 { e.rawValue }
        XCTAssertEqual(m.map { "\($0.0):\($0.1):\($0.2)" },
                       ["0:\(ev(.consolePort)):1", "0:\(ev(.portOpen)):1", "1:\(ev(.portName)):1", "1:\(ev(.portOpen)):1",
                        "2:\(ev(.portName)):1", "2:\(ev(.portOpen)):0"])
        XCTAssertEqual(Array(m[2].3.prefix { $0 != 0 }), Array("org.test.a".utf8))
        XCTAssertEqual(Array(m[4].3.prefix { $0 != 0 }), Array("org.test.b".utf8))

        // Port 1: host data waits until a process in the driver's OS opens the port (Linux would discard it).
        let rq1 = drv.queues[VirtioConsole.rxQueue(1)]
        let rb = drv.alloc(64)
        let rh = try XCTUnwrap(rq1.addChain(readable: [], writable: [(rb, 64)]))
        rq1.submit(rh)
        _ = onLoop { a.feed([1, 2, 3]) }
        XCTAssertNil(rq1.waitUsed(timeoutMs: 100))
        c.send(1, .portOpen, 1)
        let u = try XCTUnwrap(rq1.waitUsed(timeoutMs: 2000))
        XCTAssertEqual(bytes(rb, Int(u.len)), [1, 2, 3])

        // Port 2 has no host client: its output is held (not dropped) and reaches the client that connects.
        let tq2 = drv.queues[VirtioConsole.txQueue(2)]
        let tb = drv.alloc(5)
        drv.host(tb).copyMemory(from: [UInt8]([9, 8, 7, 6, 5]), byteCount: 5)
        let th = try XCTUnwrap(tq2.addChain(readable: [(tb, 5)], writable: []))
        tq2.submit(th)
        XCTAssertNil(tq2.waitUsed(timeoutMs: 100))
        XCTAssertEqual(onLoop { self.dev.portState(2)!.heldTx }, 1)
        onLoop { b.setConnected(true) }
        XCTAssertEqual(tq2.waitUsed(timeoutMs: 2000)?.id, th)
        XCTAssertEqual(onLoop { b.takeOutput() }, [9, 8, 7, 6, 5])
        XCTAssertEqual(c.receive(expect: 1).map { "\($0.0):\($0.1):\($0.2)" }, ["2:\(ev(.portOpen)):1"])

        // Port 1's client leaves: PORT_OPEN 0.
        onLoop { a.setConnected(false) }
        XCTAssertEqual(c.receive(expect: 1).map { "\($0.0):\($0.1):\($0.2)" }, ["1:\(ev(.portOpen)):0"])

        // The console port without a client drops its output (counted) instead of hanging hvc writers.
        onLoop { con.setConnected(false) }
        _ = c.receive(expect: 1)
        let tq0 = drv.queues[VirtioConsole.txQueue(0)]
        let h0 = try XCTUnwrap(tq0.addChain(readable: [(tb, 5)], writable: []))
        tq0.submit(h0)
        XCTAssertEqual(tq0.waitUsed(timeoutMs: 2000)?.id, h0)
        XCTAssertEqual(onLoop { self.dev.stats.droppedBytes }, 5)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
    }

    /// Malformed control messages are dropped and counted; the queue keeps working; no NEEDS_RESET.
    func testMalformedControlMessagesAreDroppedAndCounted() throws {
        // Ports 0 and 2 (1 is a gap): max_nr_ports 3.
        try start([ConsolePortConfig(id: 0, isConsole: true, endpoint: FakeConsoleEndpoint()),
                   ConsolePortConfig(id: 2, name: "x", isConsole: false, endpoint: FakeConsoleEndpoint())], multiport: true)
        let c = try Control(self)
        c.sendRaw([1, 2, 3, 4])                                             // too short
        c.sendRaw(Control.encode(0, 99, 1))                                 // unknown event
        c.sendRaw(Control.encode(0, VirtioConsole.Event.portAdd.rawValue, 1))   // device-only event
        c.sendRaw(Control.encode(1000, VirtioConsole.Event.portReady.rawValue, 1))  // id out of range
        c.sendRaw(Control.encode(UInt32.max, VirtioConsole.Event.portOpen.rawValue, 1))
        c.sendRaw(Control.encode(1, VirtioConsole.Event.portReady.rawValue, 1))     // port not added
        c.sendRaw(Control.encode(0, VirtioConsole.Event.portOpen.rawValue, 2))      // value not 0/1
        let s = onLoop { self.dev.stats }
        XCTAssertEqual(s.badControl, 7)
        XCTAssertEqual(s.badControlByReason[.tooShort], 1)
        XCTAssertEqual(s.badControlByReason[.unknownEvent], 1)
        XCTAssertEqual(s.badControlByReason[.deviceOnlyEvent], 1)
        XCTAssertEqual(s.badControlByReason[.portOutOfRange], 2)
        XCTAssertEqual(s.badControlByReason[.portNotConfigured], 1)
        XCTAssertEqual(s.badControlByReason[.badValue], 1)
        XCTAssertEqual(c.receive(expect: 1, ms: 100).count, 0, "a malformed message produced a reply")
        // Still working.
        c.send(0, .deviceReady, 1)
        XCTAssertEqual(c.receive(expect: 2).map(\.0), [0, 2])
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
    }

    /// Chains a hostile driver puts where they do not belong complete empty, counted; nothing latches.
    func testHostileChainsCompleteEmpty() throws {
        try start([ConsolePortConfig(id: 0, isConsole: true, endpoint: FakeConsoleEndpoint()),
                   ConsolePortConfig(id: 2, name: "x", isConsole: false, endpoint: FakeConsoleEndpoint())], multiport: true,
                  queueSize: 128)
        let b = drv.alloc(4096)
        // A queue of port 1, which the device did not add.
        let q1 = drv.queues[VirtioConsole.rxQueue(1)]
        let h1 = try XCTUnwrap(q1.addChain(readable: [], writable: [(b, 64)]))
        q1.submit(h1)
        XCTAssertEqual(q1.waitUsed(timeoutMs: 2000)?.len, 0)
        // A control receive buffer shorter than a message.
        let cq = drv.queues[VirtioConsole.controlRx]
        let hc = try XCTUnwrap(cq.addChain(readable: [], writable: [(b, 4)]))
        cq.submit(hc)
        XCTAssertEqual(cq.waitUsed(timeoutMs: 2000)?.len, 0)
        // A receive chain with nothing writable.
        let r0 = drv.queues[0]
        let hr = try XCTUnwrap(r0.addChain(readable: [(b, 16)], writable: []))
        r0.submit(hr)
        XCTAssertEqual(r0.waitUsed(timeoutMs: 2000)?.len, 0)
        // A receive chain with more segments than the device holds (65 × 1 byte).
        let segs = (0..<65).map { (b + UInt64($0), UInt32(1)) }
        let hf = try XCTUnwrap(r0.addChain(readable: [], writable: segs))
        r0.submit(hf)
        XCTAssertEqual(r0.waitUsed(timeoutMs: 2000)?.len, 0)
        XCTAssertEqual(onLoop { self.dev.stats.badChains }, 4)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
    }

    /// Reset forgets held chains; a restarted driver works.
    func testResetAndRestart() throws {
        let fake = FakeConsoleEndpoint(writeRoom: 0)
        try start([ConsolePortConfig(id: 0, isConsole: true, endpoint: fake)], multiport: false)
        let tq = drv.queues[1]
        let b = drv.alloc(16)
        tq.submit(try XCTUnwrap(tq.addChain(readable: [(b, 16)], writable: [])))
        XCTAssertNil(tq.waitUsed(timeoutMs: 100))
        XCTAssertEqual(onLoop { self.dev.portState(0)!.heldTx }, 1)
        drv.reset()
        XCTAssertEqual(onLoop { self.dev.portState(0)!.heldTx }, 0)
        onLoop { fake.setRoom(Int.max) }
        try drv.start(accept: { $0.subtracting(VirtioConsole.fMultiport) }, queueCount: 2)
        let tq2 = drv.queues[1]
        let b2 = drv.alloc(3)
        drv.host(b2).copyMemory(from: [UInt8]([1, 2, 3]), byteCount: 3)
        tq2.submit(try XCTUnwrap(tq2.addChain(readable: [(b2, 3)], writable: [])))
        XCTAssertNotNil(tq2.waitUsed(timeoutMs: 2000))
        XCTAssertEqual(onLoop { fake.takeOutput() }, [1, 2, 3])
    }

    // MARK: pure decoders and config

    func testControlDecoder() {
        func d(_ b: [UInt8], ports: Int = 4) -> Result<ConsoleDriverControl, ConsoleControlError> {
            b.withUnsafeBytes { ConsoleDriverControl.decode($0, maxPorts: ports, configured: { $0 != 1 }) }
        }
        typealias C = ConsoleTests.Control
        XCTAssertEqual(d(C.encode(7, 0, 1)), .success(.deviceReady(ok: true)))
        XCTAssertEqual(d(C.encode(3, 3, 0)), .success(.portReady(port: 3, ok: false)))
        XCTAssertEqual(d(C.encode(2, 6, 1) + [1, 2, 3]), .success(.portOpen(port: 2, open: true)))
        XCTAssertEqual(d(C.encode(4, 6, 1)), .failure(.portOutOfRange))
        XCTAssertEqual(d(C.encode(1, 6, 1)), .failure(.portNotConfigured))
        XCTAssertEqual(d(C.encode(0, 8, 1)), .failure(.unknownEvent))
        XCTAssertEqual(d(C.encode(0, 0xffff, 1)), .failure(.unknownEvent))
        for e: UInt16 in [1, 2, 4, 5, 7] { XCTAssertEqual(d(C.encode(0, e, 1)), .failure(.deviceOnlyEvent)) }
        XCTAssertEqual(d(C.encode(0, 6, 0xffff)), .failure(.badValue))
        XCTAssertEqual(d(Array(C.encode(0, 0, 1).prefix(7))), .failure(.tooShort))
        XCTAssertEqual(d([]), .failure(.tooShort))
        // Random bytes never trap.
        var r = SplitMix(state: 3)
        for _ in 0..<20000 {
            let n = Int(r.next() % 16)
            _ = d((0..<n).map { _ in UInt8(truncatingIfNeeded: r.next()) }, ports: Int(r.next() % 40))
        }
    }

    private func parse(_ text: String) throws(ConfigError) -> DaemonConfig {
        try DaemonConfig.parse(TOML.parse(text, file: "c.conf"))
    }

    func testConfigShapesAndErrors() throws {
        let c = try parse("""
            [daemon]
            transport = "sim"
            [device.con0]
            type = "console"
            console = "pty:/run/con0"
            ports = ["org.agl.log=unix:/run/log.sock", "org.agl.trace=file:/var/log/t.log"]
            queue-size = 128
            [device.con1]
            type = "console"
            backend = "vhost-user:/run/c.sock"
            """)
        XCTAssertEqual(c.devices[0].shape, DeviceShape(deviceID: 3, queueSizes: Array(repeating: 128, count: 8), configSize: 12))
        XCTAssertEqual(c.devices[1].shape, DeviceShape(deviceID: 3, queueSizes: Array(repeating: 256, count: 4), configSize: 12))
        func fails(_ body: String, line: Int, key: String, _ needle: String, l: UInt = #line) {
            do { _ = try parse("[device.c]\ntype = \"console\"\n" + body); XCTFail("accepted", line: l) } catch {
                XCTAssertEqual(error.line, line, "\(error)", line: l)
                XCTAssertTrue("\(error)".contains("c.conf"), "\(error)", line: l)
                XCTAssertTrue("\(error)".contains(key), "\(error)", line: l)
                XCTAssertTrue("\(error)".contains(needle), "\(error)", line: l)
            }
        }
        fails("", line: 1, key: "console", "needs a port")
        fails("console = \"serial\"\n", line: 3, key: "console", "unknown endpoint")
        fails("console = \"unix:relative\"\n", line: 3, key: "console", "absolute")
        fails("ports = [\"noname\"]\n", line: 3, key: "ports", "NAME=ENDPOINT")
        fails("ports = [\"bad name=pty\"]\n", line: 3, key: "ports", "port name")
        fails("ports = [\"a=pty\", \"a=stdio\"]\n", line: 3, key: "ports", "used twice")
        fails("console = \"stdio\"\nports = [\"a=stdio\"]\n", line: 4, key: "ports", "stdio")
        fails("console = \"unix:/x\"\nports = [\"a=unix:/x\"]\n", line: 4, key: "ports", "used by two ports")
        fails("console = \"pty\"\nqueues = 4\n", line: 4, key: "queues", "only for a forwarded")
        fails("console = \"pty\"\nqueue-size = 3\n", line: 4, key: "queue-size", "power of two")
        fails("backend = \"vhost-user:/s\"\nconsole = \"pty\"\n", line: 4, key: "console", "back-end")
        fails("ports = [1]\n", line: 3, key: "ports", "array of strings")
    }

    // MARK: real endpoints

    /// A pty endpoint moves bytes unchanged both ways (raw mode) and reports the terminal size.
    func testPtyEndpointRoundTripAndSize() throws {
        let link = "/tmp/loopbackd-con-test-\(getpid())"
        let pty = try PtyEndpoint(link: link)
        defer { unlink(link) }
        var st = stat()
        XCTAssertEqual(lstat(link, &st), 0)
        try start([ConsolePortConfig(id: 0, isConsole: true, endpoint: pty)], multiport: false)
        let s = open(link, O_RDWR | O_NOCTTY)
        XCTAssertGreaterThanOrEqual(s, 0)
        defer { close(s) }
        var ws = winsize(ws_row: 42, ws_col: 132, ws_xpixel: 0, ws_ypixel: 0)
        XCTAssertEqual(ioctl(s, 0x5414, &ws), 0)
        XCTAssertEqual(pty.windowSize?.cols, 132)
        XCTAssertEqual(pty.windowSize?.rows, 42)
        let w = try XCTUnwrap(ConsoleWorkload(drv, verify: true))
        for _ in 0..<200 { XCTAssertTrue(w.runOne(spinNs: 0)) }
        // Bytes a terminal would mangle (CR, LF, ^C, ^D, 0xff) pass unchanged.
        let tq = drv.queues[1]
        let b = drv.alloc(6)
        let raw: [UInt8] = [13, 10, 3, 4, 0xff, 0]
        drv.host(b).copyMemory(from: raw, byteCount: 6)
        tq.submit(try XCTUnwrap(tq.addChain(readable: [(b, 6)], writable: [])))
        var got = [UInt8](repeating: 0, count: 6), n = 0
        while n < 6 { let k = read(s, &got[n], 6 - n); XCTAssertGreaterThan(k, 0); if k <= 0 { break }; n += k }
        XCTAssertEqual(got, raw)
        // F_SIZE: config cols/rows follow the pty (refreshed every second).
        var cfg: [UInt8]? = nil
        for _ in 0..<30 { cfg = drv.readConfig(offset: 0, count: 4); if cfg == [132, 0, 42, 0] { break }; usleep(100_000) }
        XCTAssertEqual(cfg, [132, 0, 42, 0])
    }

    /// A unix socket endpoint: one client at a time; its departure stops the port, the next client gets held output.
    func testUnixEndpointClientsComeAndGo() throws {
        let path = "/tmp/loopbackd-con-\(getpid()).sock"
        let ep = try UnixEndpoint(path: path)
        try start([ConsolePortConfig(id: 0, isConsole: false, endpoint: ep),
                   ConsolePortConfig(id: 1, name: "n", isConsole: false, endpoint: FakeConsoleEndpoint())], multiport: true)
        let c = try Control(self)
        c.send(0, .deviceReady, 1)
        _ = c.receive(expect: 2)
        c.send(0, .portReady, 1)
        XCTAssertEqual(c.receive(expect: 1).map { "\($0.1):\($0.2)" }, ["\(VirtioConsole.Event.portOpen.rawValue):0"])
        c.send(0, .portOpen, 1)
        let cl = lb_unix_connect(path, 0)
        XCTAssertGreaterThanOrEqual(cl, 0)
        XCTAssertEqual(c.receive(expect: 1).map { "\($0.1):\($0.2)" }, ["\(VirtioConsole.Event.portOpen.rawValue):1"])
        let second = lb_unix_connect(path, 0)
        var one: UInt8 = 0
        XCTAssertEqual(read(second, &one, 1), 0, "a second client is refused")
        close(second)
        // Both ways.
        let rq = drv.queues[0], tq = drv.queues[1]
        let rb = drv.alloc(64), tb = drv.alloc(4)
        rq.submit(try XCTUnwrap(rq.addChain(readable: [], writable: [(rb, 64)])))
        XCTAssertEqual(write(cl, "hello", 5), 5)
        let u = try XCTUnwrap(rq.waitUsed(timeoutMs: 2000))
        XCTAssertEqual(bytes(rb, Int(u.len)), Array("hello".utf8))
        drv.host(tb).copyMemory(from: Array("ping".utf8), byteCount: 4)
        let th = try XCTUnwrap(tq.addChain(readable: [(tb, 4)], writable: []))
        tq.submit(th)
        XCTAssertNotNil(tq.waitUsed(timeoutMs: 2000))
        var got = [UInt8](repeating: 0, count: 4)
        XCTAssertEqual(read(cl, &got, 4), 4)
        XCTAssertEqual(got, Array("ping".utf8))
        close(cl)
        XCTAssertEqual(c.receive(expect: 1).map { "\($0.1):\($0.2)" }, ["\(VirtioConsole.Event.portOpen.rawValue):0"])
        // Output while nobody listens waits for the next client.
        tq.recycle(th)
        let th2 = try XCTUnwrap(tq.addChain(readable: [(tb, 4)], writable: []))
        tq.submit(th2)
        XCTAssertNil(tq.waitUsed(timeoutMs: 100))
        let cl2 = lb_unix_connect(path, 0)
        defer { close(cl2) }
        XCTAssertEqual(tq.waitUsed(timeoutMs: 2000)?.id, th2)
        XCTAssertEqual(read(cl2, &got, 4), 4)
        XCTAssertEqual(got, Array("ping".utf8))
    }
}
