import Glibc
import CLinux

/// One mapped range of driver-visible ("guest-physical") memory.
public struct RegionInfo: @unchecked Sendable, Equatable {
    /// Driver-side address of the first byte (guest-physical for a VM, physical for the kernel link).
    public var guestBase: UInt64
    public var size: UInt64
    /// Where it is mapped in this process.
    public var host: UnsafeMutableRawPointer
    /// The backing fd and its offset, so the region can be handed to a vhost-user peer (-1 if none).
    public var fd: Int32
    public var fdOffset: UInt64
    /// The address a vhost-user frontend uses for this region in its own address space.
    public var userAddr: UInt64
    public init(guestBase: UInt64, size: UInt64, host: UnsafeMutableRawPointer, fd: Int32, fdOffset: UInt64, userAddr: UInt64) {
        self.guestBase = guestBase; self.size = size; self.host = host
        self.fd = fd; self.fdOffset = fdOffset; self.userAddr = userAddr
    }
}

/// Owns an mmap; unmaps in `deinit`.
public struct Mapping: ~Copyable {
    public let base: UnsafeMutableRawPointer
    public let length: Int
    public init(fd: Int32, offset: UInt64, length: Int, writable: Bool = true) throws(Errno) {
        guard length > 0, offset <= UInt64(Int64.max) else { throw Errno.invalid }
        let prot = PROT_READ | (writable ? PROT_WRITE : 0)
        let p = mmap(nil, length, prot, MAP_SHARED, fd, off_t(offset))
        guard let p, p != MAP_FAILED else { throw Errno.current }
        base = p
        self.length = length
    }
    /// Hands the mapping to a new owner (e.g. `GuestMemory`) without unmapping it.
    public consuming func release() -> (UnsafeMutableRawPointer, Int) { let r = (base, length); discard self; return r }
    deinit { munmap(base, length) }
}

/// The driver side's memory as seen by devices: a table of non-overlapping regions.
/// A `GuestMemory` object owns the mappings (and any fds); devices and queues use the trivially copyable
/// `MemoryView` on the hot path (no ARC). The owner must outlive every view: the host keeps it for as long as
/// the device is active, and queues are stopped before it is replaced.
///
/// The table can grow in place (`append`, memory hot-plug on the kernel link): it is allocated for `maxRegions`
/// entries once, and views read the entry count through a shared header, so every queue and device sees a region
/// as soon as it is appended, without being restarted. A translation that misses every region first asks the
/// owner's `onMiss` hook (set by the kernel link: re-read the RAM list, map what was hot-added) and retries once.
public final class GuestMemory {
    // Swift arrays cannot hold ~Copyable values, so the class itself is the single owner of these.
    private var mappings: [(UnsafeMutableRawPointer, Int)]
    private let ownedFDs: [Int32]
    private let table: UnsafeMutablePointer<RegionInfo>
    private let header: UnsafeMutablePointer<MemoryHeader>
    public var count: Int { header.pointee.count }
    public static let maxRegions = 64

    /// Called (on the translating thread: the device's loop) when an address lies in no region; returns true if
    /// regions were appended (the translation is retried once). Cleared by the owner before it goes away.
    public var onMiss: ((UInt64) -> Bool)? {
        didSet {
            header.pointee.context = onMiss == nil ? nil : Unmanaged.passUnretained(self).toOpaque()
            header.pointee.miss = onMiss == nil ? nil : { ctx, addr in
                guard let ctx else { return false }
                return Unmanaged<GuestMemory>.fromOpaque(ctx).takeUnretainedValue().onMiss?(addr) ?? false
            }
        }
    }

    /// Takes ownership of the mappings (munmap) and fds (close), even when it throws; rejects overlapping or
    /// wrapping regions.
    public init(regions: [RegionInfo], mappings: [(UnsafeMutableRawPointer, Int)], fds: [Int32]) throws(Errno) {
        self.mappings = mappings
        self.ownedFDs = fds
        func fail() -> Errno { for (p, l) in mappings { munmap(p, l) }; for f in fds { FD.close(f) }; return Errno.invalid }
        guard regions.count <= GuestMemory.maxRegions else { throw fail() }
        let sorted = regions.sorted { $0.guestBase < $1.guestBase }
        for (i, r) in sorted.enumerated() {
            guard r.size > 0 else { throw fail() }
            let (end, o) = r.guestBase.addingReportingOverflow(r.size)
            guard !o else { throw fail() }
            if i + 1 < sorted.count && end > sorted[i + 1].guestBase { throw fail() }
        }
        table = .allocate(capacity: GuestMemory.maxRegions)
        table.initialize(from: sorted, count: sorted.count)
        header = .allocate(capacity: 1)
        header.initialize(to: MemoryHeader(count: sorted.count, miss: nil, context: nil))
    }

    deinit {
        table.deinitialize(count: count)
        table.deallocate()
        header.deinitialize(count: 1)
        header.deallocate()
        for (p, l) in mappings { munmap(p, l) }
        for f in ownedFDs { FD.close(f) }
    }

    public var view: MemoryView { MemoryView(table: table, header: header) }
    public var regions: [RegionInfo] { Array(UnsafeBufferPointer(start: table, count: count)) }

    /// Whether `[base, base+size)` overlaps no region (and does not wrap).
    public func isFree(_ base: UInt64, _ size: UInt64) -> Bool {
        let (end, o) = base.addingReportingOverflow(size)
        guard !o, size > 0 else { return false }
        for i in 0..<count where base < table[i].guestBase &+ table[i].size && table[i].guestBase < end { return false }
        return true
    }

    /// Appends a region in place (memory hot-plug) and takes ownership of its mapping, also when it throws
    /// (table full, overlap, size 0). Call on the thread that translates (the loop): the entry is written before
    /// the count that publishes it, and views on that thread see it at once.
    public func append(_ r: RegionInfo, mapping: (UnsafeMutableRawPointer, Int)) throws(Errno) {
        guard count < GuestMemory.maxRegions, isFree(r.guestBase, r.size) else {
            munmap(mapping.0, mapping.1)
            throw Errno.invalid
        }
        mappings.append(mapping)
        (table + count).initialize(to: r)
        lb_store_release_int(&header.pointee.count, count + 1)
    }
    /// Anonymous shared RAM in a memfd, as the simulated driver's "physical" memory.
    public static func memfdRAM(size: Int, guestBase: UInt64 = 0, name: String = "loopbackd-ram") throws(Errno) -> GuestMemory {
        let fd = OwnedFD(adopting: try syscall { lb_memfd(name, 1) })
        _ = try syscall { ftruncate(fd.raw, off_t(size)) }
        // The fd may be handed to a vhost-user back-end: sealed, it cannot shrink the file under our mapping.
        _ = try syscall { lb_seal_size(fd.raw) }
        let m = try Mapping(fd: fd.raw, offset: 0, length: size)
        let info = RegionInfo(guestBase: guestBase, size: UInt64(size), host: m.base, fd: fd.raw, fdOffset: 0,
                              userAddr: UInt64(UInt(bitPattern: m.base)))
        let map = m.release()
        return try GuestMemory(regions: [info], mappings: [map], fds: [fd.release()])
    }
}

/// What views share with their `GuestMemory`: the number of published entries and the miss hook.
public struct MemoryHeader {
    var count: Int
    var miss: (@convention(c) (UnsafeMutableRawPointer?, UInt64) -> Bool)?
    var context: UnsafeMutableRawPointer?
}

/// A hot-path view of the region table. Translation is checked: a range is returned only if every byte of it
/// lies in mapped regions; never a pointer past a region's end.
public struct MemoryView: @unchecked Sendable {
    let table: UnsafePointer<RegionInfo>
    let header: UnsafeMutablePointer<MemoryHeader>
    init(table: UnsafePointer<RegionInfo>, header: UnsafeMutablePointer<MemoryHeader>) { self.table = table; self.header = header }
    /// Entries published so far (the table only grows; see `GuestMemory.append`).
    public var count: Int { lb_load_acquire_int(&header.pointee.count) }

    @inline(__always)
    func regionIndex(_ addr: UInt64) -> Int? {
        let n = count
        var i = 0
        while i < n {
            let r = table[i]
            if addr >= r.guestBase && addr - r.guestBase < r.size { return i }
            i += 1
        }
        return missed(addr)
    }

    /// Slow path: no region holds `addr`. The owner may map hot-added memory (`GuestMemory.onMiss`); look again
    /// in what was appended.
    @inline(never)
    func missed(_ addr: UInt64) -> Int? {
        guard let hook = header.pointee.miss else { return nil }
        let before = count
        guard hook(header.pointee.context, addr), count > before else { return nil }
        for i in before..<count where addr >= table[i].guestBase && addr - table[i].guestBase < table[i].size { return i }
        return nil
    }

    /// A host pointer for `[addr, addr+len)` if it lies inside ONE region.
    @inline(__always)
    public func translate(_ addr: UInt64, _ len: UInt64) -> UnsafeMutableRawPointer? {
        guard let i = regionIndex(addr) else { return nil }
        let r = table[i]
        let off = addr - r.guestBase
        guard len <= r.size - off else { return nil }
        return r.host + Int(off)
    }

    /// Calls `body` with each host piece of `[addr, addr+len)`, which may span adjacent regions.
    /// Returns false (and stops) if any byte is unmapped or `body` returns false.
    @inline(__always)
    public func forEachPiece(_ addr: UInt64, _ len: UInt64, _ body: (UnsafeMutableRawPointer, UInt32) -> Bool) -> Bool {
        var a = addr
        var left = len
        while left > 0 {
            guard let i = regionIndex(a) else { return false }
            let r = table[i]
            let off = a - r.guestBase
            // A piece is at most 4 GiB - 1 (segment lengths are 32-bit), whatever the caller asked for.
            let n = min(left, r.size - off, UInt64(UInt32.max))
            if !body(r.host + Int(off), UInt32(n)) { return false }
            left -= n
            let (next, o) = a.addingReportingOverflow(n)
            if o && left > 0 { return false }
            a = next
        }
        return true
    }

    /// Translates a region's frontend user address (vhost-user SET_VRING_ADDR) to a guest address.
    public func guestAddress(ofUserAddress ua: UInt64) -> UInt64? {
        let n = count
        for i in 0..<n {
            let r = table[i]
            if ua >= r.userAddr && ua - r.userAddr < r.size { return r.guestBase + (ua - r.userAddr) }
        }
        return nil
    }
}
