// libFuzzer target: virtio-console with multiport (Sources/Registry/Console/ConsoleDevice.swift, ConsoleProtocol.swift)
// on fake in-memory endpoints (FakeConsoleEndpoint), driven by a fuzzed sequence of driver and host operations:
// driver control messages on the control transmitq (DEVICE_READY, PORT_READY and PORT_OPEN with any id and value,
// unknown and device-only events, short and split messages), control receive buffers of fuzzed sizes, port receive
// buffers and transmit chains (any port id, also ports not added), host input, slow readers, host connects and
// disconnects, spurious kicks, emergency writes, quiesce, reset and re-activation with other features and queue
// sizes.
//
// The driver's memory is one 64 KiB region followed by a PROT_NONE guard page; buffers are placed at the top of the
// region now and then, so a write one byte past one faults. The driver side is well-formed: descriptors come from a
// free list and buffers from an allocator, neither reused while a chain is out, so every used element names exactly
// one outstanding chain. Oracles: no trap; every used element names an outstanding head (< queue size, not
// completed twice) with a length <= the chain's writable bytes, and no byte after that length changed (canary);
// transmit chains complete with length 0; every control message the device sends is well-formed (a device-side
// event, id < max_nr_ports of a port it added, the value and length that event has, PORT_NAME's name and RESIZE's
// size) and in order (PORT_ADD only after DEVICE_READY 1, CONSOLE_PORT/PORT_NAME/PORT_OPEN/RESIZE only for a port the
// driver made ready); host input reaches the receive buffers in order, no byte twice, none lost (a port that is
// connected and open, with receive buffers held and no output outstanding on an hvc port, has no input left at the
// endpoint); output reaches the host in order with no byte twice or lost while the device counts no dropped bytes;
// device and endpoint agree on the connection; the config space says max_nr_ports; a reset leaves nothing held;
// nothing latches NEEDS_RESET.
import Glibc
import CLinux
import Transport
@testable import Registry

private let page = 4096
private let regionBytes = 64 * 1024
private let maxQueue: UInt16 = 16
private let guestBase: UInt64 = 0x2000_0000
private let maxPortID = 8                       // port ids 0..<8: up to 18 queues
private let ringStride = 512                    // desc 256, avail at +256, used at +320 (size 16)
private let bufBase = 10 * 1024
private let blockSize = 64
private let endpointCapacity = 16 * 1024

nonisolated(unsafe) private var setup: FuzzDriverMemory?
/// FUZZ_TRACE=1 .build-fuzz/bin/<target> FILE: the operations of one input, on stderr.
nonisolated(unsafe) private var tracing = false

/// Buffer space in 64-byte blocks, never handed out twice while a chain holding it is out.
private final class Blocks {
    var used = [Bool](repeating: false, count: (regionBytes - bufBase) / blockSize)
    /// `len` bytes (0 gets a block too); at the top of the region (ending at the guard page when free) or the bottom.
    func alloc(_ len: Int, top: Bool) -> (addr: UInt64, first: Int, n: Int)? {
        let n = max(1, (len + blockSize - 1) / blockSize)
        guard n <= used.count else { return nil }
        let last = used.count - n
        for j in 0...last {
            let s = top ? last - j : j
            guard !used[s] else { continue }
            var ok = true
            for i in s..<(s + n) where used[i] { ok = false; break }
            guard ok else { continue }
            for i in s..<(s + n) { used[i] = true }
            let end = bufBase + (s + n) * blockSize
            let at = top ? end - len : bufBase + s * blockSize
            return (guestBase + UInt64(at), s, n)
        }
        return nil
    }
    func free(_ first: Int, _ n: Int) { for i in first..<(first + n) { used[i] = false } }
}

private struct Seg { var addr: UInt64; var len: Int; var writable: Bool }
private struct Out { var descs: [UInt16]; var segs: [Seg]; var writable: Int; var blocks: [(Int, Int)] }

/// The driver side of one split queue: a well-formed driver (free descriptor list, outstanding chains by head).
private final class Ring {
    let k: Int
    let size: UInt16
    let desc: UnsafeMutableRawPointer, avail: UnsafeMutableRawPointer, used: UnsafeMutableRawPointer
    var availIdx: UInt16 = 0, usedSeen: UInt16 = 0
    var free: [UInt16]
    var out: [UInt16: Out] = [:]
    init(k: Int, size: UInt16, host: UnsafeMutableRawPointer) {
        self.k = k; self.size = size
        desc = host + k * ringStride; avail = desc + 256; used = desc + 320
        free = Array((0..<size).reversed())
    }
    var config: QueueConfig {
        let g = guestBase + UInt64(k * ringStride)
        return QueueConfig(size: size, desc: g, avail: g + 256, used: g + 320)
    }
}

@inline(__always) private func hostPtr(_ g: UInt64) -> UnsafeMutableRawPointer { setup!.host + Int(g - guestBase) }

/// Host input byte `i` of port `p` and driver output byte `i` of port `p`: position-dependent, so a byte delivered
/// twice, lost or out of order shows.
@inline(__always) private func inPat(_ p: Int, _ i: Int) -> UInt8 {
    UInt8(truncatingIfNeeded: (UInt64(i) &* 0x9E37_79B9_7F4A_7C15 &+ UInt64(p) &* 0x1234_5677) >> 56)
}
@inline(__always) private func outPat(_ p: Int, _ i: Int) -> UInt8 {
    UInt8(truncatingIfNeeded: (UInt64(i) &* 0xC2B2_AE3D_27D4_EB4F &+ UInt64(p) &* 0x7654_3211 &+ 99) >> 56)
}

private func trace(_ m: String) { _ = m.withCString { write(2, $0, strlen($0)) } }

@_cdecl("LLVMFuzzerTestOneInput")
public func consoleControlFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    if setup == nil { setup = FuzzDriverMemory(bytes: regionBytes); Log.level = .error; tracing = getenv("FUZZ_TRACE") != nil }
    let s = setup!
    var f = FuzzInput(data, size)
    guard let memory = s.fresh(guestBase: guestBase) else { return 0 }

    // Ports: 1-4 of ids 0..<8 (port 0 mostly there), console or named, connected or not, a terminal size or none.
    var ids: [Int] = f.u8() < 220 ? [0] : []
    let extra = f.below(4)
    for _ in 0..<extra { let id = f.below(maxPortID); if !ids.contains(id) { ids.append(id) } }
    if ids.isEmpty { ids = [f.below(maxPortID)] }
    var configs: [ConsolePortConfig] = []
    var fakes = [FakeConsoleEndpoint?](repeating: nil, count: maxPortID)
    var names = [[UInt8]](repeating: [], count: maxPortID)
    var isConsole = [Bool](repeating: false, count: maxPortID)
    for id in ids {
        let console = f.u8() < 100
        let nameKind = f.below(4)
        let name = nameKind == 0 ? "" : nameKind == 3 ? String(repeating: "n", count: 100 + f.below(60)) : "port\(id)"
        let fake = FakeConsoleEndpoint(capacity: endpointCapacity, writeRoom: f.u8() < 220 ? Int.max : f.below(64),
                                       connected: f.u8() < 220)
        if f.u8() < 60 { fake.size = (UInt16(f.below(300)), UInt16(f.below(100))) }
        fakes[id] = fake; names[id] = Array(name.utf8); isConsole[id] = console
        configs.append(ConsolePortConfig(id: id, name: name, isConsole: console, endpoint: fake))
    }
    let dev = ConsoleDevice(ports: configs, queueSize: maxQueue)
    let maxPorts = dev.maxPorts
    fuzzCheck(maxPorts == ids.max()! + 1, "max_nr_ports \(maxPorts) for ids \(ids)")
    let blocks = Blocks()
    var rings: [Ring] = []
    let queues = UnsafeMutablePointer<SplitQueue>.allocate(capacity: 2 * maxPortID + 2)
    var live = false
    var features: VirtioFeatures = []

    // What the harness knows the device must do (per activation).
    var deviceReadySent = false
    var readySent = Set<Int>()
    // Streams: host input fed / delivered; driver output submitted / expected next at the host.
    var inFed = [Int](repeating: 0, count: maxPortID), inDelivered = [Int](repeating: 0, count: maxPortID)
    var txSubmitted = [Int](repeating: 0, count: maxPortID), txOut = [Int](repeating: 0, count: maxPortID)
    var txExact = [Bool](repeating: true, count: maxPortID)
    var dropped = dev.stats.droppedBytes

    func served(_ p: Int) -> Bool { p < maxPorts && fakes[p] != nil && (dev.multiport || p == 0) }
    func drops(_ p: Int) -> Bool { isConsole[p] || !dev.multiport }

    func activate() {
        features = [.version1]
        if f.bool() { features.insert(.eventIdx) }
        if f.bool() { features.insert(.indirectDesc) }
        if f.bool() { features.insert(VirtioConsole.fSize) }
        if f.u8() < 220 { features.insert(VirtioConsole.fMultiport) }
        if f.bool() { features.insert(VirtioConsole.fEmergWrite) }
        let all = VirtioConsole.queueCount(ports: maxPorts)
        var count = features.contains(VirtioConsole.fMultiport) ? all : 2
        if f.u8() < 24 { count = 2 + f.below(all - 1) }
        dev.ackFeatures(features)
        rings = []
        for k in 0..<count {
            let sz: UInt16 = f.u8() < 200 ? maxQueue : [1, 2, 4, 8][f.below(4)]
            let r = Ring(k: k, size: sz, host: s.host)
            memset(r.desc, 0, ringStride)
            rings.append(r)
            guard let q = try? SplitQueue(config: r.config, maxSize: maxQueue, memory: memory.view, features: features, interrupt: .none) else { abort() }
            (queues + k).initialize(to: q)
        }
        live = true
        deviceReadySent = false
        readySent = []
        let ctx = DeviceContext(queues: queues, queueCount: count, memory: memory.view, loop: s.loop, configInterrupt: .none,
                                features: features)
        do { try dev.activate(ctx) } catch { abort() }
        let wantMulti = features.contains(VirtioConsole.fMultiport) && count >= 4
        fuzzCheck(dev.multiport == wantMulti, "multiport \(dev.multiport) with \(count) queues, features \(features)")
    }

    /// Checks and consumes what the device completed and what reached the host.
    func check() {
        for r in rings where live {
            let idx = r.used.load(fromByteOffset: 2, as: UInt16.self).littleEndian
            fuzzCheck(idx &- r.usedSeen <= r.size, "queue \(r.k): used.idx \(idx) ran \(idx &- r.usedSeen) ahead (size \(r.size))")
            while r.usedSeen != idx {
                let e = r.used + 4 + 8 * Int(r.usedSeen % r.size)
                r.usedSeen &+= 1
                let id = e.load(as: UInt32.self).littleEndian, len = Int(e.load(fromByteOffset: 4, as: UInt32.self).littleEndian)
                fuzzCheck(id < UInt32(r.size), "queue \(r.k): used id \(id) >= size \(r.size)")
                guard let o = r.out[UInt16(id)] else { fuzzCheck(false, "queue \(r.k): used id \(id) is not an outstanding chain"); return }
                fuzzCheck(len <= o.writable, "queue \(r.k): used length \(len) > \(o.writable) writable bytes")
                // The written bytes, and the canary after them.
                var bytes: [UInt8] = []
                var off = 0
                for sg in o.segs where sg.writable {
                    let p = hostPtr(sg.addr).assumingMemoryBound(to: UInt8.self)
                    for i in 0..<sg.len {
                        if off < len { bytes.append(p[i]) } else { fuzzCheck(p[i] == 0xee, "queue \(r.k): byte \(off) written past used length \(len)") }
                        off += 1
                    }
                }
                inspect(r.k, o, bytes)
                r.out[UInt16(id)] = nil
                r.free.append(contentsOf: o.descs)
                for b in o.blocks { blocks.free(b.0, b.1) }
            }
        }
        if dev.stats.droppedBytes != dropped {
            dropped = dev.stats.droppedBytes
            for p in 0..<maxPortID { txExact[p] = false }
        }
        for p in 0..<maxPortID {
            guard let fake = fakes[p] else { continue }
            let got = fake.takeOutput()
            fuzzCheck(txOut[p] + got.count <= txSubmitted[p], "port \(p): \(got.count) output bytes, only \(txSubmitted[p] - txOut[p]) sent")
            if txExact[p] {
                for (i, b) in got.enumerated() { fuzzCheck(b == outPat(p, txOut[p] + i), "port \(p): output byte \(txOut[p] + i) wrong (lost, repeated or reordered)") }
            }
            txOut[p] += got.count
            guard let st = dev.portState(p) else { fuzzCheck(false, "port \(p) has no state"); continue }
            fuzzCheck(st.connected == fake.isConnected, "port \(p): device says connected \(st.connected), endpoint \(fake.isConnected)")
            fuzzCheck(inDelivered[p] + fake.pendingInput == inFed[p], "port \(p): \(inFed[p]) fed, \(inDelivered[p]) delivered, \(fake.pendingInput) left")
            if live && served(p) && st.connected && st.guestOpen && st.heldRx > 0 && !(drops(p) && st.heldTx > 0) {
                fuzzCheck(fake.pendingInput == 0, "port \(p): \(fake.pendingInput) input bytes left while \(st.heldRx) receive buffers are held")
            }
            if !live { fuzzCheck(st.heldRx == 0 && st.heldTx == 0, "port \(p): reset left \(st.heldRx) + \(st.heldTx) chains held") }
        }
        if live {
            for r in rings { fuzzCheck(!queues[r.k].isBroken, "well-formed ring \(r.k) latched: \(String(describing: queues[r.k].fault))") }
        }
    }

    /// One completed chain: what the device wrote must be what that queue carries.
    func inspect(_ k: Int, _ o: Out, _ b: [UInt8]) {
        if dev.multiport && k == VirtioConsole.controlRx {
            guard !b.isEmpty else { return }   // a buffer refused (too short, too fragmented) or given back
            fuzzCheck(b.count >= 8, "control message of \(b.count) bytes")
            let id = Int(UInt32(b[0]) | UInt32(b[1]) << 8 | UInt32(b[2]) << 16 | UInt32(b[3]) << 24)
            let ev = UInt16(b[4]) | UInt16(b[5]) << 8, value = UInt16(b[6]) | UInt16(b[7]) << 8
            fuzzCheck(id < maxPorts && fakes[id] != nil, "control message for port \(id) (max_nr_ports \(maxPorts))")
            guard let e = VirtioConsole.Event(rawValue: ev) else { fuzzCheck(false, "unknown control event \(ev)"); return }
            var want = 8
            switch e {
            case .portAdd:
                fuzzCheck(deviceReadySent, "PORT_ADD before DEVICE_READY 1")
            case .consolePort:
                fuzzCheck(isConsole[id] && value == 1 && readySent.contains(id), "CONSOLE_PORT \(value) for port \(id)")
            case .portOpen:
                fuzzCheck(value <= 1 && readySent.contains(id), "PORT_OPEN \(value) for port \(id) (made ready: \(readySent.contains(id)))")
            case .portName:
                fuzzCheck(!names[id].isEmpty && value == 1 && readySent.contains(id), "PORT_NAME for port \(id)")
                let n = min(names[id].count, ConsoleDevice.maxNameBytes)
                want = min(8 + n + 1, o.writable)
                let full = names[id].prefix(n) + [0]
                fuzzCheck(b.count == want && Array(b[8...]) == Array(full.prefix(b.count - 8)), "PORT_NAME bytes \(b) for \(names[id])")
            case .resize:
                fuzzCheck(isConsole[id] && readySent.contains(id) && features.contains(VirtioConsole.fSize), "RESIZE for port \(id)")
                want = min(12, o.writable)
                guard let sz = fakes[id]!.size else { fuzzCheck(false, "RESIZE for a port with no terminal size"); return }
                if b.count == 12 {   // (a control buffer shorter than the message gets its first bytes)
                    let rows = UInt16(b[8]) | UInt16(b[9]) << 8, cols = UInt16(b[10]) | UInt16(b[11]) << 8
                    fuzzCheck(rows == sz.rows && cols == sz.cols && cols != 0, "RESIZE \(cols)x\(rows), terminal \(sz)")
                }
            default:
                fuzzCheck(false, "the device sent driver-side event \(e)")
            }
            fuzzCheck(b.count == want, "control event \(e) of \(b.count) bytes, want \(want)")
            return
        }
        if dev.multiport && k == VirtioConsole.controlTx { fuzzCheck(b.isEmpty, "control transmit chain completed with \(b.count) bytes"); return }
        guard let (p, tx) = VirtioConsole.port(ofQueue: k) else {
            fuzzCheck(b.isEmpty, "queue \(k) (no port, no multiport) completed with \(b.count) bytes"); return
        }
        if tx || !served(p) { fuzzCheck(b.isEmpty, "queue \(k) (port \(p), tx \(tx)) completed with \(b.count) bytes"); return }
        for (i, x) in b.enumerated() { fuzzCheck(x == inPat(p, inDelivered[p] + i), "port \(p): input byte \(inDelivered[p] + i) wrong (repeated, lost or reordered)") }
        inDelivered[p] += b.count
    }

    /// Puts a chain of `segs` (length, writable) on queue k; readable bytes from `fill`. False if no room.
    @discardableResult
    func submit(_ k: Int, _ specs: [(Int, Bool)], _ fill: (Int, UnsafeMutablePointer<UInt8>) -> Void) -> Bool {
        guard live, k < rings.count, !specs.isEmpty else { return false }
        let r = rings[k]
        guard r.free.count >= specs.count else { return false }
        var segs: [Seg] = [], got: [(Int, Int)] = []
        for (len, w) in specs {
            guard let a = blocks.alloc(len, top: f.u8() < 40) else { for b in got { blocks.free(b.0, b.1) }; return false }
            got.append((a.first, a.n))
            segs.append(Seg(addr: a.addr, len: len, writable: w))
        }
        var ids: [UInt16] = []
        for _ in specs { ids.append(r.free.removeLast()) }
        var readOff = 0, writable = 0
        for (i, sg) in segs.enumerated() {
            let p = hostPtr(sg.addr).assumingMemoryBound(to: UInt8.self)
            if sg.writable { memset(p, 0xee, sg.len); writable += sg.len } else {
                for j in 0..<sg.len { fill(readOff + j, p + j) }
                readOff += sg.len
            }
            let d = r.desc + 16 * Int(ids[i])
            d.storeBytes(of: sg.addr.littleEndian, as: UInt64.self)
            d.storeBytes(of: UInt32(sg.len).littleEndian, toByteOffset: 8, as: UInt32.self)
            let flags: UInt16 = (i + 1 < segs.count ? 1 : 0) | (sg.writable ? 2 : 0)
            d.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
            d.storeBytes(of: (i + 1 < segs.count ? ids[i + 1] : 0).littleEndian, toByteOffset: 14, as: UInt16.self)
        }
        r.out[ids[0]] = Out(descs: ids, segs: segs, writable: writable, blocks: got)
        r.avail.storeBytes(of: ids[0].littleEndian, toByteOffset: 4 + 2 * Int(r.availIdx % r.size), as: UInt16.self)
        r.availIdx &+= 1
        r.avail.storeBytes(of: r.availIdx.littleEndian, toByteOffset: 2, as: UInt16.self)
        return true
    }
    /// `total` bytes split into 1-3 pieces of one direction.
    func pieces(_ total: Int, _ w: Bool) -> [(Int, Bool)] {
        guard total > 0 else { return [] }
        let n = 1 + f.below(3)
        var out: [(Int, Bool)] = [], off = 0
        for i in 0..<n where off < total {
            let len = i == n - 1 ? total - off : 1 + f.below(total - off)
            out.append((len, w)); off += len
        }
        return out
    }
    func kick(_ k: Int) { if live { dev.queueNotified(k) } }

    /// A driver control message (8 bytes unless fuzzed shorter/longer), split anywhere; updates what the device
    /// must know from it.
    func control(id: UInt32, event: UInt16, value: UInt16, len: Int, extraWritable: Int) {
        var msg = [UInt8](repeating: 0, count: max(len, 8))
        for i in 0..<4 { msg[i] = UInt8(truncatingIfNeeded: id >> (8 * i)) }
        msg[4] = UInt8(truncatingIfNeeded: event); msg[5] = UInt8(truncatingIfNeeded: event >> 8)
        msg[6] = UInt8(truncatingIfNeeded: value); msg[7] = UInt8(truncatingIfNeeded: value >> 8)
        for i in 8..<msg.count { msg[i] = f.u8() }
        var specs = pieces(len, false)
        if extraWritable > 0 { specs.append((extraWritable, true)) }
        guard submit(VirtioConsole.controlTx, specs, { i, p in p.pointee = msg[i] }) else { return }
        if dev.multiport && len >= 8 && value == 1 {
            if event == VirtioConsole.Event.deviceReady.rawValue { deviceReadySent = true }
            if event == VirtioConsole.Event.portReady.rawValue && id < UInt32(maxPorts) && fakes[Int(id)] != nil { readySent.insert(Int(id)) }
        }
        kick(VirtioConsole.controlTx)
    }
    func controlBuffers(_ n: Int) {
        for _ in 0..<n {
            let size = f.u8() < 200 ? 8 + f.below(140) : f.below(12)
            var specs: [(Int, Bool)] = f.u8() < 16 ? [(1 + f.below(8), false)] : []
            specs += pieces(size, true)
            submit(VirtioConsole.controlRx, specs, { _, p in p.pointee = 0x55 })
        }
        kick(VirtioConsole.controlRx)
    }
    func deactivate() {
        guard live else { return }
        check()
        dev.reset()
        live = false
        for r in rings { for o in r.out.values { for b in o.blocks { blocks.free(b.0, b.1) } } }
        (queues + 0).deinitialize(count: rings.count)
        rings = []
        // Every chain out is forgotten: the next output starts with the next chain the driver sends.
        for p in 0..<maxPortID { txOut[p] = txSubmitted[p]; txExact[p] = true }
        check()
    }
    defer { deactivate(); queues.deallocate() }
    activate()

    var ops = 0
    while !f.isEmpty && ops < 96 {
        ops += 1
        let port = f.u8() < 230 ? ids[f.below(ids.count)] : f.below(maxPortID)
        let opcode = f.u8() % 16
        if tracing {
            let st = ids.map { p in dev.portState(p).map { "\(p):\($0.connected ? "c" : "-")\($0.guestReady ? "r" : "-")\($0.guestOpen ? "o" : "-")\($0.stalled ? "s" : "-") rx \($0.heldRx) tx \($0.heldTx)" } ?? "" }
            trace("op \(opcode) port \(port): live \(live) multiport \(dev.multiport) \(st.joined(separator: ", "))\n")
        }
        switch opcode {
        case 0, 1, 2:   // a driver control message, mostly near the valid ones
            let id = f.u8() < 220 ? UInt32(f.below(maxPorts + 2)) : f.u32()
            let ev = f.u8() < 230 ? UInt16(f.below(9)) : f.u16()
            let value = f.u8() < 230 ? UInt16(f.below(2)) : f.u16()
            let len = f.u8() < 220 ? 8 : f.below(24)
            control(id: id, event: ev, value: value, len: len, extraWritable: f.u8() < 16 ? 1 + f.below(16) : 0)
        case 3:         // control receive buffers of fuzzed sizes
            controlBuffers(1 + f.below(4))
        case 4, 5:      // port receive buffers
            let n = 1 + f.below(3)
            for _ in 0..<n {
                var specs: [(Int, Bool)] = f.u8() < 16 ? [(1 + f.below(8), false)] : []
                specs += pieces(f.u8() < 240 ? 1 + f.below(600) : 0, true)
                if specs.isEmpty { specs = [(4, false)] }
                submit(VirtioConsole.rxQueue(port), specs, { _, p in p.pointee = 0x44 })
            }
            kick(VirtioConsole.rxQueue(port))
        case 6, 7:      // a port transmit chain (bytes of the port's output stream)
            let len = f.u8() < 240 ? 1 + f.below(600) : 0
            var specs = pieces(len, false)
            if f.u8() < 16 || specs.isEmpty { specs.append((1 + f.below(16), true)) }
            let start = txSubmitted[port]
            let q = VirtioConsole.txQueue(port)
            if submit(q, specs, { i, p in p.pointee = outPat(port, start + i) }), served(port) { txSubmitted[port] += len }
            kick(q)
        case 8:         // host input
            guard let fake = fakes[port] else { break }
            let n = f.u8() < 200 ? 1 + f.below(200) : 1 + f.below(4000)
            var buf = [UInt8](repeating: 0, count: n)
            for i in 0..<n { buf[i] = inPat(port, inFed[port] + i) }
            let took = fake.feed(buf)
            inFed[port] += took
        case 9:         // a slow reader opens (some) room
            guard let fake = fakes[port] else { break }
            fake.setRoom(f.u8() < 128 ? Int.max : f.below(300))
        case 10:        // the host side connects or goes away
            guard let fake = fakes[port] else { break }
            fake.setConnected(!fake.isConnected)
        case 11:        // a kick on any queue (also ones the driver did not set up)
            kick(f.below(2 * maxPortID + 4))
        case 12:
            dev.quiesce()
        case 13:        // driver reset; the host side may move meanwhile; a new start
            deactivate()
            if f.bool(), let fake = fakes[port] {
                let n = 1 + f.below(100)
                var buf = [UInt8](repeating: 0, count: n)
                for i in 0..<n { buf[i] = inPat(port, inFed[port] + i) }
                inFed[port] += fake.feed(buf)
            }
            if f.u8() < 64, let fake = fakes[port] { fake.setConnected(!fake.isConnected) }
            check()
            activate()
        case 14:        // config space: a read of any range, an emergency write
            var c = [UInt8](repeating: 0, count: VirtioConsole.configSize)
            c.withUnsafeMutableBytes { dev.readConfig(offset: 0, into: $0) }
            let mp = UInt32(c[4]) | UInt32(c[5]) << 8 | UInt32(c[6]) << 16 | UInt32(c[7]) << 24
            fuzzCheck(mp == UInt32(maxPorts), "config max_nr_ports \(mp), want \(maxPorts)")
            let off = f.below(VirtioConsole.configSize)
            let n = 1 + f.below(min(4, VirtioConsole.configSize - off))
            var part = [UInt8](repeating: 0, count: n)
            part.withUnsafeMutableBytes { dev.readConfig(offset: off, into: $0) }
            fuzzCheck(part == Array(c[off..<(off + n)]), "config read at \(off) differs from the whole")
            check()   // output so far taken: what port 0 gets now is the emergency character alone
            var w = [UInt8](repeating: 0, count: n)
            for i in 0..<n { w[i] = f.u8() }
            let before = fakes[0]?.outputCount ?? 0
            w.withUnsafeBytes { dev.writeConfig(offset: off, from: $0) }
            if let fake0 = fakes[0] {
                let got = fake0.takeOutput()
                let at = VirtioConsole.emergWriteOffset - off
                let emerg = features.contains(VirtioConsole.fEmergWrite) && at >= 0 && at < n
                fuzzCheck(before == 0 && got.count <= (emerg ? 1 : 0), "emergency write put \(got.count) bytes out")
                if got.count == 1 { fuzzCheck(got[0] == w[at], "emergency write put \(got[0]), want \(w[at])") }
            }
        default:        // a driver that does everything right: DEVICE_READY, buffers, PORT_READY and PORT_OPEN per port
            controlBuffers(4)
            control(id: 0, event: 0, value: 1, len: 8, extraWritable: 0)
            for id in ids {
                controlBuffers(2)
                control(id: UInt32(id), event: 3, value: 1, len: 8, extraWritable: 0)
                control(id: UInt32(id), event: 6, value: 1, len: 8, extraWritable: 0)
            }
        }
        check()
    }
    if tracing {
        trace("ops \(ops) multiport \(dev.multiport) stats \(dev.stats) fed \(inFed) delivered \(inDelivered) txSub \(txSubmitted) txOut \(txOut) ready \(readySent) devready \(deviceReadySent)\n")
    }
    return 0
}
