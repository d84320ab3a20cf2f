// libFuzzer target: virtio-input (Sources/Registry/Input/InputDevice.swift, InputProtocol.swift) on the fake source
// (FakeInputSource) with fuzzed capabilities, driven by a fuzzed sequence of driver and host operations: config
// select/subsel writes with any values at any offset and length (and the reads that follow), statusq chains (LED,
// sound, force-feedback and other events with any code and value, short, long and split), eventq buffers of fuzzed
// sizes and splits, bursts of host events (groups of any length, also longer than the queue and than the device's
// ring, SYN_REPORT or not), host-device unplug and replug, a source that refuses writes, spurious kicks, quiesce,
// reset (with events arriving while the device is down) and re-activation with other queue sizes.
//
// The driver's memory is one 64 KiB region followed by a PROT_NONE guard page; buffers are placed at the top of the
// region now and then, so a write one byte past one faults. The driver side is well-formed: descriptors from a free
// list, buffers from an allocator, neither reused while a chain is out. Each host event carries its sequence number
// as its value. Oracles: no trap; every used element names an outstanding head (< queue size, never twice); an
// event buffer completes with 8 bytes if it has 8 writable bytes and 0 otherwise, the statusq with 0, and no byte
// after the used length changes (canary); the config space after any write says the select/subsel written and the
// size and bytes virtio 1.2 §5.8.5 gives for them from the capabilities, zeros after, and any partial read agrees;
// a status event is written to the host device exactly when it is one readable 8-byte event of a type and code the
// host device has; delivered events are host events in order, none twice, only from complete groups (SYN_REPORT
// seen), a group split across deliveries only when it is longer than the eventq (the device's documented policy:
// whole groups only, the oldest whole group dropped when its ring is full, counted; no SYN_DROPPED); an all-zero
// event only from quiesce; events are conserved (delivered + pending + counted drops + pending lost at reset and
// unplug = received while active; events while inactive are counted); no complete group waits while the driver has
// buffers for everything pending; a reset leaves nothing held; nothing latches NEEDS_RESET.
import Glibc
import CLinux
import Transport
@testable import Registry

private let page = 4096
private let regionBytes = 64 * 1024
private let maxQueue: UInt16 = 16
private let guestBase: UInt64 = 0x3000_0000
private let ringStride = 512                    // desc 256, avail at +256, used at +320 (size 16)
private let bufBase = 2 * 1024
private let blockSize = 64

nonisolated(unsafe) private var setup: FuzzDriverMemory?
/// FUZZ_TRACE=1 .build-fuzz/bin/<target> FILE: the operations of one input, on stderr.
nonisolated(unsafe) private var tracing = false

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

/// The config answer virtio 1.2 §5.8.5 gives for select/subsel from the capabilities (bitmaps up to their last
/// non-zero byte, at most the 128-byte union).
private func expectedConfig(_ caps: InputCapabilities, _ sel: UInt8, _ sub: UInt8) -> [UInt8] {
    func trim(_ a: [UInt8]) -> [UInt8] { var b = Array(a.prefix(VirtioInput.unionSize)); while b.last == 0 { b.removeLast() }; return b }
    func le16(_ v: UInt16) -> [UInt8] { [UInt8(v & 0xff), UInt8(v >> 8)] }
    func le32(_ v: Int32) -> [UInt8] { let u = UInt32(bitPattern: v); return [0, 8, 16, 24].map { UInt8(truncatingIfNeeded: u >> $0) } }
    switch sel {
    case 0x01 where sub == 0: return trim(Array(caps.name.utf8))
    case 0x02 where sub == 0: return trim(Array(caps.serial.utf8))
    case 0x03 where sub == 0: return le16(caps.bustype) + le16(caps.vendor) + le16(caps.product) + le16(caps.version)
    case 0x10 where sub == 0: return trim(caps.props)
    case 0x11 where sub >= 1 && sub <= 0x1f: return trim(caps.bits[Int(sub)])
    case 0x12 where sub <= 0x3f:
        guard caps.has(type: VirtioInput.evAbs, code: UInt16(sub)), let a = caps.abs[UInt16(sub)] else { return [] }
        return le32(a.min) + le32(a.max) + le32(a.fuzz) + le32(a.flat) + le32(a.res)
    default: return []
    }
}

private func trace(_ m: String) { _ = m.withCString { write(2, $0, strlen($0)) } }

@_cdecl("LLVMFuzzerTestOneInput")
public func inputEventFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    if setup == nil { setup = FuzzDriverMemory(bytes: regionBytes); Log.level = .error; tracing = getenv("FUZZ_TRACE") != nil }
    let s = setup!
    var f = FuzzInput(data, size)
    guard let memory = s.fresh(guestBase: guestBase) else { return 0 }

    // Capabilities: the guest test's keyboard+touch, or fuzzed (long and odd names, any codes, axes past ABS_MAX).
    var caps = FakeInputSource.keyboardAndTouch
    if f.u8() < 128 {
        var name = ""
        for _ in 0..<f.below(200) { name += ["x", "\u{0}", "é", "Z"][f.below(4)] }
        caps = InputCapabilities(name: name)
        if f.bool() { caps.serial = "s\(f.u16())" }
        caps.bustype = f.u16(); caps.vendor = f.u16(); caps.product = f.u16(); caps.version = f.u16()
        for _ in 0..<f.below(16) { caps.set(type: UInt16(f.below(0x20)), code: UInt16(f.below(VirtioInput.maxCodes))) }
        for _ in 0..<f.below(6) {
            caps.setAbs(UInt16(f.below(0x48)), AbsInfo(min: Int32(bitPattern: f.u32()), max: Int32(bitPattern: f.u32()),
                                                      fuzz: Int32(f.u8()), flat: Int32(f.u8()), res: Int32(f.u8())))
        }
        for _ in 0..<f.below(4) { caps.setProp(f.below(64)) }
    }
    guard let src = try? FakeInputSource(caps, capacity: 4096) else { abort() }
    let ringEvents = f.u8() < 128 ? 8 + f.below(64) : 1024
    let dev = InputDevice(source: src, queueSize: maxQueue, ringEvents: ringEvents)
    let blocks = Blocks()
    var rings: [Ring] = []
    let queues = UnsafeMutablePointer<SplitQueue>.allocate(capacity: 2)
    var live = false
    var select: UInt8 = 0, subsel: UInt8 = 0

    // Host events by sequence number (1...): type, code, and the group each belongs to (its first event) and, once
    // its SYN_REPORT came, where it ends.
    var events: [(UInt16, UInt16)] = [(0, 0)]
    var groupOf: [Int] = [0]
    var groupEnd: [Int: Int] = [:]
    var curStart = 1
    var injectedLive = 0, injectedDown = 0, lostReset = 0, lostUnplug = 0
    var delivered = 0, lastDelivered = 0
    var unplugged = false

    func activate() {
        var features: VirtioFeatures = [.version1]
        if f.bool() { features.insert(.eventIdx) }
        if f.bool() { features.insert(.indirectDesc) }
        dev.ackFeatures(features)
        rings = []
        for k in 0..<2 {
            let sz: UInt16 = f.u8() < 200 ? maxQueue : [1, 2, 4, 8][f.below(4)]
            let r = Ring(k: k, size: sz, host: s.host)
            memset(r.desc, 0, ringStride)
            rings.append(r)
            guard let q = try? SplitQueue(config: r.config, maxSize: maxQueue, memory: memory.view, features: features, interrupt: .none) else { abort() }
            (queues + k).initialize(to: q)
        }
        live = true
        curStart = events.count
        let ctx = DeviceContext(queues: queues, queueCount: 2, memory: memory.view, loop: s.loop, configInterrupt: .none,
                                features: features)
        do { try dev.activate(ctx) } catch { abort() }
    }

    func check() {
        var lastThisTurn = 0
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
                var b: [UInt8] = []
                var off = 0
                for sg in o.segs where sg.writable {
                    let p = hostPtr(sg.addr).assumingMemoryBound(to: UInt8.self)
                    for i in 0..<sg.len {
                        if off < len { b.append(p[i]) } else { fuzzCheck(p[i] == 0xee, "queue \(r.k): byte \(off) written past used length \(len)") }
                        off += 1
                    }
                }
                if r.k == 1 {
                    fuzzCheck(len == 0, "statusq chain completed with \(len) bytes")
                } else {
                    fuzzCheck(len == (o.writable >= 8 ? 8 : 0), "event buffer of \(o.writable) writable bytes completed with \(len)")
                    if len == 8 {
                        let type = UInt16(b[0]) | UInt16(b[1]) << 8, code = UInt16(b[2]) | UInt16(b[3]) << 8
                        let seq = Int(UInt32(b[4]) | UInt32(b[5]) << 8 | UInt32(b[6]) << 16 | UInt32(b[7]) << 24)
                        if seq == 0 {
                            fuzzCheck(type == 0 && code == 0, "event \(type)/\(code) with value 0 (not a host event, not the quiesce report)")
                        } else {
                            fuzzCheck(seq < events.count && events[seq] == (type, code), "delivered event \(type)/\(code)/\(seq) was not sent")
                            fuzzCheck(seq > lastDelivered, "event \(seq) delivered after \(lastDelivered) (repeated or reordered)")
                            fuzzCheck(groupEnd[groupOf[seq]] != nil, "event \(seq) delivered before its group's SYN_REPORT")
                            lastDelivered = seq
                            lastThisTurn = seq
                            delivered += 1
                        }
                    }
                }
                r.out[UInt16(id)] = nil
                r.free.append(contentsOf: o.descs)
                for bl in o.blocks { blocks.free(bl.0, bl.1) }
            }
        }
        if lastThisTurn > 0 && events[lastThisTurn] != (VirtioInput.evSyn, VirtioInput.synReport) {
            // A group is split only when the driver's eventq can never hold all of it.
            let g = groupOf[lastThisTurn], n = groupEnd[g]! - g + 1
            fuzzCheck(n > Int(rings[0].size), "group of \(n) events split over an eventq of \(rings[0].size)")
        }
        fuzzCheck(injectedLive == delivered + dev.pendingEvents + Int(dev.droppedEvents) + lostReset + lostUnplug,
                  "events: \(injectedLive) in, \(delivered) delivered, \(dev.pendingEvents) pending, \(dev.droppedEvents) dropped, \(lostReset) at reset, \(lostUnplug) at unplug")
        fuzzCheck(Int(dev.droppedInactive) == injectedDown, "\(dev.droppedInactive) events counted inactive, \(injectedDown) sent")
        if live {
            let open = events.count - curStart
            if dev.heldBuffers >= dev.pendingEvents {
                fuzzCheck(dev.pendingEvents <= open, "\(dev.pendingEvents) events wait (\(open) of an open group) with \(dev.heldBuffers) buffers held")
            }
            for r in rings { fuzzCheck(!queues[r.k].isBroken, "well-formed ring \(r.k) latched: \(String(describing: queues[r.k].fault))") }
        } else {
            fuzzCheck(dev.heldBuffers == 0 && dev.pendingEvents == 0, "reset left \(dev.heldBuffers) buffers, \(dev.pendingEvents) events")
        }
    }

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

    /// A burst of host events through the source (each with its sequence number as value).
    func burst(_ n: Int, endWithSyn: Bool) {
        var batch: [InputEvent] = []
        for i in 0..<n {
            let seq = events.count + batch.count
            var e: InputEvent
            if (i == n - 1 && endWithSyn) || f.u8() < 50 {
                e = InputEvent(type: VirtioInput.evSyn, code: VirtioInput.synReport, value: Int32(seq))
            } else {
                let types: [UInt16] = [VirtioInput.evKey, VirtioInput.evAbs, VirtioInput.evRel, VirtioInput.evMsc, VirtioInput.evSyn]
                let t = f.u8() < 240 ? types[f.below(types.count)] : UInt16(f.below(0x20))
                e = InputEvent(type: t, code: t == VirtioInput.evSyn ? 1 + UInt16(f.below(3)) : UInt16(f.below(64)), value: Int32(seq))
            }
            batch.append(e)
        }
        for e in batch {
            let seq = events.count
            events.append((e.type, e.code))
            groupOf.append(curStart)
            if live {
                injectedLive += 1
                if e.type == VirtioInput.evSyn && e.code == VirtioInput.synReport { groupEnd[curStart] = seq; curStart = seq + 1 }
            } else {
                injectedDown += 1
                curStart = seq + 1
            }
        }
        if tracing { trace("  burst " + batch.map { $0.type == 0 && $0.code == 0 ? "S" : "e" }.joined() + "\n") }
        fuzzCheck(src.inject(batch), "fake source overran")
        src.handleEvent(token: 0, events: 1)
    }

    func deactivate() {
        guard live else { return }
        check()
        lostReset += dev.pendingEvents
        dev.reset()
        live = false
        for r in rings { for o in r.out.values { for b in o.blocks { blocks.free(b.0, b.1) } } }
        (queues + 0).deinitialize(count: 2)
        rings = []
        curStart = events.count
        check()
    }
    defer { deactivate(); queues.deallocate() }
    activate()

    var ops = 0
    while !f.isEmpty && ops < 96 {
        ops += 1
        let opcode = f.u8() % 12
        if tracing { trace("op \(opcode): pending \(dev.pendingEvents) held \(dev.heldBuffers) events \(events.count - 1) curStart \(curStart) q0 \(rings.first?.size ?? 0) ring \(dev.ringCapacity) dropped \(dev.droppedEvents)" + "\n") }
        switch opcode {
        case 0, 1, 2:   // event buffers (mostly 8 writable bytes), split, sometimes short, long or with a readable part
            for _ in 0..<(1 + f.below(6)) {
                var specs: [(Int, Bool)] = f.u8() < 16 ? [(1 + f.below(8), false)] : []
                specs += pieces(f.u8() < 220 ? 8 : f.below(24), true)
                if specs.isEmpty { specs = [(8, false)] }
                submit(0, specs, { _, p in p.pointee = 0x33 })
            }
            kick(0)
        case 3:         // a status event from the driver
            let types: [UInt16] = [VirtioInput.evLed, VirtioInput.evSnd, VirtioInput.evFF, VirtioInput.evKey, VirtioInput.evSyn]
            let t = f.u8() < 230 ? types[f.below(types.count)] : f.u16()
            let code = f.u8() < 230 ? UInt16(f.below(8)) : f.u16()
            let value = Int32(bitPattern: f.u32())
            let readable = f.u8() < 220 ? 8 : f.below(20)
            var specs = pieces(readable, false)
            if f.u8() < 20 || specs.isEmpty { specs.append((1 + f.below(12), true)) }
            var w = [UInt8](repeating: 0, count: max(readable, 8))
            let wire = InputEvent(type: t, code: code, value: value).wire
            for i in 0..<8 { w[i] = UInt8(truncatingIfNeeded: wire >> (8 * UInt64(i))) }
            for i in 8..<w.count { w[i] = f.u8() }
            let before = src.written.count, bad = dev.badStatusEvents
            guard submit(1, specs, { i, p in p.pointee = w[i] }) else { break }
            kick(1)
            let ok = readable == 8 && [VirtioInput.evLed, VirtioInput.evSnd, VirtioInput.evFF].contains(t) && caps.has(type: t, code: code)
            let written = src.written.count - before
            fuzzCheck(written == (ok && src.acceptsWrites ? 1 : 0) && dev.badStatusEvents - bad == (ok ? 0 : 1),
                      "status event \(t)/\(code) in \(readable) readable bytes: \(written) written, well-formed \(ok)")
            if written == 1 { fuzzCheck(src.written.last! == InputEvent(type: t, code: code, value: value), "status event changed on its way") }
        case 4, 5, 6:   // host events: mostly short groups, sometimes a burst longer than the queue or the ring
            let n = f.u8() < 200 ? 1 + f.below(24) : 1 + f.below(300)
            burst(n, endWithSyn: f.u8() < 200)
        case 7:         // the host device goes away or comes back
            if unplugged { src.replug() } else {
                let before = dev.pendingEvents
                src.unplug()
                lostUnplug += before - dev.pendingEvents
                curStart = events.count
            }
            unplugged.toggle()
        case 8:         // config: select/subsel (or read-only bytes) written at any offset, then read back
            let off = f.u8() < 200 ? f.below(2) : f.below(VirtioInput.configSize)
            let n = 1 + f.below(min(4, VirtioInput.configSize - off))
            var w = [UInt8](repeating: 0, count: n)
            let sels: [UInt8] = [0x01, 0x02, 0x03, 0x10, 0x11, 0x12]
            for i in 0..<n { w[i] = f.u8() < 200 ? (off + i == 0 ? sels[f.below(sels.count)] : UInt8(f.below(0x48))) : f.u8() }
            w.withUnsafeBytes { dev.writeConfig(offset: off, from: $0) }
            for i in 0..<n { if off + i == 0 { select = w[i] } else if off + i == 1 { subsel = w[i] } }
            var c = [UInt8](repeating: 0xa5, count: VirtioInput.configSize)
            c.withUnsafeMutableBytes { dev.readConfig(offset: 0, into: $0) }
            let want = expectedConfig(caps, select, subsel)
            fuzzCheck(c[0] == select && c[1] == subsel, "config select/subsel \(c[0])/\(c[1]), written \(select)/\(subsel)")
            fuzzCheck(Int(c[2]) == want.count, "config size \(c[2]) for \(select)/\(subsel), want \(want.count)")
            fuzzCheck(c[3..<8].allSatisfy { $0 == 0 }, "config reserved bytes not zero")
            fuzzCheck(Array(c[8..<(8 + want.count)]) == want, "config union for \(select)/\(subsel) differs")
            fuzzCheck(c[(8 + want.count)...].allSatisfy { $0 == 0 }, "config bytes after size \(want.count) not zero")
            let ro = f.below(VirtioInput.configSize)
            let rn = 1 + f.below(min(8, VirtioInput.configSize - ro))
            var part = [UInt8](repeating: 0xa5, count: rn)
            part.withUnsafeMutableBytes { dev.readConfig(offset: ro, into: $0) }
            fuzzCheck(part == Array(c[ro..<(ro + rn)]), "config read at \(ro) differs from the whole")
        case 9:
            dev.quiesce()
        case 10:        // driver reset; host events while the device is down; a new start
            deactivate()
            if f.bool() { burst(1 + f.below(8), endWithSyn: f.bool()); check() }
            activate()
        default:        // a kick on any queue index; a host device that refuses (or takes again) status writes
            if f.bool() { kick(f.below(4)) } else { src.acceptsWrites.toggle() }
        }
        check()
    }
    if tracing {
        trace("ops \(ops) events \(events.count - 1) live \(injectedLive) delivered \(delivered) pending \(dev.pendingEvents) dropped \(dev.droppedEvents) split \(dev.splitGroups) badEv \(dev.badEventChains) badStatus \(dev.badStatusEvents) written \(src.written.count) held \(dev.heldBuffers) unknownSel \(dev.unknownSelects) lost \(lostReset)/\(lostUnplug)\n")
    }
    return 0
}
