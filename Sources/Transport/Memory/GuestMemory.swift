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

/// The driver side's memory as seen by devices: a fixed table of non-overlapping regions.
/// A `GuestMemory` object owns the mappings (and any fds); devices and queues use the trivially copyable
/// `MemoryView` on the hot path (no ARC). The owner must outlive every view: the host keeps it for as long as
/// the device is active, and queues are stopped before it is replaced.
public final class GuestMemory {
    // Swift arrays cannot hold ~Copyable values, so the class itself is the single owner of these.
    private let mappings: [(UnsafeMutableRawPointer, Int)]
    private let ownedFDs: [Int32]
    private let table: UnsafeMutablePointer<RegionInfo>
    public let count: Int
    public static let maxRegions = 64

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
        table = .allocate(capacity: max(sorted.count, 1))
        table.initialize(from: sorted, count: sorted.count)
        count = sorted.count
    }

    deinit {
        table.deinitialize(count: count)
        table.deallocate()
        for (p, l) in mappings { munmap(p, l) }
        for f in ownedFDs { FD.close(f) }
    }

    public var view: MemoryView { MemoryView(table: table, count: count) }
    public var regions: [RegionInfo] { Array(UnsafeBufferPointer(start: table, count: count)) }

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

/// A hot-path view of the region table. Translation is checked: a range is returned only if every byte of it
/// lies in mapped regions; never a pointer past a region's end.
public struct MemoryView: @unchecked Sendable {
    let table: UnsafePointer<RegionInfo>
    public let count: Int
    init(table: UnsafePointer<RegionInfo>, count: Int) { self.table = table; self.count = count }

    @inline(__always)
    func regionIndex(_ addr: UInt64) -> Int? {
        var i = 0
        while i < count {
            let r = table[i]
            if addr >= r.guestBase && addr - r.guestBase < r.size { return i }
            i += 1
        }
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
        for i in 0..<count {
            let r = table[i]
            if ua >= r.userAddr && ua - r.userAddr < r.size { return r.guestBase + (ua - r.userAddr) }
        }
        return nil
    }
}
