// libFuzzer target: the virtio-vsock packet decoder and connection state machine (Sources/Registry/Vsock/
// VsockDevice.swift) on the fake host side, driven by a fuzzed sequence of driver and host operations: transmit
// packets (header fields mostly near valid values: ops, a few ports, CIDs 3 → 2, STREAM, len around the payload;
// split anywhere), receive and event buffers of fuzzed sizes, host data, slow host readers, host closes,
// host-initiated connects, quiesce, queue stops, reset and re-activation. A small table (8 connections) and small
// credit (512 bytes) reach the table-full and credit-violation paths.
//
// Oracles: no trap; every used element names a head < queue size; a receive completion is 0 bytes or a header
// whose len plus 44 is the completion's length, within the buffer, from CID 2 to CID 3; an RW payload never exceeds
// the credit the driver gave for that connection; the device never holds more connections than its table; nothing
// latches NEEDS_RESET for a well-formed ring; a reset leaves no connection open on the host side.
import Glibc
import CLinux
import Transport
@testable import Registry

private let page = 4096
private let regionBytes = 64 * 1024
private let qsize: UInt16 = 16
private let guestBase: UInt64 = 0x1000_0000
private let hdr = VirtioVsock.headerSize

nonisolated(unsafe) private var setup: FuzzDriverMemory?

@_cdecl("LLVMFuzzerTestOneInput")
public func vsockPacketFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    if setup == nil { setup = FuzzDriverMemory(bytes: regionBytes); Log.level = .error }
    let s = setup!
    var f = FuzzInput(data, size)
    guard let memory = s.fresh(guestBase: guestBase) else { return 0 }
    let fake = FakeVsockHost(listening: [1, 2], capacity: 4096)
    let dev = VsockDevice(guestCID: 3, host: fake, queueSize: qsize, bufAlloc: 512, maxConnections: 8)
    var features: VirtioFeatures = [.version1]
    if f.bool() { features.insert(.eventIdx) }
    if f.bool() { features.insert(.indirectDesc) }
    dev.ackFeatures(features)
    let rings = FuzzRings(count: 3, size: qsize, memory: s, guestBase: guestBase)
    let queues = rings.queues
    func activate() { rings.activate(dev, memory: memory, features: features, loop: s.loop) }
    func deactivate() { rings.deactivate(dev) }
    defer { deactivate() }
    activate()

    var room: [[Int]] = Array(repeating: Array(repeating: 0, count: Int(qsize)), count: 3)
    var firstAddr: [[UInt64]] = Array(repeating: Array(repeating: 0, count: Int(qsize)), count: 3)
    /// The credit the driver gave per (host port, driver port): its buf_alloc and fwd_cnt; what it received.
    var credit: [UInt64: (alloc: UInt32, fwd: UInt32, got: UInt32)] = [:]
    // Receive buffers: one 256-byte slot each at 24 KiB (at most 16 in flight), so a later buffer never overlaps
    // one the device still holds (its header is checked at completion); other buffers from 28 KiB on.
    let rxSlotBase = rings.ringBytes
    var rxSlotUsed = [Bool](repeating: false, count: Int(qsize))
    var rxSlotOfHead = [Int](repeating: -1, count: Int(qsize))
    var buffers = FuzzBuffers(base: guestBase + UInt64(rxSlotBase + page), end: guestBase + UInt64(regionBytes))
    func buffer(_ len: Int) -> UInt64 { buffers.take(len) }
    func host(_ g: UInt64) -> UnsafeMutableRawPointer { rings.at(g) }

    /// Makes a chain available on queue k and records its room and first address by head; the head or -1 (ring full).
    @discardableResult
    func submit(_ k: Int, _ segs: [(UInt64, UInt32, Bool)]) -> Int {
        let head = rings.submit(k, segs)
        guard head >= 0 else { return -1 }
        room[k][head] = segs.filter { $0.2 }.reduce(0) { $0 + Int($1.1) }
        firstAddr[k][head] = segs[0].0
        return head
    }
    func checkUsed() {
        for k in 0..<3 {
            rings.forEachUsed(k) { head, len in
                fuzzCheck(Int(len) <= room[k][head], "queue \(k) used length \(len) > \(room[k][head])")
                if k == 0 && len > 0 {
                    // Receive buffers are contiguous (cut into pieces): the header is at the first address.
                    let h = VsockHeader(from: host(firstAddr[0][head]))
                    fuzzCheck(Int(len) == hdr + Int(h.len), "rx len \(len) vs header len \(h.len)")
                    fuzzCheck(h.srcCID == 2 && h.dstCID == 3 && h.type == VirtioVsock.typeStream, "rx addressing")
                    if h.op == VirtioVsock.Op.rw.rawValue {
                        let key = UInt64(h.srcPort) << 32 | UInt64(h.dstPort)
                        if var c = credit[key] {
                            c.got &+= h.len
                            fuzzCheck(c.got &- c.fwd <= c.alloc, "RW beyond the driver's credit: got \(c.got) fwd \(c.fwd) alloc \(c.alloc)")
                            credit[key] = c
                        }
                    }
                }
                if k == 2 { fuzzCheck(len == 0 || len == 4, "event length \(len)") }
                if k == 0 && rxSlotOfHead[head] >= 0 {
                    rxSlotUsed[rxSlotOfHead[head]] = false
                    rxSlotOfHead[head] = -1
                }
            }
        }
    }

    var ops = 0
    while !f.isEmpty && ops < 96 {
        ops += 1
        switch f.u8() % 12 {
        case 0, 1, 2, 3:   // a transmit packet
            let payload = f.u8() < 200 ? f.below(64) : f.below(600)
            let short = f.u8() < 16
            let readable = short ? f.below(hdr) : hdr + payload
            let b = buffer(max(readable, 1))
            let opRaw: UInt16 = f.u8() < 240 ? UInt16(1 + f.below(7)) : f.u16()
            let src = f.u8() < 240 ? UInt32(100 + f.below(4)) : f.u32()
            let dst = f.u8() < 240 ? UInt32(1 + f.below(3)) : f.u32()
            var h = VsockHeader(srcCID: f.u8() < 248 ? 3 : f.u64(), dstCID: f.u8() < 248 ? 2 : f.u64(), srcPort: src, dstPort: dst,
                                len: opRaw == VirtioVsock.Op.rw.rawValue ? UInt32(payload) : 0, op: .rw,
                                flags: UInt32(f.below(4)), bufAlloc: f.u8() < 200 ? 256 : f.u32(), fwdCnt: f.u32() % 2048)
            h.op = opRaw
            if f.u8() < 16 { h.len = f.u32() % 1024 }
            if f.u8() < 8 { h.type = f.u16() }
            if readable >= hdr {
                h.store(to: host(b))
                f.fill(host(b) + hdr, payload)
            } else { f.fill(host(b), max(readable, 1)) }
            let made = submit(1, f.pieces(b, readable, writable: false)) >= 0
            // The device takes the driver's credit from packets it accepts (a refused one changes nothing; one that
            // found the ring full was never made available).
            if made && readable >= hdr && validateVsockHeader(h, payload: payload, guestCID: 3) == nil {
                let key = UInt64(dst) << 32 | UInt64(src)
                if opRaw == VirtioVsock.Op.request.rawValue || opRaw == VirtioVsock.Op.response.rawValue {
                    credit[key] = (h.bufAlloc, h.fwdCnt, 0)
                } else if var c = credit[key] { c.alloc = h.bufAlloc; c.fwd = h.fwdCnt; credit[key] = c }
            }
            if rings.live { dev.queueNotified(1) }
        case 4, 5, 6:      // receive buffers
            for _ in 0..<(1 + f.below(3)) {
                let n = f.u8() < 224 ? hdr + 1 + f.below(128) : f.below(hdr + 2)
                guard n > 0, let slot = rxSlotUsed.firstIndex(of: false) else { continue }
                let b = guestBase + UInt64(rxSlotBase + 256 * slot)
                memset(host(b), 0xee, n)
                let head = submit(0, f.pieces(b, n, writable: true))
                if head >= 0 {
                    rxSlotUsed[slot] = true
                    rxSlotOfHead[head] = slot
                }
            }
            if rings.live { dev.queueNotified(0) }
        case 7:            // an event buffer
            let n = f.u8() < 224 ? 4 + f.below(8) : f.below(4)
            submit(2, f.pieces(buffer(max(n, 1)), n, writable: true))
            if rings.live { dev.queueNotified(2) }
        case 8:            // the host side
            let conns = Array(fake.conns.keys).sorted()
            switch f.u8() % 4 {
            case 0: if !conns.isEmpty { fake.feed(conns[f.below(conns.count)], Array(f.bytes(f.below(300)))) }
            case 1: if !conns.isEmpty { fake.setRoom(conns[f.below(conns.count)], f.below(200)) }
            case 2: if !conns.isEmpty { fake.hostClose(conns[f.below(conns.count)]) }
            default: _ = fake.connect(toDriverPort: UInt32(100 + f.below(4)))
            }
        case 9:
            switch f.u8() % 5 {
            case 0: dev.quiesce()
            case 1: dev.stopQueue(0); dev.startQueue(0)
            case 2: dev.stopQueue(1); dev.startQueue(1)
            case 3: dev.stopQueue(2); dev.startQueue(2)
            default: dev.transportReset()
            }
        case 10:           // driver reset and a new start
            deactivate()
            fuzzCheck(dev.connectionCount == 0, "reset left \(dev.connectionCount) connections")
            fuzzCheck(fake.conns.isEmpty, "reset left \(fake.conns.count) host connections open")
            credit = [:]
            rxSlotUsed = [Bool](repeating: false, count: Int(qsize)); rxSlotOfHead = [Int](repeating: -1, count: Int(qsize))
            activate()
        default:
            if rings.live { dev.queueNotified(f.below(3)) }
        }
        fuzzCheck(dev.connectionCount <= dev.maxConnections, "connections \(dev.connectionCount)")
        fuzzCheck(dev.connectionCount == fake.conns.count, "device has \(dev.connectionCount) connections, host side \(fake.conns.count)")
        if rings.live { fuzzCheck((0..<3).allSatisfy { !queues[$0].isBroken }, "well-formed ring latched") }
        checkUsed()
    }
    return 0
}
