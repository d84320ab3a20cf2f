import Glibc
import Transport

/// virtio-blk 4 KiB requests at random sectors: reads, or (verify) a pattern write then a read-back compare.
public final class BlkWorkload: Workload {
    let driver: SimDriver
    let slot: QD1Slot
    private(set) var readHead: UInt16, writeHead: UInt16
    private let gpa: (h: UInt64, b: UInt64, s: UInt64, wh: UInt64, wb: UInt64, ws: UInt64)
    let header: UnsafeMutableRawPointer, data: UnsafeMutableRawPointer, status: UnsafeMutableRawPointer
    let wheader: UnsafeMutableRawPointer, wdata: UnsafeMutableRawPointer, wstatus: UnsafeMutableRawPointer
    let blocks: UInt64
    let verify: Bool
    var rng: UInt64 = 0x9E37_79B9_7F4A_7C15
    public let bytesPerRequest = 4096
    public var requestKind: String { verify ? "verified write+read pairs (4 KiB)" : "4 KiB random reads" }
    /// Requests that returned wrong data (verify mode).
    public var mismatches = 0
    private(set) var recoveries = 0
    public var q: SimQueue { slot.q }

    public init?(_ d: SimDriver, verify: Bool) {
        guard let q = d.queues.first, let cap = d.readConfig(offset: 0, count: 8) else { return nil }
        let sectors = cap.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self).littleEndian }
        guard sectors >= 8 else { return nil }
        blocks = sectors / 8
        let h = d.alloc(16), b = d.alloc(4096, align: 4096), s = d.alloc(1)
        let wh = d.alloc(16), wb = d.alloc(4096, align: 4096), ws = d.alloc(1)
        gpa = (h, b, s, wh, wb, ws)
        guard let (r, w) = Self.chains(q, gpa) else { return nil }
        driver = d
        slot = QD1Slot(q)
        readHead = r; writeHead = w
        header = d.host(h); data = d.host(b); status = d.host(s)
        wheader = d.host(wh); wdata = d.host(wb); wstatus = d.host(ws)
        self.verify = verify
    }

    private static func chains(_ q: SimQueue, _ g: (h: UInt64, b: UInt64, s: UInt64, wh: UInt64, wb: UInt64, ws: UInt64))
        -> (UInt16, UInt16)? {
        guard let r = q.addChain(readable: [(g.h, 16)], writable: [(g.b, 4096), (g.s, 1)]),
              let w = q.addChain(readable: [(g.wh, 16), (g.wb, 4096)], writable: [(g.ws, 1)]) else { return nil }
        return (r, w)
    }

    private func next() -> UInt64 { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng }

    private func io(_ head: UInt16, _ hdr: UnsafeMutableRawPointer, _ st: UnsafeMutableRawPointer,
                    type: UInt32, sector: UInt64, spinNs: UInt64) -> Bool {
        hdr.storeBytes(of: type.littleEndian, as: UInt32.self)
        hdr.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
        hdr.storeBytes(of: sector.littleEndian, toByteOffset: 8, as: UInt64.self)
        st.storeBytes(of: 0xff, as: UInt8.self)
        guard slot.run(head, timeoutMs: 2000, spinNs: spinNs) != nil else { recover(); return false }
        return st.load(as: UInt8.self) == 0
    }

    private func recover() {
        guard let q = resetIfNeeded(driver, slot, recoveries: &recoveries), let (r, w) = Self.chains(q, gpa) else { return }
        readHead = r; writeHead = w
    }

    public func runOne(spinNs: UInt64) -> Bool {
        // A request still outstanding from a timed-out call uses these very buffers: wait for it before touching them
        // (rewriting an in-flight write's data would change what a replaying back-end writes).
        guard slot.settle(timeoutMs: 2000) else { recover(); return false }
        let sector = (next() % blocks) * 8
        guard verify else { return io(readHead, header, status, type: 0, sector: sector, spinNs: spinNs) }
        // Fill the write buffer with a pattern derived from the sector and a fresh random tag.
        let tag = next()
        for k in 0..<512 { wdata.storeBytes(of: tag &+ UInt64(k) &+ sector, toByteOffset: 8 * k, as: UInt64.self) }
        guard io(writeHead, wheader, wstatus, type: 1, sector: sector, spinNs: spinNs),
              io(readHead, header, status, type: 0, sector: sector, spinNs: spinNs) else { return false }
        if memcmp(data, wdata, 4096) != 0 { mismatches += 1; return false }
        return true
    }
}

extension BlkWorkload {
    /// `depth` reads of `size` bytes (default 4096; a multiple of 512) at random `size`-aligned offsets, each slot
    /// with its own header, data and status buffers (3 descriptors per request).
    public func depthRequests(depth: Int, size: Int?) throws(DeviceError) -> DepthRequests? {
        try BlkDepth(driver, q: q, depth: depth, size: size ?? bytesPerRequest, sectors: blocks * 8)
    }
}

final class BlkDepth: DepthRequests {
    let heads: [UInt16]
    let size: Int
    let headers: [UnsafeMutableRawPointer], statuses: [UnsafeMutableRawPointer]
    let units: UInt64, perUnit: UInt64
    var rng: UInt64 = 0x2545_F491_4F6C_DD1D

    init(_ d: SimDriver, q: SimQueue, depth: Int, size: Int, sectors: UInt64) throws(DeviceError) {
        guard size >= 512, size % 512 == 0, size <= Int(UInt32.max) else {
            throw DeviceError("blk request size must be a multiple of 512, found \(size)")
        }
        perUnit = UInt64(size / 512)
        guard sectors >= perUnit else { throw DeviceError("blk request size \(size) is larger than the disk (\(sectors * 512) bytes)") }
        units = sectors / perUnit
        var hs: [UInt16] = [], hp: [UnsafeMutableRawPointer] = [], sp: [UnsafeMutableRawPointer] = []
        for _ in 0..<depth {
            let h = d.alloc(16), b = d.alloc(size, align: 4096), s = d.alloc(1)
            guard let head = q.addChain(readable: [(h, 16)], writable: [(b, UInt32(size)), (s, 1)]) else {
                throw DeviceError("queue depth \(depth) needs \(3 * depth) free descriptors (3 per request), the queue (size \(q.size)) has fewer: raise queue-size")
            }
            hs.append(head); hp.append(d.host(h)); sp.append(d.host(s))
        }
        heads = hs; headers = hp; statuses = sp
        self.size = size
    }

    func prepare(_ i: Int) {
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
        let hdr = headers[i]
        hdr.storeBytes(of: UInt32(0).littleEndian, as: UInt32.self)   // VIRTIO_BLK_T_IN
        hdr.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
        hdr.storeBytes(of: ((rng % units) * perUnit).littleEndian, toByteOffset: 8, as: UInt64.self)
        statuses[i].storeBytes(of: 0xff, as: UInt8.self)
    }
    func complete(_ i: Int, len: UInt32) -> Int { statuses[i].load(as: UInt8.self) == 0 ? size : -1 }
}
