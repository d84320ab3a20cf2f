/// Chains a device holds to complete later, in arrival order: the receive side of devices that speak first
/// (console RX, input events, GPIO interrupts, CAN RX, vsock RX hold the driver's buffers until the host has
/// something), and transmit chains parked while a host endpoint cannot take more (back-pressure).
///
/// A `Chain`'s segments live in the queue's scratch space and are valid only until the next `pop`; `hold` copies
/// them into preallocated slots (no allocation after `init`). `progress` counts bytes already moved into (writable)
/// or out of (readable) the oldest chain, so a partial write to a slow endpoint resumes where it stopped.
/// One per queue, owned by the device, used on the loop thread only.
public struct HeldChains: ~Copyable {
    public struct Held {
        public var head: UInt16
        public var readableCount: Int
        public var count: Int
        public var readableBytes: UInt32
        public var writableBytes: UInt32
    }
    private let slots: UnsafeMutablePointer<Held>
    private let segments: UnsafeMutablePointer<Segment>
    public let capacity: Int
    public let maxSegments: Int
    private var first = 0
    public private(set) var count = 0
    /// Bytes of the oldest chain already consumed (readable part) or filled (writable part).
    public var progress: UInt32 = 0
    /// Chains refused because they had more than `maxSegments` segments (completed empty by `hold`'s caller).
    public private(set) var tooFragmented = 0

    /// `capacity`: the queue size (a driver cannot have more chains out); `maxSegments`: per chain.
    public init(capacity: Int, maxSegments: Int = 8) {
        self.capacity = max(capacity, 1)
        self.maxSegments = max(maxSegments, 1)
        slots = .allocate(capacity: self.capacity)
        segments = .allocate(capacity: self.capacity * self.maxSegments)
    }
    deinit {
        slots.deallocate()
        segments.deallocate()
    }

    public var isEmpty: Bool { count == 0 }
    public var isFull: Bool { count == capacity }

    /// Copies `c` to the back. False (nothing held) when full or `c` has more than `maxSegments` segments: the
    /// caller completes it at once (with 0 bytes) so the driver gets it back.
    public mutating func hold(_ c: borrowing Chain) -> Bool {
        guard count < capacity else { return false }
        guard c.count <= maxSegments else { tooFragmented &+= 1; return false }
        let k = (first + count) % capacity
        let seg = segments + k * maxSegments
        for i in 0..<c.count { seg[i] = c.segments[i] }
        slots[k] = Held(head: c.head, readableCount: c.readableCount, count: c.count,
                        readableBytes: c.readableBytes, writableBytes: c.writableBytes)
        count += 1
        return true
    }

    /// The oldest held chain and its segments, if any.
    public var oldest: (Held, UnsafeMutablePointer<Segment>)? {
        guard count > 0 else { return nil }
        return (slots[first], segments + first * maxSegments)
    }

    /// The `k`-th held chain (0 = oldest) and its segments.
    public func at(_ k: Int) -> (Held, UnsafeMutablePointer<Segment>)? {
        guard k >= 0, k < count else { return nil }
        let i = (first + k) % capacity
        return (slots[i], segments + i * maxSegments)
    }

    /// Removes the oldest chain and returns it (its segments are valid until the next `hold`).
    public mutating func removeOldest() -> Held? {
        guard count > 0 else { return nil }
        let h = slots[first]
        first = (first + 1) % capacity
        count -= 1
        progress = 0
        return h
    }

    /// Copies up to `length` bytes into the oldest chain's writable part at `progress`; returns bytes copied.
    public mutating func fillOldest(from src: UnsafeRawPointer, length: Int) -> Int {
        guard let (h, seg) = oldest else { return 0 }
        let n = forEachWritable(h, seg, from: Int(progress), limit: length) { p, n, done in
            p.copyMemory(from: src + done, byteCount: n)
            return n
        }
        progress &+= UInt32(n)
        return n
    }

    /// Room left in the oldest chain's writable part.
    public var oldestRoom: Int {
        guard let (h, _) = oldest else { return 0 }
        return Int(h.writableBytes) - Int(progress)
    }

    /// Calls `body(pointer, length, doneSoFar)` on the writable pieces of `h` starting `skip` bytes in, at most
    /// `limit` bytes; `body` returns how many it moved (fewer stops the walk). Returns the total moved.
    @inline(__always)
    public func forEachWritable(_ h: Held, _ seg: UnsafeMutablePointer<Segment>, from skip: Int, limit: Int,
                                _ body: (UnsafeMutableRawPointer, Int, Int) -> Int) -> Int {
        pieces(seg, h.readableCount, h.count, skip, limit, body)
    }

    /// The same over the readable part (transmit chains: bytes the driver sent).
    @inline(__always)
    public func forEachReadable(_ h: Held, _ seg: UnsafeMutablePointer<Segment>, from skip: Int, limit: Int,
                                _ body: (UnsafeMutableRawPointer, Int, Int) -> Int) -> Int {
        pieces(seg, 0, h.readableCount, skip, limit, body)
    }

    @inline(__always)
    private func pieces(_ seg: UnsafeMutablePointer<Segment>, _ from: Int, _ to: Int, _ skip0: Int, _ limit: Int,
                        _ body: (UnsafeMutableRawPointer, Int, Int) -> Int) -> Int {
        var skip = skip0, done = 0, i = from
        while i < to && done < limit {
            let l = Int(seg[i].length)
            if skip >= l { skip -= l; i += 1; continue }
            let n = min(l - skip, limit - done)
            let moved = body(seg[i].base + skip, n, done)
            done += moved
            if moved < n { break }
            skip = 0
            i += 1
        }
        return done
    }

    /// Forgets every held chain (device reset: the driver reset its rings, nothing is completed).
    public mutating func removeAll() {
        first = 0
        count = 0
        progress = 0
    }
}
