// libFuzzer target: the virtio-snd request decoder and device (Sources/Registry/Sound/) on fake endpoints, driven by
// a fuzzed sequence of driver operations: control requests (codes mostly valid, stream and jack ids, query ranges
// and item sizes, SET_PARAMS fields near the offer, request and response sizes 0-40 bytes, split anywhere), I/O
// messages on both queues (stream ids, header sizes, data and status room, split anywhere), event buffers, the
// stream clock moving (fake clock, then the pump), quiesce, driver reset and re-activation, xrun events on or off,
// a self-paced endpoint with fuzzed room.
//
// The driver's memory is one 128 KiB region followed by a PROT_NONE guard page. Oracles: no trap; every used element
// names a head < queue size; a control completion is 0 bytes (no room for a status) or 4 + the items of an OK
// query, never more than the room, with a known status; an event is 8 bytes of XRUN for an existing stream; an I/O
// completion is 0 (no room for a status) or 8 bytes (playback) / 8 + at most its room (capture) with OK or BAD_MSG;
// held messages never exceed the queue size; nothing latches NEEDS_RESET for a well-formed ring.
import Glibc
import CLinux
import Transport
@testable import Registry

private let page = 4096
private let regionBytes = 128 * 1024
private let qsize: UInt16 = 16
private let guestBase: UInt64 = 0x1000_0000
nonisolated(unsafe) private var fakeNow: UInt64 = 1_000_000_000

nonisolated(unsafe) private var setup: FuzzDriverMemory?

@_cdecl("LLVMFuzzerTestOneInput")
public func soundRequestFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    if setup == nil { setup = FuzzDriverMemory(bytes: regionBytes); Log.level = .error }
    let s = setup!
    var f = FuzzInput(data, size)
    guard let memory = s.fresh(guestBase: guestBase) else { return 0 }

    let caps = PcmCapabilities(formats: soundLinearFormats, rates: PcmCapabilities.allRates, channelsMin: 1, channelsMax: 2)
    let play = MemorySoundEndpoint(capabilities: caps, selfPaced: f.u8() < 64, capacity: 1 << 16)
    if play.selfPaced { play.room = f.below(4096) }
    let cap = MemorySoundEndpoint(capabilities: caps, capacity: 16, pattern: [1, 2, 3])
    let dev = SoundDevice(streams: [SoundStreamConfig(direction: VirtioSnd.dOutput, endpoint: play),
                                    SoundStreamConfig(direction: VirtioSnd.dInput, endpoint: cap)],
                          queueSize: qsize, xrunEvents: f.bool())
    fakeNow = 1_000_000_000
    dev.clock = { fakeNow }
    var features: VirtioFeatures = [.version1]
    for bit in [VirtioFeatures.eventIdx, .indirectDesc] where f.bool() { features.insert(bit) }
    dev.ackFeatures(features)
    let rings = FuzzRings(count: 4, size: qsize, memory: s, guestBase: guestBase)
    let queues = rings.queues
    // Per queue and head: where its response/status is, and how much room the chain had.
    var at = [[UInt64]](repeating: [UInt64](repeating: 0, count: Int(qsize)), count: 4)
    var room = [[Int]](repeating: [Int](repeating: 0, count: Int(qsize)), count: 4)
    func activate() { rings.activate(dev, memory: memory, features: features, loop: s.loop) }
    func deactivate() { rings.deactivate(dev) }
    defer { deactivate() }
    activate()

    let bufBase = 9 * page
    var buffers = FuzzBuffers(base: guestBase + UInt64(bufBase), end: guestBase + UInt64(regionBytes))
    func buffer(_ len: Int) -> UInt64 {
        let wraps = buffers.wraps
        let b = buffers.take(len)
        if buffers.wraps != wraps {
            // Wrapping reuses memory of chains the device may still hold (sound holds I/O until its clock says so):
            // their response/status bytes are no longer the device's to judge.
            for k in 0..<4 { for h in 0..<Int(qsize) { at[k][h] = 0 } }
        }
        return b
    }
    func host(_ g: UInt64) -> UnsafeMutableRawPointer { rings.at(g) }
    @discardableResult func submit(_ k: Int, _ segs: [(UInt64, UInt32, Bool)]) -> Int { rings.submit(k, segs) }
    let known: Set<UInt32> = [VirtioSnd.sOK, VirtioSnd.sBadMsg, VirtioSnd.sNotSupp, VirtioSnd.sIOErr]
    func checkUsed() {
        guard rings.live else { return }
        for k in 0..<4 {
            rings.forEachUsed(k) { id, used in
                let len = Int(used)
                let r = room[k][id], p = at[k][id]
                fuzzCheck(len <= r, "queue \(k) used length \(len) over the room \(r)")
                switch k {
                case VirtioSnd.controlQueue:
                    if r < 4 { fuzzCheck(len == 0, "control: \(len) bytes without room for a status") }
                    else {
                        fuzzCheck(len >= 4, "control used length \(len)")
                        guard p != 0 else { break }
                        let st = UInt32(littleEndian: host(p).loadUnaligned(as: UInt32.self))
                        fuzzCheck(known.contains(st), "control status \(st)")
                        if st != VirtioSnd.sOK { fuzzCheck(len == 4, "control error with \(len) bytes") }
                    }
                case VirtioSnd.eventQueue:
                    fuzzCheck(len == 0 || len == 8, "event length \(len)")
                    if len == 8 && p != 0 {
                        let code = UInt32(littleEndian: host(p).loadUnaligned(as: UInt32.self))
                        let d = UInt32(littleEndian: host(p).loadUnaligned(fromByteOffset: 4, as: UInt32.self))
                        fuzzCheck(code == VirtioSnd.evtPcmXrun && d < 2, "event \(code) \(d)")
                        fuzzCheck(dev.xrunEvents, "an event without xrun-events")
                    }
                default:
                    if r < 8 { fuzzCheck(len == 0, "I/O: \(len) bytes without room for a status") }
                    else {
                        fuzzCheck(len >= 8, "I/O used length \(len)")
                        if k == VirtioSnd.txQueue { fuzzCheck(len == 8, "playback used length \(len)") }
                        // the status is the last 8 bytes of the writable part; `p` is its address when contiguous
                        if p != 0 {
                            let st = UInt32(littleEndian: host(p).loadUnaligned(as: UInt32.self))
                            fuzzCheck(st == VirtioSnd.sOK || st == VirtioSnd.sBadMsg, "I/O status \(st)")
                        }
                    }
                }
            }
            fuzzCheck(!queues[k].isBroken, "queue \(k) latched on a well-formed ring: \(queues[k].fault?.rawValue ?? "")")
        }
        for sid in 0..<2 { fuzzCheck((dev.streamState(sid)?.held ?? 0) <= Int(qsize), "stream \(sid) holds too much") }
    }
    func le(_ v: UInt32, _ p: UnsafeMutableRawPointer, _ o: Int) { p.storeBytes(of: v.littleEndian, toByteOffset: o, as: UInt32.self) }

    var ops = 0
    while !f.isEmpty && ops < 64 {
        ops += 1
        switch f.u8() % 10 {
        case 0, 1, 2:   // a control request
            let codes: [UInt32] = [VirtioSnd.rJackInfo, VirtioSnd.rJackRemap, VirtioSnd.rPcmInfo, VirtioSnd.rPcmSetParams,
                                   VirtioSnd.rPcmPrepare, VirtioSnd.rPcmRelease, VirtioSnd.rPcmStart, VirtioSnd.rPcmStop,
                                   VirtioSnd.rChmapInfo]
            let code = f.u8() < 230 ? codes[f.below(codes.count)] : f.u32()
            let reqLen = f.u8() < 220 ? [4, 8, 16, 24][f.below(4)] : f.below(41)
            let q = f.u8() < 200 ? f.below(3) : Int(f.u32())
            let r = buffer(max(reqLen, 1))
            let p = host(r)
            memset(p, 0, max(reqLen, 1))
            if reqLen >= 4 { le(code, p, 0) }
            if reqLen >= 8 { le(UInt32(truncatingIfNeeded: q), p, 4) }
            if reqLen >= 12 {
                if code == VirtioSnd.rPcmSetParams {
                    le(f.u8() < 200 ? [4096, 16384, 19200][f.below(3)] : f.u32(), p, 8)
                    if reqLen >= 16 { le(f.u8() < 200 ? [1024, 4800, 4096][f.below(3)] : f.u32(), p, 12) }
                    if reqLen >= 20 { le(f.u8() < 220 ? 0 : f.u32(), p, 16) }
                    if reqLen >= 24 {
                        p.storeBytes(of: f.u8() < 220 ? UInt8(1 + f.below(2)) : f.u8(), toByteOffset: 20, as: UInt8.self)
                        p.storeBytes(of: f.u8() < 220 ? [4, 5, 11, 17, 19][f.below(5)] : f.u8(), toByteOffset: 21, as: UInt8.self)
                        p.storeBytes(of: f.u8() < 220 ? UInt8(f.below(14)) : f.u8(), toByteOffset: 22, as: UInt8.self)
                    }
                } else {
                    le(f.u8() < 220 ? UInt32(f.below(3)) : f.u32(), p, 8)
                    if reqLen >= 16 { le(f.u8() < 220 ? [24, 32, 40][f.below(3)] : f.u32(), p, 12) }
                }
            }
            let resp = f.u8() < 220 ? [4, 4 + 32, 4 + 64, 4 + 80][f.below(4)] : f.below(200)
            let w = buffer(max(resp, 1))
            let h = submit(VirtioSnd.controlQueue, f.pieces(r, reqLen, writable: false) + f.pieces(w, resp, writable: true))
            if h >= 0 { at[0][h] = w; room[0][h] = resp }
            dev.queueNotified(VirtioSnd.controlQueue)
        case 3, 4, 5:   // I/O messages
            let k = f.bool() ? VirtioSnd.txQueue : VirtioSnd.rxQueue
            for _ in 0..<(1 + f.below(4)) {
                let sid: UInt32 = f.u8() < 220 ? (k == VirtioSnd.txQueue ? 0 : 1) : f.u32()
                let hdr = f.u8() < 240 ? 4 : f.below(8)
                let dataLen = f.u8() < 200 ? [0, 4, 64, 480, 960][f.below(5)] : f.below(2000)
                let st = f.u8() < 240 ? 8 : f.below(12)
                let hb = buffer(max(hdr, 1)), db = buffer(max(dataLen, 1)), sb = buffer(max(st, 1))
                if hdr >= 4 { le(sid, host(hb), 0) }
                var segs = f.pieces(hb, hdr, writable: false)
                if k == VirtioSnd.txQueue {
                    f.fill(host(db), min(dataLen, 64))
                    segs += f.pieces(db, dataLen, writable: false) + f.pieces(sb, st, writable: true)
                } else {
                    segs += f.pieces(db, dataLen, writable: true) + f.pieces(sb, st, writable: true)
                }
                memset(host(sb), 0xee, max(st, 1))
                let h = submit(k, segs)
                let total = k == VirtioSnd.txQueue ? st : dataLen + st
                // the status: the last 8 bytes of the status buffer (the writable part ends there)
                if h >= 0 { room[k][h] = total; at[k][h] = st >= 8 ? sb + UInt64(st - 8) : 0 }
            }
            dev.queueNotified(k)
        case 6:         // event buffers
            for _ in 0..<(1 + f.below(3)) {
                let n = f.u8() < 230 ? 8 : f.below(16)
                let b = buffer(max(n, 1))
                let h = submit(VirtioSnd.eventQueue, f.pieces(b, n, writable: true))
                if h >= 0 { at[1][h] = b; room[1][h] = n }
            }
            dev.queueNotified(VirtioSnd.eventQueue)
        case 7, 8:      // the clock moves; the pump runs (what the timers do)
            fakeNow &+= f.u8() < 200 ? UInt64(f.below(30)) * 1_000_000 : UInt64(f.u32())
            if play.selfPaced && f.bool() { play.room = f.below(8192) }
            for sid in 0..<2 { dev.pump(dev.streams[sid]) }
        default:        // quiesce, or a driver reset and a new start
            if f.bool() { dev.quiesce() } else {
                deactivate()
                memset(s.host + bufBase, 0, regionBytes - bufBase)
                at = [[UInt64]](repeating: [UInt64](repeating: 0, count: Int(qsize)), count: 4)
                room = [[Int]](repeating: [Int](repeating: 0, count: Int(qsize)), count: 4)
                activate()
            }
        }
        checkUsed()
    }
    return 0
}
