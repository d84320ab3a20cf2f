import Glibc
import CLinux
import Transport

/// A real vhost-user peer run as a child process (qemu-storage-daemon, vhost-device-vsock, …), its output in `log`.
class PeerProcess {
    let binary: String
    let arguments: [String]
    let log: String
    private(set) var pid: pid_t = -1
    private(set) var starts = 0

    init(binary: String, arguments: [String], log: String) {
        self.binary = binary; self.arguments = arguments; self.log = log
    }

    /// posix_spawn with stdin from /dev/null and stdout+stderr appended to `log`, an empty signal mask and default
    /// stop signals: the child must not inherit a mask that blocks SIGTERM (the daemon's runner, run in-process by
    /// an earlier test in the same executable, blocks SIGTERM/SIGINT/SIGHUP on the main thread for its signalfd and
    /// leaves them blocked; qsd would then ignore `stop(SIGTERM)` until the SIGKILL 5 s later).
    func start() throws {
        precondition(pid < 0, "already running")
        var fa = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&fa)
        defer { posix_spawn_file_actions_destroy(&fa) }
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for sig in [SIGTERM, SIGINT, SIGHUP, SIGPIPE] { sigaddset(&defaults, sig) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&fa, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&fa, 1, 2)
        let args = [binary] + arguments
        var argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var p: pid_t = 0
        let r = posix_spawn(&p, binary, &fa, &attr, &argv, environ)
        guard r == 0 else { throw DeviceError("posix_spawn \(binary): \(Errno(r))") }
        pid = p
        starts += 1
    }

    /// Sends `signal` and reaps the child; returns the wait status.
    @discardableResult
    func stop(_ signal: Int32 = SIGTERM) -> Int32 {
        guard pid > 0 else { return 0 }
        kill(pid, signal)
        var status: Int32 = 0
        // SIGTERM: a peer exits promptly; escalate if it does not within 5 s.
        let end = lb_now_ns() + 5_000_000_000
        while waitpid(pid, &status, WNOHANG) == 0 {
            if lb_now_ns() > end { kill(pid, SIGKILL); waitpid(pid, &status, 0); break }
            usleep(5_000)
        }
        pid = -1
        return status
    }

    var isAlive: Bool {
        guard pid > 0 else { return false }
        var status: Int32 = 0
        return waitpid(pid, &status, WNOHANG) == 0
    }

    var logText: String {
        let fd = open(log, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "" }
        defer { close(fd) }
        var b = [UInt8](repeating: 0, count: 16 << 10)
        let n = b.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        return n > 0 ? String(decoding: b[0..<n], as: UTF8.self) : ""
    }
}

