import Glibc
import CLinux

/// A file descriptor this program owns; closed exactly once in `deinit` (swift-system's ownership rule).
/// Where an owner must be copyable (arrays, class tables), `FileRef` holds one.
public struct OwnedFD: ~Copyable {
    public let raw: Int32
    public init(adopting raw: Int32) { self.raw = raw }
    /// Gives up ownership without closing.
    public consuming func release() -> Int32 { let r = raw; discard self; return r }
    deinit { FD.close(raw) }
}

/// A shared owner of one descriptor (control plane: kept in arrays and tables); closed when the last reference
/// goes. The hot path reads `raw` from a plain copy and never retains this.
public final class FileRef {
    public let raw: Int32
    public init(adopting raw: Int32) { self.raw = raw }
    public convenience init(_ fd: consuming OwnedFD) { self.init(adopting: fd.release()) }
    deinit { FD.close(raw) }
}

/// Small helpers over raw descriptors; every call retries EINTR and goes through the fault-injection seam.
/// The only place that closes a descriptor (`close`): everything else owns fds through `OwnedFD` or `FileRef`.
public enum FD {
    /// Closes `fd` if it is valid. close(2) is not retried on EINTR (Linux frees the descriptor anyway).
    @inline(__always)
    public static func close(_ fd: Int32) {
        guard fd >= 0 else { return }
        _ = Glibc.close(fd)
    }
    public static func eventfd(nonblocking: Bool = true) throws(Errno) -> OwnedFD {
        OwnedFD(adopting: try syscall(.eventfd) { lb_eventfd(0, nonblocking ? 1 : 0) })
    }
    /// Adds 1 to an eventfd counter. EAGAIN (counter saturated) still means "signalled", and so does any other
    /// failure of a peer's fd: an interrupt write never blocks or fails the loop (the fd is non-blocking).
    /// A peer that shares the fd may clear O_NONBLOCK and fill the counter: the write is watched
    /// (`lb_stall_enter`, stallguard.c) and interrupted after 50 ms; it is then taken as done, not retried, and the
    /// fd made non-blocking again.
    @inline(__always)
    public static func signal(_ fd: Int32) {
        if FaultInjection.take(.write) != nil { return }
        var one: UInt64 = 1
        lb_stall_enter()
        let r = Glibc.write(fd, &one, 8)
        lb_stall_leave()
        if r < 0 && errno == EINTR { _ = lb_set_nonblocking(fd); PeerFD.stalled(fd, "write") }
    }
    /// Reads and clears an eventfd counter; 0 if it was not signalled (non-blocking fd) or the read failed.
    @inline(__always)
    public static func drain(_ fd: Int32) -> UInt64 {
        var v: UInt64 = 0
        if let e = FaultInjection.take(.read), e != EINTR { return 0 }
        // Watched like `signal`: an interrupted read (EINTR) is not retried: a peer that cleared O_NONBLOCK and
        // emptied the counter after epoll saw it readable would block the loop again.
        lb_stall_enter()
        let r = Glibc.read(fd, &v, 8)
        lb_stall_leave()
        if r == 8 { return v }
        if r < 0 && errno == EINTR { _ = lb_set_nonblocking(fd); PeerFD.stalled(fd, "read") }
        return 0
    }
    /// Blocks until an eventfd is signalled (the fd may be non-blocking) or `timeoutMs` passes; returns the count.
    public static func wait(_ fd: Int32, timeoutMs: Int32 = -1) -> UInt64 {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while true {
            let v = drain(fd)
            if v != 0 { return v }
            let r = poll(&p, 1, timeoutMs)
            if r == 0 { return 0 }
            if r < 0 && errno != EINTR { return 0 }
        }
    }
    public static func open(_ path: String, flags: Int32, mode: mode_t = 0) throws(Errno) -> OwnedFD {
        OwnedFD(adopting: try syscall(.open) { Glibc.open(path, flags | O_CLOEXEC, mode) })
    }
    public static func dup(_ fd: Int32) throws(Errno) -> OwnedFD {
        OwnedFD(adopting: try syscall(.fcntl) { fcntl(fd, F_DUPFD_CLOEXEC, 0) })
    }
    /// Reads exactly `count` bytes at `offset` (short reads retried); false on EOF.
    public static func pread(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int, _ offset: Int64) throws(Errno) -> Bool {
        var done = 0
        while done < count {
            let n = try syscall(.pread) { Glibc.pread(fd, buf + done, count - done, off_t(offset) + off_t(done)) }
            if n == 0 { return false }
            done += n
        }
        return true
    }
    /// Reads a small text file (/proc, /sys) whole; at most `limit` bytes.
    public static func readText(_ path: String, limit: Int = 1 << 20) throws(Errno) -> String {
        let f = try open(path, flags: O_RDONLY)
        var bytes: [UInt8] = []
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 8)
        defer { buf.deallocate() }
        while bytes.count < limit {
            let n = try syscall(.read) { Glibc.read(f.raw, buf, 4096) }
            if n == 0 { break }
            bytes += UnsafeRawBufferPointer(start: buf, count: n)
        }
        return String(decoding: bytes.prefix(limit), as: UTF8.self)
    }

    public static func pwrite(_ fd: Int32, _ buf: UnsafeRawPointer, _ count: Int, _ offset: Int64) throws(Errno) {
        var done = 0
        while done < count {
            done += try syscall(.pwrite) { Glibc.pwrite(fd, buf + done, count - done, off_t(offset) + off_t(done)) }
        }
    }
}
