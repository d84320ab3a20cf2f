// libFuzzer target: the virtio-gpu 2D command decoder (Sources/Registry/GPU/GpuDevice.swift), driven by a fuzzed
// sequence of driver operations: controlq commands (types mostly among the 2D commands, ids, formats, sizes,
// rectangles, offsets and backing entries mostly near valid values, sometimes any 32/64-bit value; requests split
// into 1-3 segments anywhere; response room 0-1100 bytes), cursorq commands, hot-plug, events_clear writes, and
// reset + re-activation.
//
// The driver's memory is one 256 KiB region followed by a PROT_NONE guard page: a device write one byte past it,
// or a backing entry translated past it, faults. Oracles: no trap; every used element names a head < queue size
// with a length the protocol allows (controlq: 0, 24, display info 408 or EDID 1056; cursorq: 0 or 24) and a known
// response type; host memory of resources never exceeds the budget; nothing latches NEEDS_RESET for a well-formed
// ring.
import Glibc
import CLinux
import Transport
@testable import Registry

private let page = 4096
private let regionBytes = 256 * 1024
private let qsize: UInt16 = 16
private let guestBase: UInt64 = 0x1000_0000
private let budget = 1 << 20

nonisolated(unsafe) private var setup: FuzzDriverMemory?

private let commands: [UInt32] = [
    VirtioGPU.cmdGetDisplayInfo, VirtioGPU.cmdResourceCreate2D, VirtioGPU.cmdResourceUnref, VirtioGPU.cmdSetScanout,
    VirtioGPU.cmdResourceFlush, VirtioGPU.cmdTransferToHost2D, VirtioGPU.cmdResourceAttachBacking,
    VirtioGPU.cmdResourceDetachBacking, VirtioGPU.cmdGetEDID, VirtioGPU.cmdGetCapsetInfo, VirtioGPU.cmdUpdateCursor,
    VirtioGPU.cmdMoveCursor,
]

@_cdecl("LLVMFuzzerTestOneInput")
public func gpuCommandFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    if setup == nil { setup = FuzzDriverMemory(bytes: regionBytes); Log.level = .error }
    let s = setup!
    var f = FuzzInput(data, size)
    guard let memory = s.fresh(guestBase: guestBase) else { return 0 }

    let scanouts = 1 + f.below(3)
    let dev = GpuDevice(modes: (0..<scanouts).map { GpuMode(width: UInt32(64 + 16 * $0), height: 64) },
                        outputs: (0..<scanouts).map { _ in NullGpuOutput() }, memoryBudget: budget, edid: f.bool(), queueSize: qsize)
    var features: VirtioFeatures = [.version1]
    if f.bool() { features.insert(.eventIdx) }
    if f.bool() { features.insert(.indirectDesc) }
    if dev.offeredFeatures.contains(VirtioGPU.fEDID) && f.bool() { features.insert(VirtioGPU.fEDID) }
    dev.ackFeatures(features)
    let rings = FuzzRings(count: 2, size: qsize, memory: s, guestBase: guestBase)
    let queues = rings.queues
    func activate() { rings.activate(dev, memory: memory, features: features, loop: s.loop) }
    func deactivate() { rings.deactivate(dev) }
    defer { deactivate() }
    activate()

    let bufBase = rings.ringBytes
    var buffers = FuzzBuffers(base: guestBase + UInt64(bufBase), end: guestBase + UInt64(regionBytes))
    func buffer(_ len: Int) -> UInt64 { buffers.take(len) }
    func host(_ g: UInt64) -> UnsafeMutableRawPointer { rings.at(g) }
    func submit(_ k: Int, _ segs: [(UInt64, UInt32, Bool)]) { rings.submit(k, segs) }
    func checkUsed() {
        for k in 0..<2 {
            rings.forEachUsed(k) { _, len in
                if k == 0 {
                    fuzzCheck([0, 24, UInt32(VirtioGPU.displayInfoSize), UInt32(VirtioGPU.edidResponseSize)].contains(len), "controlq used length \(len)")
                } else {
                    fuzzCheck(len == 0 || len == 24, "cursorq used length \(len)")
                }
            }
        }
        fuzzCheck(dev.memoryUsed <= budget && dev.memoryUsed >= 0, "memory \(dev.memoryUsed) of \(budget)")
        fuzzCheck(dev.resourceCount <= GpuDevice.maxResources, "resources \(dev.resourceCount)")
    }
    /// A response header's type must be one the protocol defines.
    func checkResponse(_ w: UInt64, _ room: Int) {
        guard room >= 24 else { return }
        let t = host(w).load(as: UInt32.self).littleEndian
        if t == 0xeeee_eeee { return }   // not written (no room)
        fuzzCheck((0x1100...0x1106).contains(t) || (0x1200...0x1205).contains(t), "response type \(String(t, radix: 16))")
    }
    func small(_ limit: Int) -> UInt32 { f.u8() < 230 ? UInt32(f.below(limit)) : f.u32() }

    var ops = 0
    while !f.isEmpty && ops < 48 {
        ops += 1
        switch f.u8() % 10 {
        case 0...6:   // a controlq command
            let type = f.u8() < 240 ? commands[f.below(commands.count)] : f.u32()
            var fields: [UInt32] = []
            var extra: [(UInt64, UInt32, Bool)] = []
            switch type {
            case VirtioGPU.cmdResourceCreate2D:
                let formats = GpuFormat.allCases.map(\.rawValue)
                fields = [small(6), f.u8() < 230 ? formats[f.below(formats.count)] : f.u32(), small(200), small(200)]
            case VirtioGPU.cmdSetScanout, VirtioGPU.cmdResourceFlush:
                fields = [small(100), small(100), small(130), small(130), small(4), small(6)]
            case VirtioGPU.cmdTransferToHost2D:
                fields = [small(100), small(100), small(130), small(130), small(40_000), f.u8() < 230 ? 0 : f.u32(), small(6), 0]
            case VirtioGPU.cmdResourceAttachBacking:
                let n = f.u8() < 230 ? f.below(5) : Int(f.u32() % 20_000)
                fields = [small(6), UInt32(truncatingIfNeeded: n)]
                let given = min(n, 64, f.u8() < 200 ? n : f.below(6))   // the entries sent (a count beyond them is a finding for the device)
                if given > 0 {
                    let e = buffer(16 * given)
                    for k in 0..<given {
                        // Mostly inside the region (past the rings), sometimes anywhere.
                        let addr: UInt64 = f.u8() < 220 ? guestBase + UInt64(bufBase + f.below(regionBytes - bufBase)) : f.u64()
                        let len: UInt32 = f.u8() < 220 ? UInt32(f.below(70_000)) : f.u32()
                        host(e).storeBytes(of: addr.littleEndian, toByteOffset: 16 * k, as: UInt64.self)
                        host(e).storeBytes(of: len.littleEndian, toByteOffset: 16 * k + 8, as: UInt32.self)
                        host(e).storeBytes(of: UInt32(0), toByteOffset: 16 * k + 12, as: UInt32.self)
                    }
                    extra = f.pieces(e, 16 * given - (f.u8() < 16 ? f.below(16) : 0), writable: false)
                }
            default:
                fields = [small(6), small(4), small(100), small(100)]
            }
            var req = 24 + 4 * fields.count
            if f.u8() < 24 { req = f.below(req + 8) }
            let r = buffer(64)   // room for the whole header even when fewer bytes are offered
            host(r).storeBytes(of: type.littleEndian, as: UInt32.self)
            host(r).storeBytes(of: (f.u8() < 128 ? VirtioGPU.flagFence : f.u32()).littleEndian, toByteOffset: 4, as: UInt32.self)
            host(r).storeBytes(of: f.u64().littleEndian, toByteOffset: 8, as: UInt64.self)
            host(r).storeBytes(of: f.u64().littleEndian, toByteOffset: 16, as: UInt64.self)
            for (k, v) in fields.enumerated() where 24 + 4 * k + 4 <= 64 {
                host(r).storeBytes(of: v.littleEndian, toByteOffset: 24 + 4 * k, as: UInt32.self)
            }
            let rooms = [24, VirtioGPU.displayInfoSize, VirtioGPU.edidResponseSize]
            let room = f.u8() < 220 ? rooms[f.below(3)] : f.below(1100)
            let w = buffer(max(room, 1))
            memset(host(w), 0xee, max(room, 1))
            submit(0, f.pieces(r, req, writable: false) + extra + f.pieces(w, room, writable: true))
            if rings.live { dev.queueNotified(0); checkResponse(w, room) }
        case 7:       // a cursorq command
            let type = f.u8() < 240 ? (f.bool() ? VirtioGPU.cmdUpdateCursor : VirtioGPU.cmdMoveCursor) : f.u32()
            let req = f.u8() < 230 ? 56 : f.below(70)
            let r = buffer(72)
            f.fill(host(r), 72)
            host(r).storeBytes(of: type.littleEndian, as: UInt32.self)
            if req >= 56 {
                for (k, v) in [small(4), small(200), small(200), 0, small(6), small(70), small(70)].enumerated() {
                    host(r).storeBytes(of: v.littleEndian, toByteOffset: 24 + 4 * k, as: UInt32.self)
                }
            }
            let room = f.u8() < 200 ? 0 : f.below(40)
            let w = buffer(max(room, 1))
            memset(host(w), 0xee, max(room, 1))
            submit(1, f.pieces(r, max(req, 1), writable: false) + f.pieces(w, room, writable: true))
            if rings.live { dev.queueNotified(1); checkResponse(w, room) }
        case 8:       // hot-plug, events_clear
            _ = dev.setConnected(f.below(scanouts + 1), f.bool())
            var v = f.u32()
            withUnsafeBytes(of: &v) { dev.writeConfig(offset: 4, from: $0) }
        default:      // reset and re-activation
            deactivate()
            activate()
            fuzzCheck(dev.resourceCount == 0 && dev.memoryUsed == 0, "reset left resources")
        }
        checkUsed()
        for k in 0..<2 where rings.live { fuzzCheck(!queues[k].faultPending, "queue \(k) latched a fault on a well-formed ring") }
    }
    return 0
}
