import Glibc

/// The pure part of the kernel link: every value that comes from the module, an ioctl or /proc/iomem is decoded
/// and checked here, without a system call, so it can be unit-tested and fuzzed. Nothing here traps on any input:
/// sizes, addresses and counts are checked with overflow-reporting arithmetic and exact conversions, and a bad
/// value is rejected with a reason (the caller logs it) instead of being truncated.

/// One queue as the module reports it (ADDDEV's qinfo, or GET_QUEUE).
public struct KernelQueueInfo: Equatable, Sendable {
    public var size: UInt32
    public var desc: UInt64
    public var avail: UInt64
    public var used: UInt64
    public init(size: UInt32, desc: UInt64, avail: UInt64, used: UInt64) {
        self.size = size; self.desc = desc; self.avail = avail; self.used = used
    }
}

/// How the module answered the extension probe (GETEXT).
public enum KernelFlavor: Equatable, Sendable {
    /// This project's module: extensions available, DELDEV is safe.
    case extended(version: UInt32, extensions: UInt64)
    /// The upstream unified-hmi virtio-lo driver: it answers the extension ioctls with EINVAL (ENOTTY for
    /// other ioctl types; both accepted). Its DELDEV removes the device under a spinlock (kernel BUG, then a
    /// hang), so on shutdown loopbackd unmaps and closes the fd instead: the kernel then removes every device.
    case upstream
    /// The probe failed with another errno: no extensions, and shut down as on upstream (closing the fd
    /// removes the devices on every known implementation).
    case unknown(errno: Int32)

    /// GETEXT's result: `errno` is 0 when the ioctl succeeded.
    public static func classify(probeErrno: Int32, version: UInt32, extensions: UInt64) -> KernelFlavor {
        if probeErrno == 0 { return .extended(version: version, extensions: extensions) }
        if probeErrno == EINVAL || probeErrno == ENOTTY { return .upstream }
        return .unknown(errno: probeErrno)
    }

    public var extensions: UInt64 { if case .extended(_, let e) = self { return e }; return 0 }
    /// DELDEV is only used on this project's module; elsewhere shutdown is munmap + close.
    public var deleteWithDELDEV: Bool { if case .extended = self { return true }; return false }
}

extension VirtioLoLink {
    /// Top-level "System RAM" lines of /proc/iomem ("00100000-1ffdffff : System RAM"), rounded inwards to pages.
    /// Lines that do not parse, are empty or inverted, or whose rounding would wrap are skipped; the result still
    /// goes through `checkRAMRanges`.
    public static func parseIomem(_ text: String, pageSize: UInt64 = 4096) throws(DeviceError) -> [(start: UInt64, size: UInt64)] {
        guard pageSize > 0, pageSize & (pageSize - 1) == 0 else { throw DeviceError("page size \(pageSize) is not a power of two") }
        let mask = pageSize - 1
        var out: [(start: UInt64, size: UInt64)] = []
        for line in text.split(separator: "\n") where !line.hasPrefix(" ") && line.hasSuffix(": System RAM") {
            guard let field = line.split(separator: " ").first else { continue }
            let range = field.split(separator: "-", omittingEmptySubsequences: false)
            guard range.count == 2, let a = UInt64(range[0], radix: 16), let b = UInt64(range[1], radix: 16), b > a else { continue }
            // start = a rounded up to a page; a range beginning in the last page of the address space has none.
            let (up, o1) = a.addingReportingOverflow(mask)
            guard !o1 else { continue }
            let start = up & ~mask
            // end (exclusive) = b + 1 rounded down; b = 2^64-1 cannot be represented +1, its last page is dropped.
            let (e, o2) = b.addingReportingOverflow(1)
            let end = o2 ? (UInt64.max & ~mask) : (e & ~mask)
            if end > start { out.append((start, end - start)) }
        }
        guard !out.isEmpty else {
            throw DeviceError("no System RAM in /proc/iomem (not root, or /proc not mounted)")
        }
        return out
    }

    /// Checks RAM ranges (from GET_RAM or /proc/iomem) before anything maps them: page-aligned start and size,
    /// no wrap-around, end within off_t (mmap's offset) and size within Int. Zero-sized ranges are dropped
    /// silently; every other rejected range comes back with a reason to log.
    public static func checkRAMRanges(_ ranges: [(start: UInt64, size: UInt64)], pageSize: UInt64 = 4096)
        -> (ranges: [(start: UInt64, size: UInt64)], rejected: [String]) {
        var ok: [(start: UInt64, size: UInt64)] = []
        var rejected: [String] = []
        let mask = pageSize &- 1
        for (start, size) in ranges where size != 0 {
            let what = "RAM range 0x\(String(start, radix: 16)) (+0x\(String(size, radix: 16)))"
            guard pageSize > 0, pageSize & mask == 0 else { rejected.append("\(what): page size \(pageSize) is not a power of two"); continue }
            guard start & mask == 0, size & mask == 0 else { rejected.append("\(what): not page aligned"); continue }
            let (end, o) = start.addingReportingOverflow(size)
            guard !o else { rejected.append("\(what): wraps around the address space"); continue }
            guard end <= UInt64(Int64.max), Int(exactly: size) != nil else {
                rejected.append("\(what): beyond the largest mmap offset"); continue
            }
            ok.append((start, size))
        }
        return (ok, rejected)
    }

    /// Decodes the kernel's queue table (one entry per offered queue; size 0 = the driver did not set it up) into
    /// the ring configs to activate. Only the leading set-up queues are active (virtio_blk sets up one per CPU, a
    /// prefix of those offered). A size above what the device offered, not a power of two, or a ring that is
    /// missing or wraps the address space is an error: it is never truncated to 16 bits.
    public static func decodeQueues(_ table: [KernelQueueInfo], offered: [UInt16]) throws(DeviceError) -> [QueueConfig] {
        guard table.count == offered.count else {
            throw DeviceError("kernel reported \(table.count) queues, \(offered.count) were offered")
        }
        var out: [QueueConfig] = []
        for (n, q) in table.enumerated() {
            if q.size == 0 { break }
            guard q.size <= UInt32(offered[n]), let size = UInt16(exactly: q.size), size & (size &- 1) == 0 else {
                throw DeviceError("queue \(n): kernel reported size \(q.size), offered at most \(offered[n]) (power of two)")
            }
            let n64 = UInt64(size)
            // desc: 16 per entry; avail: 6 + 2 per entry; used: 6 + 8 per entry (virtio 1.2 §2.7).
            for (name, base, bytes) in [("desc", q.desc, 16 * n64), ("avail", q.avail, 6 + 2 * n64), ("used", q.used, 6 + 8 * n64)] {
                guard base != 0 else { throw DeviceError("queue \(n): kernel reported no \(name) ring address") }
                guard !base.addingReportingOverflow(bytes).overflow else {
                    throw DeviceError("queue \(n): \(name) ring at 0x\(String(base, radix: 16)) wraps the address space")
                }
            }
            out.append(QueueConfig(size: size, desc: q.desc, avail: q.avail, used: q.used))
        }
        return out
    }

    /// GET_POOL's answer, checked: a non-empty page-multiple pool at a non-zero IOVA that does not wrap, at an mmap
    /// offset that does not wrap and fits off_t, small enough to map. Returns the length to map. Pure.
    public static func checkPool(iova: UInt64, size: UInt64, mmapOffset: UInt64, pageSize: UInt64 = 4096) -> Int? {
        // At most 1 GiB of buffers (VIRTIO_LO_POOL_MAX_KIB) plus 64 rings of 32768 entries (< 1 MiB each).
        let maxPool: UInt64 = (1 << 30) + (64 << 20)
        guard iova != 0, size > 0, size <= maxPool, size % pageSize == 0, mmapOffset % pageSize == 0,
              !iova.addingReportingOverflow(size).overflow else { return nil }
        let (end, o) = mmapOffset.addingReportingOverflow(size)
        guard !o, end <= UInt64(Int64.max) else { return nil }
        return Int(exactly: size)
    }

    /// GET_RAM's answer: `returned` entries were written into a buffer of `capacity`; `total` exist. Returns how
    /// many entries to read (never more than the buffer holds) and whether to ask again with a larger buffer.
    public static func ramListCount(returned: UInt32, total: UInt32, capacity: Int) -> (read: Int, retryWith: Int?) {
        let read = min(Int(returned), capacity)
        let t = Int(total)
        if t > capacity && t <= maxRAMListEntries { return (read, t) }
        return (read, nil)
    }

    /// The most RAM ranges loopbackd asks the module for (the module's own limit is 1024).
    public static let maxRAMListEntries = 1024
}

extension VirtioLoLink {
    /// A pending driver config write as CFG_GET reports it (SYNC_CONFIG): the bytes copied are
    /// `[offset, offset+length)` of a config space of `configSize` bytes, `length` at most the buffer's `capacity`.
    /// nil for anything else (the caller acks without applying: the driver must not wait for nothing).
    public static func checkConfigWrite(offset: UInt32, length: UInt32, capacity: Int, configSize: Int) -> Range<Int>? {
        let off = Int(offset), len = Int(length)   // UInt32 always fits Int on 64-bit
        guard configSize >= 0, len > 0, len <= capacity, off <= configSize, len <= configSize - off else { return nil }
        return off..<(off + len)
    }
}
