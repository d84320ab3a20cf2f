import XCTest
import Glibc
import Synchronization
import CLinux
@testable import Transport

/// A small device body for these tests: every chain's readable bytes come back XOR 0x5A in its writable part.
/// 8 bytes of writable config space; `changeConfig` raises the config interrupt.
final class VUEchoDevice: VirtioDevice {
    let deviceID: UInt32 = 0x4c42
    let queueMaxSizes: [UInt16]
    let offeredFeatures: VirtioFeatures = [.version1, .eventIdx, .indirectDesc]
    let configSize = 8
    var config: [UInt8] = [1, 2, 3, 4, 5, 6, 7, 8]
    private var context: DeviceContext?
    var activations = 0
    var completed = 0
    var acked: VirtioFeatures = []
    /// Opt in to queue-level stop/start (counted).
    var restartable = false
    var resets = 0, queueStops = 0, queueStarts = 0
    var supportsQueueRestart: Bool { restartable }
    func stopQueue(_ index: Int) { queueStops += 1 }
    func startQueue(_ index: Int) { queueStarts += 1 }

    init(queues: Int = 1, maxSize: UInt16 = 64) { queueMaxSizes = Array(repeating: maxSize, count: queues) }
    func ackFeatures(_ features: VirtioFeatures) { acked = features }
    func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        for k in 0..<buffer.count { buffer[k] = config[offset + k] }
    }
    func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) {
        for k in 0..<buffer.count { config[offset + k] = buffer[k] }
    }
    func activate(_ c: DeviceContext) throws(DeviceError) { context = c; activations += 1 }
    func reset() { context = nil; resets += 1 }
    func queueNotified(_ index: Int) {
        guard let c = context, index < c.queueCount else { return }
        var done = 0
        (c.queues + index).pointee.drain { chain in
            let n = Int(chain.readableBytes)
            var tmp = [UInt8](repeating: 0, count: max(n, 1))
            let got = tmp.withUnsafeMutableBytes { chain.read(into: $0.baseAddress!, length: n) }
            for k in 0..<got { tmp[k] ^= 0x5A }
            done += 1
            return UInt32(tmp.withUnsafeBytes { chain.write(from: $0.baseAddress!, length: min(got, Int(chain.writableBytes))) })
        }
        completed += done
    }
    func changeConfig(_ b: [UInt8]) {
        config = b
        context?.configInterrupt.signal()
    }
}

/// A hand-driven front-end for protocol tests: raw bytes and fds in, replies and EOF out.
final class VURawClient {
    let fd: Int32
    init?(_ path: String) {
        fd = path.withCString { lb_unix_connect($0, 1) }
        if fd < 0 { return nil }
    }
    deinit { close(fd) }

    static func message(_ request: UInt32, flags: UInt32 = 1, payload: [UInt8] = [], size: UInt32? = nil) -> [UInt8] {
        var b: [UInt8] = []
        for v in [request, flags, size ?? UInt32(payload.count)] { withUnsafeBytes(of: v) { b.append(contentsOf: $0) } }
        return b + payload
    }
    static func message(_ r: VhostUserRequest, flags: UInt32 = 1, payload: [UInt8] = []) -> [UInt8] {
        message(r.rawValue, flags: flags, payload: payload)
    }
    func send(_ bytes: [UInt8], fds: [Int32] = []) {
        XCTAssertNoThrow(try VhostUserSocket.send(fd, bytes, fds: fds, timeoutMs: 2000))
    }
    func reply(timeoutMs: Int32 = 2000) -> (VhostUserHeader, [UInt8])? {
        try? VhostUserSocket.receive(fd, timeoutMs: timeoutMs, request: nil)
    }
    func call(_ r: VhostUserRequest, flags: UInt32 = 1, payload: [UInt8] = [], fds: [Int32] = []) -> [UInt8]? {
        send(VURawClient.message(r, flags: flags, payload: payload), fds: fds)
        guard let (h, p) = reply() else { return nil }
        XCTAssertEqual(h.request, r.rawValue)
        XCTAssertEqual(h.flags, 5)
        return p
    }
    func halfClose() { shutdown(fd, Int32(SHUT_WR)) }
    /// True once the server closed the connection (replies to earlier messages are skipped).
    func waitClosed(timeoutMs: Int = 3000) -> Bool {
        let end = lb_now_ns() + UInt64(timeoutMs) * 1_000_000
        var buf = [UInt8](repeating: 0, count: 512)
        while lb_now_ns() < end {
            _ = lb_poll_one(fd, 1, 100)
            let r = recv(fd, &buf, buf.count, Int32(MSG_DONTWAIT))
            if r == 0 { return true }
            if r < 0 && errno == ECONNRESET { return true }
        }
        return false
    }
}

func u64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v) { Array($0) } }
func u32s(_ vs: [UInt32]) -> [UInt8] { vs.flatMap { v in withUnsafeBytes(of: v) { Array($0) } } }
func regionBytes(_ r: VhostUserMemoryRegion) -> [UInt8] { [r.guestAddress, r.size, r.userAddress, r.mmapOffset].flatMap(u64) }
func memTable(_ rs: [VhostUserMemoryRegion]) -> [UInt8] { u32s([UInt32(rs.count), 0]) + rs.flatMap(regionBytes) }
func memfd(_ size: Int) -> Int32 {
    let fd = lb_memfd("vhost-user-test", 0)
    precondition(fd >= 0 && ftruncate(fd, off_t(size)) == 0)
    return fd
}
func openFDCount() -> Int {
    guard let d = opendir("/proc/self/fd") else { return -1 }
    var n = 0
    while readdir(d) != nil { n += 1 }
    closedir(d)
    return n
}
nonisolated(unsafe) var socketCounter = 0
func testSocketPath() -> String {
    socketCounter += 1
    return "/tmp/lb-vhost-\(getpid())-\(socketCounter).sock"
}

/// A back-end that accepts every connection and keeps it, on its own thread: `answerHandshake` false never replies
/// to anything; true answers GET_FEATURES (everything) and GET_PROTOCOL_FEATURES (REPLY_ACK only), then never
/// replies again (it stalls the ring set-up). Counts connections accepted and connections the front-end closed.
private final class VUStuckBackend: @unchecked Sendable {
    let path: String
    private let listenFD: Int32
    private let answerHandshake: Bool
    private let stopping = Atomic<Bool>(false)
    let accepted = Atomic<Int>(0)
    let closedByPeer = Atomic<Int>(0)
    private var thread: Transport.Thread?

    init(path: String, answerHandshake: Bool) {
        self.path = path
        self.answerHandshake = answerHandshake
        listenFD = path.withCString { lb_unix_listen($0, 16, 0o600) }
        precondition(listenFD >= 0, "listen \(path)")
        thread = Transport.Thread.spawn { [self] in run() }
    }

    private func run() {
        var conns: [Int32] = []
        while !stopping.load(ordering: .acquiring) {
            if lb_poll_one(listenFD, 1, 5) > 0 {
                let c = lb_unix_accept(listenFD)
                if c >= 0 { conns.append(c); accepted.add(1, ordering: .relaxed) }
            }
            var k = 0
            while k < conns.count {
                let c = conns[k]
                var gone = false
                while lb_poll_one(c, 1, 0) > 0 {
                    if lb_peek_byte(c) <= 0 { gone = true; break }
                    guard let (h, _) = try? VhostUserSocket.receive(c, timeoutMs: 100, request: nil) else { gone = true; break }
                    guard answerHandshake else { continue }
                    let value: UInt64? = h.request == VhostUserRequest.getFeatures.rawValue ? UInt64.max
                        : h.request == VhostUserRequest.getProtocolFeatures.rawValue ? VhostUserProtocolFeatures.replyAck.rawValue : nil
                    if let value {
                        var w = VhostUserWriter.reply(h.request)
                        w.append(value)
                        _ = VhostUserSocket.sendNow(c, w.message)
                    }
                }
                if gone { close(c); conns.remove(at: k); closedByPeer.add(1, ordering: .relaxed) } else { k += 1 }
            }
        }
        for c in conns { close(c) }
    }

    func stop() {
        stopping.store(true, ordering: .releasing)
        thread?.join()
        thread = nil
        close(listenFD)
        unlink(path)
    }
}

/// A test case with one started event loop and a device host on it, and a vhost-user server helper: the set-up the
/// vhost-user, hostile-peer, fault-path and queue-restart suites share.
class LoopTestCase: XCTestCase {
    var loop: EventLoop!
    var host: DeviceHost!

    override func setUp() {
        loop = try! EventLoop()
        host = DeviceHost(loop: loop)
        loop.startThread()
    }
    override func tearDown() { loop.stopAndJoin() }

    /// Serves `device` (an echo device by default) on a fresh socket path, listening.
    func startServer(_ device: VirtioDevice = VUEchoDevice()) throws -> VhostUserBackendServer {
        let s = VhostUserBackendServer(socketPath: testSocketPath(), host: host, name: "echo", device: device)
        try s.start()
        return s
    }
}

final class VhostUserTests: LoopTestCase {

    // MARK: codec

    func testRequestAndFeatureNumbersMatchTheSpec() {
        // vhost-user.rst ":id:" fields and "Protocol features".
        let ids: [(VhostUserRequest, UInt32)] = [(.getFeatures, 1), (.setFeatures, 2), (.setOwner, 3), (.resetOwner, 4),
            (.setMemTable, 5), (.setVringNum, 8), (.setVringAddr, 9), (.setVringBase, 10), (.getVringBase, 11),
            (.setVringKick, 12), (.setVringCall, 13), (.setVringErr, 14), (.getProtocolFeatures, 15),
            (.setProtocolFeatures, 16), (.getQueueNum, 17), (.setVringEnable, 18), (.setBackendReqFD, 21),
            (.getConfig, 24), (.setConfig, 25), (.resetDevice, 34), (.getMaxMemSlots, 36), (.addMemReg, 37),
            (.remMemReg, 38), (.setStatus, 39), (.getStatus, 40)]
        for (r, n) in ids { XCTAssertEqual(r.rawValue, n, "\(r)") }
        XCTAssertEqual(VhostUserBackendRequest.configChange.rawValue, 2)
        let bits: [(VhostUserProtocolFeatures, Int)] = [(.mq, 0), (.replyAck, 3), (.backendReq, 5), (.config, 9),
            (.resetDevice, 13), (.configureMemSlots, 15), (.status, 16)]
        for (f, b) in bits { XCTAssertEqual(f.rawValue, 1 << UInt64(b)) }
    }

    func testDecoderChecks() {
        let limits = VhostUserLimits(queueMaxSizes: [64, 64])
        func decode(_ r: VhostUserRequest, _ p: [UInt8], fds: Int = 0) -> Result<VhostUserMessage, VhostUserError> {
            let h = VhostUserHeader(request: r.rawValue, flags: 1, size: UInt32(p.count))
            return p.withUnsafeBytes { b in
                Result { () throws(VhostUserError) -> VhostUserMessage in try VhostUserMessage.decode(h, payload: b, fdCount: fds, limits: limits) }
            }
        }
        XCTAssertEqual(try decode(.setVringNum, u32s([1, 32])).get(), .setVringNum(index: 1, num: 32))
        XCTAssertEqual(try decode(.setVringKick, u64(0x101)).get(), .setVringKick(index: 1, hasFD: false))
        XCTAssertEqual(try decode(.setVringKick, u64(1), fds: 1).get(), .setVringKick(index: 1, hasFD: true))
        for (r, p, fds) in [(VhostUserRequest.setVringNum, u32s([2, 32]), 0), (.setVringNum, u32s([0, 48]), 0),
                            (.setVringNum, u32s([0, 128]), 0), (.setVringNum, u32s([0, 0]), 0),
                            (.setVringKick, u64(0x200), 1), (.setVringKick, u64(0x100), 1), (.setVringKick, u64(0), 0),
                            (.setFeatures, u32s([1]), 0), (.getFeatures, u64(0), 0), (.setFeatures, u64(1), 1),
                            (.setVringEnable, u32s([0, 2]), 0), (.setStatus, u64(0x100), 0),
                            (.getConfig, u32s([0, 257, 0]) + [UInt8](repeating: 0, count: 257), 0),
                            (.getConfig, u32s([0, 8, 0]), 0), (.setMemTable, memTable([]), 0),
                            (.addMemReg, u64(0) + regionBytes(.init(guestAddress: 0, size: 4096, userAddress: 0, mmapOffset: 0)), 0)] {
            XCTAssertThrowsError(try decode(r, p, fds: fds).get(), "\(r) \(p) fds \(fds)")
        }
    }

    // MARK: server: hostile front-ends

    /// A fresh connection works (the server listens again after closing a bad one).
    private func assertServes(_ s: VhostUserBackendServer, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertTrue(loop.executeAndWait { true }, file: file, line: line)
        guard let c = VURawClient(s.socketPath) else { return XCTFail("connect", file: file, line: line) }
        let p = c.call(.getFeatures)
        XCTAssertEqual(p?.count, 8, file: file, line: line)
        if let p { XCTAssertNotEqual(p.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) } & (1 << 30), 0, file: file, line: line) }
    }

    func testMalformedMessagesCloseTheConnectionOnly() throws {
        let before = openFDCount()
        let s = try startServer(VUEchoDevice(queues: 2))
        let negotiateAll = VURawClient.message(.setProtocolFeatures, payload: u64(VhostUserBackendServer.protocolFeatures.rawValue))
        let region = VhostUserMemoryRegion(guestAddress: 0x10000, size: 0x10000, userAddress: 0x7000_0000, mmapOffset: 0)
        typealias Case = (name: String, preamble: [UInt8], bytes: [UInt8], fds: () -> [Int32], halfClose: Bool,
                          expect: (VhostUserError) -> Bool)
        func c(_ name: String, _ bytes: [UInt8], pre: [UInt8] = [], fds: @escaping () -> [Int32] = { [] }, halfClose: Bool = false,
               _ expect: @escaping (VhostUserError) -> Bool) -> Case {
            (name, pre, bytes, fds, halfClose, expect)
        }
        let cases: [Case] = [
            c("truncated header", [1, 0, 0, 0, 1, 0], halfClose: true) { $0 == .peerClosed(midMessage: true) },
            c("oversize payload", VURawClient.message(2, size: 5000)) { if case .payloadTooLarge = $0 { true } else { false } },
            c("bad version", VURawClient.message(.getFeatures, flags: 2)) { if case .badVersion = $0 { true } else { false } },
            c("reply flag in request", VURawClient.message(.getFeatures, flags: 5)) { if case .replyFlagInRequest = $0 { true } else { false } },
            c("short SET_FEATURES", VURawClient.message(.setFeatures, payload: [0, 0, 0, 0])) { if case .payloadSize = $0 { true } else { false } },
            c("GET_FEATURES with payload", VURawClient.message(.getFeatures, payload: u64(0))) { if case .payloadSize = $0 { true } else { false } },
            c("short SET_VRING_ADDR", VURawClient.message(.setVringAddr, payload: [UInt8](repeating: 0, count: 32))) { if case .payloadSize = $0 { true } else { false } },
            c("SET_VRING_ADDR with LOG", VURawClient.message(.setVringAddr, payload: u32s([0, 1]) + [UInt8](repeating: 0, count: 32))) { if case .badFlags = $0 { true } else { false } },
            c("vring index", VURawClient.message(.setVringNum, payload: u32s([2, 8]))) { if case .vringIndex = $0 { true } else { false } },
            c("kick vring index", VURawClient.message(.setVringKick, payload: u64(0x109))) { if case .vringIndex = $0 { true } else { false } },
            c("num not a power of two", VURawClient.message(.setVringNum, payload: u32s([0, 3]))) { if case .vringNum = $0 { true } else { false } },
            c("num above max", VURawClient.message(.setVringNum, payload: u32s([0, 128]))) { if case .vringNum = $0 { true } else { false } },
            c("base above 16 bits", VURawClient.message(.setVringBase, payload: u32s([0, 0x10000]))) { if case .vringBase = $0 { true } else { false } },
            c("overlapping regions", VURawClient.message(.setMemTable, payload: memTable([region,
                VhostUserMemoryRegion(guestAddress: 0x18000, size: 0x10000, userAddress: 0x7100_0000, mmapOffset: 0)])),
              fds: { [memfd(0x20000), memfd(0x20000)] }) { if case .badRegion = $0 { true } else { false } },
            c("overlapping user addresses", VURawClient.message(.setMemTable, payload: memTable([region,
                VhostUserMemoryRegion(guestAddress: 0x80000, size: 0x10000, userAddress: 0x7000_8000, mmapOffset: 0)])),
              fds: { [memfd(0x20000), memfd(0x20000)] }) { if case .badRegion = $0 { true } else { false } },
            c("region larger than the memfd", VURawClient.message(.setMemTable, payload: memTable([
                VhostUserMemoryRegion(guestAddress: 0, size: 1 << 20, userAddress: 0x7000_0000, mmapOffset: 0)])),
              fds: { [memfd(0x10000)] }) { if case .badRegion = $0 { true } else { false } },
            c("offset beyond the memfd", VURawClient.message(.setMemTable, payload: memTable([
                VhostUserMemoryRegion(guestAddress: 0, size: 0x1000, userAddress: 0x7000_0000, mmapOffset: 0x10000)])),
              fds: { [memfd(0x10000)] }) { if case .badRegion = $0 { true } else { false } },
            c("ADD_MEM_REG outside the memfd", VURawClient.message(.addMemReg, payload: u64(0) + regionBytes(
                VhostUserMemoryRegion(guestAddress: 0, size: 0x2000, userAddress: 0x7000_0000, mmapOffset: 0xf000))),
              pre: negotiateAll, fds: { [memfd(0x10000)] }) { if case .badRegion = $0 { true } else { false } },
            c("SET_MEM_TABLE without fds", VURawClient.message(.setMemTable, payload: memTable([region]))) { if case .fdCount = $0 { true } else { false } },
            c("SET_MEM_TABLE with too few fds", VURawClient.message(.setMemTable, payload: memTable([region,
                VhostUserMemoryRegion(guestAddress: 0x80000, size: 0x10000, userAddress: 0x7100_0000, mmapOffset: 0)])),
              fds: { [memfd(0x10000)] }) { if case .fdCount = $0 { true } else { false } },
            c("kick without fd", VURawClient.message(.setVringKick, payload: u64(0))) { if case .fdCount = $0 { true } else { false } },
            c("ADD_MEM_REG without fd", VURawClient.message(.addMemReg, payload: u64(0) + regionBytes(region)), pre: negotiateAll) { if case .fdCount = $0 { true } else { false } },
            c("BACKEND_REQ_FD without fd", VURawClient.message(.setBackendReqFD), pre: negotiateAll) { if case .fdCount = $0 { true } else { false } },
            c("fd on SET_FEATURES", VURawClient.message(.setFeatures, payload: u64(0)), fds: { [lb_eventfd(0, 1)] }) { if case .fdCount = $0 { true } else { false } },
            c("fd on a NOFD kick", VURawClient.message(.setVringCall, payload: u64(0x100)), fds: { [lb_eventfd(0, 1)] }) { if case .fdCount = $0 { true } else { false } },
            c("two fds on a kick", VURawClient.message(.setVringKick, payload: u64(0)), fds: { [lb_eventfd(0, 1), lb_eventfd(0, 1)] }) { if case .fdCount = $0 { true } else { false } },
            c("GPU_SET_SOCKET to a device without a display", VURawClient.message(.gpuSetSocket),
              fds: { var sv: [Int32] = [-1, -1]; socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &sv); close(sv[1]); return [sv[0]] }) { $0 == .unsupportedRequest(.gpuSetSocket) },
            c("GPU_SET_SOCKET without fd", VURawClient.message(.gpuSetSocket)) { if case .fdCount = $0 { true } else { false } },
            c("unknown request 99", VURawClient.message(99)) { $0 == .unknownRequest(99) },
            c("unknown request 0", VURawClient.message(0)) { $0 == .unknownRequest(0) },
            c("unsupported SET_LOG_BASE", VURawClient.message(.setLogBase, payload: u64(0))) { $0 == .unsupportedRequest(.setLogBase) },
            c("GET_CONFIG not negotiated", VURawClient.message(.getConfig, payload: u32s([0, 8, 0]) + [UInt8](repeating: 0, count: 8))) { $0 == .notNegotiated(.getConfig) },
            c("GET_CONFIG above 256", VURawClient.message(.getConfig, payload: u32s([0, 300, 0]) + [UInt8](repeating: 0, count: 300)), pre: negotiateAll) { $0 == .configSize(300) },
            c("features not offered", VURawClient.message(.setFeatures, payload: u64(1 << 41))) { if case .featuresNotOffered = $0 { true } else { false } },
            c("protocol features not offered", VURawClient.message(.setProtocolFeatures, payload: u64(1 << 12))) { if case .protocolFeaturesNotOffered = $0 { true } else { false } },
            c("disconnect mid-message", Array(VURawClient.message(.setVringAddr, payload: [UInt8](repeating: 0, count: 40)).prefix(22)), halfClose: true) { $0 == .peerClosed(midMessage: true) },
        ]
        for k in cases {
            guard let cl = VURawClient(s.socketPath) else { XCTFail("\(k.name): connect"); continue }
            if !k.preamble.isEmpty { cl.send(k.preamble) }
            let fds = k.fds()
            cl.send(k.bytes, fds: fds)
            for f in fds { close(f) }
            if k.halfClose { cl.halfClose() }
            XCTAssertTrue(cl.waitClosed(), "\(k.name): connection still open")
            let err = loop.executeAndWait { s.lastError }
            XCTAssertTrue(err.map(k.expect) ?? false, "\(k.name): got \(String(describing: err))")
            XCTAssertFalse(s.isConnected, k.name)
        }
        assertServes(s)
        XCTAssertEqual(s.connectionsAccepted, cases.count + 1)
        s.stop()
        XCTAssertEqual(openFDCount(), before, "file descriptors leaked")
    }

    func testSplitMessagesAndBacklog() throws {
        let s = try startServer()
        guard let a = VURawClient(s.socketPath), let b = VURawClient(s.socketPath) else { return XCTFail("connect") }
        // One message in three pieces, with pauses: reassembled.
        let m = VURawClient.message(.getFeatures)
        a.send(Array(m[0..<3])); usleep(20_000)
        a.send(Array(m[3..<10])); usleep(20_000)
        a.send(Array(m[10...]))
        XCTAssertEqual(a.reply()?.1.count, 8)
        // Two messages in one write.
        a.send(VURawClient.message(.getFeatures) + VURawClient.message(.getProtocolFeatures))
        XCTAssertEqual(a.reply()?.0.request, 1)
        XCTAssertEqual(a.reply()?.0.request, 15)
        // The second front-end waits in the backlog while the first is served...
        b.send(VURawClient.message(.getFeatures))
        XCTAssertNil(b.reply(timeoutMs: 200))
        // ...and is served once the first goes away.
        a.halfClose()
        XCTAssertTrue(a.waitClosed())
        XCTAssertEqual(b.reply()?.0.request, 1)
        s.stop()
    }

    func testProtocolHappyPath() throws {
        let before = openFDCount()
        let dev = VUEchoDevice()
        let s = try startServer(dev)
        try happyPath(s, dev)
        s.stop()
        XCTAssertEqual(openFDCount(), before, "file descriptors leaked")
    }

    private func happyPath(_ s: VhostUserBackendServer, _ dev: VUEchoDevice) throws {
        guard let c = VURawClient(s.socketPath) else { return XCTFail("connect") }
        XCTAssertEqual(c.call(.getProtocolFeatures), u64(VhostUserBackendServer.protocolFeatures.rawValue))
        c.send(VURawClient.message(.setProtocolFeatures, payload: u64(VhostUserBackendServer.protocolFeatures.rawValue)))
        let ackFlags: UInt32 = 1 | 8
        XCTAssertEqual(c.call(.setOwner, flags: ackFlags), u64(0))
        XCTAssertEqual(c.call(.getQueueNum), u64(1))
        XCTAssertEqual(c.call(.getMaxMemSlots), u64(32))
        XCTAssertEqual(c.call(.getConfig, payload: u32s([0, 8, 0]) + [UInt8](repeating: 0, count: 8)),
                       u32s([0, 8, 0]) + [1, 2, 3, 4, 5, 6, 7, 8])
        XCTAssertEqual(c.call(.getConfig, payload: u32s([4, 8, 0]) + [UInt8](repeating: 0, count: 8)), [], "out of range: empty reply")
        XCTAssertEqual(c.call(.setConfig, flags: ackFlags, payload: u32s([6, 2, 0]) + [0xEE, 0xFF]), u64(0))
        XCTAssertEqual(loop.executeAndWait { dev.config }, [1, 2, 3, 4, 5, 6, 0xEE, 0xFF])
        // Memory through ADD_MEM_REG (what QEMU uses with CONFIGURE_MEM_SLOTS); a ring inside it.
        let mfd = memfd(0x10000)
        let ram = mmap(nil, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0)!
        defer { munmap(ram, 0x10000) }
        let ua = UInt64(UInt(bitPattern: ram))
        let region = VhostUserMemoryRegion(guestAddress: 0x4000_0000, size: 0x10000, userAddress: ua, mmapOffset: 0)
        XCTAssertEqual(c.call(.addMemReg, flags: ackFlags, payload: u64(0) + regionBytes(region), fds: [mfd]), u64(0))
        close(mfd)
        XCTAssertEqual(c.call(.setFeatures, flags: ackFlags, payload: u64(VirtioFeatures.version1.rawValue | 1 << 30)), u64(0))
        XCTAssertEqual(c.call(.setVringNum, flags: ackFlags, payload: u32s([0, 8])), u64(0))
        XCTAssertEqual(c.call(.setVringBase, flags: ackFlags, payload: u32s([0, 5])), u64(0))
        let addr = u32s([0, 0]) + u64(ua) + u64(ua + 0x2000) + u64(ua + 0x1000) + u64(0)
        XCTAssertEqual(c.call(.setVringAddr, flags: ackFlags, payload: addr), u64(0))
        let kick = lb_eventfd(0, 1), call = lb_eventfd(0, 1)
        XCTAssertEqual(c.call(.setVringCall, flags: ackFlags, payload: u64(0), fds: [call]), u64(0))
        XCTAssertEqual(c.call(.setVringKick, flags: ackFlags, payload: u64(0), fds: [kick]), u64(0))
        XCTAssertFalse(loop.executeAndWait { self.host.isActive(s.index) }, "protocol features negotiated: ring starts disabled")
        // The driver had 5 chains completed before (e.g. a previous back-end): used.idx is re-read from the ring.
        (ram + 0x2000 + 2).storeBytes(of: UInt16(5), as: UInt16.self)
        (ram + 0x1000 + 2).storeBytes(of: UInt16(5), as: UInt16.self)
        XCTAssertEqual(c.call(.setVringEnable, flags: ackFlags, payload: u32s([0, 1])), u64(0))
        XCTAssertTrue(loop.executeAndWait { self.host.isActive(s.index) })
        // A chain at avail slot 5 (the base): one readable and one writable buffer.
        let desc = ram, avail = ram + 0x1000, used = ram + 0x2000
        func setDesc(_ i: Int, _ addr: UInt64, _ len: UInt32, _ flags: UInt16, _ next: UInt16) {
            (desc + 16 * i).storeBytes(of: addr, as: UInt64.self)
            (desc + 16 * i + 8).storeBytes(of: len, as: UInt32.self)
            (desc + 16 * i + 12).storeBytes(of: flags, as: UInt16.self)
            (desc + 16 * i + 14).storeBytes(of: next, as: UInt16.self)
        }
        memset(ram + 0x3000, 0x11, 16)
        setDesc(0, 0x4000_3000, 16, 1, 1)
        setDesc(1, 0x4000_4000, 16, 2, 0)
        (avail + 4 + 2 * 5).storeBytes(of: UInt16(0), as: UInt16.self)
        (avail + 2).storeBytes(of: UInt16(6), as: UInt16.self)
        FD.signal(kick)
        XCTAssertNotEqual(FD.wait(call, timeoutMs: 3000), 0, "interrupt on the call fd")
        XCTAssertEqual((used + 2).load(as: UInt16.self), 6)
        XCTAssertEqual((ram + 0x4000).load(as: UInt8.self), 0x11 ^ 0x5A)
        // A new call fd replaces the old one without stopping the ring.
        let call2 = lb_eventfd(0, 1)
        XCTAssertEqual(c.call(.setVringCall, flags: ackFlags, payload: u64(0), fds: [call2]), u64(0))
        XCTAssertEqual(loop.executeAndWait { dev.activations }, 1)
        // GET_VRING_BASE stops the ring and reports where it stopped.
        XCTAssertEqual(c.call(.getVringBase, payload: u32s([0, 0])), u32s([0, 6]))
        XCTAssertFalse(loop.executeAndWait { self.host.isActive(s.index) })
        XCTAssertEqual(c.call(.remMemReg, flags: ackFlags, payload: u64(0) + regionBytes(region)), u64(0))
        XCTAssertEqual(c.call(.setStatus, flags: ackFlags, payload: u64(7)), u64(0))
        XCTAssertEqual(c.call(.getStatus), u64(7))
        XCTAssertEqual(c.call(.resetDevice, flags: ackFlags), u64(0))
        close(kick); close(call); close(call2)
        c.halfClose()
        XCTAssertTrue(c.waitClosed())
    }

    // MARK: front-end ↔ back-end loopback

    func testLoopbackFrontendToBackendServerWithRestart() throws {
        // Back-end: its own loop (a separate "process").
        let backLoop = try EventLoop()
        let backHost = DeviceHost(loop: backLoop)
        backLoop.startThread()
        defer { backLoop.stopAndJoin() }
        let path = testSocketPath()
        var echo = VUEchoDevice()
        var server = VhostUserBackendServer(socketPath: path, host: backHost, name: "echo0", device: echo)
        try server.start()

        let fe = try VhostUserFrontendDevice(socketPath: path, deviceID: 0x4c42, queueSizes: [64], configSize: 8, loop: loop)
        XCTAssertTrue(fe.offeredFeatures.contains(.eventIdx))
        XCTAssertFalse(fe.offeredFeatures.contains(.vhostUserProtocolFeatures))
        let idx = loop.executeAndWait { self.host.add(name: "fe0", device: fe) }
        let drv = try SimDriver(host: host, index: idx, ramSize: 1 << 20)
        // A 64-entry ring: 40 requests cannot lap it. (This driver reaps completions before it needs the relayed
        // interrupt, so the front-end's scans can lag the driver; with a 16-entry ring they sometimes lagged a full
        // ring and the restart was, correctly, refused instead of replayed.)
        try drv.start(queueSizes: [64])
        XCTAssertEqual(drv.readConfig(offset: 0, count: 8), [1, 2, 3, 4, 5, 6, 7, 8])
        let q = drv.queues[0]
        let src = drv.alloc(64), dst = drv.alloc(64)

        func submit(_ seed: UInt8) throws -> UInt16 {
            for k in 0..<64 { (drv.host(src) + k).storeBytes(of: seed &+ UInt8(k), as: UInt8.self) }
            memset(drv.host(dst), 0, 64)
            let head = try XCTUnwrap(q.addChain(readable: [(src, 64)], writable: [(dst, 64)]))
            q.submit(head)
            return head
        }
        func complete(_ head: UInt16, _ seed: UInt8, timeoutMs: Int32 = 5000) throws {
            let u = try XCTUnwrap(q.waitUsed(timeoutMs: timeoutMs), "no completion")
            XCTAssertEqual(u.id, head)
            XCTAssertEqual(u.len, 64)
            q.recycle(head)
            let out = Array(UnsafeRawBufferPointer(start: drv.host(dst), count: 64))
            XCTAssertEqual(out, (0..<64).map { (seed &+ UInt8($0)) ^ 0x5A })
        }
        for i in 0..<40 { try complete(try submit(UInt8(i)), UInt8(i)) }
        XCTAssertEqual(backLoop.executeAndWait { echo.completed }, 40)
        // Replay mode: the driver has EVENT_IDX, the back-end (reading our shadow avail ring) does not.
        XCTAssertTrue(drv.features.contains(.eventIdx))
        XCTAssertFalse(backLoop.executeAndWait { echo.acked.contains(.eventIdx) })
        XCTAssertTrue(backLoop.executeAndWait { echo.acked.contains(.version1) })

        // Config write goes to the back-end; a back-end config change comes back as a config interrupt.
        XCTAssertTrue(drv.writeConfig(offset: 2, bytes: [0xAA, 0xBB]))
        XCTAssertEqual(backLoop.executeAndWait { echo.config }, [1, 2, 0xAA, 0xBB, 5, 6, 7, 8])
        let e1 = echo
        backLoop.executeAndWait { e1.changeConfig([9, 8, 7, 6, 5, 4, 3, 2]) }
        XCTAssertNotEqual(FD.wait(drv.configInterruptFD.raw, timeoutMs: 5000), 0, "config interrupt")
        XCTAssertEqual(drv.readConfig(offset: 0, count: 8), [9, 8, 7, 6, 5, 4, 3, 2])

        // The back-end restarts mid-run: a request submitted while it is away completes after the reconnect.
        server.stop()
        let head = try submit(200)
        usleep(300_000)
        echo = VUEchoDevice()
        server = VhostUserBackendServer(socketPath: path, host: backHost, name: "echo1", device: echo)
        try server.start()
        try complete(head, 200, timeoutMs: 10_000)
        for i in 0..<20 { try complete(try submit(UInt8(i)), UInt8(i)) }
        XCTAssertEqual(loop.executeAndWait { fe.reconnects }, 1)
        XCTAssertEqual(backLoop.executeAndWait { echo.completed }, 21)

        // Driver reset: the back-end's rings stop (GET_VRING_BASE).
        drv.reset()
        let s = server
        XCTAssertFalse(backLoop.executeAndWait { backHost.isActive(s.index) })
        loop.executeAndWait { fe.shutdown() }
        server.stop()
    }

    /// The front-end's shadow avail ring and in-flight tracking on hand-made rings: entries copied across and
    /// published, out-of-order completion, a head completed, reaped and made available again between two pumps,
    /// the replay rewrite into the shadow ring, a driver a whole ring ahead of the last pump (still exact: the
    /// back-end cannot run ahead of the shadow), EVENT_IDX's avail_event, losing track on a bogus used id and
    /// resynchronising once everything handed over completed.
    func testInflightTrackerOutOfOrderReuseReplayAndLoss() {
        let size: UInt16 = 8
        let avail = UnsafeMutableRawPointer.allocate(byteCount: QueueConfig.availBytes(Int(size)), alignment: 8)
        let shadow = UnsafeMutableRawPointer.allocate(byteCount: QueueConfig.availBytes(Int(size)), alignment: 8)
        let used = UnsafeMutableRawPointer.allocate(byteCount: QueueConfig.usedBytes(Int(size)), alignment: 8)
        defer { avail.deallocate(); shadow.deallocate(); used.deallocate() }
        memset(avail, 0, QueueConfig.availBytes(Int(size)))
        memset(used, 0, QueueConfig.usedBytes(Int(size)))
        var a: UInt16 = 0, u: UInt16 = 0
        func idx(_ r: UnsafeMutableRawPointer, _ v: UInt16) {
            (r + 2).assumingMemoryBound(to: Atomic<UInt16>.self).pointee.store(v, ordering: .releasing)
        }
        func offer(_ heads: UInt16...) {
            for h in heads { (avail + 4 + 2 * Int(a & (size - 1))).storeBytes(of: h, as: UInt16.self); a &+= 1 }
            idx(avail, a)
        }
        func complete(_ ids: UInt32...) {
            for id in ids { (used + 4 + 8 * Int(u & (size - 1))).storeBytes(of: id, as: UInt32.self); u &+= 1 }
            idx(used, u)
        }
        func slot(_ p: UInt16) -> UInt16 { (shadow + 4 + 2 * Int(p & (size - 1))).load(as: UInt16.self) }
        var shadowIdx: UInt16 { (shadow + 2).load(as: UInt16.self) }
        var availEvent: UInt16 { (used + 4 + 8 * Int(size)).load(as: UInt16.self) }

        let t = InflightTracker(size: size, avail: avail, shadow: shadow, used: used, lastAvail: 0, eventIdx: true)
        XCTAssertTrue(t.isTracking)
        XCTAssertEqual(shadowIdx, 0)
        offer(0, 1, 2, 3)
        XCTAssertTrue(t.pump(), "new entries published")
        XCTAssertEqual(shadowIdx, 4)
        XCTAssertEqual([slot(0), slot(1), slot(2), slot(3)], [0, 1, 2, 3])
        XCTAssertEqual(availEvent, 4, "the driver kicks for its next entry")
        XCTAssertFalse(t.pump(), "nothing new")
        complete(2, 0)              // out of order: positions 0 and 2 done, 1 and 3 still in flight
        t.pump()
        complete(3)                 // head 3 done, reaped and reused before the next pump
        offer(3)
        t.pump()
        XCTAssertTrue(t.isTracking)
        XCTAssertEqual(shadowIdx, 5)
        XCTAssertEqual(t.planReplay(), 2)
        // In-order replay from used.idx (3) would hand over shadow positions 3 and 4 (head 3's completed request,
        // then head 3 again) and never head 1. Exact replay: heads 1 and 3, oldest first, from used.idx.
        XCTAssertEqual(t.replay(k: 2), 3)
        XCTAssertEqual([slot(3), slot(4)], [1, 3])
        XCTAssertEqual(shadowIdx, 5)
        // The new back-end completes them; nothing is left in flight.
        complete(3, 1)
        t.pump()
        XCTAssertEqual(t.planReplay(), 0)

        // Shadow positions are ours: a driver whose avail.idx differs (lastAvail) is copied from there.
        // A driver a whole ring ahead of the last pump: every entry is still there (the back-end cannot have
        // completed entries it never saw), copied exactly.
        offer(0, 1, 2, 3, 4, 5, 6, 7)
        XCTAssertTrue(t.pump())
        XCTAssertTrue(t.isTracking)
        XCTAssertEqual(shadowIdx, 13)
        XCTAssertEqual(t.planReplay(), 8)
        // Completions let the driver reuse heads; the shadow never runs more than a ring past used entries read.
        complete(0, 1, 2, 3, 4, 5, 6, 7)
        offer(7)
        t.pump()
        XCTAssertEqual(shadowIdx, 14)
        XCTAssertEqual(t.planReplay(), 1)

        // A used id the ring cannot hold: the back-end is broken, no replay; copying goes on.
        offer(5)
        t.pump()                    // heads 7 and 5 in flight
        complete(42)
        t.pump()
        XCTAssertFalse(t.isTracking)
        XCTAssertEqual(t.lost, .backendUsedHeadInvalid)
        XCTAssertNil(t.planReplay())
        offer(6)
        XCTAssertTrue(t.pump())
        XCTAssertEqual(shadowIdx, 16)
        XCTAssertFalse(t.isTracking, "not everything handed over completed yet: stays lost")
        complete(5, 6)
        t.pump()
        XCTAssertTrue(t.isTracking, "everything completed: counters restart from zero")
        offer(1)
        t.pump()
        XCTAssertEqual(t.planReplay(), 1)
        XCTAssertEqual(t.losses, 1)

        // Without EVENT_IDX avail_event is left alone (the driver reads used.flags, the back-end's).
        let before = availEvent
        let t2 = InflightTracker(size: size, avail: avail, shadow: shadow, used: used, lastAvail: a, eventIdx: false)
        offer(1)
        XCTAssertTrue(t2.pump())
        XCTAssertEqual(availEvent, before)
    }

    /// A restarted back-end while the front-end does not know the in-flight heads exactly: no replay, the rings are
    /// not set up, every queue is latched (NEEDS_RESET + config interrupt); a driver reset recovers.
    func testFrontendRefusesInexactReplayAndLatchesNeedsReset() throws {
        let backLoop = try EventLoop()
        let backHost = DeviceHost(loop: backLoop)
        backLoop.startThread()
        defer { backLoop.stopAndJoin() }
        let path = testSocketPath()
        var echo = VUEchoDevice()
        var server = VhostUserBackendServer(socketPath: path, host: backHost, name: "echo0", device: echo)
        try server.start()
        let fe = try VhostUserFrontendDevice(socketPath: path, deviceID: 0x4c42, queueSizes: [64], configSize: 8, loop: loop)
        let idx = loop.executeAndWait { self.host.add(name: "fe0", device: fe) }
        let drv = try SimDriver(host: host, index: idx, ramSize: 1 << 20)
        try drv.start(queueSizes: [16])
        var q = drv.queues[0]
        let src = drv.alloc(64), dst = drv.alloc(64)
        func roundTrip() throws {
            let head = try XCTUnwrap(q.addChain(readable: [(src, 64)], writable: [(dst, 64)]))
            q.submit(head)
            let u = try XCTUnwrap(q.waitUsed(timeoutMs: 5000), "no completion")
            XCTAssertEqual(u.id, head)
            q.recycle(head)
        }
        for _ in 0..<5 { try roundTrip() }
        XCTAssertEqual(loop.executeAndWait { fe.tracking(0)?.exact }, true)

        server.stop()
        let head = try XCTUnwrap(q.addChain(readable: [(src, 64)], writable: [(dst, 64)]))
        q.submit(head)               // in flight while the back-end is away
        loop.executeAndWait { fe.loseTracking(0) }
        _ = FD.drain(drv.configInterruptFD.raw)
        echo = VUEchoDevice()
        server = VhostUserBackendServer(socketPath: path, host: backHost, name: "echo1", device: echo)
        try server.start()
        XCTAssertNotEqual(FD.wait(drv.configInterruptFD.raw, timeoutMs: 5000), 0, "config interrupt (NEEDS_RESET)")
        XCTAssertEqual(loop.executeAndWait { fe.replaysRefused }, 1)
        XCTAssertEqual(loop.executeAndWait { fe.replayedRequests }, 0)
        XCTAssertNotEqual(drv.status & DeviceStatus.needsReset, 0)
        let s1 = server
        XCTAssertFalse(backLoop.executeAndWait { backHost.isActive(s1.index) }, "rings must not be set up")
        usleep(200_000)
        XCTAssertNil(q.reap(), "nothing replayed")
        XCTAssertEqual(backLoop.executeAndWait { echo.completed }, 0)

        // The driver resets and starts again: a fresh set-up, requests flow.
        drv.reset()
        try drv.start(queueSizes: [16])
        q = drv.queues[0]
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
        for _ in 0..<3 { try roundTrip() }
        XCTAssertEqual(backLoop.executeAndWait { echo.completed }, 3)
        drv.reset()
        loop.executeAndWait { fe.shutdown() }
        server.stop()
    }

    /// reconnect = "reset": interrupts go straight from the back-end to the driver's eventfd; a restart while idle
    /// reconnects transparently, a restart with a request in flight latches NEEDS_RESET (nothing is guessed).
    func testDirectInterruptsReconnectIdleAndLatchWhenBusy() throws {
        let backLoop = try EventLoop()
        let backHost = DeviceHost(loop: backLoop)
        backLoop.startThread()
        defer { backLoop.stopAndJoin() }
        let path = testSocketPath()
        var echo = VUEchoDevice()
        var server = VhostUserBackendServer(socketPath: path, host: backHost, name: "echo0", device: echo)
        try server.start()
        let fe = try VhostUserFrontendDevice(socketPath: path, deviceID: 0x4c42, queueSizes: [64], configSize: 8, loop: loop,
                                             replay: false)
        let idx = loop.executeAndWait { self.host.add(name: "fe0", device: fe) }
        let drv = try SimDriver(host: host, index: idx, ramSize: 1 << 20)
        try drv.start(queueSizes: [16])
        let q = drv.queues[0]
        let src = drv.alloc(64), dst = drv.alloc(64)
        func roundTrip() throws {
            let head = try XCTUnwrap(q.addChain(readable: [(src, 64)], writable: [(dst, 64)]))
            q.submit(head)
            let u = try XCTUnwrap(q.waitUsed(timeoutMs: 5000), "no completion")
            XCTAssertEqual(u.id, head)
            q.recycle(head)
        }
        for _ in 0..<5 { try roundTrip() }
        XCTAssertNil(loop.executeAndWait { fe.tracking(0) }, "no in-flight tracking in direct mode")

        // Idle restart: reconnect, then requests flow again.
        server.stop()
        echo = VUEchoDevice()
        server = VhostUserBackendServer(socketPath: path, host: backHost, name: "echo1", device: echo)
        try server.start()
        for _ in 0..<200 where loop.executeAndWait({ fe.reconnects }) == 0 { usleep(10_000) }
        XCTAssertEqual(loop.executeAndWait { fe.reconnects }, 1)
        for _ in 0..<3 { try roundTrip() }
        XCTAssertEqual(loop.executeAndWait { fe.replaysRefused }, 0)

        // Busy restart: a request is in flight while the back-end is away.
        server.stop()
        let head = try XCTUnwrap(q.addChain(readable: [(src, 64)], writable: [(dst, 64)]))
        q.submit(head)
        _ = FD.drain(drv.configInterruptFD.raw)
        server = VhostUserBackendServer(socketPath: path, host: backHost, name: "echo2", device: VUEchoDevice())
        try server.start()
        XCTAssertNotEqual(FD.wait(drv.configInterruptFD.raw, timeoutMs: 5000), 0, "config interrupt (NEEDS_RESET)")
        XCTAssertEqual(loop.executeAndWait { fe.replaysRefused }, 1)
        XCTAssertNotEqual(drv.status & DeviceStatus.needsReset, 0)
        drv.reset()
        loop.executeAndWait { fe.shutdown() }
        server.stop()
    }

    /// The issue: "a back-end that never answers does not block the other devices". One front-end retries against
    /// a back-end that accepts and never replies, then against one that answers the hand-shake and stalls the ring
    /// set-up; meanwhile another device on the same loop serves requests with bounded latency. Then a real back-end
    /// appears on the path and the front-end carries on, including the request left in flight.
    func testStuckBackendDoesNotStallTheOtherDevicesOnTheLoop() throws {
        let backLoop = try EventLoop()
        let backHost = DeviceHost(loop: backLoop)
        backLoop.startThread()
        defer { backLoop.stopAndJoin() }
        let path = testSocketPath()
        var server = VhostUserBackendServer(socketPath: path, host: backHost, name: "echo0", device: VUEchoDevice())
        try server.start()
        let fe = try VhostUserFrontendDevice(socketPath: path, deviceID: 0x4c42, queueSizes: [64], configSize: 8, loop: loop)
        let idx = loop.executeAndWait { self.host.add(name: "fe0", device: fe) }
        let drv = try SimDriver(host: host, index: idx, ramSize: 1 << 20)
        try drv.start(queueSizes: [16])
        let q = drv.queues[0]
        let src = drv.alloc(64), dst = drv.alloc(64)
        func roundTrip(_ queue: SimQueue, timeoutMs: Int32 = 5000) throws -> UInt64 {
            let t0 = lb_now_ns()
            let head = try XCTUnwrap(queue.addChain(readable: [(src, 64)], writable: [(dst, 64)]))
            queue.submit(head)
            let u = try XCTUnwrap(queue.waitUsed(timeoutMs: timeoutMs), "no completion")
            XCTAssertEqual(u.id, head)
            queue.recycle(head)
            return lb_now_ns() - t0
        }
        _ = try roundTrip(q)

        // The other device: in-process, same loop.
        let other = VUEchoDevice()
        let oidx = loop.executeAndWait { self.host.add(name: "echo", device: other) }
        let odrv = try SimDriver(host: host, index: oidx, ramSize: 1 << 20)
        try odrv.start(queueSizes: [16])
        let oq = odrv.queues[0]
        func otherLatency(seconds: Double) throws -> (maxMs: Double, requests: Int) {
            let end = lb_now_ns() + UInt64(seconds * 1e9)
            var worst: UInt64 = 0, n = 0
            while lb_now_ns() < end {
                worst = max(worst, try roundTrip(oq))
                n += 1
                usleep(2000)
            }
            return (Double(worst) / 1e6, n)
        }
        XCTAssertLessThan(try otherLatency(seconds: 0.2).maxMs, 100, "baseline")

        // The back-end goes away, a request stays in flight, and a silent one takes the path.
        server.stop()
        let head = try XCTUnwrap(q.addChain(readable: [(src, 64)], writable: [(dst, 64)]))
        q.submit(head)
        let silent = VUStuckBackend(path: path, answerHandshake: false)
        let s = try otherLatency(seconds: 3)
        let silentAttempts = silent.accepted.load(ordering: .relaxed)
        silent.stop()
        print("silent back-end: \(silentAttempts) hand-shakes tried; other device: \(s.requests) requests, max latency \(s.maxMs) ms")
        XCTAssertGreaterThanOrEqual(silentAttempts, 2, "the front-end kept retrying")
        XCTAssertLessThan(s.maxMs, 300, "the other device stalled behind the silent back-end")
        XCTAssertFalse(loop.executeAndWait { fe.isConnected })

        // One that answers the hand-shake, then stalls the ring set-up (the loop's own, bounded exchange).
        let stalled = VUStuckBackend(path: path, answerHandshake: true)
        let st = try otherLatency(seconds: 3)
        let stalledAttempts = stalled.accepted.load(ordering: .relaxed)
        stalled.stop()
        print("stalling back-end: \(stalledAttempts) hand-shakes tried; other device: \(st.requests) requests, max latency \(st.maxMs) ms")
        XCTAssertGreaterThanOrEqual(stalledAttempts, 1, "the front-end tried it (backoff is at 1 s by now)")
        XCTAssertLessThan(st.maxMs, 450, "the other device stalled behind the stalling back-end")
        XCTAssertEqual(loop.executeAndWait { fe.reconnects }, 0)

        // A real back-end appears: the front-end reconnects and the request left in flight completes (replay).
        let echo = VUEchoDevice()
        server = VhostUserBackendServer(socketPath: path, host: backHost, name: "echo1", device: echo)
        try server.start()
        let u = try XCTUnwrap(q.waitUsed(timeoutMs: 10_000), "the in-flight request never completed")
        XCTAssertEqual(u.id, head)
        q.recycle(head)
        for _ in 0..<5 { _ = try roundTrip(q) }
        XCTAssertEqual(loop.executeAndWait { fe.reconnects }, 1)
        XCTAssertEqual(loop.executeAndWait { fe.replayedRequests }, 1)
        XCTAssertEqual(backLoop.executeAndWait { echo.completed }, 6)
        drv.reset()
        odrv.reset()
        loop.executeAndWait { fe.shutdown() }
        server.stop()
    }

    /// Shutting the front-end down while its reconnect hand-shake waits on a silent back-end: the helper gives up at
    /// once and closes its connection (nothing is handed over later, nothing leaks).
    func testShutdownDuringAReconnectHandshakeClosesItsConnection() throws {
        let backLoop = try EventLoop()
        let backHost = DeviceHost(loop: backLoop)
        backLoop.startThread()
        defer { backLoop.stopAndJoin() }
        let path = testSocketPath()
        let server = VhostUserBackendServer(socketPath: path, host: backHost, name: "echo0", device: VUEchoDevice())
        try server.start()
        let fe = try VhostUserFrontendDevice(socketPath: path, deviceID: 0x4c42, queueSizes: [64], configSize: 8, loop: loop)
        loop.executeAndWait { _ = self.host.add(name: "fe0", device: fe) }
        server.stop()
        let silent = VUStuckBackend(path: path, answerHandshake: false)
        defer { silent.stop() }
        let end = lb_now_ns() + 5_000_000_000
        while silent.accepted.load(ordering: .relaxed) == 0 && lb_now_ns() < end { usleep(1000) }
        XCTAssertEqual(silent.accepted.load(ordering: .relaxed), 1)
        let t0 = lb_now_ns()
        loop.executeAndWait { fe.shutdown() }
        while silent.closedByPeer.load(ordering: .relaxed) == 0 && lb_now_ns() < end { usleep(1000) }
        XCTAssertEqual(silent.closedByPeer.load(ordering: .relaxed), 1)
        XCTAssertLessThan(lb_now_ns() - t0, 500_000_000, "the hand-shake was not cancelled")
        usleep(300_000)
        XCTAssertEqual(silent.accepted.load(ordering: .relaxed), 1, "no retry after shutdown")
        XCTAssertFalse(loop.executeAndWait { fe.isConnected })
    }

    func testFrontendGivesUpOnASilentBackendWithinTheTimeout() throws {
        // A listener that never accepts: connect succeeds (backlog), no reply ever comes.
        let path = testSocketPath()
        let l = path.withCString { lb_unix_listen($0, 4, 0o600) }
        XCTAssertGreaterThanOrEqual(l, 0)
        defer { close(l); unlink(path) }
        let t0 = lb_now_ns()
        XCTAssertThrowsError(try VhostUserFrontendDevice(socketPath: path, deviceID: 4, queueSizes: [8], loop: loop))
        XCTAssertLessThan(lb_now_ns() - t0, 3_000_000_000)
    }
}
