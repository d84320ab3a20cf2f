import XCTest
import Glibc
@testable import Registry
import Transport
import CLinux

/// The simulated driver's side of virtio-can for the tests: receive buffers posted and recycled, transmit and
/// control requests built from fields, what the device wrote read back.
final class CanTestDriver {
    let drv: SimDriver
    let tx: SimQueue, rx: SimQueue, ctl: SimQueue
    var rxBufs: [UInt16: (UInt64, Int)] = [:]

    init(_ drv: SimDriver) {
        self.drv = drv
        tx = drv.queues[0]; rx = drv.queues[1]; ctl = drv.queues[2]
    }

    /// Posts `n` receive buffers of `size` bytes.
    func postRX(_ n: Int, size: Int = VirtioCAN.headerSize + 64) throws {
        for _ in 0..<n {
            let b = drv.alloc(size)
            let h = try XCTUnwrap(rx.addChain(readable: [], writable: [(b, UInt32(size))]))
            rxBufs[h] = (b, size)
            rx.submit(h)
        }
    }

    struct Rx: Equatable { var type: UInt16; var length: Int; var flags: UInt32; var id: UInt32; var data: [UInt8]; var used: UInt32 }
    /// The next received frame (nil: none within the timeout); its buffer goes back to the device.
    func receive(timeoutMs: Int32 = 3000, repost: Bool = true) -> Rx? {
        guard let u = rx.waitUsed(timeoutMs: timeoutMs), let (b, size) = rxBufs[u.id] else { return nil }
        let p = drv.host(b)
        let len = Int(UInt16(littleEndian: p.load(fromByteOffset: 2, as: UInt16.self)))
        let r = Rx(type: UInt16(littleEndian: p.load(as: UInt16.self)), length: len,
                   flags: UInt32(littleEndian: p.load(fromByteOffset: 8, as: UInt32.self)),
                   id: UInt32(littleEndian: p.load(fromByteOffset: 12, as: UInt32.self)),
                   data: u.len >= 16 ? Array(UnsafeRawBufferPointer(start: p + 16, count: min(len, size - 16, Int(u.len) - 16))) : [],
                   used: u.len)
        if repost { rx.submit(u.id) }
        return r
    }

    /// A transmit request's buffers: header (`type`, `length`, `flags`, `id`), payload, one result byte.
    func txChain(type: UInt16 = VirtioCAN.msgTX, length: Int? = nil, flags: UInt32 = 0, id: UInt32, data: [UInt8] = [],
                 readable: Int? = nil, result: Bool = true, splitHeader: Bool = false) -> (UInt16, UInt64)? {
        let n = VirtioCAN.headerSize + data.count
        let b = drv.alloc(max(n, 1)), r = drv.alloc(1)
        let p = drv.host(b)
        p.storeBytes(of: type.littleEndian, as: UInt16.self)
        p.storeBytes(of: UInt16(length ?? data.count).littleEndian, toByteOffset: 2, as: UInt16.self)
        p.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
        p.storeBytes(of: flags.littleEndian, toByteOffset: 8, as: UInt32.self)
        p.storeBytes(of: id.littleEndian, toByteOffset: 12, as: UInt32.self)
        for (i, v) in data.enumerated() { p.storeBytes(of: v, toByteOffset: 16 + i, as: UInt8.self) }
        drv.host(r).storeBytes(of: 0xee, as: UInt8.self)
        let len = UInt32(readable ?? n)
        var parts: [(UInt64, UInt32)] = [(b, len)]
        if splitHeader && len > 5 { parts = [(b, UInt32(5)), (b + 5, len - 5)] }
        let w: [(UInt64, UInt32)] = result ? [(r, UInt32(1))] : []
        guard let h = tx.addChain(readable: parts, writable: w) else { return nil }
        return (h, r)
    }

    /// Sends one request and waits for it: (result byte, used length).
    func send(type: UInt16 = VirtioCAN.msgTX, length: Int? = nil, flags: UInt32 = 0, id: UInt32, data: [UInt8] = [],
              readable: Int? = nil, result: Bool = true, splitHeader: Bool = false) -> (UInt8, UInt32)? {
        guard let (h, r) = txChain(type: type, length: length, flags: flags, id: id, data: data, readable: readable,
                                   result: result, splitHeader: splitHeader) else { return nil }
        tx.submit(h)
        guard let u = tx.waitUsed(timeoutMs: 3000) else { return nil }
        XCTAssertEqual(u.id, h)
        tx.recycle(h)
        return (drv.host(r).load(as: UInt8.self), u.len)
    }

    /// A control request: (result, used length).
    func control(_ type: UInt16, outBytes: Int = 2, result: Bool = true) -> (UInt8, UInt32)? {
        let o = drv.alloc(2), i = drv.alloc(1)
        drv.host(o).storeBytes(of: type.littleEndian, as: UInt16.self)
        drv.host(i).storeBytes(of: 0xee, as: UInt8.self)
        let w: [(UInt64, UInt32)] = result ? [(i, UInt32(1))] : []
        guard let h = ctl.addChain(readable: [(o, UInt32(outBytes))], writable: w) else { return nil }
        ctl.submit(h)
        guard let u = ctl.waitUsed(timeoutMs: 3000) else { return nil }
        ctl.recycle(h)
        return (drv.host(i).load(as: UInt8.self), u.len)
    }
    func start() -> UInt8? { control(VirtioCAN.ctrlStart)?.0 }
    func stop() -> UInt8? { control(VirtioCAN.ctrlStop)?.0 }
}

/// virtio-can on the fake bus (and on a datagram socketpair through the SocketCAN endpoint's own code): frames
/// both ways (classic, FD, RTR, extended ids), every malformed request a driver can send, order and back-pressure
/// both ways, controller start/stop, bus-off, reset. This machine's kernel has no AF_CAN (socket() fails with
/// EAFNOSUPPORT, `ip link add … type vcan` "Unknown device type"): a real vcan is exercised by the guest case
/// (Tests/guest/cases*/loopbackd-can.sh) and by `testRealVCANWhereTheKernelHasIt` where the kernel has it.
final class CanTests: XCTestCase {
    var loop: EventLoop!
    var host: DeviceHost!
    var bus: FakeCANBus!
    var dev: CANDevice!
    var drv: SimDriver!
    var d: CanTestDriver!

    override func tearDown() { loop?.stopAndJoin() }

    func start(endpoint: CANEndpoint? = nil, fd: Bool = true, queueSize: UInt16 = 256, accept: ((VirtioFeatures) -> VirtioFeatures)? = nil) throws {
        loop = try EventLoop()
        host = DeviceHost(loop: loop)
        let e = endpoint ?? FakeCANBus(fdCapable: fd, record: true)
        bus = e as? FakeCANBus
        dev = CANDevice(endpoint: e, queueSize: queueSize)
        let i = host.add(name: "can0", device: dev)
        loop.startThread()
        drv = try SimDriver(host: host, index: i, ramSize: 16 << 20)
        if let accept { try drv.start(accept: accept) } else { try drv.start() }
        d = CanTestDriver(drv)
    }
    func onLoop<T>(_ f: @escaping () -> T) -> T { loop.executeAndWait(f) }
    func sent() -> [[UInt8]] { onLoop { self.bus.sent } }
    /// SocketCAN layout: can_id (with EFF/RTR flags), len, flags, 2 reserved, data.
    func linux(_ b: [UInt8]) -> (id: UInt32, len: Int, flags: UInt8, data: [UInt8]) {
        let id = UInt32(b[0]) | UInt32(b[1]) << 8 | UInt32(b[2]) << 16 | UInt32(b[3]) << 24
        return (id, Int(b[4]), b[5], Array(b[8..<(8 + Int(b[4]))]))
    }

    func testFeaturesConfigAndFramesBothWays() throws {
        try start()
        let offered = drv.info.features
        XCTAssertTrue(offered.isSuperset(of: [VirtioCAN.fClassic, VirtioCAN.fFD, VirtioCAN.fRTR, .version1]))
        XCTAssertFalse(offered.contains(VirtioCAN.fLateTxAck), "the socket accepting a frame is not the bus transmitting it")
        XCTAssertEqual(drv.readConfig(offset: 0, count: 2), [0, 0])
        try d.postRX(8)
        // STOPPED at first: a frame is refused, none is taken from the bus.
        XCTAssertEqual(d.send(id: 0x123, data: [1, 2])?.0, VirtioCAN.resultNotOK)
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        // Classic, standard id.
        XCTAssertEqual(d.send(id: 0x123, data: [1, 2, 3])?.0, VirtioCAN.resultOK)
        // Classic, extended id, 8 bytes; header split over two descriptors.
        XCTAssertEqual(d.send(flags: VirtioCAN.flagExtended, id: 0x1abc_def0, data: Array(1...8), splitHeader: true)?.0, VirtioCAN.resultOK)
        // FD, 64 bytes; FD, 12 bytes.
        XCTAssertEqual(d.send(flags: VirtioCAN.flagFD, id: 0x7ff, data: (0..<64).map { UInt8($0) })?.0, VirtioCAN.resultOK)
        XCTAssertEqual(d.send(flags: VirtioCAN.flagFD | VirtioCAN.flagExtended, id: 5, data: Array(repeating: 9, count: 12))?.0, VirtioCAN.resultOK)
        // RTR asking for 4 bytes, with Linux's 4 zero bytes after the header; and without them.
        XCTAssertEqual(d.send(flags: VirtioCAN.flagRTR, id: 0x42, data: [0, 0, 0, 0])?.0, VirtioCAN.resultOK)
        XCTAssertEqual(d.send(length: 6, flags: VirtioCAN.flagRTR, id: 0x43)?.0, VirtioCAN.resultOK)
        let s = sent().map { ($0.count, linux($0)) }
        XCTAssertEqual(s.count, 6)
        XCTAssertEqual(s[0].0, 16); XCTAssertEqual(s[0].1.id, 0x123); XCTAssertEqual(s[0].1.data, [1, 2, 3])
        XCTAssertEqual(s[1].1.id, 0x1abc_def0 | LinuxCAN.effFlag); XCTAssertEqual(s[1].1.data, Array(1...8))
        XCTAssertEqual(s[2].0, 72); XCTAssertEqual(s[2].1.len, 64); XCTAssertEqual(s[2].1.data, (0..<64).map { UInt8($0) })
        XCTAssertEqual(s[2].1.flags & LinuxCAN.fdfFlag, LinuxCAN.fdfFlag)
        XCTAssertEqual(s[3].1.id, 5 | LinuxCAN.effFlag); XCTAssertEqual(s[3].1.len, 12)
        XCTAssertEqual(s[4].0, 16); XCTAssertEqual(s[4].1.id, 0x42 | LinuxCAN.rtrFlag); XCTAssertEqual(s[4].1.len, 4)
        XCTAssertEqual(s[5].1.id, 0x43 | LinuxCAN.rtrFlag); XCTAssertEqual(s[5].1.len, 6)
        // Host → driver: classic, extended, FD, RTR.
        onLoop {
            self.bus.inject(id: 0x10, data: [0xaa, 0xbb])
            self.bus.inject(id: 0x1234_5678 | LinuxCAN.effFlag, data: Array(repeating: 7, count: 8))
            self.bus.inject(id: 0x20, data: (0..<48).map { UInt8($0 ^ 0x5a) }, fd: true)
            self.bus.inject(id: 0x30 | LinuxCAN.rtrFlag, data: [], length: 3)
        }
        let a = try XCTUnwrap(d.receive()), b = try XCTUnwrap(d.receive()), c = try XCTUnwrap(d.receive()), r = try XCTUnwrap(d.receive())
        XCTAssertEqual(a, .init(type: VirtioCAN.msgRX, length: 2, flags: 0, id: 0x10, data: [0xaa, 0xbb], used: 18))
        XCTAssertEqual(b, .init(type: VirtioCAN.msgRX, length: 8, flags: VirtioCAN.flagExtended, id: 0x1234_5678, data: Array(repeating: 7, count: 8), used: 24))
        XCTAssertEqual(c, .init(type: VirtioCAN.msgRX, length: 48, flags: VirtioCAN.flagFD, id: 0x20, data: (0..<48).map { UInt8($0 ^ 0x5a) }, used: 64))
        // RTR: the requested length, zero bytes after the header (Linux's driver wants header + length).
        XCTAssertEqual(r, .init(type: VirtioCAN.msgRX, length: 3, flags: VirtioCAN.flagRTR, id: 0x30, data: [0, 0, 0], used: 19))
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
        XCTAssertEqual(onLoop { self.dev.stats.txFrames }, 6)
        XCTAssertEqual(onLoop { self.dev.stats.rxFrames }, 4)
    }

    func testHostileTransmitRequestsAreRefusedNeverSent() throws {
        try start()
        try d.postRX(4)
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        let cases: [(String, CANTxError, () -> (UInt8, UInt32)?)] = [
            ("msg_type RX on tx", .badMessageType, { self.d.send(type: VirtioCAN.msgRX, id: 1, data: [1]) }),
            ("msg_type 0", .badMessageType, { self.d.send(type: 0, id: 1) }),
            ("unknown flag", .unknownFlags, { self.d.send(flags: 0x1000, id: 1) }),
            ("all flags", .unknownFlags, { self.d.send(flags: 0xffff_ffff, id: 1) }),
            ("RTR with FD", .rtrWithFD, { self.d.send(flags: VirtioCAN.flagRTR | VirtioCAN.flagFD, id: 1) }),
            ("standard id > 11 bits", .badID, { self.d.send(id: 0x800, data: [1]) }),
            ("extended id > 29 bits", .badID, { self.d.send(flags: VirtioCAN.flagExtended, id: 0x2000_0000) }),
            ("id with SocketCAN's EFF bit", .badID, { self.d.send(flags: VirtioCAN.flagExtended, id: 0x8000_0001) }),
            ("classic length 9", .badLength, { self.d.send(id: 1, data: Array(repeating: 1, count: 9)) }),
            ("classic length 0xffff", .badLength, { self.d.send(length: 0xffff, id: 1, data: [1]) }),
            ("RTR length 9", .badLength, { self.d.send(length: 9, flags: VirtioCAN.flagRTR, id: 1) }),
            ("FD length 13", .badLength, { self.d.send(flags: VirtioCAN.flagFD, id: 1, data: Array(repeating: 1, count: 13)) }),
            ("FD length 65", .badLength, { self.d.send(flags: VirtioCAN.flagFD, id: 1, data: Array(repeating: 1, count: 65)) }),
            ("payload shorter than length", .shortPayload, { self.d.send(length: 8, id: 1, data: [1, 2, 3]) }),
            ("header of 10 bytes", .shortHeader, { self.d.send(id: 1, readable: 10) }),
            ("header of 0 bytes", .shortHeader, { self.d.send(id: 1, readable: 0) }),
        ]
        for (name, reason, run) in cases {
            let before = onLoop { self.dev.stats.txRefused[reason] ?? 0 }
            let r = run()
            XCTAssertEqual(r?.0, VirtioCAN.resultNotOK, name)
            XCTAssertEqual(r?.1, 1, name)
            XCTAssertEqual(onLoop { self.dev.stats.txRefused[reason] ?? 0 }, before + 1, name)
        }
        // No room for the result: completed empty (Linux's driver then counts it as NOT_OK).
        XCTAssertEqual(d.send(id: 1, data: [1], result: false)?.1, 0)
        XCTAssertEqual(sent().count, 0, "nothing malformed reached the bus")
        // Control: unknown message, a 1-byte message, no room for the result.
        XCTAssertEqual(d.control(0x0203)?.0, VirtioCAN.resultNotOK)
        XCTAssertEqual(d.control(VirtioCAN.ctrlStart, outBytes: 1)?.0, VirtioCAN.resultNotOK)
        XCTAssertEqual(d.control(VirtioCAN.ctrlStop, result: false)?.1, 0)
        XCTAssertTrue(onLoop { self.dev.started }, "a request without a result byte changes nothing")
        // Receive buffers shorter than the header come back empty.
        let b = drv.alloc(8)
        let h = try XCTUnwrap(d.rx.addChain(readable: [], writable: [(b, 8)]))
        d.rx.submit(h)
        XCTAssertEqual(d.rx.waitUsed(timeoutMs: 2000)?.len, 0)
        // Still working, nothing latched.
        XCTAssertEqual(d.send(id: 0x7ff, data: [9])?.0, VirtioCAN.resultOK)
        XCTAssertEqual(sent().count, 1)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
    }

    func testFeaturesTheDriverDidNotTakeAreRefused() throws {
        // A driver that takes classic frames only: FD and RTR requests fail, FD and RTR frames are not delivered.
        try start(accept: { $0.subtracting([VirtioCAN.fFD, VirtioCAN.fRTR]) })
        try d.postRX(4)
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        XCTAssertEqual(d.send(flags: VirtioCAN.flagFD, id: 1, data: [1])?.0, VirtioCAN.resultNotOK)
        XCTAssertEqual(d.send(flags: VirtioCAN.flagRTR, id: 1)?.0, VirtioCAN.resultNotOK)
        XCTAssertEqual(onLoop { self.dev.stats.txRefused[.fdNotNegotiated] }, 1)
        XCTAssertEqual(onLoop { self.dev.stats.txRefused[.rtrNotNegotiated] }, 1)
        onLoop {
            XCTAssertFalse(self.bus.acceptFD); XCTAssertFalse(self.bus.acceptRTR)
            self.bus.inject(id: 1, data: [1], fd: true)                     // the socket does not deliver these
            self.bus.inject(id: 2 | LinuxCAN.rtrFlag, data: [], length: 1)
            self.bus.inject(id: 3, data: [3])
        }
        XCTAssertEqual(d.receive()?.id, 3)
        // An FD-only driver: classic frames fail.
        tearDown()
        try start(accept: { $0.subtracting([VirtioCAN.fClassic, VirtioCAN.fRTR]) })
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        XCTAssertEqual(d.send(id: 1, data: [1])?.0, VirtioCAN.resultNotOK)
        XCTAssertEqual(d.send(flags: VirtioCAN.flagFD, id: 1, data: [1])?.0, VirtioCAN.resultOK)
        // An endpoint without FD (MTU 16): FD is not offered.
        tearDown()
        try start(fd: false)
        XCTAssertFalse(drv.info.features.contains(VirtioCAN.fFD))
    }

    /// Transmit under back-pressure: the bus takes 3 frames at a time; 500 frames (each numbered) all complete OK,
    /// reach the bus exactly once and in order, and the used ring gives them back in order.
    func testTransmitOrderUnderBackPressureNoneDropped() throws {
        try start()
        onLoop { self.bus.sendCapacity = 3 }
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        var heads: [UInt16: (Int, UInt64)] = [:]
        var done: [Int] = []
        var next = 0
        let total = 500
        while done.count < total {
            while next < total && heads.count < 64 {
                let (h, r) = try XCTUnwrap(d.txChain(flags: VirtioCAN.flagExtended, id: UInt32(next), data: withUnsafeBytes(of: UInt32(next)) { Array($0) }))
                heads[h] = (next, r)
                d.tx.submit(h)
                next += 1
            }
            // The bus drains slowly: a few frames per round.
            onLoop { self.bus.drainSent(2) }
            while let u = d.tx.reap() {
                let (k, r) = try XCTUnwrap(heads.removeValue(forKey: u.id))
                XCTAssertEqual(drv.host(r).load(as: UInt8.self), VirtioCAN.resultOK)
                done.append(k)
                d.tx.recycle(u.id)
            }
            if done.count < total && d.tx.usedIdx == d.tx.lastUsed { usleep(200) }
        }
        XCTAssertEqual(done, Array(0..<total), "completed in submission order")
        let ids = sent().map { linux($0).id & LinuxCAN.effMask }
        XCTAssertEqual(ids, (0..<total).map { UInt32($0) }, "on the bus once each, in order")
        XCTAssertGreaterThan(onLoop { self.dev.stats.txWaits }, 0, "the socket did block")
        // ENOBUFS (interface queue full, no writable edge): retried on the timer.
        onLoop { self.bus.sendCapacity = .max; self.bus.scriptedSends = [.retryLater, .retryLater] }
        let t0 = lb_now_ns()
        XCTAssertEqual(d.send(id: 0x100, data: [1])?.0, VirtioCAN.resultOK)
        XCTAssertGreaterThanOrEqual(lb_now_ns() - t0, 1_000_000)
        XCTAssertEqual(onLoop { self.dev.stats.txRetries }, 2)
        // A frame the host refuses (EINVAL): NOT_OK, the next one goes.
        onLoop { self.bus.scriptedSends = [.rejected(EINVAL)] }
        XCTAssertEqual(d.send(id: 0x101, data: [1])?.0, VirtioCAN.resultNotOK)
        XCTAssertEqual(d.send(id: 0x102, data: [1])?.0, VirtioCAN.resultOK)
    }

    /// Receive back-pressure: 1,000 frames queued on the bus, 8 buffers: the device reads exactly as many frames as
    /// it has buffers (the rest stay in the socket's queue), and as buffers come back every frame arrives, in order.
    func testReceiveBackPressureInOrderNoneLost() throws {
        try start()
        try d.postRX(8)
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        let total = 1000
        onLoop { for k in 0..<total { self.bus.inject(id: UInt32(k) | LinuxCAN.effFlag, data: withUnsafeBytes(of: UInt32(k)) { Array($0) }) } }
        var got: [UInt32] = []
        // Nothing recycled yet: 8 delivered, 992 left on the bus.
        for _ in 0..<8 { got.append(try XCTUnwrap(d.receive(repost: false)).id) }
        usleep(20_000)
        XCTAssertEqual(onLoop { self.bus.queued }, total - 8, "no frame read without a buffer for it")
        XCTAssertNil(d.receive(timeoutMs: 50))
        for h in d.rxBufs.keys { d.rx.submit(h) }
        while got.count < total { got.append(try XCTUnwrap(d.receive(), "frame \(got.count)").id) }
        XCTAssertEqual(got, (0..<total).map { UInt32($0) })
        XCTAssertEqual(onLoop { self.bus.discarded }, 0)
        XCTAssertEqual(onLoop { self.dev.stats.rxFrames }, UInt64(total))
    }

    func testSmallReceiveBufferPassesTheFrameToTheNextOne() throws {
        try start()
        try d.postRX(1, size: 20)          // room for 4 payload bytes
        try d.postRX(1, size: 16 + 64)
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        onLoop { _ = self.bus.inject(id: 9, data: Array(repeating: 3, count: 64), fd: true) }
        let small = try XCTUnwrap(d.rx.waitUsed(timeoutMs: 2000))
        XCTAssertEqual(small.len, 0)
        let big = try XCTUnwrap(d.rx.waitUsed(timeoutMs: 2000))
        XCTAssertEqual(big.len, 80)
        XCTAssertEqual(onLoop { self.dev.stats.rxFrames }, 1)
    }

    func testStopCancelsTheWaitingFrameAndReceivesNothing() throws {
        try start()
        try d.postRX(4)
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        onLoop { self.bus.sendCapacity = 0 }
        let (h1, r1) = try XCTUnwrap(d.txChain(id: 1, data: [1]))
        let (h2, r2) = try XCTUnwrap(d.txChain(id: 2, data: [2]))
        d.tx.submit(h1); d.tx.submit(h2)
        usleep(20_000)
        XCTAssertNil(d.tx.reap(), "the frame waits for the socket")
        XCTAssertEqual(d.stop(), VirtioCAN.resultOK)
        var results: [UInt16: UInt8] = [:]
        for _ in 0..<2 { let u = try XCTUnwrap(d.tx.waitUsed(timeoutMs: 2000)); results[u.id] = drv.host(u.id == h1 ? r1 : r2).load(as: UInt8.self) }
        XCTAssertEqual(results, [h1: VirtioCAN.resultNotOK, h2: VirtioCAN.resultNotOK], "cancelled on STOP, none sent")
        onLoop { self.bus.sendCapacity = .max }
        XCTAssertEqual(sent().count, 0)
        XCTAssertFalse(onLoop { self.bus.inject(id: 5, data: [5]) }, "a stopped controller takes nothing from the bus")
        XCTAssertEqual(d.send(id: 3, data: [3])?.0, VirtioCAN.resultNotOK)
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        XCTAssertEqual(d.send(id: 4, data: [4])?.0, VirtioCAN.resultOK)
        onLoop { _ = self.bus.inject(id: 6, data: [6]) }
        XCTAssertEqual(d.receive()?.id, 6)
        XCTAssertEqual(onLoop { (self.dev.stats.starts, self.dev.stats.stops) }.0, 2)
    }

    /// STOP with the last frame of the ring waiting for the socket: the transmit loop that left it waiting left
    /// kicks disabled, and with nothing else in the ring no later turn re-armed them (EVENT_IDX: the driver never
    /// kicked again). The next request must be answered.
    func testStopWithTheLastFrameWaitingKeepsKicksArmed() throws {
        try start()
        XCTAssertTrue(drv.features.contains(.eventIdx))
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        onLoop { self.bus.sendCapacity = 0 }
        let (h1, r1) = try XCTUnwrap(d.txChain(id: 1, data: [1]))
        d.tx.submit(h1)
        usleep(20_000)
        XCTAssertNil(d.tx.reap(), "the frame waits for the socket")
        XCTAssertEqual(d.stop(), VirtioCAN.resultOK)
        let u = try XCTUnwrap(d.tx.waitUsed(timeoutMs: 2000))
        XCTAssertEqual(u.id, h1)
        XCTAssertEqual(drv.host(r1).load(as: UInt8.self), VirtioCAN.resultNotOK)
        d.tx.recycle(h1)
        onLoop { self.bus.sendCapacity = .max }
        XCTAssertEqual(d.send(id: 3, data: [3])?.0, VirtioCAN.resultNotOK, "answered while stopped")
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        XCTAssertEqual(d.send(id: 4, data: [4])?.0, VirtioCAN.resultOK)
    }

    func testBusOffStopsTheControllerAndTellsTheDriver() throws {
        try start()
        try d.postRX(4)
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        _ = FD.drain(drv.configInterruptFD.raw)
        onLoop { self.bus.raiseBusOff() }
        XCTAssertEqual(lb_poll_one(drv.configInterruptFD.raw, 1, 2000), 1, "config interrupt")
        _ = FD.drain(drv.configInterruptFD.raw)
        XCTAssertEqual(drv.readConfig(offset: 0, count: 2), [1, 0], "VIRTIO_CAN_S_CTRL_BUSOFF")
        XCTAssertFalse(onLoop { self.dev.started })
        XCTAssertEqual(d.send(id: 1, data: [1])?.0, VirtioCAN.resultNotOK)
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        XCTAssertEqual(drv.readConfig(offset: 0, count: 2), [0, 0], "START clears bus-off")
        XCTAssertEqual(d.send(id: 1, data: [1])?.0, VirtioCAN.resultOK)
        // The interface going down while sending: NOT_OK, bus-off; START refused while it is down.
        onLoop { self.bus.up = false }
        XCTAssertEqual(d.send(id: 2, data: [2])?.0, VirtioCAN.resultNotOK)
        XCTAssertEqual(lb_poll_one(drv.configInterruptFD.raw, 1, 2000), 1)
        XCTAssertEqual(drv.readConfig(offset: 0, count: 2), [1, 0])
        XCTAssertEqual(d.start(), VirtioCAN.resultNotOK)
        onLoop { self.bus.up = true }
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        XCTAssertEqual(d.send(id: 3, data: [3])?.0, VirtioCAN.resultOK)
        XCTAssertEqual(onLoop { self.dev.stats.busOffs }, 2)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
    }

    func testResetWithAWaitingFrameThenRunAgain() throws {
        try start()
        try d.postRX(2)
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        onLoop { self.bus.sendCapacity = 0 }
        let (h, _) = try XCTUnwrap(d.txChain(id: 1, data: [1]))
        d.tx.submit(h)
        usleep(10_000)
        drv.reset()
        XCTAssertFalse(onLoop { self.dev.started })
        onLoop { self.bus.sendCapacity = .max }
        try drv.start()
        d = CanTestDriver(drv)
        try d.postRX(2)
        XCTAssertEqual(d.send(id: 2, data: [2])?.0, VirtioCAN.resultNotOK, "stopped again after the reset")
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        XCTAssertEqual(d.send(id: 3, data: [3])?.0, VirtioCAN.resultOK)
        onLoop { _ = self.bus.inject(id: 4, data: [4]) }
        XCTAssertEqual(d.receive()?.id, 4)
        XCTAssertEqual(sent().map { linux($0).id }, [3], "the frame of the reset driver never went out")
    }

    /// The SocketCAN endpoint's code on a SOCK_SEQPACKET socketpair (one frame per message, a real send buffer that
    /// fills, real edge-triggered epoll): 2,000 frames each way, in order, none lost, while the peer reads slowly.
    func testSocketEndpointOnASocketpairBothWaysUnderBackPressure() throws {
        var sv: [Int32] = [-1, -1]
        XCTAssertEqual(Glibc.socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv), 0)
        var small: Int32 = 4096
        _ = setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, 4)
        let peer = sv[1]
        var peerClosed = false
        defer { if !peerClosed { Glibc.close(peer) } }
        try start(endpoint: SocketCANEndpoint(datagramFD: sv[0], fdCapable: true))
        try d.postRX(16)
        // Stopped: what the peer sends now is discarded, not delivered after START.
        var stale = [UInt8](repeating: 0, count: 16); stale[0] = 0x77; stale[4] = 1
        XCTAssertEqual(Glibc.send(peer, &stale, 16, 0), 16)
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        let total = 2000
        // Driver → peer: requests posted in windows of 32; the peer reads 7 frames per round.
        var heads: [UInt16: Int] = [:]
        var next = 0, completed: [Int] = [], received: [UInt32] = []
        var buf = [UInt8](repeating: 0, count: 72)
        while received.count < total {
            while next < total && heads.count < 32 {
                let fd = next % 3 == 0
                let (h, _) = try XCTUnwrap(d.txChain(flags: VirtioCAN.flagExtended | (fd ? VirtioCAN.flagFD : 0), id: UInt32(next),
                                                     data: fd ? Array(repeating: UInt8(next & 0xff), count: 64) : [UInt8(next & 0xff)]))
                heads[h] = next; d.tx.submit(h); next += 1
            }
            for _ in 0..<7 {
                let n = Glibc.recv(peer, &buf, 72, Int32(MSG_DONTWAIT))
                guard n > 0 else { break }
                let f = linux(buf)
                XCTAssertEqual(n, received.count % 3 == 0 ? 72 : 16)
                XCTAssertEqual(f.data.first, UInt8(received.count & 0xff))
                received.append(f.id & LinuxCAN.effMask)
            }
            while let u = d.tx.reap() { completed.append(try XCTUnwrap(heads.removeValue(forKey: u.id))); d.tx.recycle(u.id) }
            usleep(100)
        }
        XCTAssertEqual(received, (0..<total).map { UInt32($0) })
        while completed.count < total, let u = d.tx.waitUsed(timeoutMs: 2000) { completed.append(try XCTUnwrap(heads.removeValue(forKey: u.id))); d.tx.recycle(u.id) }
        XCTAssertEqual(completed, Array(0..<total))
        XCTAssertGreaterThan(onLoop { self.dev.stats.txWaits }, 0, "the socket's send buffer filled")
        // Peer → driver: 2,000 frames written as fast as the socket takes them; 16 receive buffers.
        var sentByPeer = 0, got: [UInt32] = []
        while got.count < total {
            while sentByPeer < total {
                var f = [UInt8](repeating: 0, count: 16)
                withUnsafeBytes(of: UInt32(sentByPeer)) { for i in 0..<4 { f[i] = $0[i] } }
                f[4] = 2; f[8] = UInt8(sentByPeer & 0xff)
                guard Glibc.send(peer, &f, 16, Int32(MSG_DONTWAIT)) == 16 else { break }
                sentByPeer += 1
            }
            guard let r = d.receive(timeoutMs: 2000) else { return XCTFail("frame \(got.count) did not arrive") }
            XCTAssertEqual(r.data, [UInt8(got.count & 0xff), 0])
            got.append(r.id)
        }
        XCTAssertEqual(got, (0..<total).map { UInt32($0) })
        // The peer goes away while the device holds receive buffers: the loop must not spin on the end of file (it
        // did, and the next executeAndWait never returned).
        Glibc.close(peer)
        peerClosed = true
        usleep(20_000)
        let t0 = lb_now_ns()
        XCTAssertEqual(onLoop { self.dev.started }, true)
        XCTAssertLessThan(lb_now_ns() - t0, 1_000_000_000, "the loop answers")
    }

    /// A real vcan interface where the kernel has SocketCAN: skipped only when AF_CAN or the vcan link type is
    /// missing (this project's build machines: EAFNOSUPPORT); anywhere else a failure is a failure.
    func testRealVCANWhereTheKernelHasIt() throws {
        let s = Glibc.socket(29, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 1)
        if s < 0 && errno == EAFNOSUPPORT { throw XCTSkip("no AF_CAN in this kernel (EAFNOSUPPORT): vcan is tested in the guest case loopbackd-can") }
        XCTAssertGreaterThanOrEqual(s, 0, "AF_CAN socket: \(Errno.current)")
        Glibc.close(s)
        let name = "lbtcan\(getpid() % 100000)"
        let add = run(["ip", "link", "add", name, "type", "vcan"])
        if add.out.contains("Unknown device type") { throw XCTSkip("AF_CAN but no vcan link type here") }
        XCTAssertEqual(add.status, 0, add.out)
        defer { _ = run(["ip", "link", "del", name]) }
        XCTAssertEqual(run(["ip", "link", "set", name, "up"]).status, 0)
        let ep = try SocketCANEndpoint(interface: name)
        XCTAssertTrue(ep.fdCapable, "vcan's MTU is CANFD_MTU")
        try start(endpoint: ep)
        try d.postRX(8)
        XCTAssertEqual(d.start(), VirtioCAN.resultOK)
        // A second socket on the interface plays the other node.
        let other = try SocketCANEndpoint(interface: name)
        other.setReceiving(true); other.configure(fd: true, rtr: true)
        XCTAssertEqual(d.send(flags: VirtioCAN.flagFD, id: 0x55, data: Array(repeating: 4, count: 16))?.0, VirtioCAN.resultOK)
        let f = UnsafeMutableRawPointer.allocate(byteCount: 72, alignment: 8)
        defer { f.deallocate() }
        var r = CANReceiveResult.empty
        for _ in 0..<200 { r = other.receive(into: f); if r != .empty { break }; usleep(5000) }
        XCTAssertEqual(r, .frame(size: 72))
        XCTAssertEqual(f.load(as: UInt32.self), 0x55)
        f.storeBytes(of: UInt32(0x66), as: UInt32.self); f.storeBytes(of: UInt8(1), toByteOffset: 4, as: UInt8.self)
        XCTAssertEqual(other.send(f, size: 16), .sent)
        XCTAssertEqual(d.receive()?.id, 0x66)
    }

    private func run(_ args: [String]) -> (status: Int32, out: String) {
        var fds: [Int32] = [-1, -1]
        pipe(&fds)
        var pid: pid_t = 0
        var fa = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&fa)
        posix_spawn_file_actions_adddup2(&fa, fds[1], 1)
        posix_spawn_file_actions_adddup2(&fa, fds[1], 2)
        let argv = args.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) }; posix_spawn_file_actions_destroy(&fa) }
        guard posix_spawnp(&pid, args[0], &fa, nil, argv, environ) == 0 else { close(fds[0]); close(fds[1]); return (-1, "spawn failed") }
        close(fds[1])
        var out = [UInt8](), b = [UInt8](repeating: 0, count: 512)
        while true { let n = read(fds[0], &b, 512); if n <= 0 { break }; out += b[0..<n] }
        close(fds[0])
        var st: Int32 = 0
        waitpid(pid, &st, 0)
        return ((st >> 8) & 0xff, String(decoding: out, as: UTF8.self))
    }

    /// Options: errors name the file, the line and the key; forwarded tables take only queue-size (and queues).
    func testConfigErrorsNameFileLineAndKey() throws {
        func parse(_ t: String) throws(ConfigError) -> DaemonConfig { try DaemonConfig.parse(TOML.parse(t, file: "c.conf")) }
        func fails(_ text: String, line: Int, key: String, _ needle: String, file: StaticString = #filePath, l: UInt = #line) {
            do { _ = try parse(text); XCTFail("accepted", file: file, line: l) } catch {
                XCTAssertEqual(error.line, line, "\(error)", file: file, line: l)
                XCTAssertTrue("\(error)".contains("c.conf") && "\(error)".contains(key) && "\(error)".contains(needle), "\(error)", file: file, line: l)
            }
        }
        fails("[device.c]\ntype = \"can\"\n", line: 1, key: "interface", "exactly one of")
        fails("[device.c]\ntype = \"can\"\ninterface = \"vcan0\"\nsimulated = true\n", line: 4, key: "simulated", "exactly one of")
        fails("[device.c]\ntype = \"can\"\ninterface = \"averyveryverylongname\"\n", line: 3, key: "interface", "1 to 15")
        fails("[device.c]\ntype = \"can\"\nsimulated = true\nqueue-size = 100\n", line: 4, key: "queue-size", "power of two")
        fails("[device.c]\ntype = \"can\"\nsimulated = true\nqueues = 3\n", line: 4, key: "queues", "exactly 3")
        fails("[device.c]\ntype = \"can\"\nsimulated = true\nbitrate = 500000\n", line: 4, key: "bitrate", "unknown key")
        fails("[device.c]\ntype = \"can\"\nbackend = \"vhost-user:/run/c.sock\"\ninterface = \"vcan0\"\n", line: 4, key: "interface", "back-end")
        fails("[device.c]\ntype = \"can\"\nsimulated = 1\n", line: 3, key: "simulated", "boolean")
        let c = try parse("[device.c]\ntype = \"can\"\ninterface = \"vcan0\"\nqueue-size = 64\nfd = false\n")
        XCTAssertEqual(c.devices[0].shape, DeviceShape(deviceID: 36, queueSizes: [64, 64, 64], configSize: 2))
        let f = try parse("[device.c]\ntype = \"can\"\nbackend = \"vhost-user:/run/c.sock\"\n")
        XCTAssertEqual(f.devices[0].shape, DeviceShape(deviceID: 36, queueSizes: [256, 256, 256], configSize: 2))
        // Where the kernel has no SocketCAN, building the device says so (never a crash).
        let n = try parse("[device.c]\ntype = \"can\"\ninterface = \"nosuchcan0\"\n")
        XCTAssertThrowsError(try n.devices[0].make()) { e in
            let m = "\(e)"
            XCTAssertTrue(m.contains("AF_CAN") || m.contains("no CAN interface nosuchcan0"), m)
        }
    }

    func testWorkloadOnTheSimulatedBus() throws {
        try start(endpoint: FakeCANBus(echo: true))
        let w = try XCTUnwrap(CANWorkload(drv, verify: true))
        for _ in 0..<2000 { XCTAssertTrue(w.runOne(spinNs: 0)) }
        XCTAssertEqual(onLoop { self.dev.stats.rxFrames }, 2000)
    }
}
