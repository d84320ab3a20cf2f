import Glibc
import Transport

/// 64-byte reads from virtio-rng.
public final class RngWorkload: Workload {
    let driver: SimDriver
    let slot: QD1Slot
    private(set) var head: UInt16
    private let buffer: UInt64
    public let bytesPerRequest = 64
    public let requestKind = "64-byte reads"
    /// Driver resets after the device latched NEEDS_RESET.
    private(set) var recoveries = 0
    public var q: SimQueue { slot.q }
    public init?(_ d: SimDriver) {
        let b = d.alloc(64)
        guard let q = d.queues.first, let h = q.addChain(readable: [], writable: [(b, 64)]) else { return nil }
        driver = d
        buffer = b
        slot = QD1Slot(q)
        head = h
    }
    public func runOne(spinNs: UInt64) -> Bool {
        guard let u = slot.run(head, timeoutMs: 1000, spinNs: spinNs) else {
            if let q = resetIfNeeded(driver, slot, recoveries: &recoveries),
               let h = q.addChain(readable: [], writable: [(buffer, 64)]) { head = h }
            return false
        }
        return u.len == 64
    }
}

extension RngWorkload {
    /// `depth` reads of `size` bytes (default 64), each with its own buffer. The device fills at most 64 KiB of a
    /// request (the spec allows fewer bytes than asked): the bytes counted are the used lengths.
    public func depthRequests(depth: Int, size: Int?) throws(DeviceError) -> DepthRequests? {
        try RngDepth(driver, q: q, depth: depth, size: size ?? bytesPerRequest)
    }
}

final class RngDepth: DepthRequests {
    let heads: [UInt16]
    let size: Int
    init(_ d: SimDriver, q: SimQueue, depth: Int, size: Int) throws(DeviceError) {
        guard size > 0, size <= Int(UInt32.max) else { throw DeviceError("rng request size \(size) out of range") }
        var hs: [UInt16] = []
        for _ in 0..<depth {
            let b = d.alloc(size)
            guard let h = q.addChain(readable: [], writable: [(b, UInt32(size))]) else {
                throw DeviceError("queue depth \(depth) needs \(depth) free descriptors, the queue (size \(q.size)) has fewer: raise queue-size")
            }
            hs.append(h)
        }
        heads = hs
        self.size = size
    }
    func prepare(_ i: Int) {}
    func complete(_ i: Int, len: UInt32) -> Int { len > 0 && Int(len) <= size ? Int(len) : -1 }
}
