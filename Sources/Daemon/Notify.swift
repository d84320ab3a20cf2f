import Glibc
import CLinux
import Transport
import Registry

// The systemd service protocol, natively (sd_notify(3), sd_watchdog_enabled(3); no libsystemd, which Debian ships
// shared only): datagrams of "KEY=VALUE" lines to the socket named by $NOTIFY_SOCKET.

/// A datagram socket to the service manager's notify socket: a path, or an abstract name written `@name`.
public final class SystemdNotify: @unchecked Sendable {
    /// $NOTIFY_SOCKET as given.
    public let address: String
    private let fd: Int32
    private var addr = sockaddr_un()
    private let addrLen: socklen_t

    /// nil when `address` is not an absolute path or `@name` that fits a unix address, or socket(2) fails.
    public init?(address: String) {
        let bytes = Array(address.utf8)
        guard bytes.count >= 2, bytes[0] == UInt8(ascii: "/") || bytes[0] == UInt8(ascii: "@"),
              !bytes.contains(0) else { return nil }
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity else { return nil }
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in bytes.enumerated() { p[i] = b }
            if bytes[0] == UInt8(ascii: "@") { p[0] = 0 }   // abstract namespace: leading NUL, no terminator
        }
        let pathOffset = MemoryLayout<sockaddr_un>.offset(of: \sockaddr_un.sun_path)!
        // Abstract names are exactly their bytes long; a path includes its terminating NUL.
        addrLen = socklen_t(pathOffset + bytes.count + (bytes[0] == UInt8(ascii: "@") ? 0 : 1))
        let s = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { return nil }
        fd = s
        self.address = address
    }
    deinit { FD.close(fd) }

    /// From $NOTIFY_SOCKET; nil when loopbackd does not run under a service manager that asked for notifications.
    public static func fromEnvironment() -> SystemdNotify? {
        guard let v = getenv("NOTIFY_SOCKET") else { return nil }
        return SystemdNotify(address: String(cString: v))
    }

    /// Sends one notification ("READY=1", "STATUS=…", several lines joined by "\n"); never blocks.
    @discardableResult
    public func send(_ state: String) -> Bool {
        var s = state
        return s.withUTF8 { buf -> Bool in
            withUnsafePointer(to: &addr) { a in
                a.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                    var r: Int
                    repeat { r = sendto(fd, buf.baseAddress, buf.count, Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL), sa, addrLen) }
                    while r < 0 && errno == EINTR
                    return r == buf.count
                }
            }
        }
    }

    /// sd_watchdog_enabled(3): the watchdog timeout in microseconds when $WATCHDOG_USEC is set (and positive) and
    /// $WATCHDOG_PID, if set, is this process; else nil.
    public static func watchdogMicroseconds(usec: String?, pid: String?, myPID: Int32 = getpid()) -> UInt64? {
        guard let usec, let us = UInt64(usec), us > 0 else { return nil }
        if let pid { guard let p = Int32(pid), p == myPID else { return nil } }
        return us
    }

    public static func watchdogMicrosecondsFromEnvironment() -> UInt64? {
        watchdogMicroseconds(usec: getenv("WATCHDOG_USEC").map { String(cString: $0) },
                             pid: getenv("WATCHDOG_PID").map { String(cString: $0) })
    }
}

/// WATCHDOG=1 sent by the event loop thread itself, every `intervalNs`: a one-shot timerfd registered on the loop
/// and re-armed by its handler. A loop that stops turning (a handler stuck, a deadlock) stops the pings, and
/// systemd kills and restarts the service after WatchdogSec=.
public final class LoopWatchdog: EventHandler {
    public let intervalNs: UInt64
    private let notify: SystemdNotify
    private let loop: EventLoop
    private var timer: FileRef?
    private var registration = -1
    /// Pings sent (loop thread).
    public private(set) var pings = 0

    public init(loop: EventLoop, notify: SystemdNotify, intervalNs: UInt64) {
        self.loop = loop; self.notify = notify; self.intervalNs = max(intervalNs, 1_000_000)
    }

    /// Loop thread: sends the first ping and arms the timer.
    public func start() throws(Errno) {
        let t = FileRef(adopting: try syscall(.timerfd) { lb_timerfd() })
        registration = try loop.register(fd: t.raw, handler: self, token: 0)
        timer = t
        ping()
    }

    /// Loop thread.
    public func stop() {
        guard let t = timer else { return }
        loop.unregister(fd: t.raw, registration: registration)
        timer = nil
        registration = -1
    }

    public func handleEvent(token: UInt32, events: UInt32) {
        guard let t = timer else { return }
        var expirations: UInt64 = 0
        _ = read(t.raw, &expirations, 8)
        ping()
    }

    private func ping() {
        if notify.send("WATCHDOG=1") { pings += 1 }
        if let t = timer { _ = lb_timerfd_arm(t.raw, intervalNs) }
    }
}

/// What the runner tells the service manager; every call is a no-op when not started by one (no $NOTIFY_SOCKET).
final class ServiceNotifier {
    let notify: SystemdNotify?
    private var watchdog: LoopWatchdog?

    init(notify: SystemdNotify? = SystemdNotify.fromEnvironment()) { self.notify = notify }

    /// After the loop thread started: pings at half of $WATCHDOG_USEC (sd_watchdog_enabled(3)'s advice).
    func loopStarted(_ loop: EventLoop) {
        guard let notify, let us = SystemdNotify.watchdogMicrosecondsFromEnvironment() else { return }
        let w = LoopWatchdog(loop: loop, notify: notify, intervalNs: us * 1000 / 2)
        let r = loop.executeAndWait { () -> Errno? in
            do throws(Errno) { try w.start(); return nil } catch { return error }
        }
        if let r { Log.error("watchdog timer: \(r)") } else { watchdog = w; Log.debug("watchdog: pinging every \(us / 2000) ms") }
    }

    /// Every configured device is bound (driver side started) or listening (vhost-user server).
    func ready(_ status: String) { notify?.send("READY=1\nSTATUS=\(status)") }
    func status(_ status: String) { notify?.send("STATUS=\(status)") }
    func stopping() { notify?.send("STOPPING=1\nSTATUS=stopping") }

    /// Loop thread (inside the shutdown's executeAndWait).
    func stopWatchdog() { watchdog?.stop() }

    /// The STATUS= line: every device, where it is served, and the driver side.
    static func statusLine(_ config: DaemonConfig) -> String {
        let devices = config.devices.map { d -> String in
            if let s = d.serve { return "\(d.name) (\(d.type), serve \(s))" }
            if case .vhostUser(let p) = d.backend { return "\(d.name) (\(d.type) via vhost-user \(p))" }
            return "\(d.name) (\(d.type))"
        }
        return "serving \(config.devices.count) device(s), transport \(config.transport.rawValue): " + devices.joined(separator: ", ")
    }
}
