import Glibc
import Synchronization

/// Why a ring's in-flight set stopped being exact, naming the party whose ring entry was wrong: the back-end (it
/// writes the used ring), or the driver (it writes the avail ring). `fault` is the queue fault it maps to.
enum InflightLoss: Equatable, Sendable, CustomStringConvertible {
    /// The back-end wrote a used entry whose id is not a head of the ring.
    case usedIDOutOfRange(id: UInt32, size: UInt16)
    /// The back-end moved used.idx past everything it was handed.
    case usedBeyondHandedOver(extra: UInt16)
    /// The back-end returned a head more often than it was handed it.
    case usedHeadNotHeld(head: UInt16)
    /// The driver made a head available that is not one of the ring's.
    case availHeadOutOfRange(head: UInt16, size: UInt16)
    /// The driver's avail.idx moved by more than the ring holds.
    case availIndexJump(by: UInt16, size: UInt16)
    /// The driver has more requests out than the ring holds (the back-end completed none of a full ring).
    case ringOverfull(size: UInt16)
    /// Made unknown on purpose (tests).
    case forced

    var description: String {
        switch self {
        case .usedIDOutOfRange(let id, let size):
            return "back-end returned an invalid head: used id \(id), queue size \(size) (back-end bug)"
        case .usedBeyondHandedOver(let extra):
            return "back-end published \(extra) used entr\(extra == 1 ? "y" : "ies") more than it was handed (back-end bug)"
        case .usedHeadNotHeld(let head):
            return "back-end returned head \(head), which it did not hold (back-end bug)"
        case .availHeadOutOfRange(let head, let size):
            return "driver made head \(head) available, out of range for queue size \(size) (driver bug)"
        case .availIndexJump(let by, let size):
            return "driver's avail.idx moved by \(by), more than queue size \(size) (driver bug)"
        case .ringOverfull(let size):
            return "driver has more than \(size) requests out on a ring of \(size) (driver bug)"
        case .forced:
            return "in-flight set made unknown"
        }
    }

    /// The queue fault latched for it.
    var fault: QueueFault {
        switch self {
        case .usedIDOutOfRange, .usedBeyondHandedOver, .usedHeadNotHeld: return .backendUsedHeadInvalid
        case .availHeadOutOfRange: return .headOutOfRange
        case .availIndexJump, .ringOverfull, .forced: return .availIndexJump
        }
    }
}

/// One ring's shadow avail ring and the heads the back-end holds. In replay mode the back-end never reads the
/// driver's avail ring: it reads a ring loopbackd owns (`shadow`, in a memfd region of the memory table), and every
/// entry gets there by `pump`, which copies the driver's new avail entries across. So the front-end knows exactly,
/// by construction, which heads it handed over; the used ring (the driver's, written by the back-end) says which
/// came back. No lag can lose track: the back-end cannot run ahead of what was copied, and `pump` never publishes
/// more than `size` entries past the last used entry it read, so no used slot is overwritten unread.
///
/// Per head a wrapping counter: +1 for every shadow entry naming it, -1 for every used entry. Each pump reads the
/// used ring first, then copies, so a head completed, reaped and made available again is counted 0 → 1 → 0 → 1.
/// Shadow positions run in step with used positions (a back-end starts with its base at used.idx and reads used.idx
/// from the ring): `shadowIdx - used.idx` is the number in flight. They are independent of the driver's avail
/// positions (`driverSeen`). All storage is allocated at activation; a pump allocates nothing.
///
/// Tracking is `lost` only when a ring holds garbage (a head or used id out of range, a driver with more chains out
/// than the ring holds); it resynchronises when everything handed over has completed (used.idx == shadowIdx).
/// Copying goes on while lost: only a replay is refused. A driver that makes a head available again before it came
/// back (a spec violation, but not garbage) is counted, not lost: the back-end holds that head twice, and a replay
/// hands it over twice, as the old back-end had it.
final class InflightTracker {
    let size: UInt16
    let mask: UInt16
    /// The driver's avail ring (read only), our shadow avail ring (the back-end's), the driver's used ring (read,
    /// and its `avail_event` word written when `eventIdx`).
    private let avail: UnsafeMutableRawPointer
    let shadow: UnsafeMutableRawPointer
    private let used: UnsafeMutableRawPointer
    /// The driver negotiated VIRTIO_F_EVENT_IDX: it kicks when its avail.idx passes `avail_event`, which we own.
    private let eventIdx: Bool
    /// Per head: shadow entries minus used entries seen (wrapping).
    private let count: UnsafeMutablePointer<Int16>
    /// Per head: the shadow position (free-running) it was last published at; orders the replay.
    private let position: UnsafeMutablePointer<UInt16>
    /// Replay scratch: the in-flight heads.
    private let scratch: UnsafeMutablePointer<UInt16>
    /// Driver avail position copied up to; next shadow position (published as shadow avail.idx); used position read.
    private(set) var driverSeen: UInt16
    private(set) var shadowIdx: UInt16
    private(set) var usedSeen: UInt16
    /// Why the counters stopped being exact (nil while tracking): the queue fault, and the finding with the party
    /// at fault (`lossReason`).
    private(set) var lost: QueueFault?
    private(set) var lossReason: InflightLoss?
    /// The last `planReplay`: a head the back-end held more than once (the driver made it available again before it
    /// came back), and how often. Reported, then replayed as often.
    private(set) var repeatedHead: (head: UInt16, times: Int)?
    /// Times tracking was lost (diagnostics, tests).
    private(set) var losses = 0
    /// Set by a pump that moved entries; the front-end's scan tick clears it.
    var progressed = false
    /// Requests handed over and not completed (or unknown), or driver entries not copied yet: keep the tick going.
    var busy: Bool { lost != nil || shadowIdx != usedSeen || Self.index(avail) != driverSeen }

    /// `lastAvail`: where the driver side says the device starts in the driver's avail ring. The shadow starts at
    /// the used ring's index; `shadow` (6 + 2 * size bytes) is initialised here.
    init(size: UInt16, avail: UnsafeMutableRawPointer, shadow: UnsafeMutableRawPointer, used: UnsafeMutableRawPointer,
         lastAvail: UInt16, eventIdx: Bool) {
        self.size = size
        mask = size &- 1
        self.avail = avail
        self.shadow = shadow
        self.used = used
        self.eventIdx = eventIdx
        let n = Int(size)
        count = .allocate(capacity: n)
        count.initialize(repeating: 0, count: n)
        position = .allocate(capacity: n)
        position.initialize(repeating: 0, count: n)
        scratch = .allocate(capacity: n)
        scratch.initialize(repeating: 0, count: n)
        let u = Self.index(used)
        driverSeen = lastAvail
        shadowIdx = u
        usedSeen = u
        memset(shadow, 0, 6 + 2 * n)
        Self.publish(shadow, u)
    }

    deinit {
        count.deallocate()
        position.deallocate()
        scratch.deallocate()
    }

    @inline(__always) private static func index(_ ring: UnsafeMutableRawPointer) -> UInt16 {
        (ring + 2).assumingMemoryBound(to: Atomic<UInt16>.self).pointee.load(ordering: .acquiring)
    }

    /// Release: the shadow entries written before are visible to the back-end once it reads the index.
    @inline(__always) private static func publish(_ ring: UnsafeMutableRawPointer, _ v: UInt16) {
        (ring + 2).assumingMemoryBound(to: Atomic<UInt16>.self).pointee.store(v.littleEndian, ordering: .releasing)
    }

    var isTracking: Bool { lost == nil }

    /// Records the first cause only: later findings follow from it (an avail.idx jump also overfills the ring).
    func lose(_ why: InflightLoss) {
        guard lost == nil else { return }
        losses += 1
        lost = why.fault
        lossReason = why
    }

    /// Reads the used entries the back-end added since the last read. While lost, resynchronises once everything
    /// handed over has completed.
    private func scanUsed() {
        // Acquire: the entries the back-end wrote before publishing used.idx are visible.
        let u = Self.index(used)
        var p = usedSeen
        // A back-end publishing more than we handed over is broken (or not reading our ring).
        if u &- p > shadowIdx &- p { lose(.usedBeyondHandedOver(extra: (u &- p) &- (shadowIdx &- p))) }
        if lost == nil {
            while p != u {
                let id = (used + 4 + 8 * Int(p & mask)).load(as: UInt32.self).littleEndian
                guard id < UInt32(size) else { lose(.usedIDOutOfRange(id: id, size: size)); break }
                count[Int(id)] &-= 1
                p &+= 1
            }
        }
        if u != usedSeen { progressed = true }
        usedSeen = u
        if lost != nil && u == shadowIdx {
            // Nothing handed over is outstanding at this instant: the counters restart from zero.
            count.update(repeating: 0, count: Int(size))
            lost = nil
            lossReason = nil
        }
    }

    /// Driver kick, relayed interrupt or scan tick: reads the used ring, copies the driver's new avail entries into
    /// the shadow ring and publishes them, then (EVENT_IDX) sets `avail_event` to the driver's position copied up to,
    /// so the driver kicks for its next entry; a full fence and a re-read of the driver's avail.idx close the race
    /// with a driver that read the old `avail_event` (no lost kick). Returns whether new entries were published
    /// (the back-end needs a kick).
    @discardableResult
    func pump() -> Bool {
        var published = false
        var stalled = false
        while true {
            scanUsed()
            // Acquire: the entries the driver wrote before publishing avail.idx are visible.
            let a = Self.index(avail)
            let n = a &- driverSeen
            if n != 0 {
                if n > size { lose(.availIndexJump(by: n, size: size)) }   // a driver more than a ring ahead of itself: garbage
                // Never more than `size` published past the used entries read: no used slot is overwritten unread.
                let room = size &- (shadowIdx &- usedSeen)
                let m = min(n, room)
                if m == 0 {
                    // The back-end must complete something first; the driver cannot have more chains out than the
                    // ring holds, so a second look without room means it does.
                    if stalled { lose(.ringOverfull(size: size)); break }
                    stalled = true
                    continue
                }
                stalled = false
                var i: UInt16 = 0
                while i < m {
                    let head = (avail + 4 + 2 * Int((driverSeen &+ i) & mask)).load(as: UInt16.self)
                    let sp = shadowIdx &+ i
                    (shadow + 4 + 2 * Int(sp & mask)).storeBytes(of: head, as: UInt16.self)
                    let h = UInt16(littleEndian: head)
                    if h < size {
                        count[Int(h)] &+= 1
                        position[Int(h)] = sp
                    } else {
                        lose(.availHeadOutOfRange(head: h, size: size))   // passed on as is: the back-end rejects it as it would have
                    }
                    i &+= 1
                }
                driverSeen &+= m
                shadowIdx &+= m
                Self.publish(shadow, shadowIdx)
                published = true
                progressed = true
                continue
            }
            guard eventIdx else { break }
            (used + 4 + 8 * Int(size)).assumingMemoryBound(to: Atomic<UInt16>.self).pointee
                .store(driverSeen.littleEndian, ordering: .relaxed)
            atomicMemoryFence(ordering: .sequentiallyConsistent)
            if Self.index(avail) == driverSeen { break }
        }
        return published
    }

    /// Checks that the counters describe exactly `shadowIdx - used.idx` entries in flight (call after a final
    /// `pump()`, with the back-end stopped so the used ring no longer moves). Returns the number `k` of entries to
    /// replay (a head the driver made available again before it came back counts as often as the back-end held it:
    /// `repeatedHead`), or nil (then `lost` and `lossReason` say why).
    func planReplay() -> Int? {
        repeatedHead = nil
        guard lost == nil else { return nil }
        let outstanding = Int(shadowIdx &- usedSeen)
        // More used entries for a head than shadow entries: the back-end returned what it did not hold.
        for h in 0..<Int(size) where count[h] < 0 { lose(.usedHeadNotHeld(head: UInt16(h))); return nil }
        var k = 0
        for h in 0..<Int(size) {
            let c = Int(count[h])
            if c == 0 { continue }
            // Cannot happen without a negative count (the sum is `outstanding`); never write past the scratch.
            guard k + c <= outstanding else { lose(.usedBeyondHandedOver(extra: 0)); return nil }
            if c > 1 && (repeatedHead == nil || c > repeatedHead!.times) { repeatedHead = (UInt16(h), c) }
            for _ in 0..<c {
                scratch[k] = UInt16(h)
                k += 1
            }
        }
        // Every shadow entry counts +1 and every in-range used entry -1: the sum is `outstanding` by construction.
        guard k == outstanding else { lose(.usedBeyondHandedOver(extra: UInt16(truncatingIfNeeded: k - outstanding))); return nil }
        return k
    }

    /// Rewrites the shadow slots of positions `[used.idx, used.idx + k)` with the `k` in-flight entries of
    /// `planReplay`, oldest first (a repeated head's entries together, at its newest position), and returns the base
    /// the new back-end starts from (used.idx). `shadowIdx` is `used.idx + k` already (`planReplay` checked), so the published shadow avail.idx stays. The shadow is ours:
    /// no driver reads it, and no back-end runs on it while this runs.
    func replay(k: Int) -> UInt16 {
        let base = usedSeen
        if k > 0 {
            var heads = UnsafeMutableBufferPointer(start: scratch, count: k)
            let pos = position, top = shadowIdx
            // Oldest first: distance back from shadowIdx, largest first (reconnect only; may allocate).
            heads.sort { top &- pos[Int($0)] > top &- pos[Int($1)] }
            for i in 0..<k {
                let p = base &+ UInt16(i)
                (shadow + 4 + 2 * Int(p & mask)).storeBytes(of: heads[i].littleEndian, as: UInt16.self)
                position[Int(heads[i])] = p
            }
        }
        Self.publish(shadow, shadowIdx)
        return base
    }
}

