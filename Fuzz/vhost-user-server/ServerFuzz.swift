// libFuzzer target: the vhost-user back-end server's state machine (Sources/Transport/VhostUser/BackendServer.swift)
// fed whole message sequences over a real Unix socket, with real descriptors attached (SCM_RIGHTS): memfds of a
// few sizes (so SET_MEM_TABLE / ADD_MEM_REG map and rings start), eventfds, pipe ends, socket ends. The fuzzer also
// plays the driver: it writes descriptors and avail entries into the shared memfds, kicks queues, shrinks a memfd
// under a mapping, raises config-change events and reconnects.
//
// The event loop is never run: `executeAndWait` runs inline, and the harness calls `handleEvent` itself (tokens:
// listener 1, connection 2, config 3, memory guard 4). Every iteration ends with the client closed and the server
// back to listening; the process's fd count must then be what it was before the iteration (no leak).
import Glibc
import CLinux
import Transport

/// A small device: two queues; it completes most chains at once (reads the readable part, fills the writable
/// part) and keeps a few in flight until `quiesce`/`reset`, like an asynchronous device.
final class FuzzDevice: VirtioDevice {
    let deviceID: UInt32 = 0x1234
    let queueMaxSizes: [UInt16] = [256, 16]
    let offeredFeatures: VirtioFeatures = [.version1, .eventIdx, .indirectDesc, VirtioFeatures(bit: 0)]
    let configSize = 16
    var config = [UInt8](repeating: 0, count: 16)
    var context: DeviceContext?
    var inFlight: [(queue: Int, head: UInt16)] = []
    var buffer = [UInt8](repeating: 0xA5, count: 4096)
    var activations = 0, kicks = 0, chains = 0

    func ackFeatures(_ features: VirtioFeatures) {}
    func readConfig(offset: Int, into b: UnsafeMutableRawBufferPointer) {
        fuzzCheck(offset >= 0 && offset + b.count <= configSize, "config read out of range \(offset)+\(b.count)")
        for i in 0..<b.count { b[i] = config[offset + i] }
    }
    func writeConfig(offset: Int, from b: UnsafeRawBufferPointer) {
        fuzzCheck(offset >= 0 && offset + b.count <= configSize, "config write out of range \(offset)+\(b.count)")
        for i in 0..<b.count { config[offset + i] = b[i] }
    }
    func activate(_ c: DeviceContext) throws(DeviceError) {
        fuzzCheck(context == nil, "activate while active")
        fuzzCheck(c.queueCount >= 1 && c.queueCount <= queueMaxSizes.count, "activated with \(c.queueCount) queues")
        context = c
        activations += 1
    }
    func queueNotified(_ index: Int) {
        guard let c = context else { fuzzCheck(false, "kick while inactive"); return }
        fuzzCheck(index < c.queueCount, "kick for queue \(index) of \(c.queueCount)")
        var budget = 4096
        kicks += 1
        c.queues[index].drain { chain in
            budget -= 1
            self.chains += 1
            fuzzCheck(budget > 0, "drain did not end")
            let wantAsync = chain.head & 7 == 7 && self.inFlight.count < 8
            _ = self.buffer.withUnsafeMutableBytes { chain.read(into: $0.baseAddress!, length: $0.count) }
            let w = self.buffer.withUnsafeBytes { chain.write(from: $0.baseAddress!, length: min($0.count, Int(chain.writableBytes))) }
            if wantAsync { self.inFlight.append((index, chain.head)); return nil }
            return UInt32(w)
        }
    }
    func quiesce() {
        guard let c = context else { inFlight = []; return }
        for (q, h) in inFlight where q < c.queueCount { c.queues[q].addUsed(head: h, written: 0) }
        for q in 0..<c.queueCount { c.queues[q].publish() }
        inFlight = []
    }
    func reset() { context = nil; inFlight = [] }
}

private let memfdSizes = [4096, 16384, 65536, 1 << 20]
private let userBase: UInt64 = 0x7f00_0000_0000

struct Harness {
    let loop: EventLoop
    let host: DeviceHost
    let server: VhostUserBackendServer
    let device: FuzzDevice
    let path: String
}
nonisolated(unsafe) private var harness: Harness?
nonisolated(unsafe) private var socketPathC: UnsafeMutablePointer<CChar>?

/// Open descriptors below `limit` (fcntl probes: cheaper than reading /proc/self/fd).
private func openFDCount(_ limit: Int32) -> Int {
    var n = 0
    for fd in Int32(0)..<limit where fcntl(fd, F_GETFD) >= 0 { n += 1 }
    return n
}
nonisolated(unsafe) private var iterations = 0

/// Per-iteration state: the client socket, the memfds (also mapped here, to play the driver), the rings the
/// client announced.
private struct Session {
    var client: Int32 = -1
    var memfds: [Int32] = [-1, -1, -1, -1]
    var maps: [UnsafeMutableRawPointer?] = [nil, nil, nil, nil]
    var mapSizes = [0, 0, 0, 0]
    /// Per vring: memfd index and offsets of desc/avail/used, and size, as last sent.
    var rings: [(k: Int, desc: Int, avail: Int, used: Int)?] = [nil, nil]
    var ringNum: [Int] = [256, 16]
    var driverIdx: [UInt16] = [0, 0]
}

private func memfd(_ s: inout Session, _ k: Int) -> Int32 {
    if s.memfds[k] < 0 {
        let fd = lb_memfd("fuzz-ram", 1)
        fuzzCheck(fd >= 0, "memfd failed")
        _ = ftruncate(fd, off_t(memfdSizes[k]))
        s.memfds[k] = fd
        let p = mmap(nil, memfdSizes[k], PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        fuzzCheck(p != nil && p != MAP_FAILED, "mmap failed")
        s.maps[k] = p
        s.mapSizes[k] = memfdSizes[k]
    }
    return s.memfds[k]
}

/// A descriptor of a fuzzed kind for SCM_RIGHTS; the caller closes it after sending.
private func anyFD(_ f: inout FuzzInput, _ s: inout Session) -> Int32 {
    switch f.u8() % 6 {
    case 0, 1: return dup(memfd(&s, f.below(4)))
    case 2: return lb_eventfd(0, 1)
    case 3: return lb_eventfd(0, 0)   // blocking
    case 4:
        var p: [Int32] = [-1, -1]
        guard pipe(&p) == 0 else { return -1 }
        close(p[1]); return p[0]
    default:
        var sv: [Int32] = [-1, -1]
        guard lb_unix_socketpair(&sv, 1) == 0 else { return -1 }
        close(sv[1]); return sv[0]
    }
}

/// Closes the client; the server must notice, close everything and listen again.
private func disconnect(_ h: Harness, _ s: inout Session) {
    guard s.client >= 0 else { return }
    close(s.client)
    s.client = -1
    var rounds = 0
    while h.server.isConnected && rounds < 100 { h.server.handleEvent(token: 2, events: UInt32(LB_EPOLLIN)); rounds += 1 }
    fuzzCheck(!h.server.isConnected, "server still connected after the peer closed")
}

private func connect(_ h: Harness, _ s: inout Session) {
    disconnect(h, &s)
    s.client = h.path.withCString { lb_unix_connect($0, 1) }
    fuzzCheck(s.client >= 0, "connect failed: \(errno)")
    h.server.handleEvent(token: 1, events: UInt32(LB_EPOLLIN))
    fuzzCheck(h.server.isConnected, "server did not accept")
}

/// Replies are read (and any descriptor in them closed) so the server never finds the socket full.
private func drainReplies(_ s: Session) {
    var buf = [UInt8](repeating: 0, count: 8192)
    var fds = [Int32](repeating: -1, count: 16)
    while true {
        var n: Int32 = 0, t: Int32 = 0
        let r = buf.withUnsafeMutableBytes { lb_recvmsg_fds(s.client, $0.baseAddress, $0.count, &fds, 16, &n, &t) }
        for k in 0..<Int(n) { close(fds[k]) }
        if r <= 0 { return }
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func vhostUserServerFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    if harness == nil {
        Log.level = getenv("FUZZ_TRACE") != nil ? .debug : .error
        signal(SIGPIPE, SIG_IGN)
        do {
            let loop = try EventLoop()
            let host = DeviceHost(loop: loop)
            let path = "/tmp/loopbackd-fuzz-\(getpid()).sock"
            let device = FuzzDevice()
            let server = VhostUserBackendServer(socketPath: path, host: host, name: "fuzz", device: device)
            try server.start()
            socketPathC = strdup(path)
            atexit { if let p = socketPathC { unlink(p) } }   // libFuzzer exits through exit(): no stale socket
            harness = Harness(loop: loop, host: host, server: server, device: device, path: path)
        } catch { fuzzCheck(false, "setup: \(error)") }
    }
    let h = harness!
    // A leak takes the lowest free numbers, so 256 catches it at once; every 64th iteration looks further.
    iterations += 1
    let fdLimit: Int32 = iterations % 64 == 0 ? 4096 : 256
    let fdsBefore = openFDCount(fdLimit)
    var f = FuzzInput(data, size)
    var s = Session()
    connect(h, &s)

    func u64(_ w: inout VhostUserWriter, _ v: UInt64) { w.append(v) }
    var ops = 0
    while !f.isEmpty && ops < 64 {
        ops += 1
        let op = f.u8()
        var bytes: [UInt8] = []
        var fds: [Int32] = []
        switch op % 16 {
        case 0...9:
            // A request built field by field, the way a front-end would (with fuzzed values).
            let all = VhostUserRequest.allCases
            let req = all[f.below(all.count)]
            var flags = VhostUserHeader.version | (op & 0x10 != 0 ? VhostUserHeader.needReplyFlag : 0)
            if op & 0x20 != 0 && op & 0x80 != 0 { flags = f.u32() }
            var w = VhostUserWriter(request: req.rawValue, flags: flags)
            let ring = f.below(3)   // 2 = out of range
            switch req {
            case .setFeatures:
                let sel = f.u8()
                w.append(sel == 0xFF ? f.u64() : (UInt64(sel & 0x0F) << 28 | UInt64(sel >> 4 & 1) << 32 | UInt64(sel >> 5 & 1)))
            case .setProtocolFeatures:
                let sel = f.u8()
                w.append(sel == 0xFF ? f.u64() : (0x1_ffff & (sel & 1 != 0 ? 0x1_a229 : UInt64(f.u16()) | UInt64(sel) << 16)))
            case .setMemTable, .addMemReg, .remMemReg:
                let count = req == .setMemTable ? 1 + f.below(3) : 1
                if req == .setMemTable { w.append(UInt32(op & 0x40 != 0 ? Int(f.u8()) : count)); w.append(UInt32(0)) }
                else { w.append(UInt64(0)) }
                var guest: UInt64 = 0
                for r in 0..<count {
                    let k = f.below(4)
                    let sel = f.u8()
                    let size: UInt64 = sel & 3 == 0 ? f.u64() : sel & 3 == 1 ? UInt64(memfdSizes[k] / 2) : UInt64(memfdSizes[k])
                    let offset: UInt64 = sel & 4 != 0 ? UInt64(f.u16()) : 0
                    guest = sel & 8 != 0 ? f.u64() : (sel & 16 != 0 ? guest : UInt64(r) << 24)
                    let user = sel & 32 != 0 ? f.u64() : userBase + UInt64(k) << 28
                    w.appendRegion(VhostUserMemoryRegion(guestAddress: guest, size: size, userAddress: user, mmapOffset: offset))
                    guest &+= size
                    fds.append(dup(memfd(&s, k)))
                }
                if req == .remMemReg && op & 0x40 == 0 { for x in fds { close(x) }; fds = [] }
            case .setVringNum, .setVringBase, .setVringEnable, .getVringBase:
                w.append(UInt32(ring))
                let v: UInt32 = op & 0x40 != 0 ? f.u32() : req == .setVringNum ? UInt32(1) << f.below(10) : UInt32(f.u8() % 4)
                w.append(v)
                if req == .setVringNum && ring < 2 { s.ringNum[ring] = Int(v) }
            case .setVringAddr:
                let k = f.below(4)
                let lim = memfdSizes[k]
                var offs: [Int] = []
                for align in [16, 2, 4] {
                    let o = Int(f.u16()) * (op & 0x40 != 0 ? 1 : align) % lim
                    offs.append(o)
                }
                w.append(UInt32(ring)); w.append(UInt32(0))
                let ua = userBase + UInt64(k) << 28
                w.append(ua + UInt64(offs[0])); w.append(ua + UInt64(offs[2])); w.append(ua + UInt64(offs[1])); w.append(UInt64(0))
                if ring < 2 { s.rings[ring] = (k, offs[0], offs[1], offs[2]) }
            case .setVringKick, .setVringCall, .setVringErr:
                let nofd = op & 0x40 != 0
                w.append(UInt64(ring) | (nofd ? VhostUserMessage.noFDFlag : 0))
                if !nofd { fds.append(f.u8() & 0xE0 == 0 ? anyFD(&f, &s) : lb_eventfd(0, 1)) }
            case .getConfig, .setConfig:
                let off = UInt32(f.u8() % 20), sz = UInt32(f.u8() % 20)
                w.append(off); w.append(sz); w.append(UInt32(f.u8() % 2))
                let got = Array(f.bytes(Int(sz)))
                w.append(bytes: got + [UInt8](repeating: 0, count: Int(sz) - got.count))
            case .setStatus:
                w.append(UInt64(f.u8()))
            case .setBackendReqFD:
                fds.append(f.bool() ? anyFD(&f, &s) : { var sv: [Int32] = [-1, -1]; _ = lb_unix_socketpair(&sv, 1); close(sv[1]); return sv[0] }())
            default:
                break
            }
            if op & 0x80 != 0 && op & 0x20 == 0 { for _ in 0..<f.below(3) { fds.append(anyFD(&f, &s)) } }
            bytes = w.message
        case 10:
            // Raw bytes: any header, any size field, any payload (possibly split across sends).
            let n = f.below(300)
            bytes = Array(f.bytes(n))
            for _ in 0..<f.below(3) { fds.append(anyFD(&f, &s)) }
        case 11:
            let q = f.below(2)
            h.host.kick(h.server.index, q)
        case 12:
            // The driver writes into shared memory.
            let k = f.below(4)
            _ = memfd(&s, k)
            let len = 1 + f.below(64)
            let off = f.below(memfdSizes[k] - len)
            f.fill(s.maps[k]! + off, len)
        case 13:
            // The driver makes a chain available on a ring the client announced: one descriptor, then the entry.
            let q = f.below(2)
            if let r = s.rings[q], let m = s.maps[r.k] {
                let num = max(1, min(s.ringNum[q], 256))
                let head = Int(f.u8()) % num
                let lim = memfdSizes[r.k]
                if r.desc + 16 * (head + 1) <= lim {
                    let d = m + r.desc + 16 * head
                    d.storeBytes(of: (userBase &* 0) &+ UInt64(f.u16()) &* 16, as: UInt64.self)  // guest address
                    d.storeBytes(of: UInt32(f.u16()), toByteOffset: 8, as: UInt32.self)
                    d.storeBytes(of: UInt16(f.u8() % 8), toByteOffset: 12, as: UInt16.self)
                    d.storeBytes(of: UInt16(f.u8()) % UInt16(num), toByteOffset: 14, as: UInt16.self)
                }
                if r.avail + 4 + 2 * num <= lim {
                    (m + r.avail + 4 + 2 * (Int(s.driverIdx[q]) % num)).storeBytes(of: UInt16(head), as: UInt16.self)
                    s.driverIdx[q] &+= 1
                    (m + r.avail + 2).storeBytes(of: s.driverIdx[q], as: UInt16.self)
                }
                h.host.kick(h.server.index, q)
            }
        case 14:
            if f.bool() { h.server.handleEvent(token: 3, events: UInt32(LB_EPOLLIN)) }
            else {
                // The peer shrinks a memfd under the server's mapping: the SIGBUS guard must catch the access.
                let k = f.below(4)
                if s.memfds[k] >= 0 && f.u8() == 0x5A {
                    if let m = s.maps[k] { munmap(m, s.mapSizes[k]); s.maps[k] = nil }
                    _ = ftruncate(s.memfds[k], 0)
                    h.host.kick(h.server.index, 0)
                    h.server.handleEvent(token: 4, events: UInt32(LB_EPOLLIN))
                }
            }
        default:
            connect(h, &s)
        }
        if !bytes.isEmpty {
            let split = op & 0x40 != 0 && op % 16 == 10 ? f.below(bytes.count + 1) : bytes.count
            for (a, b) in [(0, split), (split, bytes.count)] where b > a {
                let r = bytes.withUnsafeBytes { p in
                    fds.withUnsafeBufferPointer { lb_sendmsg_fds(s.client, p.baseAddress! + a, b - a, a == 0 ? $0.baseAddress : nil, a == 0 ? Int32($0.count) : 0) }
                }
                if r < 0 { break }   // the server closed the connection
                h.server.handleEvent(token: 2, events: UInt32(LB_EPOLLIN))
            }
        }
        for x in fds where x >= 0 { close(x) }
        h.server.handleEvent(token: 4, events: UInt32(LB_EPOLLIN))
        drainReplies(s)
        if !h.server.isConnected { connect(h, &s) }
    }

    // End of the session: the server must notice, close everything and listen again.
    disconnect(h, &s)
    h.host.reset(h.server.index)
    for k in 0..<4 {
        if let m = s.maps[k] { munmap(m, s.mapSizes[k]) }
        if s.memfds[k] >= 0 { close(s.memfds[k]) }
    }
    if getenv("FUZZ_TRACE") != nil {
        print("fuzz: activations \(h.device.activations), kicks \(h.device.kicks), chains \(h.device.chains), last error \(String(describing: h.server.lastError))")
    }
    let fdsAfter = openFDCount(fdLimit)
    fuzzCheck(fdsAfter == fdsBefore, "fd leak: \(fdsBefore) open before the iteration, \(fdsAfter) after")
    return 0
}
