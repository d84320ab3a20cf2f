import Glibc
import Transport

/// The simulated driver's gpu workload, shaped like Linux's virtio-gpu showing a dumb buffer: GET_DISPLAY_INFO,
/// a B8G8R8X8 resource of scanout 0's mode (resource id 1), its backing attached in 4 KiB entries (what a
/// shmem-backed buffer looks like), SET_SCANOUT; then one round trip = a full-frame TRANSFER_TO_HOST_2D (fenced)
/// followed by a full-frame RESOURCE_FLUSH, each waited for (two requests). With `verify` the backing gets a new
/// first pixel each round and each response is checked (type, fence echoed). Chains and buffers are built once.
public final class GpuWorkload: Workload {
    let driver: SimDriver
    public let q: SimQueue
    private let slot: QD1Slot
    private let transferHead: UInt16, flushHead: UInt16
    private let transferReq: UnsafeMutableRawPointer, transferResp: UnsafeMutableRawPointer
    private let flushResp: UnsafeMutableRawPointer
    private let backing: UnsafeMutableRawPointer
    private let verify: Bool
    private var fence: UInt64 = 1
    public let width: UInt32, height: UInt32
    public var bytesPerRequest: Int { Int(width) * Int(height) * 4 }
    public let requestKind: String

    public init?(_ d: SimDriver, verify: Bool = false) {
        guard let q = d.queues.first else { return nil }
        driver = d
        self.q = q
        slot = QD1Slot(q)
        self.verify = verify
        // Display info: scanout 0's mode.
        let info = d.alloc(24), infoResp = d.alloc(VirtioGPU.displayInfoSize)
        Self.header(d.host(info), VirtioGPU.cmdGetDisplayInfo)
        guard let ih = q.addChain(readable: [(info, 24)], writable: [(infoResp, UInt32(VirtioGPU.displayInfoSize))]),
              let u = slot.run(ih, timeoutMs: 2000, spinNs: 0), u.len == UInt32(VirtioGPU.displayInfoSize),
              le32(d.host(infoResp), 0) == VirtioGPU.respOKDisplayInfo else { return nil }
        q.recycle(ih)
        let w = le32(d.host(infoResp), 24 + 8), h = le32(d.host(infoResp), 24 + 12)
        guard w > 0, h > 0 else { return nil }
        width = w; height = h
        let frame = Int(w) * Int(h) * 4
        requestKind = "full-frame TRANSFER_TO_HOST_2D + RESOURCE_FLUSH, \(w)x\(h) B8G8R8X8 (2 requests)"
        let resp = d.alloc(24), slot = self.slot
        func once(_ build: (UnsafeMutableRawPointer) -> Void, _ size: Int, extra: [(UInt64, UInt32)] = []) -> Bool {
            let r = d.alloc(size)
            memset(d.host(r), 0, size)
            build(d.host(r))
            guard let h = q.addChain(readable: [(r, UInt32(size))] + extra, writable: [(resp, 24)]),
                  slot.run(h, timeoutMs: 2000, spinNs: 0) != nil else { return false }
            q.recycle(h)
            return le32(d.host(resp), 0) == VirtioGPU.respOKNoData
        }
        guard once({ p in Self.header(p, VirtioGPU.cmdResourceCreate2D); put32(p, 24, 1)
                     put32(p, 28, GpuFormat.b8g8r8x8.rawValue); put32(p, 32, w); put32(p, 36, h) }, 40) else { return nil }
        let bk = d.alloc(frame, align: 4096)
        let bp = d.host(bk)
        memset(bp, 0x40, frame)
        let nEntries = (frame + 4095) / 4096
        let entries = d.alloc(16 * nEntries)
        for e in 0..<nEntries {
            put64(d.host(entries), 16 * e, bk + UInt64(4096 * e))
            put32(d.host(entries), 16 * e + 8, UInt32(min(4096, frame - 4096 * e)))
            put32(d.host(entries), 16 * e + 12, 0)
        }
        guard once({ p in Self.header(p, VirtioGPU.cmdResourceAttachBacking); put32(p, 24, 1); put32(p, 28, UInt32(nEntries)) },
                   32, extra: [(entries, UInt32(16 * nEntries))]) else { return nil }
        guard once({ p in Self.header(p, VirtioGPU.cmdSetScanout); put32(p, 32, w); put32(p, 36, h)
                     put32(p, 40, 0); put32(p, 44, 1) }, 48) else { return nil }
        // The two timed requests.
        backing = bp
        let t = d.alloc(56), tr = d.alloc(24), f = d.alloc(48), fr = d.alloc(24)
        memset(d.host(t), 0, 56); memset(d.host(f), 0, 48)
        Self.header(d.host(t), VirtioGPU.cmdTransferToHost2D, fence: true)
        put32(d.host(t), 32, w); put32(d.host(t), 36, h); put32(d.host(t), 48, 1)
        Self.header(d.host(f), VirtioGPU.cmdResourceFlush)
        put32(d.host(f), 32, w); put32(d.host(f), 36, h); put32(d.host(f), 40, 1)
        guard let th = q.addChain(readable: [(t, 56)], writable: [(tr, 24)]),
              let fh = q.addChain(readable: [(f, 48)], writable: [(fr, 24)]) else { return nil }
        transferHead = th; flushHead = fh
        transferReq = d.host(t); transferResp = d.host(tr); flushResp = d.host(fr)
    }

    static func header(_ p: UnsafeMutableRawPointer, _ type: UInt32, fence: Bool = false) {
        put32(p, 0, type); put32(p, 4, fence ? VirtioGPU.flagFence : 0); put64(p, 8, 0); put32(p, 16, 0); put32(p, 20, 0)
    }

    public func runOne(spinNs: UInt64) -> Bool {
        fence &+= 1
        put64(transferReq, 8, fence)
        if verify { backing.storeBytes(of: UInt32(truncatingIfNeeded: fence), as: UInt32.self) }
        transferResp.storeBytes(of: 0, as: UInt32.self)
        guard slot.run(transferHead, timeoutMs: 1000, spinNs: spinNs) != nil else { return false }
        if verify {
            guard le32(transferResp, 0) == VirtioGPU.respOKNoData, le32(transferResp, 4) & VirtioGPU.flagFence != 0,
                  le64(transferResp, 8) == fence else { return false }
        }
        flushResp.storeBytes(of: 0, as: UInt32.self)
        guard slot.run(flushHead, timeoutMs: 1000, spinNs: spinNs) != nil else { return false }
        return !verify || le32(flushResp, 0) == VirtioGPU.respOKNoData
    }
}
