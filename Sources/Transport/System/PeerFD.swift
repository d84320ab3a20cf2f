import Glibc
import CLinux

/// Checks for file descriptors a peer hands us (vhost-user SCM_RIGHTS). The peer keeps its own copy of the file
/// description, so whatever it is must be safe for the one loop thread: an eventfd where the protocol says
/// eventfd (a pipe nobody reads or a socket would block or report hang-up forever), non-blocking (a full eventfd
/// means an interrupt is already pending: EAGAIN there is success), and never a semaphore eventfd as a kick (each
/// read takes 1 from a count of up to 2^64-2: readable forever).
public enum PeerFD {
    public enum Use { case kick, call }

    /// Who shares each watched eventfd (a vhost-user connection), so a stall the watchdog broke (stallguard.c) is
    /// logged with the peer's name. Set when a connection hands over or receives an fd (control path); read only
    /// when a call was interrupted.
    private final class Owners: @unchecked Sendable {
        var lock = pthread_mutex_t()
        var names: [Int32: String] = [:]
        var logged = Set<String>()
        init() { pthread_mutex_init(&lock, nil) }
    }
    private static let owners = Owners()

    /// Records that `fd` is shared with `peer` (replaces what an earlier fd of that number was).
    public static func noteOwner(_ fd: Int32, _ peer: String) {
        guard fd >= 0 else { return }
        pthread_mutex_lock(&owners.lock); owners.names[fd] = peer; pthread_mutex_unlock(&owners.lock)
    }

    /// A `call` on `fd` blocked until the watchdog interrupted it (its peer cleared O_NONBLOCK): logged once per
    /// peer, naming it.
    static func stalled(_ fd: Int32, _ call: String) {
        pthread_mutex_lock(&owners.lock)
        let peer = owners.names[fd] ?? "an unknown peer"
        let first = owners.logged.insert(peer).inserted
        pthread_mutex_unlock(&owners.lock)
        if first {
            Log.warning("\(peer): an eventfd \(call) on fd \(fd) blocked the event loop for 50 ms (the peer cleared O_NONBLOCK on the eventfd it shares); interrupted and made non-blocking again (logged once per peer)")
        }
    }

    /// nil if `fd` is acceptable as a kick or call eventfd (it is then non-blocking), else why not.
    public static func checkEventFD(_ fd: Int32, for use: Use) -> String? {
        let k = lb_fd_kind(fd)
        guard k == Int32(LB_FD_EVENTFD) || k == Int32(LB_FD_ANON) else { return "not an eventfd (\(kindName(k)))" }
        guard lb_set_nonblocking(fd) == 0 else { return "cannot make it non-blocking: \(Errno.current)" }
        if use == .kick {
            switch lb_eventfd_is_semaphore(fd) {
            case 0: break
            case 1: return "a semaphore eventfd (EFD_SEMAPHORE) cannot carry kicks"
            default: return "not a usable eventfd: \(Errno.current)"
            }
        }
        return nil
    }

    /// nil if `fd` is a socket (the back-end request channel), else why not.
    public static func checkSocket(_ fd: Int32) -> String? {
        let k = lb_fd_kind(fd)
        return k == Int32(LB_FD_SOCKET) ? nil : "not a socket (\(kindName(k)))"
    }

    public static func kindName(_ k: Int32) -> String {
        switch k {
        case Int32(LB_FD_REGULAR): return "a regular file"
        case Int32(LB_FD_BLOCK): return "a block device"
        case Int32(LB_FD_CHAR): return "a character device"
        case Int32(LB_FD_PIPE): return "a pipe"
        case Int32(LB_FD_SOCKET): return "a socket"
        case Int32(LB_FD_DIRECTORY): return "a directory"
        case Int32(LB_FD_EVENTFD): return "an eventfd"
        case Int32(LB_FD_ANON), Int32(LB_FD_OTHER): return "another kind of file"
        default: return "fstat failed: \(Errno.current)"
        }
    }
}
