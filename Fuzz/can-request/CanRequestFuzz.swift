// libFuzzer target: the virtio-can request decoder and device (Sources/Registry/CAN/) on the fake bus, driven by a
// fuzzed sequence of driver and bus operations: transmit requests (header fields mostly near the valid values,
// payloads split anywhere, result room 0, 1 or more), receive buffers of fuzzed sizes, control requests (fuzzed
// message types and sizes), frames from the bus (any id, length, kind, size), the bus blocking, taking frames
// again, failing sends (ENOBUFS, EINVAL, down), bus-off, the socket's events, quiesce, queue stop/start, reset and
// re-activation, with fuzzed features.
//
// The driver's memory is one 64 KiB region followed by a PROT_NONE guard page. Oracles: no trap; every used element
// names a head < queue size; tx and control completions are 0 or 1 bytes with a result of OK or NOT_OK; a filled
// receive buffer holds msg_type RX, length within the negotiated kind (classic/RTR ≤ 8, FD an FD length ≤ 64),
// only known flags, FD only when negotiated, RTR only when negotiated and never with FD, an id within 11 or 29 bits,
// and the used length is header + length; every OK transmit result is exactly one frame on the bus (the bus's sent
// count equals the OK results seen), and each frame on the bus is well-formed (size 16 or 72, length in range,
// id in range); nothing latches NEEDS_RESET for a well-formed ring.
import Glibc
import CLinux
import Transport
@testable import Registry

private let page = 4096
private let regionBytes = 64 * 1024
private let qsize: UInt16 = 16
private let guestBase: UInt64 = 0x1000_0000

nonisolated(unsafe) private var setup: FuzzDriverMemory?

@_cdecl("LLVMFuzzerTestOneInput")
public func canRequestFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    if setup == nil { setup = FuzzDriverMemory(bytes: regionBytes); Log.level = .error }
    let s = setup!
    var f = FuzzInput(data, size)
    guard let memory = s.fresh(guestBase: guestBase) else { return 0 }

    let bus = FakeCANBus(fdCapable: f.bool(), capacity: 64, sendCapacity: f.bool() ? .max : f.below(4), echo: f.bool(), record: true)
    let dev = CANDevice(endpoint: bus, queueSize: qsize, offerFD: f.u8() < 200)
    var features: VirtioFeatures = [.version1]
    for bit in [VirtioFeatures.eventIdx, .indirectDesc, VirtioCAN.fClassic, VirtioCAN.fFD, VirtioCAN.fRTR] where f.u8() < 192 {
        features.insert(bit)
    }
    features = features.intersection(dev.offeredFeatures)
    dev.ackFeatures(features)
    let hasFD = features.contains(VirtioCAN.fFD), hasRTR = features.contains(VirtioCAN.fRTR)
    let hasClassic = features.contains(VirtioCAN.fClassic)
    let rings = FuzzRings(count: 3, size: qsize, memory: s, guestBase: guestBase)
    let queues = rings.queues
    var okResults = 0
    // Where each head's result byte / receive buffer is (queue k, head) -> guest address.
    var where_ = [[UInt64]](repeating: [UInt64](repeating: 0, count: Int(qsize)), count: 3)
    func activate() { rings.activate(dev, memory: memory, features: features, loop: s.loop) }
    func deactivate() { rings.deactivate(dev) }
    defer { deactivate(); bus.stop() }
    activate()

    var buffers = FuzzBuffers(base: guestBase + UInt64(rings.ringBytes), end: guestBase + UInt64(regionBytes))
    func buffer(_ len: Int) -> UInt64 { buffers.take(len) }
    func host(_ g: UInt64) -> UnsafeMutableRawPointer { rings.at(g) }
    @discardableResult func submit(_ k: Int, _ segs: [(UInt64, UInt32, Bool)]) -> Int { rings.submit(k, segs) }
    func checkUsed() {
        guard rings.live else { return }
        for k in 0..<3 {
            rings.forEachUsed(k) { id, len in
                let at = where_[k][id]
                switch k {
                case VirtioCAN.txQueue, VirtioCAN.controlQueue:
                    fuzzCheck(len <= 1, "queue \(k) used length \(len)")
                    if len == 1 && at != 0 {
                        let r = host(at).load(as: UInt8.self)
                        fuzzCheck(r == VirtioCAN.resultOK || r == VirtioCAN.resultNotOK, "result \(r)")
                        if k == VirtioCAN.txQueue && r == VirtioCAN.resultOK { okResults += 1 }
                    }
                default:
                    if len > 0 && at != 0 {
                        fuzzCheck(len >= 16 && len <= 80, "rx used length \(len)")
                        let p = host(at)
                        let type = p.load(as: UInt16.self).littleEndian
                        let length = Int(p.load(fromByteOffset: 2, as: UInt16.self).littleEndian)
                        let flags = p.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian
                        let cid = p.loadUnaligned(fromByteOffset: 12, as: UInt32.self).littleEndian
                        fuzzCheck(type == VirtioCAN.msgRX, "rx msg_type \(type)")
                        fuzzCheck(Int(len) == 16 + length, "rx used \(len) for length \(length)")
                        fuzzCheck(flags & ~VirtioCAN.knownFlags == 0, "rx flags \(flags)")
                        let fd = flags & VirtioCAN.flagFD != 0, rtr = flags & VirtioCAN.flagRTR != 0
                        fuzzCheck(!fd || hasFD, "FD frame delivered without F_CAN_FD")
                        fuzzCheck(fd || hasClassic, "classic frame delivered without F_CAN_CLASSIC")
                        fuzzCheck(!rtr || (hasRTR && !fd), "RTR frame delivered wrongly")
                        fuzzCheck(fd ? (length <= 64 && VirtioCAN.isFDLength(length)) || length <= 64 : length <= 8, "rx length \(length)")
                        fuzzCheck(cid <= (flags & VirtioCAN.flagExtended != 0 ? LinuxCAN.effMask : LinuxCAN.sffMask), "rx id \(cid)")
                    }
                }
            }
            fuzzCheck(!queues[k].isBroken, "queue \(k) latched on a well-formed ring: \(queues[k].fault?.rawValue ?? "")")
        }
        fuzzCheck(okResults == bus.sentCount, "\(okResults) OK results, \(bus.sentCount) frames on the bus")
        for fr in bus.sent {
            fuzzCheck(fr.count == 16 || fr.count == 72, "frame size \(fr.count)")
            let id = UInt32(fr[0]) | UInt32(fr[1]) << 8 | UInt32(fr[2]) << 16 | UInt32(fr[3]) << 24
            fuzzCheck(Int(fr[4]) <= (fr.count == 72 ? 64 : 8), "frame length \(fr[4])")
            fuzzCheck(id & LinuxCAN.errFlag == 0, "error flag on a sent frame")
            fuzzCheck((id & ~(LinuxCAN.effFlag | LinuxCAN.rtrFlag)) <= (id & LinuxCAN.effFlag != 0 ? LinuxCAN.effMask : LinuxCAN.sffMask), "frame id \(id)")
        }
    }

    var ops = 0
    while !f.isEmpty && ops < 64 {
        ops += 1
        switch f.u8() % 12 {
        case 0, 1, 2:   // a transmit request
            var length = f.u8() < 220 ? [0, 1, 4, 8, 12, 16, 48, 64][f.below(8)] : f.below(80)
            let flags: UInt32 = f.u8() < 230 ? [0, VirtioCAN.flagExtended, VirtioCAN.flagFD, VirtioCAN.flagFD | VirtioCAN.flagExtended,
                                                 VirtioCAN.flagRTR, VirtioCAN.flagRTR | VirtioCAN.flagExtended][f.below(6)] : f.u32()
            let id: UInt32 = f.u8() < 220 ? UInt32(f.below(0x800)) : f.u32()
            let type: UInt16 = f.u8() < 240 ? VirtioCAN.msgTX : f.u16()
            var readable = 16 + length
            if f.u8() < 24 { readable = f.below(100) }
            if f.u8() < 8 { length = Int(f.u16()) }
            let room = f.u8() < 230 ? 1 : f.below(4)
            let r = buffer(max(readable, 1)), w = buffer(max(room, 1))
            let p = host(r)
            if readable >= 16 {
                p.storeBytes(of: type.littleEndian, as: UInt16.self)
                p.storeBytes(of: UInt16(truncatingIfNeeded: length).littleEndian, toByteOffset: 2, as: UInt16.self)
                p.storeBytes(of: f.u32(), toByteOffset: 4, as: UInt32.self)
                p.storeBytes(of: flags.littleEndian, toByteOffset: 8, as: UInt32.self)
                p.storeBytes(of: id.littleEndian, toByteOffset: 12, as: UInt32.self)
                f.fill(p + 16, readable - 16)
            } else { f.fill(p, readable) }
            host(w).storeBytes(of: 0xee, as: UInt8.self)
            let h = submit(VirtioCAN.txQueue, f.pieces(r, readable, writable: false) + f.pieces(w, room, writable: true))
            if h >= 0 { where_[VirtioCAN.txQueue][h] = room > 0 ? w : 0 }
            dev.queueNotified(VirtioCAN.txQueue)
        case 3, 4:      // receive buffers
            for _ in 0..<(1 + f.below(4)) {
                let n = f.u8() < 220 ? [24, 80, 16, 20][f.below(4)] : f.below(100)
                let b = buffer(max(n, 1))
                let h = submit(VirtioCAN.rxQueue, f.pieces(b, n, writable: true))
                if h >= 0 { where_[VirtioCAN.rxQueue][h] = b }
            }
            dev.queueNotified(VirtioCAN.rxQueue)
        case 5:         // a control request
            let t: UInt16 = f.u8() < 230 ? (f.bool() ? VirtioCAN.ctrlStart : VirtioCAN.ctrlStop) : f.u16()
            let out = f.u8() < 230 ? 2 : f.below(5), room = f.u8() < 230 ? 1 : f.below(3)
            let o = buffer(max(out, 1)), i = buffer(max(room, 1))
            host(o).storeBytes(of: t.littleEndian, as: UInt16.self)
            let h = submit(VirtioCAN.controlQueue, f.pieces(o, out, writable: false) + f.pieces(i, room, writable: true))
            if h >= 0 { where_[VirtioCAN.controlQueue][h] = room > 0 ? i : 0 }
            dev.queueNotified(VirtioCAN.controlQueue)
        case 6, 7:      // frames from the bus
            for _ in 0..<(1 + f.below(6)) {
                var fr = [UInt8](repeating: 0, count: 72)
                let raw = f.u8() < 200 ? UInt32(f.below(0x800)) | (f.bool() ? LinuxCAN.effFlag : 0) | (f.u8() < 30 ? LinuxCAN.rtrFlag : 0) : f.u32()
                withUnsafeBytes(of: raw) { for i in 0..<4 { fr[i] = $0[i] } }
                let fd = f.u8() < 80
                fr[4] = f.u8() < 220 ? UInt8(fd ? [0, 8, 12, 64][f.below(4)] : f.below(9)) : f.u8()
                let n = f.u8() < 245 ? (fd ? 72 : 16) : f.below(80)
                _ = fr.withUnsafeBytes { bus.inject($0.baseAddress!, size: n) }
            }
            dev.endpointReadable()
        case 8:         // the bus takes frames again / a send result
            switch f.below(5) {
            case 0: bus.drainSent(f.below(4)); dev.endpointWritable()
            case 1: bus.scriptedSends.append(.retryLater)
            case 2: bus.scriptedSends.append(.rejected(EINVAL))
            case 3: bus.scriptedSends.append(.down)
            default: bus.sendCapacity = f.bool() ? .max : f.below(4); dev.endpointWritable()
            }
        case 9:         // bus-off, the interface down or up
            switch f.below(3) {
            case 0: bus.raiseBusOff(); dev.endpointReadable()
            case 1: bus.up = false
            default: bus.up = true
            }
        case 10:        // a front-end stopping rings
            if f.bool() { dev.quiesce() } else {
                let q = f.below(3)
                dev.stopQueue(q)
                dev.startQueue(q)
            }
        default:        // driver reset and a new start
            if f.u8() < 64 {
                deactivate()
                bus.scriptedSends.removeAll()
                okResults = bus.sentCount
                where_ = [[UInt64]](repeating: [UInt64](repeating: 0, count: Int(qsize)), count: 3)
                activate()
            }
        }
        checkUsed()
    }
    return 0
}
