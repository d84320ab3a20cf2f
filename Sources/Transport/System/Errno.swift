import Glibc
import Synchronization

/// An errno value as a typed error (swift-system `Errno` style).
public struct Errno: Error, Equatable, CustomStringConvertible, Sendable {
    public var rawValue: Int32
    public init(_ rawValue: Int32) { self.rawValue = rawValue }
    public static var current: Errno { Errno(errno) }
    public var description: String {
        guard let s = strerror(rawValue) else { return "errno \(rawValue)" }
        return "\(String(cString: s)) (errno \(rawValue))"
    }
    public static let again = Errno(EAGAIN)
    public static let interrupted = Errno(EINTR)
    public static let badFD = Errno(EBADF)
    public static let invalid = Errno(EINVAL)
}

/// The system calls the daemon makes, by kind: the unit of fault injection.
public enum Sys: UInt8, Sendable, CaseIterable {
    case other, open, close, read, write, eventfd, memfd, mmap, fcntl, ioctl, epollCtl, accept, recvmsg, sendmsg,
         ftruncate, pread, pwrite, timerfd
}

/// Runs a system call, retrying EINTR. EBADF and EFAULT mean a bug in this program (an fd or pointer we own went
/// wrong), so they trap instead of being reported as the user's problem (swift-nio `syscall(blocking:)`).
/// In debug builds `FaultInjection` can make the call fail first (tests of the fault paths).
@inline(__always)
public func syscall<T: BinaryInteger>(_ kind: Sys = .other, _ call: () -> T) throws(Errno) -> T {
    while true {
        if let e = FaultInjection.take(kind) {
            if e == EINTR { continue }   // an injected EINTR exercises the retry
            throw Errno(e)
        }
        let r = call()
        if r >= 0 { return r }
        let e = errno
        if e == EINTR { continue }
        precondition(e != EBADF && e != EFAULT, "system call failed with \(Errno(e)): program bug")
        throw Errno(e)
    }
}

/// A test seam for the fault paths (swift-system's `Mocking.swift` idea): arm a kind of system call to fail with an
/// errno for its next `times` calls, on any thread. Debug builds only: in release builds `take` is a constant nil.
public enum FaultInjection {
#if DEBUG
    private static let table = Mutex<[Sys: (errno: Int32, left: Int)]>([:])
    private static let armed = Atomic<Bool>(false)
    public static func fail(_ kind: Sys, with e: Int32, times: Int = 1) {
        table.withLock { $0[kind] = (e, times) }
        armed.store(true, ordering: .releasing)
    }
    public static func clear() {
        table.withLock { $0.removeAll() }
        armed.store(false, ordering: .releasing)
    }
    /// How many armed failures of `kind` are left.
    public static func remaining(_ kind: Sys) -> Int { table.withLock { $0[kind]?.left ?? 0 } }
    @inline(__always)
    public static func take(_ kind: Sys) -> Int32? {
        guard armed.load(ordering: .acquiring) else { return nil }
        return table.withLock { t -> Int32? in
            guard let f = t[kind], f.left > 0 else { return nil }
            t[kind] = f.left > 1 ? (f.errno, f.left - 1) : nil
            return f.errno
        }
    }
#else
    public static func fail(_ kind: Sys, with e: Int32, times: Int = 1) {}
    public static func clear() {}
    public static func remaining(_ kind: Sys) -> Int { 0 }
    @inline(__always) public static func take(_ kind: Sys) -> Int32? { nil }
#endif
}

// The log sink `Log` lives in Log.swift.
