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
