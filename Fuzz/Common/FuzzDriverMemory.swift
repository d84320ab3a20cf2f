// The simulated driver's memory for the device harnesses: one region followed by a PROT_NONE guard page (a device
// write one byte past the region faults), mapped once per process, and the event loop the device is given.
import Glibc
import Transport

struct FuzzDriverMemory {
    static let page = 4096
    let host: UnsafeMutableRawPointer
    let bytes: Int
    let loop: EventLoop

    init(bytes: Int) {
        guard let p = mmap(nil, bytes + Self.page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              p != MAP_FAILED, mprotect(p, bytes, PROT_READ | PROT_WRITE) == 0 else { abort() }
        host = p
        self.bytes = bytes
        guard let l = try? EventLoop() else { abort() }
        loop = l
    }

    /// The region zeroed and seen as guest memory at `guestBase` (one region, no file).
    func fresh(guestBase: UInt64) -> GuestMemory? {
        memset(host, 0, bytes)
        let info = RegionInfo(guestBase: guestBase, size: UInt64(bytes), host: host, fd: -1, fdOffset: 0,
                              userAddr: UInt64(UInt(bitPattern: host)))
        return try? GuestMemory(regions: [info], mappings: [], fds: [])
    }
}
