import XCTest
import Glibc
@testable import Registry
import Transport
import CLinux

/// The simulated driver's side of virtio-vsock, for the unit tests: receive buffers posted once and recycled,
/// one transmit buffer pool, packets built from `VsockHeader`.
final class VsockTestDriver {
    let drv: SimDriver
    let rx: SimQueue, tx: SimQueue, ev: SimQueue
    var rxBufs: [UInt16: UInt64] = [:]
    let bufSize: Int
    var txFree: [UInt64] = []
    var txInFlight: [UInt16: UInt64] = [:]
    static let cid: UInt64 = 3

    init(_ drv: SimDriver, rxBuffers: Int = 32, bufSize: Int = 4096, split: Bool = true) throws {
        self.drv = drv
        rx = drv.queues[0]; tx = drv.queues[1]; ev = drv.queues[2]
        self.bufSize = bufSize
        for _ in 0..<rxBuffers {
            let b = drv.alloc(VirtioVsock.headerSize + bufSize)
            let w: [(UInt64, UInt32)] = split ? [(b, UInt32(VirtioVsock.headerSize)), (b + UInt64(VirtioVsock.headerSize), UInt32(bufSize))]
                                              : [(b, UInt32(VirtioVsock.headerSize + bufSize))]
            let h = try XCTUnwrap(rx.addChain(readable: [], writable: w))
            rxBufs[h] = b
            rx.submit(h)
        }
        for _ in 0..<64 { txFree.append(drv.alloc(VirtioVsock.headerSize + 8192)) }
    }

    func header(_ op: VirtioVsock.Op, src: UInt32, dst: UInt32, len: UInt32 = 0, flags: UInt32 = 0,
                bufAlloc: UInt32 = 1 << 20, fwdCnt: UInt32 = 0) -> VsockHeader {
        VsockHeader(srcCID: Self.cid, dstCID: VirtioVsock.hostCID, srcPort: src, dstPort: dst, len: len, op: op,
                    flags: flags, bufAlloc: bufAlloc, fwdCnt: fwdCnt)
    }

    /// Makes a packet available (header and payload in two descriptors); completes finished ones first.
    @discardableResult
    func post(_ h: VsockHeader, _ payload: [UInt8] = [], extra: Int = 0) -> UInt16? {
        reapTX()
        while txFree.isEmpty { guard let u = tx.waitUsed(timeoutMs: 5000) else { return nil }; finish(u.id) }
        let b = txFree.removeLast()
        h.store(to: drv.host(b))
        payload.withUnsafeBytes { if $0.count > 0 { (drv.host(b) + VirtioVsock.headerSize).copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
        let n = payload.count + extra
        let parts: [(UInt64, UInt32)] = n == 0 ? [(b, UInt32(VirtioVsock.headerSize))]
            : [(b, UInt32(VirtioVsock.headerSize)), (b + UInt64(VirtioVsock.headerSize), UInt32(n))]
        guard let head = tx.addChain(readable: parts, writable: []) else { txFree.append(b); return nil }
        txInFlight[head] = b
        tx.submit(head)
        return head
    }
    /// Posts and waits until the device completed it.
    func send(_ h: VsockHeader, _ payload: [UInt8] = []) {
        guard let head = post(h, payload) else { return XCTFail("no TX descriptor") }
        while txInFlight[head] != nil { guard let u = tx.waitUsed(timeoutMs: 5000) else { return XCTFail("TX completion") }; finish(u.id) }
    }
    func reapTX() { while let u = tx.reap() { finish(u.id) } }
    private func finish(_ head: UInt16) {
        if let b = txInFlight.removeValue(forKey: head) { txFree.append(b) }
        tx.recycle(head)
    }

    /// The next packet (any op), its payload; the buffer goes back to the device.
    func receive(timeoutMs: Int32 = 5000) -> (VsockHeader, [UInt8])? {
        guard let u = rx.waitUsed(timeoutMs: timeoutMs), let b = rxBufs[u.id] else { return nil }
        let h = VsockHeader(from: drv.host(b))
        XCTAssertLessThanOrEqual(VirtioVsock.headerSize + Int(h.len), Int(u.len))
        let p = Array(UnsafeRawBufferPointer(start: drv.host(b) + VirtioVsock.headerSize, count: min(Int(h.len), bufSize)))
        rx.submit(u.id)
        return (h, p)
    }
    /// The next packet with op `op` (others skipped).
    func receive(op: VirtioVsock.Op, timeoutMs: Int32 = 5000) -> VsockHeader? {
        while let (h, _) = receive(timeoutMs: timeoutMs) { if h.op == op.rawValue { return h } }
        return nil
    }
    /// The next packet that is not a credit update/request.
    func receiveControl(timeoutMs: Int32 = 5000) -> VsockHeader? {
        while let (h, _) = receive(timeoutMs: timeoutMs) {
            if h.op == VirtioVsock.Op.creditUpdate.rawValue || h.op == VirtioVsock.Op.creditRequest.rawValue { continue }
            return h
        }
        return nil
    }
}

/// virtio-vsock on the fake host side: connections both ways, data both ways byte-identical under back-pressure,
/// credit accounting, RST and shutdown, many connections, reset, and every driver-controlled field validated.
final class VsockTests: XCTestCase {
    var loop: EventLoop!
    var host: DeviceHost!
    var dev: VsockDevice!
    var fake: FakeVsockHost!
    var drv: SimDriver!
    var d: VsockTestDriver!

    override func tearDown() { loop?.stopAndJoin() }

    func start(listening: Set<UInt32> = [1234], queueSize: UInt16 = 256, bufAlloc: UInt32 = 256 << 10,
               rxBuffers: Int = 32, bufSize: Int = 4096) throws {
        loop = try EventLoop()
        host = DeviceHost(loop: loop)
        fake = FakeVsockHost(listening: listening)
        dev = VsockDevice(guestCID: 3, host: fake, queueSize: queueSize, bufAlloc: bufAlloc, maxConnections: 128)
        let i = host.add(name: "vsock0", device: dev)
        loop.startThread()
        drv = try SimDriver(host: host, index: i, ramSize: 32 << 20)
        try drv.start()
        d = try VsockTestDriver(drv, rxBuffers: rxBuffers, bufSize: bufSize)
    }
    func onLoop<T>(_ f: @escaping () -> T) -> T { loop.executeAndWait(f) }
    func pattern(_ n: Int, seed: UInt64) -> [UInt8] {
        var s = seed, out = [UInt8](repeating: 0, count: n)
        for i in 0..<n { s = s &* 6364136223846793005 &+ 1442695040888963407; out[i] = UInt8(truncatingIfNeeded: s >> 33) }
        return out
    }
    /// Connects driver port `src` to host port `dst`; returns the fake's slot.
    func connect(_ src: UInt32, _ dst: UInt32 = 1234, bufAlloc: UInt32 = 1 << 20) throws -> Int {
        d.send(d.header(.request, src: src, dst: dst, bufAlloc: bufAlloc))
        let r = try XCTUnwrap(d.receiveControl(), "RESPONSE")
        XCTAssertEqual(r.op, VirtioVsock.Op.response.rawValue)
        XCTAssertEqual(r.srcPort, dst); XCTAssertEqual(r.dstPort, src)
        XCTAssertEqual(r.srcCID, 2); XCTAssertEqual(r.dstCID, 3)
        XCTAssertEqual(r.bufAlloc, dev.bufAlloc)
        return try XCTUnwrap(onLoop { self.dev.connection(hostPort: dst, driverPort: src)?.slot })
    }

    // MARK: connections and data

    func testConnectBothWaysDataBothWays() throws {
        try start()
        XCTAssertEqual(drv.readConfig(offset: 0, count: 8), [3, 0, 0, 0, 0, 0, 0, 0])
        let slot = try connect(5000)
        d.send(d.header(.rw, src: 5000, dst: 1234, len: 5), Array("hello".utf8))
        XCTAssertEqual(onLoop { self.fake.take(slot) }, Array("hello".utf8))
        _ = onLoop { self.fake.feed(slot, Array("world!".utf8)) }
        let (h, p) = try XCTUnwrap(d.receive())
        XCTAssertEqual(h.op, VirtioVsock.Op.rw.rawValue)
        XCTAssertEqual(p, Array("world!".utf8))
        XCTAssertEqual(h.fwdCnt, 5, "every packet carries the bytes forwarded so far")
        // Host → driver connection: REQUEST to the driver's port 7000, RESPONSE, OK <host port>.
        let hs = try XCTUnwrap(onLoop { self.fake.connect(toDriverPort: 7000) })
        let req = try XCTUnwrap(d.receiveControl())
        XCTAssertEqual(req.op, VirtioVsock.Op.request.rawValue)
        XCTAssertEqual(req.dstPort, 7000)
        XCTAssertEqual(req.bufAlloc, dev.bufAlloc)
        _ = onLoop { self.fake.feed(hs, Array("early".utf8)) }   // before the driver accepted: held back
        d.send(d.header(.response, src: 7000, dst: req.srcPort))
        XCTAssertEqual(onLoop { self.fake.conns[hs]?.okPort }, req.srcPort)
        let (h2, p2) = try XCTUnwrap(d.receive())
        XCTAssertEqual(h2.op, VirtioVsock.Op.rw.rawValue)
        XCTAssertEqual(h2.dstPort, 7000)
        XCTAssertEqual(p2, Array("early".utf8))
        d.send(d.header(.rw, src: 7000, dst: req.srcPort, len: 3), [1, 2, 3])
        XCTAssertEqual(onLoop { self.fake.take(hs) }, [1, 2, 3])
        XCTAssertEqual(onLoop { self.dev.stats.badPackets }, 0)
    }

    /// 4 MiB each way at the same time, through a slow host reader (random room) and a driver that gives 64 KiB of
    /// credit: byte-identical both ways, the device never sends beyond the driver's credit, the driver never needs
    /// more than the device's, and transmit chains were parked (back-pressure) rather than dropped or copied.
    func testFourMiBEachWayUnderBackPressureByteIdentical() throws {
        try start(bufAlloc: 128 << 10)
        let driverBuf: UInt32 = 64 << 10
        let slot = try connect(5000, bufAlloc: driverBuf)
        let total = 4 << 20
        let out = pattern(total, seed: 1), inn = pattern(total, seed: 2)
        onLoop { self.fake.setRoom(slot, 0) }
        var sent = 0, written: [UInt8] = [], received: [UInt8] = []
        written.reserveCapacity(total); received.reserveCapacity(total)
        var deviceFwd: UInt32 = 0, deviceBuf = dev.bufAlloc   // the device's credit as the driver knows it
        var consumed: UInt32 = 0, lastTold: UInt32 = 0, peakParked = 0
        var fed = 0
        var rng = SplitMix(state: 9)
        let deadline = lb_now_ns() + 120_000_000_000
        while (written.count < total || received.count < total) && lb_now_ns() < deadline {
            // Driver → host, within the device's credit.
            while sent < total {
                let credit = Int(deviceBuf) - (sent - Int(deviceFwd))
                let n = min(total - sent, 1 + Int(rng.next() % 4096), credit)
                guard n > 0, d.txFree.count > 1 else { break }
                guard d.post(d.header(.rw, src: 5000, dst: 1234, len: UInt32(n), bufAlloc: driverBuf, fwdCnt: consumed),
                             Array(out[sent..<sent + n])) != nil else { break }
                lastTold = consumed   // every packet carries the driver's fwd_cnt
                sent += n
            }
            d.reapTX()
            // Host: feeds its 4 MiB as fast as the fake takes it, reads slowly.
            let (got, parked) = onLoop { () -> ([UInt8], Int) in
                if fed < total { fed += inn[fed..<min(total, fed + 300_000)].withUnsafeBytes { b in self.fake.feed(slot, Array(b)) } }
                let o = self.fake.take(slot)
                self.fake.setRoom(slot, Int(rng.next() % 40_000))
                return (o, self.dev.connection(hostPort: 1234, driverPort: 5000)?.parked ?? 0)
            }
            peakParked = max(peakParked, parked)
            written += got
            // Driver receive side: packets within its credit, credit updates after consuming.
            while let (h, p) = d.receive(timeoutMs: 1) {
                if h.op == VirtioVsock.Op.rw.rawValue {
                    received += p
                    consumed &+= UInt32(p.count)
                    XCTAssertLessThanOrEqual(UInt32(received.count) &- lastTold, driverBuf, "device exceeded the driver's credit")
                }
                deviceFwd = max(deviceFwd, h.fwdCnt)
                deviceBuf = h.bufAlloc
                XCTAssertNotEqual(h.op, VirtioVsock.Op.rst.rawValue, "connection reset")
            }
            if consumed &- lastTold >= driverBuf / 4 || (received.count == total && consumed != lastTold) {
                d.send(d.header(.creditUpdate, src: 5000, dst: 1234, bufAlloc: driverBuf, fwdCnt: consumed))
                lastTold = consumed
            }
        }
        XCTAssertEqual(written.count, total)
        XCTAssertTrue(written == out, "driver → host bytes differ")
        XCTAssertEqual(received.count, total)
        XCTAssertTrue(received == inn, "host → driver bytes differ")
        XCTAssertGreaterThan(peakParked, 0, "the slow reader never parked a chain")
        let st = onLoop { self.dev.stats }
        XCTAssertEqual(st.badPackets, 0)
        XCTAssertGreaterThan(st.creditUpdatesSent, 0)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
    }

    func testCreditAccounting() throws {
        try start()
        // The driver gives 100 bytes of credit: the host's 1000 bytes arrive 100 at a time.
        let slot = try connect(5000, bufAlloc: 100)
        _ = onLoop { self.fake.feed(slot, self.pattern(1000, seed: 3)) }
        var got: [UInt8] = []
        while let (h, p) = d.receive(timeoutMs: 200), h.op == VirtioVsock.Op.rw.rawValue { got += p }
        XCTAssertEqual(got.count, 100)
        XCTAssertEqual(onLoop { self.dev.connection(hostPort: 1234, driverPort: 5000)?.txCnt }, 100)
        d.send(d.header(.creditUpdate, src: 5000, dst: 1234, bufAlloc: 100, fwdCnt: 100))
        while let (h, p) = d.receive(timeoutMs: 200), h.op == VirtioVsock.Op.rw.rawValue { got += p }
        XCTAssertEqual(got, Array(pattern(1000, seed: 3).prefix(200)))
        // CREDIT_REQUEST: answered with the device's fwd_cnt.
        d.send(d.header(.rw, src: 5000, dst: 1234, len: 10, bufAlloc: 100, fwdCnt: 200), [UInt8](repeating: 7, count: 10))
        d.send(d.header(.creditRequest, src: 5000, dst: 1234, bufAlloc: 100, fwdCnt: 200))
        let cu = try XCTUnwrap(d.receive(op: .creditUpdate))
        XCTAssertEqual(cu.fwdCnt, 10)
        XCTAssertEqual(cu.bufAlloc, dev.bufAlloc)
        // The host stops reading: fwd_cnt stops; more than buf_alloc unread is a credit violation → RST.
        onLoop { self.fake.setRoom(slot, 0) }
        let chunk = [UInt8](repeating: 1, count: 8192)
        var n = 0
        while n + chunk.count <= Int(dev.bufAlloc) {
            XCTAssertNotNil(d.post(d.header(.rw, src: 5000, dst: 1234, len: UInt32(chunk.count), bufAlloc: 100, fwdCnt: 200), chunk))
            n += chunk.count
        }
        _ = onLoop { 0 }
        usleep(50_000)
        XCTAssertEqual(onLoop { self.dev.connection(hostPort: 1234, driverPort: 5000)?.fwdCnt }, 10, "nothing forwarded while the host does not read")
        XCTAssertGreaterThan(onLoop { self.dev.connection(hostPort: 1234, driverPort: 5000)?.parked ?? 0 }, 0)
        d.send(d.header(.rw, src: 5000, dst: 1234, len: UInt32(chunk.count), bufAlloc: 100, fwdCnt: 200), chunk)
        XCTAssertNotNil(d.receive(op: .rst))
        XCTAssertEqual(onLoop { self.dev.stats.badByReason[.creditExceeded] }, 1)
        XCTAssertNil(onLoop { self.dev.connection(hostPort: 1234, driverPort: 5000) })
        d.reapTX()
        XCTAssertEqual(d.txInFlight.count, 0, "the parked chains were completed at the reset")
    }

    func testRSTOnClosedPortAndUnknownConnection() throws {
        try start()
        d.send(d.header(.request, src: 5000, dst: 4321))
        let r = try XCTUnwrap(d.receiveControl())
        XCTAssertEqual(r.op, VirtioVsock.Op.rst.rawValue)
        XCTAssertEqual(r.srcPort, 4321); XCTAssertEqual(r.dstPort, 5000)
        d.send(d.header(.rw, src: 5000, dst: 1234, len: 2), [1, 2])
        XCTAssertEqual(d.receiveControl()?.op, VirtioVsock.Op.rst.rawValue)
        // A RST for nothing is not answered.
        d.send(d.header(.rst, src: 5000, dst: 1234))
        XCTAssertNil(d.receive(timeoutMs: 100))
        XCTAssertEqual(onLoop { self.dev.stats.connectionsRefused }, 1)
    }

    func testShutdown() throws {
        try start()
        let slot = try connect(5000)
        let conn = try XCTUnwrap(onLoop { self.fake.conns[slot] })
        d.send(d.header(.shutdown, src: 5000, dst: 1234, flags: VirtioVsock.shutdownSend))
        XCTAssertTrue(onLoop { conn.eof })
        XCTAssertFalse(onLoop { conn.closed })
        // The host may still send after the driver's SEND shutdown.
        _ = onLoop { self.fake.feed(slot, [9]) }
        XCTAssertEqual(d.receive()?.1, [9])
        // Both ways: the device ends it with RST (the spec's clean disconnect).
        d.send(d.header(.shutdown, src: 5000, dst: 1234, flags: 3))
        XCTAssertEqual(d.receiveControl()?.op, VirtioVsock.Op.rst.rawValue)
        XCTAssertTrue(onLoop { conn.closed })
        // The host closes: the driver hears SHUTDOWN (SEND: the host sends no more), answers RST, the slot is free.
        let s2 = try connect(5001)
        onLoop { self.fake.hostClose(s2) }
        let sd = try XCTUnwrap(d.receiveControl())
        XCTAssertEqual(sd.op, VirtioVsock.Op.shutdown.rawValue)
        XCTAssertEqual(sd.flags, VirtioVsock.shutdownSend)
        d.send(d.header(.rst, src: 5001, dst: 1234))
        XCTAssertEqual(onLoop { self.dev.connectionCount }, 0)
    }

    /// 64 connections at once, each with its own data both ways, interleaved packets.
    func testManyConnections() throws {
        try start(rxBuffers: 64)
        var slots: [Int] = []
        for k in 0..<64 { slots.append(try connect(10_000 + UInt32(k))) }
        for round in 0..<4 {
            for k in 0..<64 {
                let msg = Array("c\(k) r\(round);".utf8)
                d.send(d.header(.rw, src: 10_000 + UInt32(k), dst: 1234, len: UInt32(msg.count)), msg)
            }
        }
        for k in 0..<64 {
            let want = (0..<4).flatMap { Array("c\(k) r\($0);".utf8) }
            XCTAssertEqual(onLoop { self.fake.take(slots[k]) }, want)
        }
        onLoop { for k in 0..<64 { self.fake.feed(slots[k], Array("to \(k)".utf8)) } }
        var got: [UInt32: [UInt8]] = [:]
        for _ in 0..<64 {
            guard let (h, p) = d.receive() else { return XCTFail("missing packets") }
            XCTAssertEqual(h.op, VirtioVsock.Op.rw.rawValue)
            got[h.dstPort, default: []] += p
        }
        for k in 0..<64 { XCTAssertEqual(got[10_000 + UInt32(k)], Array("to \(k)".utf8)) }
        XCTAssertEqual(onLoop { self.dev.connectionCount }, 64)
        // Close half of them (RST from the driver): the index stays consistent for the rest.
        for k in stride(from: 0, to: 64, by: 2) { d.send(d.header(.rst, src: 10_000 + UInt32(k), dst: 1234)) }
        XCTAssertEqual(onLoop { self.dev.connectionCount }, 32)
        for k in stride(from: 1, to: 64, by: 2) {
            XCTAssertNotNil(onLoop { self.dev.connection(hostPort: 1234, driverPort: 10_000 + UInt32(k)) }, "\(k)")
            XCTAssertNil(onLoop { self.dev.connection(hostPort: 1234, driverPort: 10_000 + UInt32(k - 1)) }, "\(k - 1)")
        }
    }

    /// Two queues (rx, tx) are enough: QEMU's vhost-user-vsock keeps the event queue for itself, so the served
    /// device sees only those (it used to stay idle: "needs rx, tx and event"). A reset with connections open then
    /// has no event queue to report on.
    func testRunsWithoutTheEventQueue() throws {
        loop = try EventLoop()
        host = DeviceHost(loop: loop)
        fake = FakeVsockHost(listening: [1234])
        dev = VsockDevice(guestCID: 3, host: fake, maxConnections: 16)
        let i = host.add(name: "vsock0", device: dev)
        loop.startThread()
        drv = try SimDriver(host: host, index: i, ramSize: 8 << 20)
        try drv.start(queueCount: 2)
        let rx = drv.queues[0], tx = drv.queues[1]
        let rb = drv.alloc(VirtioVsock.headerSize + 4096)
        let rh = try XCTUnwrap(rx.addChain(readable: [], writable: [(rb, UInt32(VirtioVsock.headerSize + 4096))]))
        rx.submit(rh)
        let tb = drv.alloc(VirtioVsock.headerSize)
        VsockHeader(srcCID: 3, dstCID: VirtioVsock.hostCID, srcPort: 5000, dstPort: 1234, len: 0, op: .request, flags: 0,
                    bufAlloc: 1 << 20, fwdCnt: 0).store(to: drv.host(tb))
        let th = try XCTUnwrap(tx.addChain(readable: [(tb, UInt32(VirtioVsock.headerSize))], writable: []))
        tx.submit(th)
        XCTAssertNotNil(tx.waitUsed(timeoutMs: 5000))
        let u = try XCTUnwrap(rx.waitUsed(timeoutMs: 5000), "RESPONSE")
        XCTAssertEqual(u.id, rh)
        let r = VsockHeader(from: drv.host(rb))
        XCTAssertEqual(r.op, VirtioVsock.Op.response.rawValue)
        XCTAssertEqual(r.dstPort, 5000)
        XCTAssertEqual(onLoop { self.dev.connectionCount }, 1)
        onLoop { self.dev.quiesce() }   // no event queue to touch
        drv.reset()
        XCTAssertEqual(onLoop { self.dev.connectionCount }, 0)
    }

    /// The transmit queue stops at its per-turn budget exactly as the ring runs empty: kicks must be re-armed, or a
    /// driver with EVENT_IDX never kicks again (Linux's vsock stalled like this after 64 busy connections: new
    /// connections were neither accepted nor refused). The chains are made available while the loop is held, so
    /// one turn finds exactly `chainBudget` of them.
    func testTransmitBudgetSpentOnAnEmptyRingRearmsKicks() throws {
        try start()
        XCTAssertTrue(drv.features.contains(.eventIdx))
        let n = SplitQueue.chainBudget
        let b = drv.alloc(VirtioVsock.headerSize)
        d.header(.rst, src: 7000, dst: 7001).store(to: drv.host(b))   // a RST for nothing: not answered
        let heads: [UInt16] = onLoop {
            var hs: [UInt16] = []
            for _ in 0..<n { if let h = self.d.tx.addChain(readable: [(b, UInt32(VirtioVsock.headerSize))], writable: []) { self.d.tx.submit(h); hs.append(h) } }
            return hs
        }
        XCTAssertEqual(heads.count, n)
        var done = 0
        while done < n { guard let u = d.tx.waitUsed(timeoutMs: 5000) else { return XCTFail("\(done) of \(n) completed") }; d.tx.recycle(u.id); done += 1 }
        // The next packet must be taken: a REQUEST to a closed port is answered with RST.
        d.send(d.header(.request, src: 5000, dst: 4321))
        XCTAssertEqual(d.receiveControl(timeoutMs: 2000)?.op, VirtioVsock.Op.rst.rawValue)
    }

    /// A driver reset closes every host connection; the device tells the driver TRANSPORT_RESET when it runs again.
    func testResetClosesConnectionsAndSendsTransportReset() throws {
        try start()
        let s1 = try connect(5000), s2 = try connect(5001)
        let c1 = try XCTUnwrap(onLoop { self.fake.conns[s1] }), c2 = try XCTUnwrap(onLoop { self.fake.conns[s2] })
        drv.reset()
        XCTAssertTrue(onLoop { c1.closed && c2.closed })
        XCTAssertEqual(onLoop { self.dev.connectionCount }, 0)
        try drv.start()
        d = try VsockTestDriver(drv)
        let b = drv.alloc(8)
        drv.host(b).storeBytes(of: UInt32(0xffff_ffff), as: UInt32.self)
        d.ev.submit(try XCTUnwrap(d.ev.addChain(readable: [], writable: [(b, 8)])))
        let u = try XCTUnwrap(d.ev.waitUsed(timeoutMs: 2000), "TRANSPORT_RESET event")
        XCTAssertEqual(u.len, 4)
        XCTAssertEqual(drv.host(b).load(as: UInt32.self), VirtioVsock.eventTransportReset)
        _ = try connect(5000)   // works again
    }

    // MARK: hostile driver

    func testHostileDriverPackets() throws {
        try start()
        _ = try connect(5000)
        typealias Bad = (VsockHeader, [UInt8], VsockPacketError, Bool)   // answered with RST?
        var h = d.header(.rw, src: 5000, dst: 1234, len: 100)
        let tooLong: Bad = (h, [1, 2, 3], .badLength, true)            // len > payload: resets the connection
        h = d.header(.request, src: 6000, dst: 1234); h.type = 2
        let seqpacket: Bad = (h, [], .badType, true)
        h = d.header(.request, src: 6001, dst: 1234); h.op = 99
        let badOp: Bad = (h, [], .badOp, true)
        h = d.header(.request, src: 6002, dst: 1234); h.srcCID = 4
        let spoofed: Bad = (h, [], .badSourceCID, false)
        h = d.header(.request, src: 6003, dst: 1234); h.dstCID = 7
        let otherGuest: Bad = (h, [], .badDestinationCID, false)
        h = d.header(.request, src: 6004, dst: 1234, len: 4)
        let requestWithLen: Bad = (h, [1, 2, 3, 4], .badLength, true)
        h = d.header(.response, src: 6005, dst: 1234)
        let strayResponse: Bad = (h, [], .noConnection, true)
        for (k, (hdr, payload, reason, rst)) in [tooLong, seqpacket, badOp, spoofed, otherGuest, requestWithLen, strayResponse].enumerated() {
            let before = onLoop { self.dev.stats.badByReason[reason] ?? 0 }
            d.send(hdr, payload)
            XCTAssertEqual(onLoop { self.dev.stats.badByReason[reason] ?? 0 }, before + 1, "case \(k): \(reason)")
            if rst {
                let r = d.receiveControl(timeoutMs: 1000)
                XCTAssertEqual(r?.op, VirtioVsock.Op.rst.rawValue, "case \(k)")
                XCTAssertEqual(r?.dstPort, hdr.srcPort, "case \(k)")
            } else {
                XCTAssertNil(d.receive(timeoutMs: 100), "case \(k): answered a packet not addressed from the guest to the host")
            }
        }
        // A chain shorter than the header: dropped and counted.
        let b = drv.alloc(16)
        let sh = try XCTUnwrap(d.tx.addChain(readable: [(b, 16)], writable: []))
        d.tx.submit(sh)
        XCTAssertNotNil(d.tx.waitUsed(timeoutMs: 2000))
        XCTAssertEqual(onLoop { self.dev.stats.badByReason[.shortHeader] }, 1)
        // Receive buffers too small for a header: given back empty.
        let small = drv.alloc(44)
        let sr = try XCTUnwrap(d.rx.addChain(readable: [], writable: [(small, 44)]))
        d.rx.submit(sr)
        let u = try XCTUnwrap(d.rx.waitUsed(timeoutMs: 2000))
        XCTAssertEqual(u.id, sr); XCTAssertEqual(u.len, 0)
        XCTAssertEqual(onLoop { self.dev.stats.badChains }, 1)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
        // The device still works.
        _ = try connect(5100)
    }

    /// The real host side (hybrid vsock unix sockets, edge-triggered): 4 MiB each way between the driver and a
    /// host program that reads in small bites with pauses (its socket buffer fills: writev would block, the chains
    /// park until epoll says writable), byte-identical; then the host program closes and the driver hears SHUTDOWN.
    func testFourMiBEachWayThroughRealUnixSockets() throws {
        let dir = "/tmp/lb-vsock-u-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        mkdir(dir, 0o700)
        let uds = "\(dir)/v.sock"
        defer { unlink("\(uds)_1234"); unlink(uds); rmdir(dir) }
        let listener = "\(uds)_1234".withCString { lb_unix_listen($0, 4, 0o600) }
        XCTAssertGreaterThanOrEqual(listener, 0)
        defer { close(listener) }
        loop = try EventLoop()
        host = DeviceHost(loop: loop)
        dev = VsockDevice(guestCID: 3, host: try UnixVsockHost(path: uds, capacity: 64), queueSize: 256, bufAlloc: 128 << 10)
        let i = host.add(name: "vsock0", device: dev)
        loop.startThread()
        drv = try SimDriver(host: host, index: i, ramSize: 32 << 20)
        try drv.start()
        d = try VsockTestDriver(drv, rxBuffers: 32, bufSize: 4096)
        let driverBuf: UInt32 = 64 << 10
        d.send(d.header(.request, src: 5000, dst: 1234, bufAlloc: driverBuf))
        XCTAssertEqual(d.receiveControl()?.op, VirtioVsock.Op.response.rawValue)
        XCTAssertGreaterThan(lb_poll_one(listener, 1, 2000), 0)
        let hc = lb_unix_accept(listener)   // non-blocking
        XCTAssertGreaterThanOrEqual(hc, 0)
        defer { close(hc) }
        var small: Int32 = 4096
        setsockopt(hc, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        let total = 4 << 20
        let out = pattern(total, seed: 5), inn = pattern(total, seed: 6)
        var sent = 0, fed = 0, written: [UInt8] = [], received: [UInt8] = []
        var deviceFwd: UInt32 = 0, consumed: UInt32 = 0, lastTold: UInt32 = 0, peakParked = 0, turns = 0
        var buf = [UInt8](repeating: 0, count: 8192)
        let deadline = lb_now_ns() + 120_000_000_000
        while (written.count < total || received.count < total) && lb_now_ns() < deadline {
            turns += 1
            while sent < total {
                let n = min(total - sent, 4000, Int(dev.bufAlloc) - (sent - Int(deviceFwd)))
                guard n > 0, d.txFree.count > 1 else { break }
                guard d.post(d.header(.rw, src: 5000, dst: 1234, len: UInt32(n), bufAlloc: driverBuf, fwdCnt: consumed),
                             Array(out[sent..<sent + n])) != nil else { break }
                lastTold = consumed
                sent += n
            }
            d.reapTX()
            // The host program: writes what the socket takes, reads a small bite every few turns.
            if fed < total {
                let k = inn[fed..<min(total, fed + 65536)].withUnsafeBytes { lb_send_nowait(hc, $0.baseAddress, $0.count) }
                if k > 0 { fed += k }
            }
            if turns % 3 == 0 {
                let k = buf.withUnsafeMutableBytes { recv(hc, $0.baseAddress, 2048, Int32(MSG_DONTWAIT)) }
                if k > 0 { written += buf[0..<k] }
            }
            peakParked = max(peakParked, onLoop { self.dev.connection(hostPort: 1234, driverPort: 5000)?.parked ?? 0 })
            while let (h, p) = d.receive(timeoutMs: 0) {
                if h.op == VirtioVsock.Op.rw.rawValue { received += p; consumed &+= UInt32(p.count) }
                XCTAssertNotEqual(h.op, VirtioVsock.Op.rst.rawValue)
                deviceFwd = max(deviceFwd, h.fwdCnt)
            }
            if consumed &- lastTold >= driverBuf / 4 {
                d.send(d.header(.creditUpdate, src: 5000, dst: 1234, bufAlloc: driverBuf, fwdCnt: consumed))
                lastTold = consumed
            }
            if sent == total && received.count == total { usleep(100) }
        }
        XCTAssertTrue(written == out, "driver → host: \(written.count) of \(total) bytes, or different")
        XCTAssertTrue(received == inn, "host → driver: \(received.count) of \(total) bytes, or different")
        XCTAssertGreaterThan(peakParked, 0, "the host socket never pushed back")
        // The host program closes: SHUTDOWN to the driver.
        Glibc.shutdown(hc, Int32(SHUT_RDWR))
        XCTAssertEqual(d.receiveControl()?.op, VirtioVsock.Op.shutdown.rawValue)
        XCTAssertEqual(onLoop { self.dev.stats.badPackets }, 0)
    }

    /// ab's flow phase through the real host side: each direction twice on fresh connections, bytes moved, no
    /// error, the driver never beyond the device's credit (no packet refused), echo both ways equal within what was
    /// in flight at the deadline, and every flow connection closed again by its RST (only the ping-pong one left).
    func testWorkloadFlowsWithinCredit() throws {
        let dir = "/tmp/lb-vsock-f-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        mkdir(dir, 0o700)
        let uds = "\(dir)/v.sock"
        defer { unlink(uds); rmdir(dir) }
        loop = try EventLoop()
        host = DeviceHost(loop: loop)
        dev = VsockDevice(guestCID: 3, host: try UnixVsockHost(path: uds, capacity: 64), queueSize: 256)
        let i = host.add(name: "vsock0", device: dev)
        loop.startThread()
        drv = try SimDriver(host: host, index: i, ramSize: 32 << 20)
        try drv.start()
        let w = try XCTUnwrap(VsockWorkload(drv, hostPath: uds, guestCID: 3))
        for mode in VsockFlow.allCases {
            for run in 0..<2 {
                let r = w.flow(mode, seconds: 0.3, depth: 8, size: 65536)
                XCTAssertEqual(r.errors, 0, "\(mode) \(run)")
                if mode != .toDriver { XCTAssertGreaterThan(r.toHost, 1 << 20, "\(mode) \(run)") }
                if mode != .toHost { XCTAssertGreaterThan(r.toDriver, 1 << 20, "\(mode) \(run)") }
                if mode == .toHost { XCTAssertEqual(r.toDriver, 0) }
                if mode == .toDriver { XCTAssertEqual(r.toHost, 0) }
                // Echo: what came back is what the host read, less what was on its way back at the deadline (at
                // most the driver's 1 MiB of credit plus the echo's 64 KiB).
                if mode == .both { XCTAssertLessThanOrEqual(r.toHost - min(r.toHost, r.toDriver), (1 << 20) + (64 << 10)) }
                print("flow \(mode) \(run): to host \(r.toHost) B, to driver \(r.toDriver) B in \(r.elapsedNs / 1_000_000) ms")
            }
        }
        XCTAssertEqual(onLoop { self.dev.stats.badPackets }, 0, "\(onLoop { self.dev.stats.badByReason })")
        XCTAssertEqual(onLoop { self.dev.stats.connectionsOpened }, 7)
        XCTAssertNotNil(onLoop { self.dev.connection(hostPort: VsockWorkload.hostPort, driverPort: VsockWorkload.driverPort) })
        for n in 1...6 {
            XCTAssertNil(onLoop { self.dev.connection(hostPort: VsockWorkload.flowHostPort, driverPort: VsockWorkload.flowPortBase + UInt32(n)) },
                         "flow connection \(n) still open")
        }
        XCTAssertTrue(w.runOne(spinNs: 0), "the ping-pong connection still works after the flows")
    }

    /// Options: errors name the file, the line and the key; forwarded tables take only queue-size.
    /// `ab`'s child serves the vsock on a path of its own: the option is replaced and the device built again, with
    /// every check of the factory (a relative path is still refused, naming the file, line and key).
    func testReplacingAnOptionRebuildsTheDevice() throws {
        let c = try DaemonConfig.parse(TOML.parse("[device.v0]\ntype = \"vsock\"\nguest-cid = 7\nuds-path = \"/tmp/a.sock\"\n", file: "v.conf"))
        let d = try XCTUnwrap(c.devices.first)
        XCTAssertEqual(d.string("uds-path"), "/tmp/a.sock")
        XCTAssertEqual(d.integer("guest-cid"), 7)
        let e = try d.replacing("uds-path", with: .string("/tmp/a.sock.ab"), file: "v.conf")
        XCTAssertEqual(e.string("uds-path"), "/tmp/a.sock.ab")
        XCTAssertEqual(e.integer("guest-cid"), 7)
        XCTAssertEqual(e.name, "v0")
        do { _ = try d.replacing("uds-path", with: .string("relative.sock"), file: "v.conf"); XCTFail("accepted") } catch {
            XCTAssertTrue("\(error)".contains("v.conf") && "\(error)".contains("uds-path"), "\(error)")
        }
    }

    func testConfigErrorsNameFileLineAndKey() throws {
        func parse(_ t: String) throws(ConfigError) -> DaemonConfig { try DaemonConfig.parse(TOML.parse(t, file: "v.conf")) }
        func fails(_ text: String, line: Int, key: String, _ needle: String, file: StaticString = #filePath, l: UInt = #line) {
            do { _ = try parse(text); XCTFail("accepted", file: file, line: l) } catch {
                XCTAssertEqual(error.line, line, "\(error)", file: file, line: l)
                XCTAssertTrue("\(error)".contains("v.conf") && "\(error)".contains(key) && "\(error)".contains(needle), "\(error)", file: file, line: l)
            }
        }
        fails("[device.v]\ntype = \"vsock\"\nuds-path = \"/tmp/x\"\n", line: 1, key: "guest-cid", "needs guest-cid")
        fails("[device.v]\ntype = \"vsock\"\nguest-cid = 3\n", line: 1, key: "uds-path", "needs uds-path")
        fails("[device.v]\ntype = \"vsock\"\nguest-cid = 2\nuds-path = \"/tmp/x\"\n", line: 3, key: "guest-cid", "between 3")
        fails("[device.v]\ntype = \"vsock\"\nguest-cid = 3\nuds-path = \"tmp/x\"\n", line: 4, key: "uds-path", "absolute")
        fails("[device.v]\ntype = \"vsock\"\nguest-cid = 3\nuds-path = \"/tmp/x\"\nqueue-size = 100\n", line: 5, key: "queue-size", "power of two")
        fails("[device.v]\ntype = \"vsock\"\nbackend = \"vhost-user:/run/v.sock\"\nguest-cid = 3\n", line: 4, key: "guest-cid", "back-end")
        fails("[device.v]\ntype = \"vsock\"\nguest-cid = 3\nuds-path = \"/tmp/x\"\nqueues = 3\n", line: 5, key: "queues", "unknown key")
        let c = try parse("[device.v]\ntype = \"vsock\"\nguest-cid = 42\nuds-path = \"/run/v.sock\"\nqueue-size = 64\n")
        XCTAssertEqual(c.devices[0].shape, DeviceShape(deviceID: 19, queueSizes: [64, 64, 64], configSize: 8))
        let f = try parse("[device.v]\ntype = \"vsock\"\nbackend = \"vhost-user:/run/v.sock\"\n")
        XCTAssertEqual(f.devices[0].shape, DeviceShape(deviceID: 19, queueSizes: [256, 256, 256], configSize: 8))
    }
}
