// The simulated driver's side of a split ring for the device harnesses: a chain written into the descriptor table and
// made available (virtio 1.2 §2.7.5, §2.7.6), as a driver would.
import Glibc
import Transport

/// Links `segs` (guest address, length, device-writable) through descriptors `ids` of the table at `desc`, in that
/// order, and makes the head available in the avail ring at `avail` (`qsize` entries; `availIdx` advances).
func fuzzMakeAvailable(desc: UnsafeMutableRawPointer, avail: UnsafeMutableRawPointer, ids: [Int],
                       segs: [(UInt64, UInt32, Bool)], availIdx: inout UInt16, qsize: UInt16) {
    for (i, seg) in segs.enumerated() {
        let d = desc + 16 * ids[i]
        d.storeBytes(of: seg.0.littleEndian, as: UInt64.self)
        d.storeBytes(of: seg.1.littleEndian, toByteOffset: 8, as: UInt32.self)
        let flags: UInt16 = (i + 1 < segs.count ? 1 : 0) | (seg.2 ? 2 : 0)   // NEXT, WRITE
        d.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
        d.storeBytes(of: UInt16(i + 1 < segs.count ? ids[i + 1] : 0).littleEndian, toByteOffset: 14, as: UInt16.self)
    }
    avail.storeBytes(of: UInt16(ids[0]).littleEndian, toByteOffset: 4 + 2 * Int(availIdx % qsize), as: UInt16.self)
    availIdx &+= 1
    avail.storeBytes(of: availIdx.littleEndian, toByteOffset: 2, as: UInt16.self)
}

/// The simulated driver's side of `count` split rings of `size` entries for the device harnesses, in the first pages
/// of the driver's region (queue k: descriptor table at 8 KiB·k, avail ring at +256, used ring at +512), and the
/// `SplitQueue`s the device runs on. Descriptor ids come from a free list and go back to it only when their chain's
/// head is used, so a chain the device still holds is never overwritten, as with a well-formed driver (ids handed out
/// round robin did that: a false alarm in can-request); every used id must be an outstanding head.
final class FuzzRings {
    static let page = 4096
    let count: Int
    let size: UInt16
    let host: UnsafeMutableRawPointer
    let guestBase: UInt64
    let queues: UnsafeMutablePointer<SplitQueue>
    private(set) var live = false
    private var availIdx: [UInt16]
    private var usedSeen: [UInt16]
    private var free: [[Int]]
    private var chainOf: [[[Int]]]
    /// The bytes the rings take at the start of the region; buffers go after them.
    var ringBytes: Int { 2 * Self.page * count }

    init(count: Int, size: UInt16, memory: FuzzDriverMemory, guestBase: UInt64) {
        self.count = count
        self.size = size
        host = memory.host
        self.guestBase = guestBase
        queues = .allocate(capacity: count)
        availIdx = [UInt16](repeating: 0, count: count)
        usedSeen = availIdx
        free = []
        chainOf = []
    }
    deinit { queues.deallocate() }   // the owner deactivates first

    func at(_ g: UInt64) -> UnsafeMutableRawPointer { host + Int(g - guestBase) }
    private func base(_ k: Int) -> UInt64 { guestBase + UInt64(2 * k * Self.page) }

    /// Zeroed rings, fresh indices and ids, queues built and `dev` activated on them.
    func activate(_ dev: VirtioDevice, memory: GuestMemory, features: VirtioFeatures, loop: EventLoop) {
        for k in 0..<count {
            let b = base(k)
            memset(at(b), 0, 2 * Self.page)
            let c = QueueConfig(size: size, desc: b, avail: b + 256, used: b + 512)
            guard let q = try? SplitQueue(config: c, maxSize: size, memory: memory.view, features: features, interrupt: .none) else { abort() }
            (queues + k).initialize(to: q)
        }
        availIdx = [UInt16](repeating: 0, count: count)
        usedSeen = availIdx
        free = [[Int]](repeating: Array((0..<Int(size)).reversed()), count: count)
        chainOf = [[[Int]]](repeating: [[Int]](repeating: [], count: Int(size)), count: count)
        live = true
        let ctx = DeviceContext(queues: queues, queueCount: count, memory: memory.view, loop: loop, configInterrupt: .none,
                                features: features)
        do { try dev.activate(ctx) } catch { abort() }
    }

    /// Resets `dev` and drops the queues (no-op when not active).
    func deactivate(_ dev: VirtioDevice) {
        guard live else { return }
        dev.reset()
        queues.deinitialize(count: count)
        live = false
    }

    /// Writes a chain of `segs` (guest address, length, device-writable) to queue k and makes it available; its head,
    /// or -1 when not active or too few descriptors are free (the driver would wait).
    @discardableResult
    func submit(_ k: Int, _ segs: [(UInt64, UInt32, Bool)]) -> Int {
        guard live, !segs.isEmpty, free[k].count >= segs.count else { return -1 }
        var ids: [Int] = []
        for _ in segs { ids.append(free[k].removeLast()) }
        chainOf[k][ids[0]] = ids
        fuzzMakeAvailable(desc: at(base(k)), avail: at(base(k) + 256), ids: ids, segs: segs, availIdx: &availIdx[k], qsize: size)
        return ids[0]
    }

    /// Calls `body(head, length)` for each used element queue k published since the last call, in order, after
    /// checking the head is an outstanding one (its descriptors are free again afterwards).
    func forEachUsed(_ k: Int, _ body: (Int, UInt32) -> Void) {
        guard live else { return }
        let used = at(base(k) + 512)
        let idx = used.load(fromByteOffset: 2, as: UInt16.self).littleEndian
        while usedSeen[k] != idx {
            let e = used + 4 + 8 * Int(usedSeen[k] % size)
            let id = e.load(as: UInt32.self).littleEndian, len = e.load(fromByteOffset: 4, as: UInt32.self).littleEndian
            usedSeen[k] &+= 1
            fuzzCheck(id < UInt32(size), "queue \(k) used id \(id)")
            guard id < UInt32(size) else { continue }
            fuzzCheck(!chainOf[k][Int(id)].isEmpty, "queue \(k) used id \(id) is not an outstanding head")
            free[k] += chainOf[k][Int(id)]
            chainOf[k][Int(id)] = []
            body(Int(id), len)
        }
    }
}

/// Buffers for the harnesses' chains: bump allocation in `[base, end)` of the driver's region (16-byte aligned),
/// starting over at `base` when full; `wraps` counts the restarts (memory of chains the device may still hold is
/// then reused).
struct FuzzBuffers {
    let base: UInt64
    let end: UInt64
    private var next: UInt64 = 0
    private(set) var wraps = 0
    init(base: UInt64, end: UInt64) { self.base = base; self.end = end }
    mutating func take(_ len: Int) -> UInt64 {
        if next + UInt64(len) > end - base { next = 0; wraps += 1 }
        defer { next += UInt64((len + 15) & ~15) }
        return base + next
    }
}
