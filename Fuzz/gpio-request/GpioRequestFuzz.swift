// libFuzzer target: the virtio-gpio request and event decoder (Sources/Registry/GPIO/GpioDevice.swift) on the fake
// chip, driven by a fuzzed sequence of driver operations: requestq chains (fuzzed segment counts and lengths, split
// anywhere, request fields mostly near the valid values), eventq buffers, edges on the chip's lines, quiesce, queue
// stop, reset and re-activation.
//
// The driver's memory is one 64 KiB region followed by a PROT_NONE guard page, so a device write one byte past it
// faults. Oracles: no trap; every used element names a head < queue size with a length the response format allows
// (requestq: 0, 1, 2 or 1 + gpio_names_size; eventq: 0 or 1); an eventq status byte is INVALID or VALID; the device
// never holds more event buffers than it has lines; nothing latches NEEDS_RESET for a well-formed ring.
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
public func gpioRequestFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    if setup == nil { setup = FuzzDriverMemory(bytes: regionBytes); Log.level = .error }
    let s = setup!
    var f = FuzzInput(data, size)
    guard let memory = s.fresh(guestBase: guestBase) else { return 0 }

    let lines = 1 + f.below(12)
    let named = f.bool()
    let chip = FakeGpioChip(lines: lines, names: named ? (0..<lines).map { $0 % 3 == 0 ? "" : "line\($0)" } : [String](repeating: "", count: lines),
                            loopback: f.bool())
    let dev = GpioDevice(chip: chip, queueSize: qsize)
    var features: VirtioFeatures = [.version1]
    if f.bool() { features.insert(.eventIdx) }
    if f.bool() { features.insert(.indirectDesc) }
    if f.bool() { features.insert(VirtioGpio.fIRQ) }
    dev.ackFeatures(features)
    let rings = FuzzRings(count: 2, size: qsize, memory: s, guestBase: guestBase)
    let queues = rings.queues
    func activate() { rings.activate(dev, memory: memory, features: features, loop: s.loop) }
    func deactivate() { rings.deactivate(dev) }
    defer { deactivate() }
    activate()

    var buffers = FuzzBuffers(base: guestBase + UInt64(rings.ringBytes), end: guestBase + UInt64(regionBytes))
    func buffer(_ len: Int) -> UInt64 { buffers.take(len) }
    func host(_ g: UInt64) -> UnsafeMutableRawPointer { rings.at(g) }
    let namesSize = dev.namesSize
    func submit(_ k: Int, _ segs: [(UInt64, UInt32, Bool)]) { rings.submit(k, segs) }
    func checkUsed() {
        for k in 0..<2 {
            rings.forEachUsed(k) { _, len in
                if k == 0 { fuzzCheck(len <= 2 || len == UInt32(1 + namesSize), "requestq used length \(len)") }
                else { fuzzCheck(len <= 1, "eventq used length \(len)") }
            }
        }
    }

    var ops = 0
    while !f.isEmpty && ops < 64 {
        ops += 1
        switch f.u8() % 8 {
        case 0, 1, 2:   // a request
            var readable = 8
            if f.u8() < 32 { readable = f.below(16) }
            let room = f.u8() < 200 ? (f.bool() ? 2 : 1 + namesSize) : f.below(40)
            let r = buffer(max(readable, 1)), w = buffer(max(room, 1))
            let t = f.u8() < 240 ? UInt16(f.below(8)) : f.u16()
            let line = f.u8() < 240 ? UInt16(f.below(lines + 2)) : f.u16()
            let v = f.u8() < 240 ? UInt32(f.below(10)) : f.u32()
            if readable >= 8 {
                host(r).storeBytes(of: t.littleEndian, as: UInt16.self)
                host(r).storeBytes(of: line.littleEndian, toByteOffset: 2, as: UInt16.self)
                host(r).storeBytes(of: v.littleEndian, toByteOffset: 4, as: UInt32.self)
            } else { f.fill(host(r), max(readable, 1)) }
            submit(0, f.pieces(r, readable, writable: false) + f.pieces(w, room, writable: true))
            if rings.live { dev.queueNotified(0) }
        case 3, 4:      // an event buffer
            let readable = f.u8() < 32 ? f.below(5) : 2
            let room = f.u8() < 32 ? f.below(3) : 1
            let r = buffer(max(readable, 2)), w = buffer(max(room, 1))
            host(r).storeBytes(of: UInt16(f.below(lines + 2)).littleEndian, as: UInt16.self)
            host(w).storeBytes(of: 0xee, as: UInt8.self)
            submit(1, f.pieces(r, readable, writable: false) + f.pieces(w, room, writable: true))
            if rings.live {
                dev.queueNotified(1)
                if room >= 1 {
                    let st = host(w).load(as: UInt8.self)
                    fuzzCheck(st == 0xee || st <= 1, "eventq status \(st)")
                }
            }
        case 5:         // the outside world
            chip.drive(f.below(lines), f.bool())
        case 6:
            switch f.u8() % 3 {
            case 0: dev.quiesce()
            case 1: dev.stopQueue(1)
            default: dev.stopQueue(0)
            }
        default:        // driver reset and a new start
            deactivate()
            fuzzCheck(dev.held == 0, "reset left \(dev.held) held buffers")
            fuzzCheck(chip.direction.allSatisfy { $0 == .none }, "reset left lines requested")
            activate()
        }
        fuzzCheck(dev.held <= lines, "held \(dev.held) > \(lines) lines")
        if rings.live { fuzzCheck(!queues[0].isBroken && !queues[1].isBroken, "well-formed ring latched: \(String(describing: queues[0].fault)) \(String(describing: queues[1].fault))") }
        checkUsed()
    }
    return 0
}
