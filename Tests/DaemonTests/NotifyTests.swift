import XCTest
import Glibc
import Synchronization
@testable import Daemon
@testable import Registry
@testable import Transport
import CLinux

/// The systemd service protocol against a datagram socket playing systemd, and the journal-aware log sink.
final class NotifyTests: XCTestCase {
    /// A bound SOCK_DGRAM socket: what systemd's notify socket is. Messages come with their arrival time.
    final class FakeSystemd {
        let fd: Int32
        let address: String   // as $NOTIFY_SOCKET says it
        private let path: String?
        init(abstract: Bool = false) {
            let s = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            precondition(s >= 0)
            let name = "loopbackd-notify-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            var a = sockaddr_un()
            a.sun_family = sa_family_t(AF_UNIX)
            let bytes: [UInt8] = abstract ? [0] + Array(name.utf8) : Array("/tmp/\(name).sock".utf8)
            withUnsafeMutableBytes(of: &a.sun_path) { p in for (i, b) in bytes.enumerated() { p[i] = b } }
            let len = socklen_t(MemoryLayout<sockaddr_un>.offset(of: \sockaddr_un.sun_path)! + bytes.count + (abstract ? 0 : 1))
            let r = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, len) } }
            precondition(r == 0, "bind: \(Errno.current)")
            fd = s
            path = abstract ? nil : "/tmp/\(name).sock"
            address = abstract ? "@" + name : path!
        }
        deinit { close(fd); if let path { unlink(path) } }

        /// The next message within `timeoutMs`, or nil.
        func receive(timeoutMs: Int32) -> String? {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, timeoutMs) == 1 else { return nil }
            var buf = [UInt8](repeating: 0, count: 4096)
            let n = recv(fd, &buf, buf.count, 0)
            guard n > 0 else { return nil }
            return String(decoding: buf[0..<n], as: UTF8.self)
        }
        /// Waits for a message containing `needle`; returns every message seen on the way (including it).
        func wait(for needle: String, timeoutMs: Int32) -> [String]? {
            let deadline = now() + UInt64(timeoutMs) * 1_000_000
            var seen: [String] = []
            while now() < deadline {
                guard let m = receive(timeoutMs: Int32((deadline - now()) / 1_000_000) + 1) else { continue }
                seen.append(m)
                if m.contains(needle) { return seen }
            }
            return nil
        }
        /// Every message arriving within `ms`.
        func collect(ms: Int32) -> [String] {
            let deadline = now() + UInt64(ms) * 1_000_000
            var seen: [String] = []
            while now() < deadline {
                if let m = receive(timeoutMs: max(1, Int32((deadline &- now()) / 1_000_000))) { seen.append(m) }
            }
            return seen
        }
    }

    static func now() -> UInt64 { var ts = timespec(); clock_gettime(CLOCK_MONOTONIC, &ts); return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec) }
    func now() -> UInt64 { NotifyTests.now() }

    func tmpConfig(_ text: String) -> String {
        let path = "/tmp/loopbackd-notify-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).conf"
        let fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0o600)
        var t = text
        t.withUTF8 { _ = write(fd, $0.baseAddress, $0.count) }
        close(fd)
        addTeardownBlock { unlink(path) }
        return path
    }

    /// Runs the daemon's Runner on its own thread (its stop signals blocked there, so SIGTERM goes to it with
    /// pthread_kill). `env` is set for the run and removed afterwards.
    final class RunnerThread: @unchecked Sendable {
        var tid = pthread_t()
        let started = Atomic<Bool>(false)
        let status = Atomic<Int32>(-1)
        var thread: Transport.Thread?
        init(configPath: String) throws {
            let config = try DaemonConfig.load(path: configPath)
            let options = try Options.parse(["-c", configPath])
            let box = UncheckedSendable((config, options))
            thread = Transport.Thread.spawn { [self] in
                tid = pthread_self()
                started.store(true, ordering: .releasing)
                let (c, o) = box.value
                status.store(Runner(config: c, options: o).run(), ordering: .releasing)
            }
            while !started.load(ordering: .acquiring) { usleep(1000) }
        }
        func terminate() { pthread_kill(tid, SIGTERM) }
        func join() -> Int32 { thread?.join(); thread = nil; return status.load(ordering: .acquiring) }
    }

    func withEnvironment<T>(_ env: [String: String], _ body: () throws -> T) rethrows -> T {
        for (k, v) in env { setenv(k, v, 1) }
        defer { for k in env.keys { unsetenv(k) } }
        return try body()
    }

    // MARK: the address and the environment

    func testAddressForms() {
        XCTAssertNil(SystemdNotify(address: ""))
        XCTAssertNil(SystemdNotify(address: "relative/path"))
        XCTAssertNil(SystemdNotify(address: "/" + String(repeating: "x", count: 200)))
        let path = FakeSystemd(), abstract = FakeSystemd(abstract: true)
        for s in [path, abstract] {
            guard let n = SystemdNotify(address: s.address) else { return XCTFail("\(s.address) refused") }
            XCTAssertTrue(n.send("STATUS=hello"))
            XCTAssertEqual(s.receive(timeoutMs: 1000), "STATUS=hello", s.address)
        }
    }

    func testWatchdogEnvironment() {
        XCTAssertEqual(SystemdNotify.watchdogMicroseconds(usec: "2000000", pid: nil), 2_000_000)
        XCTAssertEqual(SystemdNotify.watchdogMicroseconds(usec: "2000000", pid: "\(getpid())"), 2_000_000)
        XCTAssertNil(SystemdNotify.watchdogMicroseconds(usec: "2000000", pid: "1"))   // meant for another process
        XCTAssertNil(SystemdNotify.watchdogMicroseconds(usec: "2000000", pid: "x"))
        XCTAssertNil(SystemdNotify.watchdogMicroseconds(usec: "0", pid: nil))
        XCTAssertNil(SystemdNotify.watchdogMicroseconds(usec: nil, pid: nil))
        XCTAssertNil(SystemdNotify.watchdogMicroseconds(usec: "-5", pid: nil))
    }

    // MARK: readiness, status, stopping (the daemon's Runner)

    /// transport "none", one served device: READY=1 with STATUS arrives only once the vhost-user socket accepts
    /// connections; SIGTERM gives STOPPING=1 before the daemon exits.
    func testReadyOnlyWhenListeningThenStoppingOnSIGTERM() throws {
        let sd = FakeSystemd()
        let sock = "/tmp/loopbackd-notify-srv-\(getpid()).sock"
        unlink(sock)
        defer { unlink(sock) }
        let conf = tmpConfig("[daemon]\ntransport = \"none\"\nlog-level = \"error\"\n[device.srv0]\ntype = \"rng\"\nserve = \"\(sock)\"\n")
        try withEnvironment(["NOTIFY_SOCKET": sd.address]) {
            let r = try RunnerThread(configPath: conf)
            guard let msgs = sd.wait(for: "READY=1", timeoutMs: 5000) else {
                r.terminate(); _ = r.join(); return XCTFail("no READY=1")
            }
            // Listening at the moment readiness was announced.
            let c = lb_unix_connect(sock, 0)
            XCTAssertGreaterThanOrEqual(c, 0, "READY=1 before the socket listens")
            if c >= 0 { close(c) }
            let ready = msgs.last!
            XCTAssertTrue(ready.contains("STATUS="), ready)
            XCTAssertTrue(ready.contains("srv0 (rng, serve \(sock))"), ready)
            XCTAssertTrue(ready.contains("transport none"), ready)
            XCTAssertFalse(ready.contains("\n\n"))
            r.terminate()
            XCTAssertNotNil(sd.wait(for: "STOPPING=1", timeoutMs: 3000), "no STOPPING=1 on SIGTERM")
            XCTAssertEqual(r.join(), 0)
        }
    }

    /// A device forwarded to a vhost-user backend that appears only 800 ms after start: READY=1 must wait for it
    /// (the device is bound only once the backend accepted the ring set-up).
    func testReadyWaitsForLateBackend() throws {
        let sd = FakeSystemd()
        let sock = "/tmp/loopbackd-notify-be-\(getpid()).sock"
        unlink(sock)
        defer { unlink(sock) }
        let conf = tmpConfig("[daemon]\ntransport = \"sim\"\nlog-level = \"error\"\n[device.fwd0]\ntype = \"rng\"\nbackend = \"vhost-user:\(sock)\"\n")
        try withEnvironment(["NOTIFY_SOCKET": sd.address]) {
            let t0 = now()
            let r = try RunnerThread(configPath: conf)
            XCTAssertNil(sd.wait(for: "READY=1", timeoutMs: 800), "READY=1 while the backend is absent")
            // The backend: this process's own vhost-user server on a loop of its own.
            let loop = try EventLoop()
            loop.startThread()
            let host = DeviceHost(loop: loop)
            let server = VhostUserBackendServer(socketPath: sock, host: host, name: "be", device: RngDevice())
            let started: Errno? = loop.executeAndWait { () -> Errno? in do throws(Errno) { try server.start(); return nil } catch { return error } }
            XCTAssertNil(started)
            defer { loop.executeAndWait { server.stop(); host.shutdown() }; loop.stopAndJoin() }
            let msgs = sd.wait(for: "READY=1", timeoutMs: 6000)
            XCTAssertNotNil(msgs, "no READY=1 after the backend appeared")
            XCTAssertGreaterThan(now() - t0, 800_000_000)
            XCTAssertTrue(msgs?.last?.contains("fwd0 (rng via vhost-user \(sock))") ?? false, "\(msgs ?? [])")
            r.terminate()
            XCTAssertNotNil(sd.wait(for: "STOPPING=1", timeoutMs: 3000))
            XCTAssertEqual(r.join(), 0)
        }
    }

    /// A start-up failure: no READY, a STATUS line saying why, exit status 1 (systemd's Restart=on-failure).
    func testFailedStartSaysWhyAndNeverReady() throws {
        let sd = FakeSystemd()
        let conf = tmpConfig("[daemon]\ntransport = \"none\"\nlog-level = \"error\"\n[device.srv0]\ntype = \"rng\"\nserve = \"/nonexistent-dir/x.sock\"\n")
        try withEnvironment(["NOTIFY_SOCKET": sd.address]) {
            let r = try RunnerThread(configPath: conf)
            XCTAssertEqual(r.join(), 1)
            let msgs = sd.collect(ms: 100)
            XCTAssertFalse(msgs.contains { $0.contains("READY=1") }, "\(msgs)")
            XCTAssertTrue(msgs.contains { $0.hasPrefix("STATUS=failed: ") && $0.contains("srv0") }, "\(msgs)")
        }
    }

    // MARK: watchdog

    /// WATCHDOG=1 from the loop thread every interval; none while the loop is blocked; again once it turns.
    func testWatchdogPingsStopWhileLoopIsBlocked() throws {
        let sd = FakeSystemd()
        let loop = try EventLoop()
        loop.startThread()
        defer { loop.stopAndJoin() }
        let w = LoopWatchdog(loop: loop, notify: SystemdNotify(address: sd.address)!, intervalNs: 50_000_000)
        let err: Errno? = loop.executeAndWait { () -> Errno? in do throws(Errno) { try w.start(); return nil } catch { return error } }
        XCTAssertNil(err)
        // 1 s at 50 ms: ~20 pings (a loaded 2-CPU machine may be late, never early).
        let running = sd.collect(ms: 1000)
        XCTAssertTrue(running.allSatisfy { $0 == "WATCHDOG=1" }, "\(running)")
        XCTAssertGreaterThanOrEqual(running.count, 12, "too few pings: \(running.count)")
        XCTAssertLessThanOrEqual(running.count, 22, "too many pings: \(running.count)")
        // Block the loop thread for 1 s: after at most one ping already under way, silence.
        loop.execute { usleep(1_000_000) }
        usleep(100_000)
        _ = sd.collect(ms: 50)
        let blocked = sd.collect(ms: 700)
        XCTAssertEqual(blocked.count, 0, "pings while the loop was blocked: \(blocked.count)")
        // Unblocked: pings resume.
        XCTAssertNotNil(sd.wait(for: "WATCHDOG=1", timeoutMs: 1000), "pings did not resume")
        let after = sd.collect(ms: 500)
        XCTAssertGreaterThanOrEqual(after.count, 5)
        loop.executeAndWait { w.stop() }
        _ = sd.collect(ms: 60)
        XCTAssertEqual(sd.collect(ms: 200).count, 0, "pings after stop")
    }

    /// The daemon pings at half of $WATCHDOG_USEC, and not at all when $WATCHDOG_PID names another process.
    func testDaemonWatchdogFromEnvironment() throws {
        let sock = "/tmp/loopbackd-notify-wd-\(getpid()).sock"
        let conf = tmpConfig("[daemon]\ntransport = \"none\"\nlog-level = \"error\"\n[device.srv0]\ntype = \"rng\"\nserve = \"\(sock)\"\n")
        defer { unlink(sock) }
        for (pid, expectPings) in [("\(getpid())", true), ("1", false)] {
            let sd = FakeSystemd()
            try withEnvironment(["NOTIFY_SOCKET": sd.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": pid]) {
                let r = try RunnerThread(configPath: conf)
                XCTAssertNotNil(sd.wait(for: "READY=1", timeoutMs: 5000))
                let msgs = sd.collect(ms: 1000)
                let pings = msgs.filter { $0 == "WATCHDOG=1" }.count
                if expectPings {
                    XCTAssertGreaterThanOrEqual(pings, 6, "every 100 ms: \(pings) in 1 s")
                    XCTAssertLessThanOrEqual(pings, 12, "every 100 ms: \(pings) in 1 s")
                } else {
                    XCTAssertEqual(pings, 0, "WATCHDOG_PID=1 is another process")
                }
                r.terminate()
                XCTAssertEqual(r.join(), 0)
            }
        }
    }

    // MARK: the log sink

    /// Captures what `Log` writes while `body` runs.
    func captureLog(journal: Bool, _ body: () -> Void) -> [String] {
        var p: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&p), 0)
        let (savedFD, savedJournal, savedLevel) = (Log.outputFD, Log.journal, Log.level)
        Log.outputFD = p[1]; Log.journal = journal; Log.level = .debug
        body()
        Log.outputFD = savedFD; Log.journal = savedJournal; Log.level = savedLevel
        close(p[1])
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true { let n = read(p[0], &buf, buf.count); if n <= 0 { break }; out += buf[0..<n] }
        close(p[0])
        return String(decoding: out, as: UTF8.self).split(separator: "\n").map(String.init)
    }

    func testJournalPriorityPrefixes() {
        let lines = captureLog(journal: true) {
            Log.error("e1"); Log.warning("w1"); Log.info("i1"); Log.debug("d1")
        }
        XCTAssertEqual(lines, ["<3>error: e1", "<4>warning: w1", "<6>info: i1", "<7>debug: d1"])
        let plain = captureLog(journal: false) { Log.error("e1"); Log.info("i1") }
        XCTAssertEqual(plain, ["loopbackd: error: e1", "loopbackd: info: i1"])
    }

    /// $JOURNAL_STREAM counts only when it names the stream stderr actually is (device and inode).
    func testJournalStreamDetection() {
        let path = "/tmp/loopbackd-journal-\(getpid())"
        let fd = open(path, O_CREAT | O_RDWR, 0o600)
        defer { close(fd); unlink(path) }
        var st = stat()
        XCTAssertEqual(fstat(fd, &st), 0)
        XCTAssertTrue(Log.isJournalStream("\(st.st_dev):\(st.st_ino)", fd: fd))
        XCTAssertFalse(Log.isJournalStream("\(st.st_dev):\(st.st_ino + 1)", fd: fd))
        XCTAssertFalse(Log.isJournalStream(nil, fd: fd))
        XCTAssertFalse(Log.isJournalStream("garbage", fd: fd))
        XCTAssertFalse(Log.isJournalStream("\(st.st_dev):\(st.st_ino):1", fd: fd))
    }

    /// 25 identical warnings from one site: `rateLimitBurst` written, the rest counted; another site is not
    /// affected; errors are never suppressed.
    func testWarningsRateLimitedPerSite() {
        Log.resetRateLimits()
        defer { Log.resetRateLimits() }
        let lines = captureLog(journal: false) {
            for i in 0..<25 { Log.warning("flood \(i)") }
            Log.warning("other site")
            for _ in 0..<15 { Log.error("every error") }
        }
        XCTAssertEqual(lines.filter { $0.contains("flood") }.count, Log.rateLimitBurst, "\(lines)")
        XCTAssertEqual(lines.filter { $0.contains("other site") }.count, 1)
        XCTAssertEqual(lines.filter { $0.contains("every error") }.count, 15)
    }

    /// When the window ends the suppressed count is reported once, on the next warning from the site or by
    /// `flushSuppressed` (the daemon calls it every second).
    func testSuppressedCountReportedWhenWindowEnds() {
        let rl = Log.RateLimiter()
        let site = Log.Site(file: 1, line: 7)
        let t0: UInt64 = 1_000_000_000
        var written = 0
        for _ in 0..<30 { if rl.admit(site, now: t0, name: "X.swift").0 { written += 1 } }
        XCTAssertEqual(written, Log.rateLimitBurst)
        XCTAssertEqual(rl.expired(now: t0 + Log.rateLimitIntervalNs - 1), [])
        // Next warning after the window: the summary comes first, then the warning itself is written.
        let (allowed, summary) = rl.admit(site, now: t0 + Log.rateLimitIntervalNs, name: "X.swift")
        XCTAssertTrue(allowed)
        XCTAssertEqual(summary, "suppressed 20 similar messages (X.swift:7) in the last 10 s")
        // A flood that ends: flushSuppressed-style report once the window is over, then nothing more.
        for _ in 0..<12 { _ = rl.admit(site, now: t0 + Log.rateLimitIntervalNs + 1, name: "X.swift") }   // 9 written, 3 not
        let flushed = rl.expired(now: t0 + 2 * Log.rateLimitIntervalNs + 1)
        XCTAssertEqual(flushed, ["suppressed 3 similar messages (X.swift:7) in the last 10 s"])
        XCTAssertEqual(rl.expired(now: t0 + 5 * Log.rateLimitIntervalNs), [])
    }
}
