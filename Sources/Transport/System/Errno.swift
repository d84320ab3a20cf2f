import Glibc

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

/// Runs a system call, retrying EINTR. EBADF and EFAULT mean a bug in this program (an fd or pointer we own went
/// wrong), so they trap instead of being reported as the user's problem (swift-nio `syscall(blocking:)`).
@inline(__always)
public func syscall<T: BinaryInteger>(_ call: () -> T) throws(Errno) -> T {
    while true {
        let r = call()
        if r >= 0 { return r }
        let e = errno
        if e == EINTR { continue }
        precondition(e != EBADF && e != EFAULT, "system call failed with \(Errno(e)): program bug")
        throw Errno(e)
    }
}

/// Writes a line to standard error without Foundation (the daemon's log sink).
public enum Log {
    public enum Level: Int, Comparable, Sendable {
        case error = 0, warning, info, debug
        public static func < (a: Level, b: Level) -> Bool { a.rawValue < b.rawValue }
        public init?(name: String) {
            switch name {
            case "error": self = .error
            case "warn", "warning": self = .warning
            case "info": self = .info
            case "debug": self = .debug
            default: return nil
            }
        }
    }
    // Set once at start-up, before any thread starts; read-only afterwards.
    nonisolated(unsafe) public static var level: Level = .info

    public static func write(_ level: Level, _ message: @autoclosure () -> String) {
        guard level <= Log.level else { return }
        let tag: String
        switch level {
        case .error: tag = "error"
        case .warning: tag = "warning"
        case .info: tag = "info"
        case .debug: tag = "debug"
        }
        var line = "loopbackd: \(tag): \(message())\n"
        line.withUTF8 { buf in _ = Glibc.write(2, buf.baseAddress, buf.count) }
    }
    public static func error(_ m: @autoclosure () -> String) { write(.error, m()) }
    public static func warning(_ m: @autoclosure () -> String) { write(.warning, m()) }
    public static func info(_ m: @autoclosure () -> String) { write(.info, m()) }
    public static func debug(_ m: @autoclosure () -> String) { write(.debug, m()) }
}
