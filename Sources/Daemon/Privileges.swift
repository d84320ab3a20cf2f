import Glibc
import CLinux
import Transport
import Registry

/// Least privilege after start-up (`[daemon] user`, `[daemon] seccomp`): called by the runner once the driver
/// side is open and mapped and every configured device is open and bound or listening, before READY=1.
/// The C side (drop, filter, SIGSYS log line) is Sources/CLinux/privdrop.c.
enum Privileges {
    /// The test hook's variable: "1" makes the loop thread call a system call outside the allow-list once the
    /// filter is in (the guest case loopbackd-privdrop checks the log line and the death by SIGSYS).
    static let testViolationVariable = "LOOPBACKD_TEST_SECCOMP_VIOLATION"

    /// Drops to the configured user, then installs the filter. Returns an error message, or nil.
    static func apply(_ c: DaemonConfig, loop: EventLoop) -> String? {
        if let a = c.user {
            // Started as that user already (a service manager's User=): only capabilities and no_new_privs.
            let change: Int32 = getuid() == a.uid && geteuid() == a.uid && getgid() == a.gid && getegid() == a.gid ? 0 : 1
            var step: UnsafePointer<CChar>?
            let groups = a.groups.map { gid_t($0) }
            let r = groups.withUnsafeBufferPointer { lb_drop_privileges(change, a.uid, a.gid, $0.baseAddress, $0.count, &step) }
            if r != 0 {
                let e = Errno.current
                return "user = \"\(a.name)\": \(step.map { String(cString: $0) } ?? "drop"): \(e)"
            }
            Log.info("running as \(a.name) (uid \(a.uid), gid \(a.gid), groups \(a.groups.map(String.init).joined(separator: ","))) with no capabilities and no_new_privs")
        }
        switch c.seccomp {
        case .off: break
        case .kill, .log:
            let n = lb_seccomp_allowed_count()
            guard lb_seccomp_install(c.seccomp == .kill ? Int32(LB_SECCOMP_KILL) : Int32(LB_SECCOMP_LOG), Log.journal ? 1 : 0) == 0 else {
                return "seccomp = \"\(c.seccomp.rawValue)\": \(Errno.current)"
            }
            Log.info(c.seccomp == .kill
                ? "seccomp: \(n) system calls allowed; any other kills the process (SIGSYS, logged)"
                : "seccomp: \(n) system calls allowed; the kernel logs any other and lets it run (seccomp = \"log\")")
        }
        if let v = getenv(testViolationVariable), String(cString: v) == "1" {
            Log.warning("\(testViolationVariable)=1: test hook: the loop thread makes a system call outside the allow-list (syslog)")
            loop.execute { _ = lb_seccomp_test_violation() }
        }
        return nil
    }
}
