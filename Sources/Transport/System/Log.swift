import Glibc
import Synchronization

/// The daemon's log sink: one line per message on standard error, without Foundation.
///
/// Under systemd (`Log.journal`, set when `$JOURNAL_STREAM` names the stream stderr is, sd-daemon(3)) every line
/// starts with its syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug), which journald strips
/// and records as PRIORITY=. Warnings are rate-limited per message site (the call's file and line): at most
/// `rateLimitBurst` per `rateLimitIntervalNs`, then one "suppressed K similar messages" line when the window
/// ends (on the next warning from that site, or from `flushSuppressed`, which the daemon calls periodically).
/// Errors, info and debug lines are never suppressed.
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
        var tag: String {
            switch self {
            case .error: return "error"
            case .warning: return "warning"
            case .info: return "info"
            case .debug: return "debug"
            }
        }
        /// syslog(3) priority: LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG.
        public var syslogPriority: Int {
            switch self {
            case .error: return 3
            case .warning: return 4
            case .info: return 6
            case .debug: return 7
            }
        }
    }
    // Set once at start-up, before any thread starts; read-only afterwards.
    nonisolated(unsafe) public static var level: Level = .info
    /// Lines carry `<N>` syslog priority prefixes (stderr is the journal). Set once at start-up, like `level`.
    nonisolated(unsafe) public static var journal = false
    /// Where lines go: standard error. Tests point it at a pipe.
    nonisolated(unsafe) public static var outputFD: Int32 = 2
    /// At most this many warnings from one message site per `rateLimitIntervalNs`.
    public static let rateLimitBurst = 10
    public static let rateLimitIntervalNs: UInt64 = 10_000_000_000

    /// One formatted line (with its newline): `loopbackd: warning: text`, or `<4>warning: text` for the journal
    /// (journald already records the identifier).
    public static func format(_ level: Level, _ message: String, journal: Bool) -> String {
        journal ? "<\(level.syslogPriority)>\(level.tag): \(message)\n" : "loopbackd: \(level.tag): \(message)\n"
    }

    /// Writes one line, unconditionally of rate limits (but subject to `level`).
    public static func write(_ level: Level, _ message: @autoclosure () -> String) {
        guard level <= Log.level else { return }
        emit(format(level, message(), journal: journal))
    }

    public static func error(_ m: @autoclosure () -> String) { write(.error, m()) }
    public static func warning(_ m: @autoclosure () -> String, file: StaticString = #fileID, line: UInt = #line) {
        guard Level.warning <= Log.level else { return }
        let site = Site(file: UInt(bitPattern: file.utf8Start), line: line)
        let (allowed, suppressed) = limiter.admit(site, now: monotonicNs(), name: file)
        if let suppressed { emit(format(.warning, suppressed, journal: journal)) }
        if allowed { emit(format(.warning, m(), journal: journal)) }
    }
    public static func info(_ m: @autoclosure () -> String) { write(.info, m()) }
    public static func debug(_ m: @autoclosure () -> String) { write(.debug, m()) }

    /// Reports the sites whose rate-limit window ended with suppressed warnings (one line each) and forgets them.
    public static func flushSuppressed() {
        for line in limiter.expired(now: monotonicNs()) { emit(format(.warning, line, journal: journal)) }
    }

    /// Forgets every rate-limit window (tests).
    public static func resetRateLimits() { limiter.reset() }

    /// True when `$JOURNAL_STREAM` ("DEVICE:INODE", set by systemd for a service whose stdout/stderr is the
    /// journal) names the file `fd` is open on; the variable is inherited by children whose stderr may be
    /// something else, so the device and inode are compared, as sd_journal_stream_fd(3) tells.
    public static func isJournalStream(_ value: String?, fd: Int32 = 2) -> Bool {
        guard let value else { return false }
        let parts = value.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let dev = UInt64(parts[0]), let ino = UInt64(parts[1]) else { return false }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return false }
        return UInt64(st.st_dev) == dev && UInt64(st.st_ino) == ino
    }

    /// `journal` from the process environment and standard error.
    public static func detectJournal() {
        journal = isJournalStream(getenv("JOURNAL_STREAM").map { String(cString: $0) }, fd: outputFD)
    }

    private static func emit(_ line: String) {
        var line = line
        line.withUTF8 { buf in _ = Glibc.write(outputFD, buf.baseAddress, buf.count) }
    }

    private static func monotonicNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    struct Site: Hashable { var file: UInt; var line: UInt }
    private static let limiter = RateLimiter()

    /// Per-site windows; called from any thread (a mutex: warnings are rare, never per request).
    final class RateLimiter: Sendable {
        struct Window { var start: UInt64; var count: Int; var suppressed: Int; var name: String }
        private let windows = Mutex<[Site: Window]>([:])

        /// Whether this warning is written, and the "suppressed" line of the window it closed, if any.
        func admit(_ site: Site, now: UInt64, name: StaticString) -> (Bool, String?) {
            windows.withLock { w -> (Bool, String?) in
                var closed: String?
                var win = w[site] ?? Window(start: now, count: 0, suppressed: 0, name: "\(name):\(site.line)")
                if now &- win.start >= Log.rateLimitIntervalNs {
                    if win.suppressed > 0 { closed = RateLimiter.summary(win) }
                    win.start = now; win.count = 0; win.suppressed = 0
                }
                let allowed = win.count < Log.rateLimitBurst
                if allowed { win.count += 1 } else { win.suppressed += 1 }
                w[site] = win
                return (allowed, closed)
            }
        }

        func expired(now: UInt64) -> [String] {
            windows.withLock { w -> [String] in
                var lines: [String] = []
                for (site, win) in w where now &- win.start >= Log.rateLimitIntervalNs {
                    if win.suppressed > 0 { lines.append(RateLimiter.summary(win)) }
                    w[site] = nil
                }
                return lines
            }
        }

        func reset() { windows.withLock { $0.removeAll() } }

        static func summary(_ win: Window) -> String {
            "suppressed \(win.suppressed) similar message\(win.suppressed == 1 ? "" : "s") (\(win.name)) in the last \(Log.rateLimitIntervalNs / 1_000_000_000) s"
        }
    }
}
