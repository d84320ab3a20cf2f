import XCTest
import Glibc
import CLinux
@testable import Daemon
@testable import Registry
import Transport

/// Least privilege after start-up: `[daemon] user` and `seccomp` (config, /etc/passwd parsing, the allow-list),
/// and the built loopbackd binary run under the filter (sim driver, every simulated device type; a forbidden call
/// logged and killed by SIGSYS). The kernel-module path is the guest case loopbackd-privdrop.
final class PrivilegeTests: XCTestCase {
    func parse(_ text: String) throws -> DaemonConfig { try DaemonConfig.parse(TOML.parse(text, file: "t.conf")) }
    let rng = "[device.r]\ntype = \"rng\"\n"

    func testKeys() throws {
        let d = try parse(rng)
        XCTAssertNil(d.user)
        XCTAssertEqual(d.seccomp, .off, "off unless configured")
        let c = try parse("[daemon]\nuser = \"root\"\nseccomp = \"kill\"\n" + rng)
        XCTAssertEqual(c.user?.uid, 0)
        XCTAssertEqual(c.user?.gid, 0)
        XCTAssertEqual(c.user?.name, "root")
        XCTAssertEqual(c.seccomp, .kill)
        XCTAssertEqual(try parse("[daemon]\nseccomp = \"log\"\n" + rng).seccomp, .log)
        XCTAssertEqual(try parse("[daemon]\nseccomp = \"off\"\n" + rng).seccomp, .off)
    }

    func testErrors() {
        func expectError(_ text: String, line: Int, _ needle: String, l: UInt = #line) {
            XCTAssertThrowsError(try parse(text), line: l) { e in
                XCTAssertEqual((e as? ConfigError)?.line, line, "\(e)", line: l)
                XCTAssertTrue("\(e)".hasPrefix("t.conf:\(line):"), "\(e)", line: l)
                XCTAssertTrue("\(e)".contains(needle), "\(e)", line: l)
            }
        }
        expectError("[daemon]\nuser = \"no-such-user-lb\"\n" + rng, line: 2, "no user \"no-such-user-lb\" in /etc/passwd")
        expectError("[daemon]\nuser = 65534\n" + rng, line: 2, "expected a string")
        expectError("[daemon]\nseccomp = \"strict\"\n" + rng, line: 2, "must be one of")
        expectError("[daemon]\nseccomp = true\n" + rng, line: 2, "expected a string")
    }

    func testPasswdAndGroupParsing() {
        let passwd = """
        root:x:0:0:root:/root:/bin/bash
        # not an entry
        broken:x:abc:1::/:/bin/sh
        loopbackd:x:998:997:loopbackd:/var/lib/loopbackd:/usr/sbin/nologin
        loopbackd2:x:1000:1000::/:/bin/sh
        """
        let group = """
        disk:x:6:loopbackd2,loopbackd
        kvm:x:104:other
        loopbackd:x:997:
        gpio:x:990:loopbackd
        bad
        """
        XCTAssertEqual(Account.lookup("loopbackd", passwd: passwd, group: group),
                       Account(name: "loopbackd", uid: 998, gid: 997, groups: [997, 6, 990]))
        XCTAssertEqual(Account.lookup("root", passwd: passwd, group: group)?.groups, [0])
        XCTAssertNil(Account.lookup("loopback", passwd: passwd, group: group), "no prefix match")
        XCTAssertNil(Account.lookup("broken", passwd: passwd, group: group), "a bad uid is no entry")
        XCTAssertNil(Account.lookup("", passwd: passwd, group: group))
    }

    func testAllowList() {
        let n = lb_seccomp_allowed_count()
        XCTAssertGreaterThan(n, 50)
        XCTAssertLessThan(n, 200)
        func nr(_ name: String) -> Int { let v = lb_syscall_number(name); XCTAssertGreaterThanOrEqual(v, 0, name); return v }
        for name in ["read", "write", "epoll_pwait", "ioctl", "io_uring_enter", "futex", "mmap", "openat", "accept4",
                     "sendmsg", "recvmsg", "exit_group", "rt_sigreturn", "restart_syscall"] {
            XCTAssertEqual(lb_seccomp_allows(nr(name)), 1, name)
        }
        // What a compromised device body would want, and the test hook's call: never allowed.
        for name in ["execve", "execveat", "ptrace", "mount", "setuid", "setresuid", "setgroups", "capset", "init_module",
                     "finit_module", "kexec_load", "bpf", "unshare", "setns", "process_vm_readv", "process_vm_writev",
                     "perf_event_open", "keyctl", "chroot", "fork", "vfork", "kill", "seccomp", "syslog"] {
            let v = lb_syscall_number(name)   // fork, vfork: not on every architecture
            if v >= 0 { XCTAssertEqual(lb_seccomp_allows(v), 0, name) }
        }
        XCTAssertEqual(String(cString: lb_syscall_name(nr("syslog"))), "syslog")
        #if arch(x86_64)
        XCTAssertEqual(nr("syslog"), 103)   // the guest case greps for this number
        XCTAssertEqual(lb_seccomp_allows(nr("epoll_wait")), 1)
        #endif
        XCTAssertNil(lb_syscall_name(100_000))
    }

    // MARK: the binary under the filter

    /// The loopbackd executable next to this test bundle (swift build builds it), or nil.
    static var binary: String? {
        var p = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &p, p.count - 1)
        guard n > 0 else { return nil }
        var path = String(decoding: p[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        // .../debug/loopbackdPackageTests.xctest (the test executable)
        path = String(path[..<path.lastIndex(of: "/")!]) + "/loopbackd"
        return access(path, X_OK) == 0 ? path : nil
    }

    /// Runs the binary; returns the wait status and its output.
    func run(_ binary: String, _ args: [String], env: [String] = [], timeout: Int = 60) -> (status: Int32, output: String) {
        let out = "/tmp/loopbackd-priv-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log"
        defer { unlink(out) }
        var fa = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&fa)
        defer { posix_spawn_file_actions_destroy(&fa) }
        posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&fa, 1, out, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&fa, 1, 2)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for sig in [SIGTERM, SIGINT, SIGHUP, SIGPIPE, SIGSYS] { sigaddset(&defaults, sig) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var argv: [UnsafeMutablePointer<CChar>?] = ([binary] + args).map { strdup($0) } + [nil]
        var envp: [UnsafeMutablePointer<CChar>?] = (["PATH=/usr/bin:/bin"] + env).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) }; envp.forEach { free($0) } }
        var pid: pid_t = 0
        guard posix_spawn(&pid, binary, &fa, &attr, &argv, &envp) == 0 else { return (-1, "spawn failed") }
        var status: Int32 = 0
        let end = lb_now_ns() + UInt64(timeout) * 1_000_000_000
        while waitpid(pid, &status, WNOHANG) == 0 {
            if lb_now_ns() > end { kill(pid, SIGKILL); waitpid(pid, &status, 0); break }
            usleep(20_000)
        }
        let text = Account.readText(out) ?? ""
        return (status, text)
    }

    func conf(dir: String, user: Bool, seccomp: String = "kill") -> String {
        """
        [daemon]
        transport = "sim"
        seccomp = "\(seccomp)"
        \(user ? "user = \"nobody\"" : "")
        control = "\(dir)/ctl.sock"

        [device.rng0]
        type = "rng"

        [device.disk0]
        type = "blk"
        path = "\(dir)/disk0.img"
        create-mib = 4
        queues = 2

        [device.con0]
        type = "console"
        console = "echo"
        ports = ["p1=unix:\(dir)/p1.sock"]

        [device.in0]
        type = "input"
        simulated = true

        [device.gpio0]
        type = "gpio"
        simulated = true

        [device.vs0]
        type = "vsock"
        guest-cid = 3
        uds-path = "\(dir)/vs.sock"

        [device.srv0]
        type = "rng"
        serve = "\(dir)/srv0.sock"

        """
    }

    func testBinaryServesUnderFilterKillsAForbiddenCallAndLogModeLetsItRun() throws {
        guard let binary = PrivilegeTests.binary else { throw XCTSkip("no loopbackd executable next to the tests (swift build first)") }
        var template = Array("/tmp/loopbackd-priv-XXXXXX".utf8CString)
        guard let d = mkdtemp(&template) else { return XCTFail("mkdtemp") }
        let dir = String(cString: d)
        chmod(dir, 0o755)
        defer { for f in ["disk0.img", "ctl.sock", "p1.sock", "vs.sock", "srv0.sock", "t.conf"] { unlink(dir + "/" + f) }; rmdir(dir) }
        let asRoot = getuid() == 0
        let confPath = dir + "/t.conf"
        var text = conf(dir: dir, user: asRoot)
        let fd = open(confPath, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o644)
        text.withUTF8 { _ = write(fd, $0.baseAddress, $0.count) }
        close(fd)

        // Serves every simulated device under the filter (and, as root, as nobody) for 3 s, then stops cleanly.
        let ok = run(binary, ["-c", confPath, "--duration", "3"])
        XCTAssertTrue(ok.status & 0x7f == 0 && (ok.status >> 8) & 0xff == 0, "status \(ok.status): \(ok.output)")
        XCTAssertTrue(ok.output.contains("system calls allowed; any other kills the process"), ok.output)
        if asRoot { XCTAssertTrue(ok.output.contains("running as nobody (uid 65534"), ok.output) }
        XCTAssertFalse(ok.output.contains("errors 1"), ok.output)
        XCTAssertTrue(ok.output.contains("stopped"), ok.output)
        XCTAssertFalse(ok.output.contains("forbidden"), ok.output)

        // The test hook: the loop thread makes a forbidden call; one line names it, the process dies of SIGSYS.
        let bad = run(binary, ["-c", confPath, "--duration", "20"], env: ["\(Privileges.testViolationVariable)=1"])
        XCTAssertEqual(bad.status & 0x7f, SIGSYS, "status \(bad.status): \(bad.output)")
        XCTAssertTrue(bad.output.contains("loopbackd: error: seccomp: forbidden system call \(lb_syscall_number("syslog")) (syslog) in thread "), bad.output)

        // seccomp = "log": the same call is let through (the kernel logs it); the daemon runs on and stops cleanly.
        text = conf(dir: dir, user: asRoot, seccomp: "log")
        let fd2 = open(confPath, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o644)
        text.withUTF8 { _ = write(fd2, $0.baseAddress, $0.count) }
        close(fd2)
        let logged = run(binary, ["-c", confPath, "--duration", "2"], env: ["\(Privileges.testViolationVariable)=1"])
        XCTAssertTrue(logged.status & 0x7f == 0 && (logged.status >> 8) & 0xff == 0, "status \(logged.status): \(logged.output)")
        XCTAssertTrue(logged.output.contains("the kernel logs any other and lets it run"), logged.output)
        XCTAssertFalse(logged.output.contains("forbidden"), logged.output)
    }
}
