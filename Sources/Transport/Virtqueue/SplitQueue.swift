import Synchronization
import CLinux

/// Where the driver put a queue's three rings, and how big it is (the "queue ready" event).
public struct QueueConfig: Sendable, Equatable {
    public var size: UInt16
    public var desc: UInt64
    public var avail: UInt64
    public var used: UInt64
    public init(size: UInt16, desc: UInt64, avail: UInt64, used: UInt64) {
        self.size = size; self.desc = desc; self.avail = avail; self.used = used
    }
    /// Byte sizes of the rings (virtio 1.2 §2.7): the avail/used rings carry the event-idx word at their end.
    public static func descBytes(_ n: Int) -> Int { 16 * n }
    public static func availBytes(_ n: Int) -> Int { 6 + 2 * n }
    public static func usedBytes(_ n: Int) -> Int { 6 + 8 * n }
}

/// Why a queue was latched broken. Each is a driver bug or an attack; none may crash, spin or overrun.
public enum QueueFault: String, Error, Sendable {
    case ringOutsideMemory = "ring not inside mapped memory"
    case ringMisaligned = "ring misaligned"
    case badSize = "queue size not a power of two in 1...max"
    case availIndexJump = "avail.idx moved more than the queue size"
    case headOutOfRange = "head index out of range"
    case nextOutOfRange = "next index out of range"
    case chainTooLong = "descriptor chain loop or longer than allowed"
    case nestedIndirect = "indirect descriptor inside an indirect table"
    case indirectWithNext = "indirect descriptor with NEXT flag"
    case indirectNotNegotiated = "indirect descriptor without VIRTIO_F_INDIRECT_DESC"
    case badIndirectLength = "indirect table length zero or not a multiple of 16"
    case bufferOutsideMemory = "buffer not inside mapped memory"
    case readableAfterWritable = "readable descriptor after a writable one"
    case chainTooLarge = "chain total length exceeds 2^32-1"
    case tooManySegments = "chain has too many buffer segments"
    case usedHeadInvalid = "device returned an invalid head (device bug)"
    case backendRestarted = "vhost-user back-end restarted while requests were in flight that cannot be replayed exactly"
    case backendUsedHeadInvalid = "vhost-user back-end returned an invalid head or length (back-end bug)"
    case kickBroken = "kick fd reported hang-up or error"
    case ringsOverlap = "descriptor table, avail ring and used ring overlap"
}

/// One host-mapped piece of a descriptor chain's buffers.
public struct Segment {
    public var base: UnsafeMutableRawPointer
    public var length: UInt32
    public var writable: Bool
}

/// A validated descriptor chain: readable segments first, then writable ones. The segment storage belongs to
/// the queue and is valid until the next `pop` on that queue; a device that completes later copies what it needs.
public struct Chain {
    public let head: UInt16
    public let segments: UnsafeMutablePointer<Segment>
    public let readableCount: Int
    public let count: Int
    public let readableBytes: UInt32
    public let writableBytes: UInt32

    public var writableCount: Int { count - readableCount }

    /// Copies up to `length` readable bytes starting at byte `offset` of the readable part; returns bytes copied.
    public func read(into dst: UnsafeMutableRawPointer, length: Int, at offset: Int = 0) -> Int {
        copy(first: 0, end: readableCount, offset: offset, length: length) { seg, o, n, done in
            dst.advanced(by: done).copyMemory(from: seg.base + o, byteCount: n)
        }
    }
    /// Copies up to `length` bytes into the writable part starting at byte `offset`; returns bytes copied.
    public func write(from src: UnsafeRawPointer, length: Int, at offset: Int = 0) -> Int {
        copy(first: readableCount, end: count, offset: offset, length: length) { seg, o, n, done in
            (seg.base + o).copyMemory(from: src.advanced(by: done), byteCount: n)
        }
    }
    @inline(__always)
    private func copy(first: Int, end: Int, offset: Int, length: Int,
                      _ op: (Segment, Int, Int, Int) -> Void) -> Int {
        var skip = offset
        var done = 0
        var i = first
        while i < end && done < length {
            let s = segments[i]
            let l = Int(s.length)
            if skip >= l { skip -= l; i += 1; continue }
            let n = min(l - skip, length - done)
            op(s, skip, n, done)
            done += n
            skip = 0
            i += 1
        }
        return done
    }
}

@inline(__always) private func atomic16(_ p: UnsafeMutableRawPointer) -> UnsafeMutablePointer<Atomic<UInt16>> {
    p.assumingMemoryBound(to: Atomic<UInt16>.self)
}

/// The device side of a split virtqueue (virtio 1.2 §2.7), driven by one thread (the host's event loop).
///
/// Validate once, then run fast (firecracker `queue.rs`): `init` checks the ring geometry and keeps raw pointers
/// into mapped memory; afterwards the rings are read with plain loads plus one acquire load of `avail.idx`, and
/// used entries are published in batches with one release store of `used.idx`. Every value the driver controls is
/// checked (rust-vmm virtio-queue, crosvm `descriptor_chain.rs`, libvhost-user); a violation latches the queue
/// broken: it then does nothing until reset, so a hostile driver can neither spin nor crash the daemon.
public struct SplitQueue: ~Copyable {
    public let size: UInt16
    let mask: UInt16
    let desc: UnsafeMutableRawPointer
    let avail: UnsafeMutableRawPointer
    let used: UnsafeMutableRawPointer
    let memory: MemoryView
    public let eventIdx: Bool
    let indirect: Bool
    public let interrupt: Notifier

    /// Next avail slot to consume and next used slot to fill (free-running 16-bit counters, wrap intended).
    public private(set) var lastAvail: UInt16
    public private(set) var nextUsed: UInt16
    /// `used.idx` the driver has seen (last release store).
    var publishedUsed: UInt16
    public private(set) var fault: QueueFault?
    /// While the host busy-polls, `drain` leaves driver kicks disabled (they would only cost the driver syscalls).
    public var polling = false
    /// Set when a fault was just latched; the host reads and clears it to raise NEEDS_RESET once.
    public var faultPending = false
    /// Set by `drain` when it stopped at its budget with chains left (kicks still disabled): the host must run the
    /// queue again on a later loop turn. `scheduled`: the host has it on its deferred list.
    public var yielded = false
    public var scheduled = false
    /// Stopped on its own (`DeviceHost.stopQueue`) while the device runs: takes nothing until rebuilt.
    public internal(set) var stopped = false
    /// Uniform counters (loop thread only): chains taken, chains completed, bytes written into completed chains.
    /// In flight = taken - completed.
    public private(set) var taken: UInt64 = 0
    public private(set) var completed: UInt64 = 0
    public private(set) var bytesWritten: UInt64 = 0

    /// Work one `drain` does before it yields the loop to every other fd and device: a driver or peer that keeps
    /// its avail ring topped up must not hold the one thread that serves all devices (vhost-net CVE-2019-3900).
    /// 256 chains or 1 MiB written, whichever comes first (a few hundred µs here).
    public static let chainBudget = 256
    public static let byteBudget: UInt64 = 1 << 20

    let segments: UnsafeMutablePointer<Segment>
    let segmentCapacity: Int
    /// A chain may hold at most this many descriptors (direct + indirect): Linux uses indirect tables as long as
    /// the device's seg_max, which can exceed the ring size.
    let maxChainDescriptors: Int

    public static let maxSize: UInt16 = 32768

    /// An in-flight record in memory that outlives this process (VDUSE reconnect; `attachInflightLog`), or nil.
    /// Layout: u16 next avail index, u16 used index whose heads are cleared, u32 queue size, then one byte per head
    /// (1: taken from the ring, its completion not yet published).
    var inflight: UnsafeMutableRawPointer?
    /// Heads recovered from the record that were in flight when the previous process died: taken again first.
    var replay: UnsafeMutablePointer<UInt16>?
    public private(set) var replayCount = 0
    var lastPopWasReplay = false
    public static func inflightLogBytes(size: UInt16) -> Int { 8 + Int(size) }

    /// Validates ring geometry. `lastAvail` / `used` start from the given values (vhost-user SET_VRING_BASE; after a
    /// reconnect the used index is re-read from the ring so completions are never lost or repeated).
    public init(config c: QueueConfig, maxSize: UInt16, memory: MemoryView, features: VirtioFeatures,
                interrupt: Notifier, lastAvail: UInt16 = 0, usedFromRing: Bool = false) throws(QueueFault) {
        let n = Int(c.size)
        guard c.size > 0, c.size <= maxSize, c.size <= SplitQueue.maxSize, c.size & (c.size - 1) == 0 else { throw .badSize }
        // Alignment from virtio 1.2 §2.7 table "Virtqueue Part Alignment": desc 16, avail 2, used 4.
        guard c.desc % 16 == 0, c.avail % 2 == 0, c.used % 4 == 0 else { throw .ringMisaligned }
        // The three rings must be disjoint: a used ring whose flags word is the avail ring's idx lets the device's
        // own notification-suppression stores move avail.idx, and the no-lost-kick re-check never settles (found by
        // the split-ring fuzz target). Ranges are small and inside 64 bits (checked by translate below).
        func overlap(_ a: UInt64, _ an: Int, _ b: UInt64, _ bn: Int) -> Bool {
            let (ae, o1) = a.addingReportingOverflow(UInt64(an)), (be, o2) = b.addingReportingOverflow(UInt64(bn))
            return o1 || o2 || (a < be && b < ae)
        }
        let (db, ab, ub) = (QueueConfig.descBytes(n), QueueConfig.availBytes(n), QueueConfig.usedBytes(n))
        guard !overlap(c.desc, db, c.avail, ab), !overlap(c.desc, db, c.used, ub), !overlap(c.avail, ab, c.used, ub) else {
            throw .ringsOverlap
        }
        guard let d = memory.translate(c.desc, UInt64(QueueConfig.descBytes(n))),
              let a = memory.translate(c.avail, UInt64(QueueConfig.availBytes(n))),
              let u = memory.translate(c.used, UInt64(QueueConfig.usedBytes(n))) else { throw .ringOutsideMemory }
        // The host addresses too: a vhost-user region's mmap offset moves them against the guest addresses, and
        // avail.idx / used.idx are accessed atomically (a misaligned atomic splits a lock on x86, traps on arm64).
        guard UInt(bitPattern: d) % 16 == 0, UInt(bitPattern: a) % 2 == 0, UInt(bitPattern: u) % 4 == 0 else {
            throw .ringMisaligned
        }
        size = c.size
        mask = c.size - 1
        desc = d; avail = a; used = u
        self.memory = memory
        eventIdx = features.contains(.eventIdx)
        indirect = features.contains(.indirectDesc)
        self.interrupt = interrupt
        self.lastAvail = lastAvail
        let ringUsed = atomic16(u + 2).pointee.load(ordering: .acquiring)
        nextUsed = usedFromRing ? ringUsed : 0
        publishedUsed = nextUsed
        maxChainDescriptors = max(n, 1024)
        segmentCapacity = maxChainDescriptors + 64
        segments = .allocate(capacity: segmentCapacity)
        if !usedFromRing {
            // A fresh queue: the driver zeroed the used ring; make flags/idx explicit anyway.
            u.storeBytes(of: 0, as: UInt16.self)
            atomic16(u + 2).pointee.store(0, ordering: .releasing)
        }
    }

    deinit { segments.deallocate(); replay?.deallocate() }

    public var isBroken: Bool { fault != nil }

    mutating func latch(_ f: QueueFault) {
        if fault == nil { fault = f; faultPending = true }
    }

    /// Number of chains the driver has made available and we have not consumed (no fault checks).
    public var availIdx: UInt16 { atomic16(avail + 2).pointee.load(ordering: .acquiring) }
    public var hasAvailable: Bool { fault == nil && !stopped && (replayCount > 0 || availIdx != lastAvail) }

    // MARK: - Consuming chains

    /// Takes the next available chain, fully validated, or nil when the ring is empty or the queue broke.
    public mutating func pop() -> Chain? {
        guard fault == nil, !stopped else { return nil }
        if replayCount > 0 {
            let head = replay![replayCount - 1]
            replayCount -= 1
            lastPopWasReplay = true
            if let c = walk(head: head) { taken &+= 1; return c }
            return nil
        }
        lastPopWasReplay = false
        // Acquire: the ring entries and descriptors the driver wrote before bumping avail.idx are visible.
        let idx = atomic16(avail + 2).pointee.load(ordering: .acquiring)
        if idx == lastAvail { return nil }
        // More than `size` outstanding is impossible for a correct driver (vm-virtio PR #196).
        if idx &- lastAvail > size { latch(.availIndexJump); return nil }
        let head = (avail + 4 + 2 * Int(lastAvail & mask)).load(as: UInt16.self).littleEndian
        guard head < size else { latch(.headOutOfRange); return nil }
        if let c = walk(head: head) {
            lastAvail &+= 1
            taken &+= 1
            if let log = inflight {
                // Flag first, then the index: a process killed between the two is recognised by `recoverInflight`.
                log.storeBytes(of: 1, toByteOffset: 8 + Int(head), as: UInt8.self)
                log.storeBytes(of: lastAvail, as: UInt16.self)
            }
            return c
        }
        return nil
    }

    /// Walks and validates a chain, translating every buffer into host segments.
    private mutating func walk(head: UInt16) -> Chain? {
        var table = desc
        var tableSize = Int(size)
        var index = Int(head)
        var inIndirect = false
        var descriptors = 0
        var limit = Int(size)  // descriptors allowed in the current table (loop guard)
        var nseg = 0
        var readable = 0
        var readBytes: UInt64 = 0
        var writeBytes: UInt64 = 0
        var seenWritable = false
        while true {
            descriptors += 1
            // Loop guard: a chain never holds more descriptors than allowed (a cycle hits this bound).
            if descriptors > limit { latch(.chainTooLong); return nil }
            let d = table + 16 * index
            let addr = d.loadUnaligned(as: UInt64.self).littleEndian
            let len = d.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian
            let flags = d.loadUnaligned(fromByteOffset: 12, as: UInt16.self).littleEndian
            let next = d.loadUnaligned(fromByteOffset: 14, as: UInt16.self).littleEndian
            if flags & 4 != 0 {  // VIRTQ_DESC_F_INDIRECT
                guard indirect else { latch(.indirectNotNegotiated); return nil }
                guard !inIndirect else { latch(.nestedIndirect); return nil }
                guard flags & 1 == 0 else { latch(.indirectWithNext); return nil }
                guard len != 0, len % 16 == 0, Int(len / 16) <= maxChainDescriptors else { latch(.badIndirectLength); return nil }
                // The table must be contiguous in one region; it may be unaligned (loads above are unaligned).
                guard let t = memory.translate(addr, UInt64(len)) else { latch(.bufferOutsideMemory); return nil }
                table = t
                tableSize = Int(len / 16)
                index = 0
                inIndirect = true
                descriptors = 0
                limit = tableSize
                continue
            }
            let writable = flags & 2 != 0
            if writable { seenWritable = true } else if seenWritable { latch(.readableAfterWritable); return nil }
            if len > 0 {  // zero-length descriptors carry nothing; skip them (crosvm does the same)
                if writable { writeBytes += UInt64(len) } else { readBytes += UInt64(len) }
                if readBytes + writeBytes > UInt64(UInt32.max) { latch(.chainTooLarge); return nil }
                var overflow = false
                let segs = segments
                let cap = segmentCapacity
                let ok = memory.forEachPiece(addr, UInt64(len)) { p, n in
                    if nseg == cap { overflow = true; return false }
                    segs[nseg] = Segment(base: p, length: n, writable: writable)
                    nseg += 1
                    return true
                }
                if overflow { latch(.tooManySegments); return nil }
                if !ok { latch(.bufferOutsideMemory); return nil }
                if !writable { readable = nseg }
            }
            guard flags & 1 != 0 else { break }  // VIRTQ_DESC_F_NEXT
            guard Int(next) < tableSize else { latch(.nextOutOfRange); return nil }
            index = Int(next)
        }
        return Chain(head: head, segments: segments, readableCount: readable, count: nseg,
                     readableBytes: UInt32(readBytes), writableBytes: UInt32(writeBytes))
    }

    /// Gives back the last popped chain (a device that cannot take it now, e.g. no free request slot).
    public mutating func undoPop() {
        taken &-= 1
        if lastPopWasReplay { replayCount += 1; return }   // the head is still in the replay buffer
        lastAvail &-= 1
        if let log = inflight {
            let head = (avail + 4 + 2 * Int(lastAvail & mask)).load(as: UInt16.self).littleEndian
            log.storeBytes(of: lastAvail, as: UInt16.self)
            if head < size { log.storeBytes(of: 0, toByteOffset: 8 + Int(head), as: UInt8.self) }
        }
    }

    // MARK: - Returning chains

    /// Writes one used element; it becomes visible to the driver at the next `publish()`.
    @inline(__always)
    public mutating func addUsed(head: UInt16, written: UInt32) {
        guard fault == nil else { return }
        guard head < size else { latch(.usedHeadInvalid); return }
        let e = used + 4 + 8 * Int(nextUsed & mask)
        e.storeBytes(of: UInt32(head).littleEndian, as: UInt32.self)
        e.storeBytes(of: written.littleEndian, toByteOffset: 4, as: UInt32.self)
        nextUsed &+= 1
        completed &+= 1
        bytesWritten &+= UInt64(written)
    }

    /// Publishes all used elements with one release store of `used.idx` and raises the interrupt if the driver
    /// asked for one (EVENT_IDX: `vring_need_event`, virtio 1.2 §2.7.10; otherwise the NO_INTERRUPT flag).
    /// Returns true if it signalled.
    @discardableResult
    public mutating func publish() -> Bool {
        let old = publishedUsed
        let new = nextUsed
        guard old != new, fault == nil else { return false }
        // Release: the used elements (and the data written into buffers) are visible before the index.
        atomic16(used + 2).pointee.store(new, ordering: .releasing)
        publishedUsed = new
        if let log = inflight {
            // The driver has these heads back: clear them, then say so (a process killed in between leaves used.idx
            // ahead of the record's used index, and `recoverInflight` clears the rest).
            var i = old
            while i != new {
                let id = (used + 4 + 8 * Int(i & mask)).load(as: UInt32.self).littleEndian
                if id < UInt32(size) { log.storeBytes(of: 0, toByteOffset: 8 + Int(id), as: UInt8.self) }
                i &+= 1
            }
            log.storeBytes(of: new, toByteOffset: 2, as: UInt16.self)
        }
        // Full fence: our used.idx store must be ordered before the load of used_event / avail.flags, or we could
        // miss a driver that just re-enabled interrupts (the store-load case release/acquire does not cover).
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        let notify: Bool
        if eventIdx {
            let usedEvent = (avail + 4 + 2 * Int(size)).load(as: UInt16.self).littleEndian
            // vring_need_event(event, new, old): the driver wants an interrupt when used.idx passes event.
            notify = new &- usedEvent &- 1 < new &- old
        } else {
            notify = (avail.load(as: UInt16.self).littleEndian & 1) == 0  // VRING_AVAIL_F_NO_INTERRUPT
        }
        if notify { interrupt.signal() }
        return notify
    }

    // MARK: - Driver-to-device notification suppression

    /// Asks the driver not to kick while we are processing anyway.
    public mutating func disableNotifications() {
        // With EVENT_IDX the driver kicks only when avail.idx crosses avail_event, which we leave behind; without
        // it we set VRING_USED_F_NO_NOTIFY.
        if !eventIdx { used.storeBytes(of: UInt16(1).littleEndian, as: UInt16.self) }
    }

    /// Re-enables kicks and returns true if more chains arrived meanwhile: the caller must then drain again
    /// (disable → drain → enable → re-check), or a kick the driver suppressed would be lost.
    public mutating func enableNotifications() -> Bool {
        guard fault == nil else { return false }
        if eventIdx {
            (used + 4 + 8 * Int(size)).storeBytes(of: lastAvail.littleEndian, as: UInt16.self)
        } else {
            used.storeBytes(of: UInt16(0).littleEndian, as: UInt16.self)
        }
        // Full fence: the avail_event/flags store must be visible before we re-read avail.idx (store-load).
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return atomic16(avail + 2).pointee.load(ordering: .acquiring) != lastAvail
    }

    /// For a device's own pop loop that stopped at its per-turn budget: true when chains are left (kicks stay
    /// disabled; the device asks for another turn with `FaultReporter.again`). Otherwise kicks are re-enabled and
    /// re-checked like at the end of a drain, and true only if more arrived meanwhile. Stopping at the budget just as
    /// the ring ran empty and returning without this left kicks disabled for good (with EVENT_IDX a stale
    /// avail_event: the driver never kicks again): Linux's vsock transmit queue stalled that way after 64 busy
    /// connections.
    public mutating func budgetSpent() -> Bool {
        if hasAvailable { return true }
        if polling || fault != nil || stopped { return false }
        return enableNotifications()
    }

    /// Runs `handle` on the available chains with the no-lost-kick loop, then publishes once.
    /// `handle` returns the number of bytes written into the chain, or nil if it took the chain asynchronously
    /// (it will `addUsed` later). Stops at the per-turn budget with `yielded` set and kicks left disabled: the
    /// host then runs the queue again after the loop has served everything else that is ready.
    @inline(__always)
    public mutating func drain(_ handle: (borrowing Chain) -> UInt32?) {
        var chains = 0
        var bytes: UInt64 = 0
        var rechecks = 0
        while true {
            disableNotifications()
            while let c = pop() {
                if let w = handle(c) {
                    addUsed(head: c.head, written: w)
                    bytes &+= UInt64(w)
                }
                chains &+= 1
                if chains >= SplitQueue.chainBudget || bytes >= SplitQueue.byteBudget {
                    if fault == nil && (replayCount > 0 || availIdx != lastAvail) { yielded = true }
                    publish()
                    if yielded { return }
                    chains = 0
                    bytes = 0
                }
            }
            if polling || !enableNotifications() { break }
            // The re-check found more: go round again, but not forever (a driver racing us, or rings that alias
            // each other, could keep it true): after 64 rounds yield to the loop like the budget does.
            rechecks &+= 1
            if rechecks >= 64 { yielded = true; break }
        }
        publish()
    }

    // MARK: - In-flight record (a restarted device process resumes exactly; VDUSE reconnect)

    /// Records this queue's in-flight heads at `log` (`inflightLogBytes(size:)` bytes of memory that outlives the
    /// process, e.g. a file in /run mapped shared). `resume` false: a fresh queue, the record is reset. `resume`
    /// true: the queue was built on rings a killed process was serving (`usedFromRing`): the next avail index and
    /// the heads that were taken but never completed come from the record (`recoverInflight`), and those heads are
    /// taken again before the ring. Returns false (record reset, queue unchanged) when the record does not fit the
    /// ring (another size, or indexes further apart than the ring).
    @discardableResult
    public mutating func attachInflightLog(_ log: UnsafeMutableRawPointer, resume: Bool) -> Bool {
        inflight = log
        if replay == nil { replay = .allocate(capacity: Int(size)) }
        if resume, let r = SplitQueue.recoverInflight(log: log, size: size, avail: avail, used: used,
                                                      availIdx: availIdx, usedIdx: nextUsed) {
            lastAvail = r.lastAvail
            replayCount = 0
            for h in r.heads { replay![replayCount] = h; replayCount += 1 }
            return true
        }
        log.storeBytes(of: lastAvail, as: UInt16.self)
        log.storeBytes(of: nextUsed, toByteOffset: 2, as: UInt16.self)
        log.storeBytes(of: UInt32(size), toByteOffset: 4, as: UInt32.self)
        (log + 8).initializeMemory(as: UInt8.self, repeating: 0, count: Int(size))
        return !resume
    }

    /// What a killed process left: (1) used entries it published but had not cleared in the record (used.idx ahead
    /// of the record's used index) are cleared; (2) a head flagged but whose avail index was not yet stored is the
    /// one at the record's next avail slot (a correct driver never makes a head available again while the device
    /// holds it), so that slot counts as taken; (3) the heads still flagged were taken and never completed. Pure
    /// apart from the clearing in (1) (unit-tested). Nil if the record is not for this ring.
    static func recoverInflight(log: UnsafeMutableRawPointer, size: UInt16, avail: UnsafeMutableRawPointer,
                                used: UnsafeMutableRawPointer, availIdx: UInt16, usedIdx: UInt16)
        -> (lastAvail: UInt16, heads: [UInt16])? {
        let mask = size &- 1
        guard log.load(fromByteOffset: 4, as: UInt32.self) == UInt32(size) else { return nil }
        var lastAvail = log.load(as: UInt16.self)
        var cleared = log.load(fromByteOffset: 2, as: UInt16.self)
        guard usedIdx &- cleared <= size, availIdx &- lastAvail <= size, lastAvail &- usedIdx <= size else { return nil }
        while cleared != usedIdx {
            let id = (used + 4 + 8 * Int(cleared & mask)).load(as: UInt32.self).littleEndian
            if id < UInt32(size) { log.storeBytes(of: 0, toByteOffset: 8 + Int(id), as: UInt8.self) }
            cleared &+= 1
        }
        log.storeBytes(of: cleared, toByteOffset: 2, as: UInt16.self)
        if availIdx != lastAvail {
            let h = (avail + 4 + 2 * Int(lastAvail & mask)).load(as: UInt16.self).littleEndian
            if h < size && log.load(fromByteOffset: 8 + Int(h), as: UInt8.self) == 1 {
                lastAvail &+= 1
                log.storeBytes(of: lastAvail, as: UInt16.self)
            }
        }
        var heads: [UInt16] = []
        for h in 0..<size where log.load(fromByteOffset: 8 + Int(h), as: UInt8.self) == 1 { heads.append(h) }
        return (lastAvail, heads)
    }
}
