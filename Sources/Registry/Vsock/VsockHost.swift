import Glibc
import CLinux
import Transport

/// The device side of a vsock host's events (the vsock device), on the loop thread. `conn` is the device's
/// connection slot, which the host side uses as its handle.
public protocol VsockHostDelegate: AnyObject {
    /// Host data may be readable on `conn` (or the host side closed: the next read says `.closed`).
    func hostReadable(_ conn: Int)
    /// A write to `conn` that would have blocked may succeed now.
    func hostWritable(_ conn: Int)
    /// A host program asks to reach the driver's port `port` (hybrid vsock `CONNECT P`): the device returns the
    /// slot it took for it (the host side binds its socket to it), or nil (table full: the host side closes).
    func hostConnect(toDriverPort port: UInt32) -> Int?
}

/// The host side of a vsock device: what the driver's connections to CID 2 reach, and where host programs
/// connect from. The real one is `UnixVsockHost` (hybrid vsock, the Firecracker / vhost-device-vsock convention),
/// the fake one `FakeVsockHost` (in memory, for unit tests). Reads and writes never block (edge-triggered: after
/// `.wouldBlock` the host side reports readable/writable again). Loop thread only.
public protocol VsockHost: AnyObject {
    var description: String { get }
    func start(loop: EventLoop, delegate: VsockHostDelegate) throws(DeviceError)
    func stop()
    /// The driver connects to host port `port` on slot `conn`: true when a host listener took it.
    func connect(_ conn: Int, port: UInt32) -> Bool
    /// The driver accepted the host-initiated connection on `conn` (RESPONSE): its local port is `localPort`.
    func established(_ conn: Int, localPort: UInt32)
    func read(_ conn: Int, _ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO
    func write(_ conn: Int, _ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO
    /// The driver will send no more: the host program reads end of file.
    func shutdownWrite(_ conn: Int)
    /// The connection is gone (RST, reset): close it.
    func close(_ conn: Int)
}

private let epollET: UInt32 = 1 << 31

/// Hybrid vsock over unix sockets: the driver's connection to CID 2 port P is a connection to `path_P`; a host
/// program connects to `path` and writes `CONNECT P\n` to reach the driver's listener on port P, answered
/// `OK <host port>\n` once the driver accepted (closed if it refused). One socket per connection, non-blocking,
/// watched edge-triggered with the connection slot as token.
public final class UnixVsockHost: VsockHost, EventHandler {
    public let path: String
    public var description: String { "hybrid vsock \(path)" }
    private var listener: FileRef?
    private var fds: [Int32]
    private var registrations: [Int]
    private weak var loop: EventLoop?
    private unowned(unsafe) var delegate: VsockHostDelegate?
    private var listenRegistration = -1
    /// Accepted host clients that have not yet sent their `CONNECT P` line (token = 0x8000_0000 | index).
    private var pending: [(fd: Int32, registration: Int, since: UInt64)] = []
    public static let maxPending = 16
    public static let pendingToken: UInt32 = 0x8000_0000
    private static let listenToken: UInt32 = 0xffff_ffff

    public init(path: String, capacity: Int) throws(DeviceError) {
        self.path = path
        fds = Array(repeating: -1, count: capacity)
        registrations = Array(repeating: -1, count: capacity)
        try listen()   // at start-up: a path in use is a configuration error now, not at the driver's DRIVER_OK
    }
    deinit { stop() }

    private func listen() throws(DeviceError) {
        guard listener == nil else { return }
        let fd = lb_unix_listen(path, 64, 0o600)
        guard fd >= 0 else { throw DeviceError("vsock: cannot listen on \(path): \(Errno.current)") }
        listener = FileRef(adopting: fd)
    }

    /// Listens (again) and watches the listener; host programs are served while the driver runs the device.
    public func start(loop: EventLoop, delegate: VsockHostDelegate) throws(DeviceError) {
        guard self.loop == nil else { self.delegate = delegate; return }
        try listen()
        self.loop = loop
        self.delegate = delegate
        do { listenRegistration = try loop.register(fd: listener!.raw, handler: self, token: Self.listenToken) } catch {
            throw DeviceError("vsock: cannot watch \(path): \(error)")
        }
    }

    /// Closes every connection and the listener (the socket file goes): a reset device takes no host programs.
    public func stop() {
        for c in 0..<fds.count where fds[c] >= 0 { close(c) }
        for p in pending { dropPending(p) }
        pending = []
        if let l = listener {
            if listenRegistration >= 0 { loop?.unregister(fd: l.raw, registration: listenRegistration) }
            listenRegistration = -1
            listener = nil
            unlink(path)
        }
        loop = nil
        delegate = nil
    }

    private func bind(_ conn: Int, fd: Int32) -> Bool {
        guard let loop else { FD.close(fd); return false }
        let ev = UInt32(LB_EPOLLIN | LB_EPOLLOUT | LB_EPOLLRDHUP) | epollET
        do { registrations[conn] = try loop.register(fd: fd, events: ev, handler: self, token: UInt32(conn)) } catch {
            Log.warning("vsock: cannot watch a connection: \(error)")
            FD.close(fd)
            return false
        }
        fds[conn] = fd
        return true
    }

    public func connect(_ conn: Int, port: UInt32) -> Bool {
        guard conn < fds.count, fds[conn] < 0 else { return false }
        let fd = "\(path)_\(port)".withCString { lb_unix_connect($0, 1) }
        guard fd >= 0 else { return false }   // nobody listens (ENOENT, ECONNREFUSED) or backlog full (EAGAIN)
        return bind(conn, fd: fd)
    }

    public func established(_ conn: Int, localPort: UInt32) {
        guard conn < fds.count, fds[conn] >= 0 else { return }
        // A few bytes on a fresh socket: the send buffer takes them (a client that never reads gets them anyway).
        let line = Array("OK \(localPort)\n".utf8)
        _ = line.withUnsafeBytes { lb_send_nowait(fds[conn], $0.baseAddress, $0.count) }
    }

    public func read(_ conn: Int, _ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO {
        guard conn < fds.count, fds[conn] >= 0 else { return .closed }
        while true {
            let n = Glibc.readv(fds[conn], iov, Int32(count))
            if n > 0 { return .bytes(n) }
            if n == 0 { return .closed }
            if errno == EINTR { continue }
            return errno == EAGAIN ? .wouldBlock : .closed
        }
    }

    public func write(_ conn: Int, _ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO {
        guard conn < fds.count, fds[conn] >= 0 else { return .closed }
        var m = msghdr()
        m.msg_iov = iov
        m.msg_iovlen = count
        while true {
            let n = Glibc.sendmsg(fds[conn], &m, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            if n > 0 { return .bytes(n) }
            if n == 0 { return .wouldBlock }
            if errno == EINTR { continue }
            return errno == EAGAIN ? .wouldBlock : .closed
        }
    }

    public func shutdownWrite(_ conn: Int) {
        guard conn < fds.count, fds[conn] >= 0 else { return }
        _ = Glibc.shutdown(fds[conn], Int32(SHUT_WR))
    }

    public func close(_ conn: Int) {
        guard conn < fds.count, fds[conn] >= 0 else { return }
        if registrations[conn] >= 0 { loop?.unregister(fd: fds[conn], registration: registrations[conn]) }
        registrations[conn] = -1
        FD.close(fds[conn])
        fds[conn] = -1
    }

    /// The fd of connection `conn` (tests, the workload).
    public func fd(_ conn: Int) -> Int32 { conn < fds.count ? fds[conn] : -1 }

    public func handleEvent(token: UInt32, events: UInt32) {
        if token == Self.listenToken { acceptClients(); return }
        if token & Self.pendingToken != 0 { readConnectLine(Int32(bitPattern: token & ~Self.pendingToken)); return }
        let conn = Int(token)
        guard conn < fds.count, fds[conn] >= 0 else { return }
        let e = IOEvents(epoll: events)
        if e.rawValue & IOEvents.writable.rawValue != 0 { delegate?.hostWritable(conn) }
        if e.rawValue & (IOEvents.readable.rawValue | IOEvents.hangUp.rawValue | IOEvents.error.rawValue) != 0 {
            delegate?.hostReadable(conn)
        }
    }

    private func acceptClients() {
        while true {
            guard let l = listener else { return }
            let fd = lb_unix_accept(l.raw)
            guard fd >= 0 else {
                if errno != EAGAIN { Log.warning("vsock: accept on \(path): \(Errno.current)") }
                return
            }
            if pending.count >= Self.maxPending { dropPending(pending.removeFirst()) }
            guard let loop else { FD.close(fd); return }
            do {
                let r = try loop.register(fd: fd, handler: self, token: Self.pendingToken | UInt32(bitPattern: fd))
                pending.append((fd, r, lb_now_ns()))
            } catch {
                FD.close(fd)
            }
            readConnectLine(fd)
        }
    }

    private func dropPending(_ p: (fd: Int32, registration: Int, since: UInt64)) {
        loop?.unregister(fd: p.fd, registration: p.registration)
        FD.close(p.fd)
    }

    /// Reads `CONNECT P\n` without consuming a byte after it (peek, then take exactly the line): what the
    /// client sends next is the connection's data.
    private func readConnectLine(_ fd: Int32) {
        guard let k = pending.firstIndex(where: { $0.fd == fd }) else { return }
        var buf = [UInt8](repeating: 0, count: 32)
        let n = buf.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, $0.count, Int32(MSG_PEEK) | Int32(MSG_DONTWAIT)) }
        if n < 0 && (errno == EAGAIN || errno == EINTR) { return }
        guard n > 0 else { dropPending(pending.remove(at: k)); return }
        guard let nl = buf[0..<n].firstIndex(of: 0x0a) else {
            if n == buf.count { Log.warning("vsock: \(path): a client sent no CONNECT line"); dropPending(pending.remove(at: k)) }
            return
        }
        _ = buf.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, nl + 1, Int32(MSG_DONTWAIT)) }
        let p = pending.remove(at: k)
        loop?.unregister(fd: p.fd, registration: p.registration)
        var line = buf[0..<nl]
        if line.last == 0x0d { line = line.dropLast() }
        let text = String(decoding: line, as: UTF8.self)
        let words = text.split(separator: " ")
        guard words.count == 2, words[0] == "CONNECT", let port = UInt32(words[1]) else {
            Log.warning("vsock: \(path): expected \"CONNECT <port>\", got \"\(text.prefix(32))\"")
            FD.close(fd)
            return
        }
        guard let conn = delegate?.hostConnect(toDriverPort: port), conn < fds.count, fds[conn] < 0 else { FD.close(fd); return }
        if !bind(conn, fd: fd) { Log.warning("vsock: \(path): cannot take the connection to port \(port)") }
    }
}

/// An in-memory host side for unit tests: listeners are a set of host ports, each connection has a byte ring
/// each way; `room` limits what the host takes before a write would block (a slow reader). A host program
/// connects with `connect(toDriverPort:)`.
public final class FakeVsockHost: VsockHost {
    public var description: String { "fake" }
    public final class Conn {
        public let port: UInt32
        var toDriver: ByteRing
        var fromDriver: ByteRing
        public var room = Int.max
        /// The driver shut its sending side (the host read end of file) / closed the connection.
        public internal(set) var eof = false
        public internal(set) var closed = false
        /// The host closed its side (reads report `.closed` once the bytes queued are gone).
        public internal(set) var hostClosed = false
        /// Host-initiated: `OK <port>` was answered with this local port.
        public internal(set) var okPort: UInt32?
        init(port: UInt32, capacity: Int) {
            self.port = port
            toDriver = ByteRing(capacity: capacity)
            fromDriver = ByteRing(capacity: capacity)
        }
        public var pendingToDriver: Int { toDriver.count }
        public var receivedCount: Int { fromDriver.count }
    }
    public var listening: Set<UInt32>
    public private(set) var conns: [Int: Conn] = [:]
    /// Every connection ever made (closed ones too), by slot at the time.
    public private(set) var history: [Conn] = []
    private unowned(unsafe) var delegate: VsockHostDelegate?
    public let capacity: Int
    public private(set) var writeBlocks = 0

    public init(listening: Set<UInt32> = [], capacity: Int = 8 << 20) {
        self.listening = listening
        self.capacity = capacity
    }
    public func start(loop: EventLoop, delegate: VsockHostDelegate) throws(DeviceError) { self.delegate = delegate }
    public func stop() { delegate = nil }

    public func connect(_ conn: Int, port: UInt32) -> Bool {
        guard listening.contains(port), conns[conn] == nil else { return false }
        let c = Conn(port: port, capacity: capacity)
        conns[conn] = c
        history.append(c)
        return true
    }
    /// A host program connects to the driver's `port`: the slot, or nil when the device refused.
    public func connect(toDriverPort port: UInt32) -> Int? {
        guard let slot = delegate?.hostConnect(toDriverPort: port) else { return nil }
        let c = Conn(port: port, capacity: capacity)
        conns[slot] = c
        history.append(c)
        return slot
    }
    public func established(_ conn: Int, localPort: UInt32) { conns[conn]?.okPort = localPort }

    public func read(_ conn: Int, _ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO {
        guard let c = conns[conn] else { return .closed }
        var done = 0
        for i in 0..<count {
            let n = c.toDriver.pop(into: iov[i].iov_base!, iov[i].iov_len)
            done += n
            if n < iov[i].iov_len { break }
        }
        if done > 0 { return .bytes(done) }
        return c.hostClosed ? .closed : .wouldBlock
    }
    public func write(_ conn: Int, _ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO {
        guard let c = conns[conn], !c.hostClosed else { return .closed }
        var done = 0
        for i in 0..<count where c.room > 0 {
            let want = min(iov[i].iov_len, c.room)
            let n = c.fromDriver.push(iov[i].iov_base!, want)
            done += n
            if c.room != Int.max { c.room -= n }
            if n < iov[i].iov_len { break }
        }
        if done == 0 { writeBlocks += 1; return .wouldBlock }
        return .bytes(done)
    }
    public func shutdownWrite(_ conn: Int) { conns[conn]?.eof = true }
    public func close(_ conn: Int) {
        guard let c = conns.removeValue(forKey: conn) else { return }
        c.closed = true
        c.eof = true
    }

    // The host program's side (loop thread).
    @discardableResult
    public func feed(_ conn: Int, _ bytes: [UInt8]) -> Int {
        guard let c = conns[conn] else { return 0 }
        let n = bytes.withUnsafeBytes { c.toDriver.push($0.baseAddress!, $0.count) }
        if n > 0 { delegate?.hostReadable(conn) }
        return n
    }
    public func take(_ conn: Int, max: Int = Int.max) -> [UInt8] {
        guard let c = conns[conn] else { return [] }
        var out = [UInt8](repeating: 0, count: min(c.fromDriver.count, max))
        out.withUnsafeMutableBytes { _ = c.fromDriver.pop(into: $0.baseAddress!, $0.count) }
        return out
    }
    public func setRoom(_ conn: Int, _ room: Int) {
        guard let c = conns[conn] else { return }
        c.room = room
        if room > 0 { delegate?.hostWritable(conn) }
    }
    /// The host program closes its socket.
    public func hostClose(_ conn: Int) {
        guard let c = conns[conn] else { return }
        c.hostClosed = true
        delegate?.hostReadable(conn)
    }
    /// The slot of the connection to host port `port` (driver-initiated), if open.
    public func slot(port: UInt32) -> Int? { conns.first { $0.value.port == port }?.key }
}
