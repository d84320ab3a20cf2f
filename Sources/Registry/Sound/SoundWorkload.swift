import Glibc
import Transport

/// The simulated driver's sound workload: a PCM_INFO query of stream 0 on the control queue (what Linux's
/// virtio_snd sends at probe; I/O messages complete on the stream clock, so they measure the clock, not the
/// device path). One round trip = the request answered S_OK with one 32-byte item. Chain and buffers built once.
public final class SoundWorkload: Workload {
    let driver: SimDriver
    public let q: SimQueue
    private let head: UInt16
    private let status: UnsafeMutableRawPointer
    private let info: UnsafeMutableRawPointer
    public let bytesPerRequest = VirtioSnd.pcmInfoSize
    public let requestKind = "PCM_INFO queries"
    private let slot: QD1Slot

    public init?(_ d: SimDriver) {
        guard let q = d.queues.first else { return nil }
        let req = d.alloc(VirtioSnd.queryInfoSize), st = d.alloc(4), inf = d.alloc(VirtioSnd.pcmInfoSize)
        let r = d.host(req)
        r.storeBytes(of: VirtioSnd.rPcmInfo.littleEndian, as: UInt32.self)
        r.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
        r.storeBytes(of: UInt32(1).littleEndian, toByteOffset: 8, as: UInt32.self)
        r.storeBytes(of: UInt32(VirtioSnd.pcmInfoSize).littleEndian, toByteOffset: 12, as: UInt32.self)
        guard let h = q.addChain(readable: [(req, UInt32(VirtioSnd.queryInfoSize))],
                                 writable: [(st, 4), (inf, UInt32(VirtioSnd.pcmInfoSize))]) else { return nil }
        driver = d
        self.q = q
        head = h
        status = d.host(st)
        info = d.host(inf)
        slot = QD1Slot(q)
    }

    public func runOne(spinNs: UInt64) -> Bool {
        status.storeBytes(of: 0, as: UInt32.self)
        guard let u = slot.run(head, timeoutMs: 1000, spinNs: spinNs) else { return false }
        return u.len == UInt32(4 + VirtioSnd.pcmInfoSize) && UInt32(littleEndian: status.load(as: UInt32.self)) == VirtioSnd.sOK
    }
}
