import Glibc
import CLinux

/// Received file descriptors: whatever the handler does not `take` is closed when this object goes away, so no
/// error path can leak a descriptor the peer sent.
final class ReceivedFDs {
    private var fds: [Int32]
    init(_ fds: [Int32]) { self.fds = fds }
    var count: Int { fds.count }
    /// Descriptor `i`, still owned here.
    func peek(_ i: Int) -> Int32 { fds[i] }
    /// Takes ownership of descriptor `i` (the caller must close it).
    func take(_ i: Int) -> Int32 {
        let f = fds[i]
        fds[i] = -1
        return f
    }
    deinit { for f in fds where f >= 0 { FD.close(f) } }
}

/// Blocking-with-deadline message I/O over a non-blocking Unix socket, for the front-end's request/reply
/// exchanges (control plane only; every wait is a bounded poll, never a sleep).
enum VhostUserSocket {
    /// The absolute deadline (`lb_now_ns`) `timeoutMs` from now.
    static func deadline(afterMs timeoutMs: Int32) -> UInt64 { lb_now_ns() &+ UInt64(max(timeoutMs, 0)) * 1_000_000 }

    /// Sends a whole message; `fds` ride with its first byte. Waits for buffer space at most `timeoutMs`.
    static func send(_ fd: Int32, _ bytes: [UInt8], fds: [Int32] = [], timeoutMs: Int32) throws(VhostUserError) {
        try send(fd, bytes, fds: fds, deadline: deadline(afterMs: timeoutMs))
    }

    /// Sends a whole message, waiting for buffer space until `deadline` at most. `cancelFD` (an eventfd, or -1):
    /// once it is readable every wait ends at once with `.io(ECANCELED)` (a reconnect thread told to give up).
    static func send(_ fd: Int32, _ bytes: [UInt8], fds: [Int32] = [], deadline: UInt64,
                     cancelFD: Int32 = -1) throws(VhostUserError) {
        var sent = 0
        var pendingFDs = fds
        while sent < bytes.count {
            let r = bytes.withUnsafeBytes { b in
                pendingFDs.withUnsafeBufferPointer { f in
                    lb_sendmsg_fds(fd, b.baseAddress! + sent, b.count - sent, f.baseAddress, Int32(f.count))
                }
            }
            if r > 0 { sent += r; pendingFDs = []; continue }
            if r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                try wait(fd, events: 4, deadline: deadline, request: nil, cancelFD: cancelFD)
                continue
            }
            if r < 0 && (errno == EPIPE || errno == ECONNRESET) { throw .peerClosed(midMessage: false) }
            throw .io(r < 0 ? Errno.current : Errno(EIO))
        }
    }

    /// Reads exactly one message (header + payload) within `timeoutMs`; any descriptors that arrive are closed
    /// (replies and back-end requests handled here never carry one loopbackd keeps).
    static func receive(_ fd: Int32, timeoutMs: Int32, request: VhostUserRequest?) throws(VhostUserError) -> (VhostUserHeader, [UInt8]) {
        try receive(fd, deadline: deadline(afterMs: timeoutMs), request: request)
    }

    /// Reads exactly one message by `deadline`; `cancelFD` as for `send`.
    static func receive(_ fd: Int32, deadline: UInt64, request: VhostUserRequest?,
                        cancelFD: Int32 = -1) throws(VhostUserError) -> (VhostUserHeader, [UInt8]) {
        var head = [UInt8](repeating: 0, count: VhostUserHeader.byteCount)
        try readExactly(fd, &head, deadline: deadline, request: request, started: false, cancelFD: cancelFD)
        let h = head.withUnsafeBytes { VhostUserHeader(from: $0.baseAddress!) }
        guard h.flags & VhostUserHeader.versionMask == VhostUserHeader.version else { throw .badVersion(flags: h.flags) }
        guard h.size <= VhostUserHeader.maxPayload else { throw .payloadTooLarge(request: h.request, size: h.size) }
        var payload = [UInt8](repeating: 0, count: Int(h.size))
        if h.size > 0 { try readExactly(fd, &payload, deadline: deadline, request: request, started: true, cancelFD: cancelFD) }
        return (h, payload)
    }

    private static func readExactly(_ fd: Int32, _ buf: inout [UInt8], deadline: UInt64, request: VhostUserRequest?,
                                    started: Bool, cancelFD: Int32) throws(VhostUserError) {
        var have = 0
        var fds = [Int32](repeating: -1, count: 16)
        while have < buf.count {
            var n: Int32 = 0, trunc: Int32 = 0
            let r = buf.withUnsafeMutableBytes { b in
                lb_recvmsg_fds(fd, b.baseAddress! + have, b.count - have, &fds, 16, &n, &trunc)
            }
            for k in 0..<Int(n) { FD.close(fds[k]) }
            if r > 0 { have += r; continue }
            if r == 0 { throw .peerClosed(midMessage: started || have > 0) }
            if errno == EAGAIN || errno == EWOULDBLOCK {
                try wait(fd, events: 1, deadline: deadline, request: request, cancelFD: cancelFD)
                continue
            }
            if errno == ECONNRESET { throw .peerClosed(midMessage: started || have > 0) }
            throw .io(Errno.current)
        }
    }

    private static func wait(_ fd: Int32, events: Int32, deadline: UInt64, request: VhostUserRequest?,
                             cancelFD: Int32) throws(VhostUserError) {
        let now = lb_now_ns()
        guard now < deadline else { throw .timeout(request) }
        let ms = Int32(min((deadline - now + 999_999) / 1_000_000, 1000))
        guard cancelFD >= 0 else {
            let r = lb_poll_one(fd, events, ms)
            if r < 0 { throw .io(Errno.current) }
            // POLLHUP/POLLERR: the next read or write reports EOF or the error.
            return
        }
        var p = (pollfd(fd: fd, events: Int16(events), revents: 0), pollfd(fd: cancelFD, events: Int16(POLLIN), revents: 0))
        var r: Int32
        repeat {
            r = withUnsafeMutableBytes(of: &p) { poll($0.baseAddress!.assumingMemoryBound(to: pollfd.self), 2, ms) }
        } while r < 0 && errno == EINTR
        if r < 0 { throw .io(Errno.current) }
        if p.1.revents != 0 { throw .io(Errno(ECANCELED)) }
    }

    /// Non-blocking send of a whole small message; false if it could not be sent at once (peer not reading).
    static func sendNow(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { lb_send_nowait(fd, $0.baseAddress, $0.count) } == bytes.count
    }
}
