import Glibc
import CLinux

/// What epoll reported for a host fd, typed: readable, writable, hang-up (the peer closed; after the data left
/// is read, nothing more comes), error. A handler decodes its `events` with `IOEvents(epoll:)`.
public struct IOEvents: OptionSet, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let readable = IOEvents(rawValue: 1)
    public static let writable = IOEvents(rawValue: 2)
    public static let hangUp = IOEvents(rawValue: 4)
    public static let error = IOEvents(rawValue: 8)

    @inline(__always)
    public init(epoll e: UInt32) {
        var v: UInt8 = 0
        if e & UInt32(LB_EPOLLIN) != 0 { v |= 1 }
        if e & UInt32(LB_EPOLLOUT) != 0 { v |= 2 }
        if e & UInt32(LB_EPOLLHUP | LB_EPOLLRDHUP) != 0 { v |= 4 }
        if e & UInt32(LB_EPOLLERR) != 0 { v |= 8 }
        rawValue = v
    }
    /// epoll's mask for interest in `self` (hang-up and error are always reported).
    public var epollMask: UInt32 {
        var m: UInt32 = 0
        if contains(.readable) { m |= UInt32(LB_EPOLLIN | LB_EPOLLRDHUP) }
        if contains(.writable) { m |= UInt32(LB_EPOLLOUT) }
        return m
    }
}

/// A one-shot or periodic timer on the event loop (a timerfd): devices that run on a clock (sound periods,
/// input key repeat, retries) and control-plane timeouts. `fire` runs on the loop thread.
public final class LoopTimer: EventHandler {
    private let loop: EventLoop
    private let fd: FileRef
    private var registration = -1
    private var periodNs: UInt64 = 0
    private let fire: (LoopTimer) -> Void
    /// Expirations so far (a periodic timer that fell behind counts every period it missed).
    public private(set) var expirations: UInt64 = 0

    /// Creates the timer (disarmed) on `loop`; call on the loop thread.
    public init(loop: EventLoop, fire: @escaping (LoopTimer) -> Void) throws(Errno) {
        self.loop = loop
        self.fire = fire
        fd = FileRef(adopting: try syscall(.timerfd) { lb_timerfd() })
        registration = try loop.register(fd: fd.raw, handler: self, token: 0)
    }

    /// Fires once after `ns` (0 disarms).
    public func arm(afterNs ns: UInt64) {
        periodNs = 0
        _ = lb_timerfd_arm(fd.raw, ns)
    }

    /// Fires every `ns` from now (0 disarms).
    public func arm(everyNs ns: UInt64) {
        periodNs = ns
        _ = lb_timerfd_arm_periodic(fd.raw, ns)
    }

    public func disarm() { arm(afterNs: 0) }

    /// Unregisters from the loop (the loop keeps a registered handler alive); the fd closes with the object.
    public func cancel() {
        guard registration >= 0 else { return }
        disarm()
        loop.unregister(fd: fd.raw, registration: registration)
        registration = -1
    }

    public func handleEvent(token: UInt32, events: UInt32) {
        let n = FD.drain(fd.raw)   // a timerfd read gives the number of expirations
        guard n > 0 else { return }
        expirations &+= n
        fire(self)
    }
}
