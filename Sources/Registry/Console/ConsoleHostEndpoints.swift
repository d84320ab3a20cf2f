import Glibc
import CLinux
import Transport

/// epoll: edge-triggered readiness (a read or write that returned EAGAIN is retried on the next edge).
private let epollET: UInt32 = 1 << 31
private let TIOCGWINSZ: UInt = 0x5413
private let FIONREAD: UInt = 0x541B

/// One endpoint fd's events to its owner (an endpoint has up to three: listener, client, or stdin + stdout).
private final class FDWatch: EventHandler {
    unowned(unsafe) let owner: HostEndpoint
    let fd: Int32
    var registration = -1
    init(owner: HostEndpoint, fd: Int32) { self.owner = owner; self.fd = fd }
    func handleEvent(token: UInt32, events: UInt32) { owner.event(token: token, IOEvents(epoll: events)) }
}

/// The common part of the real endpoints: fd watching and non-blocking readv/writev.
public class HostEndpoint: ConsoleEndpoint {
    public var description: String { "" }
    public var isConnected: Bool { true }
    public var windowSize: (cols: UInt16, rows: UInt16)? { nil }
    unowned(unsafe) var delegate: ConsoleEndpointDelegate?
    var port = 0
    weak var loop: EventLoop?
    fileprivate var watches: [FDWatch] = []

    public func start(loop: EventLoop, port: Int, delegate: ConsoleEndpointDelegate) throws(DeviceError) {
        guard self.loop == nil else { return }
        self.loop = loop
        self.port = port
        self.delegate = delegate
        try startWatching()
    }
    func startWatching() throws(DeviceError) {}
    public func stop() {
        for w in watches { unwatch(w) }
        watches = []
        delegate = nil
    }
    deinit { for w in watches { unwatch(w) } }

    /// Watches `fd` (edge-triggered in, out, hang-up unless `levelIn`); `token` comes back in `event`.
    fileprivate func watch(_ fd: Int32, token: UInt32, levelIn: Bool = false) throws(Errno) -> FDWatch {
        let w = FDWatch(owner: self, fd: fd)
        let ev = levelIn ? UInt32(LB_EPOLLIN) : (UInt32(LB_EPOLLIN | LB_EPOLLOUT | LB_EPOLLRDHUP) | epollET)
        w.registration = try loop!.register(fd: fd, events: ev, handler: w, token: token)
        watches.append(w)
        return w
    }
    fileprivate func unwatch(_ w: FDWatch) {
        guard w.registration >= 0 else { return }
        loop?.unregister(fd: w.fd, registration: w.registration)
        w.registration = -1
        watches.removeAll { $0 === w }
    }

    func event(token: UInt32, _ e: IOEvents) {
        // Raw bits: an option-set literal would build an array per event in unoptimized builds.
        if e.rawValue & IOEvents.writable.rawValue != 0 { delegate?.endpointWritable(port) }
        if e.rawValue & (IOEvents.readable.rawValue | IOEvents.hangUp.rawValue | IOEvents.error.rawValue) != 0 {
            delegate?.endpointReadable(port)
        }
    }

    public func read(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO { .wouldBlock }
    public func write(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO { .wouldBlock }

    /// readv: EOF or a lost connection is `.closed` when `eofCloses`, else no data.
    static func readv(_ fd: Int32, _ iov: UnsafeMutablePointer<iovec>, _ count: Int, eofCloses: Bool) -> EndpointIO {
        while true {
            let n = Glibc.readv(fd, iov, Int32(count))
            if n > 0 { return .bytes(n) }
            if n == 0 { return eofCloses ? .closed : .wouldBlock }
            switch errno {
            case EINTR: continue
            case EAGAIN: return .wouldBlock
            case EIO: return .wouldBlock          // a pty master whose slave is not open
            default: return eofCloses ? .closed : .wouldBlock
            }
        }
    }
    static func writev(_ fd: Int32, _ iov: UnsafeMutablePointer<iovec>, _ count: Int, socket: Bool) -> EndpointIO {
        while true {
            let n: Int
            if socket {
                var m = msghdr()
                m.msg_iov = iov
                m.msg_iovlen = count
                n = Glibc.sendmsg(fd, &m, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            } else {
                n = Glibc.writev(fd, iov, Int32(count))
            }
            if n > 0 { return .bytes(n) }
            if n == 0 { return .wouldBlock }
            switch errno {
            case EINTR: continue
            case EAGAIN: return .wouldBlock
            default: return .closed
            }
        }
    }
}

/// A pseudo-terminal: loopbackd holds the master and keeps a slave descriptor open (raw mode), so the port never
/// hangs up and output waits in the pty for whoever opens the slave (`screen`, `minicom`, a test's `cat`). The
/// slave path is logged and optionally symlinked at `link`. The terminal size comes from the pty (F_SIZE).
public final class PtyEndpoint: HostEndpoint {
    public let master: FileRef
    let slave: FileRef
    public let path: String
    let link: String?
    public override var description: String { "pty \(path)" }

    public init(link: String?) throws(DeviceError) {
        // /dev/ptmx directly (glibc's posix_openpt/grantpt are not in Swift's Glibc module; grantpt is a no-op on
        // devpts): unlock (TIOCSPTLCK 0), the number (TIOCGPTN), the slave (TIOCGPTPEER, Linux 4.13+).
        var m = Glibc.open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK)
        if m < 0 && errno == ENOENT { m = Glibc.open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK) }
        guard m >= 0 else { throw DeviceError("open /dev/ptmx: \(Errno.current)") }
        master = FileRef(adopting: m)
        var unlock: Int32 = 0, number: UInt32 = 0
        guard lb_ioctl_ptr(m, 0x4004_5431, &unlock) == 0, lb_ioctl_ptr(m, 0x8004_5430, &number) == 0 else {
            throw DeviceError("pty unlock: \(Errno.current)")
        }
        path = "/dev/pts/\(number)"
        var s = lb_ioctl_val(m, 0x5441, UInt(O_RDWR | O_NOCTTY | O_CLOEXEC))
        if s < 0 { s = Glibc.open(path, O_RDWR | O_NOCTTY | O_CLOEXEC) }
        guard s >= 0 else { throw DeviceError("open \(path): \(Errno.current)") }
        slave = FileRef(adopting: s)
        // Raw: bytes pass unchanged both ways (no echo, no CR/LF mapping, no line editing).
        var t = termios()
        if tcgetattr(s, &t) == 0 { cfmakeraw(&t); _ = tcsetattr(s, TCSANOW, &t) }
        if let link {
            var st = stat()
            if lstat(link, &st) == 0 {
                guard st.st_mode & S_IFMT == S_IFLNK else { throw DeviceError("pty link \(link) exists and is not a symlink") }
                unlink(link)
            }
            guard symlink(path, link) == 0 else { throw DeviceError("symlink \(link) -> \(path): \(Errno.current)") }
        }
        self.link = link
        super.init()
    }
    deinit { if let link { unlink(link) } }

    override func startWatching() throws(DeviceError) {
        do { _ = try watch(master.raw, token: 0) } catch { throw DeviceError("pty: cannot watch \(path): \(error)") }
        Log.info("console: port \(port): pty \(path)" + (link.map { " (link \($0))" } ?? ""))
    }
    public override func read(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO {
        HostEndpoint.readv(master.raw, iov, count, eofCloses: false)
    }
    public override func write(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO {
        let r = HostEndpoint.writev(master.raw, iov, count, socket: false)
        return r == .closed ? .wouldBlock : r
    }
    public override var windowSize: (cols: UInt16, rows: UInt16)? {
        var ws = winsize()
        guard lb_ioctl_ptr(master.raw, TIOCGWINSZ, &ws) == 0 else { return nil }
        return (ws.ws_col, ws.ws_row)
    }
}

/// A listening unix stream socket: one client at a time (a second one is refused: accepted and closed, with a
/// warning). The port is connected while a client is.
public final class UnixEndpoint: HostEndpoint {
    let listener: FileRef
    public let path: String
    private var client: FileRef?
    private var clientWatch: FDWatch?
    /// Clients refused because one was connected.
    public private(set) var refused = 0
    public override var description: String { "unix:\(path)" }
    public override var isConnected: Bool { client != nil }

    public init(path: String) throws(DeviceError) {
        let fd = lb_unix_listen(path, 4, 0o600)
        guard fd >= 0 else { throw DeviceError("cannot listen on \(path): \(Errno.current)") }
        listener = FileRef(adopting: fd)
        self.path = path
        super.init()
    }
    deinit { unlink(path) }

    override func startWatching() throws(DeviceError) {
        do { _ = try watch(listener.raw, token: 1, levelIn: true) } catch { throw DeviceError("cannot watch \(path): \(error)") }
    }

    override func event(token: UInt32, _ e: IOEvents) {
        guard token == 1 else {
            // Peer fully gone with nothing left to read: report now (a read would only say so later).
            if e.contains(.hangUp) || e.contains(.error), let c = client {
                var n: Int32 = 0
                if lb_ioctl_ptr(c.raw, FIONREAD, &n) != 0 || n == 0 { drop(); delegate?.endpointConnection(port, connected: false); return }
            }
            super.event(token: token, e)
            return
        }
        let fd = lb_unix_accept(listener.raw)
        guard fd >= 0 else {
            if errno != EAGAIN { Log.warning("console: accept on \(path): \(Errno.current)") }
            return
        }
        guard client == nil else {
            refused += 1
            Log.warning("console: \(path): a client is already connected; refused another")
            FD.close(fd)
            return
        }
        client = FileRef(adopting: fd)
        do { clientWatch = try watch(fd, token: 2) } catch {
            Log.warning("console: \(path): cannot watch the client: \(error)")
            client = nil
            return
        }
        delegate?.endpointConnection(port, connected: true)
    }

    private func drop() {
        if let w = clientWatch { unwatch(w) }
        clientWatch = nil
        client = nil
    }

    public override func read(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO {
        guard let c = client else { return .closed }
        let r = HostEndpoint.readv(c.raw, iov, count, eofCloses: true)
        if r == .closed { drop() }
        return r
    }
    public override func write(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO {
        guard let c = client else { return .closed }
        let r = HostEndpoint.writev(c.raw, iov, count, socket: true)
        if r == .closed { drop() }
        return r
    }
}

/// loopbackd's own stdin and stdout (made non-blocking). End of input stops input; output never drops.
public final class StdioEndpoint: HostEndpoint {
    public override var description: String { "stdio" }
    private var inputEnded = false
    public override init() { super.init() }
    override func startWatching() throws(DeviceError) {
        _ = lb_set_nonblocking(0)
        _ = lb_set_nonblocking(1)
        // A regular file or /dev/null cannot be watched (EPERM): always ready, nothing to wait for.
        _ = try? watch(0, token: 0)
        _ = try? watch(1, token: 1)
    }
    public override func read(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO {
        guard !inputEnded else { return .wouldBlock }
        let r = HostEndpoint.readv(0, iov, count, eofCloses: true)
        if r == .closed { inputEnded = true; return .wouldBlock }
        return r
    }
    public override func write(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO {
        let r = HostEndpoint.writev(1, iov, count, socket: false)
        return r == .closed ? .wouldBlock : r
    }
    public override var windowSize: (cols: UInt16, rows: UInt16)? {
        guard isatty(1) == 1 else { return nil }
        var ws = winsize()
        guard lb_ioctl_ptr(1, TIOCGWINSZ, &ws) == 0 else { return nil }
        return (ws.ws_col, ws.ws_row)
    }
}

/// An append-only log file: output only. A write error is logged once and the output dropped (a full disk must
/// not stall the driver's console).
public final class FileEndpoint: HostEndpoint {
    let file: FileRef
    public let path: String
    private var failed = false
    public override var description: String { "file:\(path)" }
    public init(path: String) throws(DeviceError) {
        let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o640)
        guard fd >= 0 else { throw DeviceError("cannot open \(path): \(Errno.current)") }
        file = FileRef(adopting: fd)
        self.path = path
        super.init()
    }
    public override func write(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO {
        var total = 0
        for i in 0..<count { total += iov[i].iov_len }
        let r = HostEndpoint.writev(file.raw, iov, count, socket: false)
        if case .bytes = r { return r }
        if !failed { failed = true; Log.error("console: \(path): write failed (\(Errno.current)); output dropped") }
        return .bytes(max(total, 1))
    }
}
