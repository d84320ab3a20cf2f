import Glibc
import CLinux
import Transport
import Registry

/// `loopbackd ab`: the same device type and workload through two paths in one run, interleaved in rounds:
/// (a) in-process: the device body runs on loopbackd's own event loop;
/// (b) socket: the requests go through loopbackd's vhost-user frontend to a backend (by default this binary's own
///     backend server in a child process, running the same device body; or `--socket`).
/// The driver side (ABDriver.choose) is the Linux kernel's own driver through the virtio-loopback module
/// (ABKernel.swift: two kernel devices, driven from user space through /dev/hwrng or /dev/vdX), or the simulated
/// driver. Both paths use queue depth 1, so each sample is one full round trip. Throughput mode (`--depth`, `--size`,
/// `--seconds`; simulated driver only) keeps N requests in flight on each path instead (`DepthRunner`).
enum AB {
    static func run(_ config: DaemonConfig, _ o: Options) -> Int32 {
        guard let name = o.device, let d = config.devices.first(where: { $0.name == name }) else {
            printErr("loopbackd: error: ab needs --device NAME, one of: \(config.devices.map(\.name).joined(separator: ", "))")
            return 2
        }
        guard DeviceRegistry.standard.types[d.type]?.workload != nil else {
            printErr("loopbackd: error: ab: no workload for type \(d.type)")
            return 2
        }
        let driver = ABDriver.choose(config, requested: o.driver)
        if driver == .virtioLo && o.throughput {
            printErr("loopbackd: error: ab --driver virtio-lo measures queue depth 1 latency only: depth N through the kernel's "
                     + "driver needs io_uring or Linux AIO on its node from user space (not implemented); --depth, --size and "
                     + "--seconds work with --driver sim")
            return 2
        }
        if o.restricted && (driver != .virtioLo || o.relay || o.direct || o.socket != nil) {
            printErr("loopbackd: error: ab --restricted compares full and restricted memory through the kernel module: "
                     + "only with --driver virtio-lo, not with --socket, --relay or --direct")
            return 2
        }
        let pollUs = o.poll ? Bench.pollWindowUs : 0
        var child: pid_t = 0
        let socket = o.socket ?? "/tmp/loopbackd-ab-\(getpid()).sock"
        defer {
            if child > 0 { kill(child, SIGTERM); var st: Int32 = 0; waitpid(child, &st, 0); unlink(socket) }
        }
        if o.socket == nil && !o.restricted {
            switch spawnBackend(config: config, device: name, socket: socket, poll: o.poll) {
            case .success(let pid): child = pid
            case .failure(let e): printErr("loopbackd: error: ab: \(e)"); return 1
            }
        }
        do throws(DeviceError) {
            switch driver {
            case .sim: return try runSim(d, o, socket: socket, pollUs: pollUs)
            case .virtioLo: return try runKernel(d, config, o, socket: socket, pollUs: pollUs)
            }
        } catch {
            printErr("loopbackd: error: ab: \(error)")
            return 1
        }
    }

    /// Driver side = the simulated driver: one loop per path, each with its own simulated driver.
    static func runSim(_ d: DeviceConfig, _ o: Options, socket: String, pollUs: Int) throws(DeviceError) -> Int32 {
        let loopA: EventLoop, loopB: EventLoop
        do { loopA = try EventLoop(pollMicroseconds: pollUs); loopB = try EventLoop(pollMicroseconds: pollUs) } catch { throw DeviceError("event loop: \(error)") }
        let hostA = DeviceHost(loop: loopA), hostB = DeviceHost(loop: loopB)
        let ia = hostA.add(name: d.name, device: try d.make())
        let ib = hostB.add(name: d.name, device: try makeFrontend(d, socket: socket, loop: loopB, relay: o.relay, replay: !o.direct && !o.relay))
        loopA.startThread(); loopB.startThread()
        defer {
            loopA.executeAndWait { hostA.shutdown() }; loopA.stopAndJoin()
            loopB.executeAndWait { hostB.shutdown() }; loopB.stopAndJoin()
        }
        let da: SimDriver, db: SimDriver
        do { da = try SimDriver(host: hostA, index: ia, ramSize: simRAM(o)); db = try SimDriver(host: hostB, index: ib, ramSize: simRAM(o)) }
        catch { throw DeviceError("\(error)") }
        let queues = workloadQueueCount(type: d.type)
        try da.start(queueCount: queues)
        try db.start(queueCount: queues)
        defer { da.reset(); db.reset() }
        guard let wa = makeWorkload(type: d.type, driver: da, verify: false),
              let wb = try socketSideWorkload(d, o, driver: db) else { throw DeviceError("no workload") }
        if o.throughput, let va = wa as? VsockWorkload, let vb = wb as? VsockWorkload {
            return compareVsockFlow(va, vb, d, o)
        }
        if o.throughput {
            return try compareThroughput(makeRunner(wa, o, type: d.type), makeRunner(wb, o, type: d.type), d, o, pollUs: pollUs)
        }
        let status = try compare(wa, wb, d, o, driver: .sim, pollUs: pollUs, socket: socket)
        if let sa = wa as? SoundWorkload, let sb = wb as? SoundWorkload {
            return max(status, compareStream(sa, sb, d, o))
        }
        return status
    }

    /// Throughput mode on a vsock device: for each direction (driver → host sink, host source → driver, both ways
    /// through a host echo), `rounds` runs per path alternating which goes first, each on a fresh connection of
    /// `--seconds / rounds` (default 1 s per run), with `--depth` packets of `--size` bytes (default 8 of 64 KiB) in
    /// flight at most and the device's credit respected (`VsockWorkload.flow`).
    static func compareVsockFlow(_ wa: VsockWorkload, _ wb: VsockWorkload, _ d: DeviceConfig, _ o: Options) -> Int32 {
        let depth = o.depth ?? 8, size = o.size ?? 65536
        guard o.plot == nil else { printErr("loopbackd: error: ab: --plot draws requests, not vsock flows (a table and JSON only)"); return 2 }
        guard size > 0, size <= 65536 else { printErr("loopbackd: error: ab: a vsock packet is 1 to 65536 bytes (--size)"); return 2 }
        let perRun = o.seconds.map { Double($0) / Double(o.rounds) } ?? 1.0
        var rows: [String] = [], json: [String] = [], errors = 0
        if !o.json {
            print("loopbackd ab: device \(d.name) (vsock), driver sim, flows of \(fmt2(perRun)) s x \(o.rounds) rounds per path and direction, up to \(depth) packets of \(size) bytes in flight within the device's credit")
            print("socket backend: \(backendText(o))")
            print("direction  path       to_host_MB/s  to_driver_MB/s  credit_stalls  errors")
        }
        for mode in VsockFlow.allCases {
            var sum = [VsockFlowResult(), VsockFlowResult()]
            for r in 0..<o.rounds {
                for path in (r % 2 == 0 ? [0, 1] : [1, 0]) {
                    let x = (path == 0 ? wa : wb).flow(mode, seconds: perRun, depth: depth, size: size)
                    sum[path].toHost &+= x.toHost; sum[path].toDriver &+= x.toDriver; sum[path].elapsedNs &+= x.elapsedNs
                    sum[path].errors += x.errors; sum[path].creditStalls += x.creditStalls
                }
            }
            var objs: [String] = []
            for (n, k) in [("inproc", 0), ("socket", 1)] {
                let s = sum[k], t = Double(max(s.elapsedNs, 1))
                let up = Double(s.toHost) * 1000 / t, down = Double(s.toDriver) * 1000 / t
                errors += s.errors
                rows.append(pad(mode.rawValue, 10, left: true) + " " + pad(n, 8, left: true) + pad(fmt2(up), 14) + pad(fmt2(down), 16)
                            + pad(String(s.creditStalls), 15) + pad(String(s.errors), 8))
                objs.append("\"\(n)\": {\"to_host_mbps\": \(fmt2(up)), \"to_driver_mbps\": \(fmt2(down)), \"to_host_bytes\": \(s.toHost), \"to_driver_bytes\": \(s.toDriver), \"elapsed_ns\": \(s.elapsedNs), \"credit_stalls\": \(s.creditStalls), \"errors\": \(s.errors)}")
            }
            if !o.json { for r in rows.suffix(2) { print(r) } }
            json.append("\"\(mode.rawValue)\": {" + objs.joined(separator: ", ") + "}")
        }
        print("{\"device\": \"\(d.name)\", \"driver\": \"sim\", \"mode\": \"vsock-flow\", \"depth\": \(depth), \"size\": \(size), \"relay\": \(o.relay), \"direct\": \(o.direct), \"flows\": {" + json.joined(separator: ", ") + "}, \"errors\": \(errors)}")
        return errors == 0 ? 0 : 1
    }

    /// The stream phase of a sound device (after its control round trips): a playback stream on each path per
    /// round (alternating which goes first), every I/O message's completion timed against its due time on the
    /// stream clock (`SoundWorkload.stream`). What a stream needs from the path is punctual completions, not
    /// round trips: lateness (completion − due) and jitter (|interval between completions − one period|).
    static let streamPeriodFrames = 240, streamQueued = 4, streamPeriodsPerRound = 400
    static func compareStream(_ wa: SoundWorkload, _ wb: SoundWorkload, _ d: DeviceConfig, _ o: Options) -> Int32 {
        var late: [[Int64]] = [[], []], jit: [[Int64]] = [[], []], errors = [0, 0]
        for r in 0..<o.rounds {
            for path in (r % 2 == 0 ? [0, 1] : [1, 0]) {
                let run = (path == 0 ? wa : wb).stream(periods: streamPeriodsPerRound, periodFrames: streamPeriodFrames, queued: streamQueued)
                late[path] += run.lateness; jit[path] += run.jitter; errors[path] += run.errors
            }
        }
        func pct(_ v: [Int64], _ p: Double) -> Int64 { v.isEmpty ? 0 : v[min(v.count - 1, Int(Double(v.count) * p))] }
        func us(_ ns: Int64) -> String { ns < 0 ? "-" + micro(UInt64(-ns)) : micro(UInt64(ns)) }
        for k in 0..<2 { late[k].sort(); jit[k].sort() }
        let periodUs = Double(streamPeriodFrames) * 1e6 / 48000
        if !o.json {
            print("stream: playback 48 kHz S16_LE stereo, \(streamPeriodFrames)-frame periods (\(fmt2(periodUs / 1000)) ms), \(streamQueued) queued, \(o.rounds) rounds x \(streamPeriodsPerRound) periods per path; lateness = completion - due on the stream clock (from START's submission)")
            print("path     late_p50_us late_p99_us late_max_us jitter_p50_us jitter_p99_us jitter_max_us  periods  errors")
            for (n, k) in [("inproc", 0), ("socket", 1)] {
                print(pad(n, 8, left: true) + pad(us(pct(late[k], 0.5)), 12) + pad(us(pct(late[k], 0.99)), 12) + pad(us(late[k].last ?? 0), 12)
                      + pad(us(pct(jit[k], 0.5)), 14) + pad(us(pct(jit[k], 0.99)), 14) + pad(us(jit[k].last ?? 0), 14)
                      + pad(String(late[k].count), 9) + pad(String(errors[k]), 8))
            }
        }
        func js(_ k: Int) -> String {
            "{\"periods\": \(late[k].count), \"late_p50_ns\": \(pct(late[k], 0.5)), \"late_p99_ns\": \(pct(late[k], 0.99)), \"late_max_ns\": \(late[k].last ?? 0), "
                + "\"jitter_p50_ns\": \(pct(jit[k], 0.5)), \"jitter_p99_ns\": \(pct(jit[k], 0.99)), \"jitter_max_ns\": \(jit[k].last ?? 0), \"errors\": \(errors[k])}"
        }
        print("{\"device\": \"\(d.name)\", \"driver\": \"sim\", \"mode\": \"stream\", \"period_frames\": \(streamPeriodFrames), \"queued\": \(streamQueued), \"paths\": {\"inproc\": \(js(0)), \"socket\": \(js(1))}, \"errors\": \(errors[0] + errors[1])}")
        let expected = o.rounds * streamPeriodsPerRound
        return errors[0] + errors[1] == 0 && late[0].count == expected && late[1].count == expected ? 0 : 1
    }

    static func backendText(_ o: Options) -> String {
        (o.socket == nil ? "loopbackd ab-serve (child process, same device body)" : o.socket!)
            + (o.relay ? "; kicks and interrupts relayed through loopbackd, no shadow ring (original adapter path)"
               : o.direct ? "; kicks and interrupts straight between driver and backend (reconnect = reset)"
               : "; kicks and interrupts pass loopbackd, backend reads its shadow avail ring (reconnect = replay)")
    }
    static func pathText(_ o: Options) -> String { o.relay ? "--relay" : o.direct ? "--direct" : "default path" }

    /// Throughput mode (simulated driver): warm-up, then `rounds` rounds per path alternating which goes first, each
    /// `requests / rounds` requests or `seconds / rounds` seconds with `depth` requests in flight.
    static func compareThroughput(_ ra: DepthRunner, _ rb: DepthRunner, _ d: DeviceConfig, _ o: Options,
                                  pollUs: Int) throws(DeviceError) -> Int32 {
        let spin = UInt64(pollUs) * 1000
        let perRound = max(o.requests / o.rounds, 100)
        let perRoundS = o.seconds.map { Double($0) / Double(o.rounds) }
        for r in [ra, rb] {
            _ = runPhase(r, requests: max(perRound / 10, 2 * r.depth), seconds: perRoundS.map { $0 / 10 }, spinNs: spin)
            r.resetCounters()
        }
        var ta: UInt64 = 0, tb: UInt64 = 0
        for round in 0..<o.rounds {
            for path in (round % 2 == 0 ? [0, 1] : [1, 0]) {
                let e = runPhase(path == 0 ? ra : rb, requests: perRound, seconds: perRoundS, spinNs: spin)
                if path == 0 { ta += e } else { tb += e }
            }
        }
        let a = ThroughputStats(ra, elapsedNs: ta), b = ThroughputStats(rb, elapsedNs: tb)
        let errors = a.errors + b.errors
        let ratio = a.iops > 0 ? b.iops / a.iops : 0
        let amount = perRoundS.map { "\(fmt2($0)) s" } ?? "\(perRound) requests"
        let mode = o.poll ? "busy-poll \(pollUs) us" : "notifications"
        if !o.json {
            print("loopbackd ab: device \(d.name) (\(d.type)), driver sim, \(o.rounds) rounds x \(amount) per path, throughput at queue depth \(a.depth), \(a.size)-byte requests, \(mode)")
            print("socket backend: \(backendText(o))")
            print("path       depth     size      MB/s      IOPS   p50_us   p99_us   max_us  errors")
            for (n, s) in [("inproc", a), ("socket", b)] {
                print(pad(n, 8, left: true) + pad(String(s.depth), 7) + " " + pad(String(s.size), 8) + " " + pad(fmt2(s.mbps), 9)
                      + " " + pad(String(Int(s.iops)), 9) + " " + pad(micro(s.p50), 8) + " " + pad(micro(s.p99), 8)
                      + " " + pad(micro(s.max), 8) + " " + pad(String(s.errors), 7))
            }
            print("ratio socket/inproc IOPS: \(fmt2(ratio))   errors: \(errors)")
        }
        print("{\"device\": \"\(d.name)\", \"driver\": \"sim\", \"poll\": \(o.poll), \"relay\": \(o.relay), \"direct\": \(o.direct), \"mode\": \"throughput\", \"paths\": {\"inproc\": \(a.json), \"socket\": \(b.json)}, \"ratio_iops\": \(fmt2(ratio)), \"errors\": \(errors)}")
        if let path = o.plot {
            let svg = Plot.throughput(
                title: "loopbackd ab \(d.name) (\(d.type)): in-process vs socket, queue depth \(a.depth)",
                subtitle: "simulated driver, \(a.size)-byte requests, \(o.rounds) rounds x \(amount) per path, \(mode), socket: \(pathText(o)); MB/s = 10^6 bytes/s",
                bars: [Plot.Bar(label: "inproc", mbps: a.mbps, iops: a.iops), Plot.Bar(label: "socket", mbps: b.mbps, iops: b.iops)],
                series: [Plot.cdf("inproc", samples: a.requests, quantile: { ra.histogram.percentile($0) }),
                         Plot.cdf("socket", samples: b.requests, quantile: { rb.histogram.percentile($0) })])
            try Plot.write(svg, to: path)
        }
        return errors == 0 ? 0 : 1
    }

    /// Warm-up, then `rounds` rounds of `requests / rounds` requests per path, alternating which path goes first;
    /// prints the table (unless --json) and the JSON line. Returns the exit status.
    static func compare(_ wa: RoundTrip, _ wb: RoundTrip, _ d: DeviceConfig, _ o: Options, driver: ABDriver, pollUs: Int,
                        socket: String, targets: (String, String)? = nil,
                        labels: (String, String) = ("inproc", "socket")) throws(DeviceError) -> Int32 {
        let (la, lb) = labels
        let spin = UInt64(pollUs) * 1000
        let perRound = max(o.requests / o.rounds, 100)
        var sa: [UInt64] = [], sb: [UInt64] = []
        sa.reserveCapacity(perRound * o.rounds); sb.reserveCapacity(perRound * o.rounds)
        var ta: UInt64 = 0, tb: UInt64 = 0, errors = 0
        // Warm-up.
        try wa.beginPhase()
        for _ in 0..<perRound / 10 { _ = wa.runOne(spinNs: spin) }
        try wb.beginPhase()
        for _ in 0..<perRound / 10 { _ = wb.runOne(spinNs: spin) }
        for r in 0..<o.rounds {
            // Alternate which path goes first, so drift in the machine's state hits both alike.
            for path in (r % 2 == 0 ? [0, 1] : [1, 0]) {
                let w = path == 0 ? wa : wb
                try w.beginPhase()
                let (samples, elapsed, e) = timeRoundTrips(w, count: perRound, spinNs: spin)
                errors += e
                if path == 0 { sa += samples; ta += elapsed } else { sb += samples; tb += elapsed }
            }
        }
        let a = LatencyStats(samples: &sa, elapsedNs: ta), b = LatencyStats(samples: &sb, elapsedNs: tb)
        let ratio = a.p50 > 0 ? Double(b.p50) / Double(a.p50) : 0
        let backend = backendText(o)
        if !o.json {
            print("loopbackd ab: device \(d.name) (\(d.type)), driver \(driver.rawValue), \(o.rounds) rounds x \(perRound) requests per path, queue depth 1, \(o.poll ? "busy-poll \(pollUs) us" : "notifications")")
            if !o.restricted { print("socket backend: \(backend)") }
            if let (ka, kb) = targets { print("kernel devices: \(la) \(ka), \(lb) \(kb)") }
            print("path        p50_us   p90_us   p99_us  p99.9_us   max_us    req/s")
            for (n, s) in [(la, a), (lb, b)] {
                print(pad(n, 10, left: true) + pad(micro(s.p50), 8) + " " + pad(micro(s.p90), 8) + " " + pad(micro(s.p99), 8)
                      + " " + pad(micro(s.p999), 9) + " " + pad(micro(s.max), 8) + " " + pad(String(Int(s.rps)), 8))
            }
            print("ratio \(lb)/\(la) p50: \(fmt2(ratio))   errors: \(errors)")
        }
        let kernel = targets.map { ", \"kernel\": {\"\(la)\": \"\($0.0)\", \"\(lb)\": \"\($0.1)\"}" } ?? ""
        print("{\"device\": \"\(d.name)\", \"driver\": \"\(driver.rawValue)\", \"poll\": \(o.poll), \"relay\": \(o.relay), \"direct\": \(o.direct)\(kernel), \"paths\": {\"\(la)\": \(a.json), \"\(lb)\": \(b.json)}, \"ratio_p50\": \(fmt2(ratio)), \"errors\": \(errors)}")
        if let path = o.plot {
            // LatencyStats sorted sa and sb.
            let svg = Plot.latency(
                title: "loopbackd ab \(d.name) (\(d.type)): in-process vs socket round trips, queue depth 1",
                subtitle: "driver \(driver.rawValue), \(o.rounds) rounds x \(perRound) requests per path, \(o.poll ? "busy-poll \(pollUs) us" : "notifications"), socket: \(pathText(o))",
                series: [Plot.cdf(la, samples: sa.count, quantile: Plot.sortedQuantile(sa)),
                         Plot.cdf(lb, samples: sb.count, quantile: Plot.sortedQuantile(sb))])
            try Plot.write(svg, to: path)
        }
        return errors == 0 ? 0 : 1
    }

    /// Starts `loopbackd ab-serve` (this same binary) and waits until its socket accepts connections.
    static func spawnBackend(config: DaemonConfig, device: String, socket: String, poll: Bool) -> Result<pid_t, DeviceError> {
        var exe = [CChar](repeating: 0, count: 4096)
        var n = readlink("/proc/self/exe", &exe, 4095)
        if n <= 0, let a0 = lb_argv()?[0] { strncpy(&exe, a0, 4095); n = Int(strlen(&exe)) }
        guard n > 0 else { return .failure(DeviceError("cannot find this executable's path")) }
        let path = String(decoding: exe[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        guard config.file.hasPrefix("/") || access(config.file, R_OK) == 0, config.file != "(embedded default)" else {
            return .failure(DeviceError("ab needs -c FILE (the child reads the same file)"))
        }
        var args = [path, "ab-serve", "-c", config.file, "--device", device, "--socket", socket, "--log-level", "warning"]
        if poll { args.append("--poll") }
        unlink(socket)
        var cargs: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        var pid: pid_t = 0
        let r = posix_spawn(&pid, path, nil, nil, &cargs, environ)
        guard r == 0 else { return .failure(DeviceError("posix_spawn \(path): \(Errno(r))")) }
        for _ in 0..<300 {
            let fd = lb_unix_connect(socket, 0)
            if fd >= 0 { FD.close(fd); return .success(pid) }
            var st: Int32 = 0
            if waitpid(pid, &st, WNOHANG) == pid { return .failure(DeviceError("backend child exited (status \(st))")) }
            usleep(10_000)
        }
        kill(pid, SIGTERM)
        return .failure(DeviceError("backend child did not listen on \(socket) within 3 s"))
    }

    /// The child's uds-path for a vsock device: its own (the in-process side listens on the configured one).
    static func childUdsPath(_ p: String) -> String { p + ".ab" }

    /// The socket side's workload. A vsock's host end is found through the device body, which on this side runs in
    /// another process: the workload is given the back-end's hybrid vsock path (the child's, or --uds-path for a
    /// back-end of --socket such as vhost-device-vsock) and the guest CID from the file.
    static func socketSideWorkload(_ d: DeviceConfig, _ o: Options, driver: SimDriver) throws(DeviceError) -> Workload? {
        guard d.type == "vsock" else { return makeWorkload(type: d.type, driver: driver, verify: false) }
        let path: String
        if let p = o.udsPath { path = p }
        else if o.socket == nil, let p = d.string("uds-path") { path = childUdsPath(p) }
        else { throw DeviceError("ab --socket with a vsock device needs --uds-path (the back-end's hybrid vsock path)") }
        guard let cid = d.integer("guest-cid"), cid >= 3 else { throw DeviceError("\(d.name): no guest-cid in the file") }
        return VsockWorkload(driver, hostPath: path, guestCID: UInt64(cid))
    }

    /// The child: serve one device body on the socket until SIGTERM or the parent's death.
    static func serve(_ config: DaemonConfig, _ o: Options) -> Int32 {
        _ = lb_die_with_parent()
        guard let name = o.device, let socket = o.socket, var d = config.devices.first(where: { $0.name == name }) else {
            printErr("loopbackd: ab-serve needs --device and --socket"); return 2
        }
        if d.type == "vsock", let p = d.string("uds-path") {
            do { d = try d.replacing("uds-path", with: .string(childUdsPath(p)), file: config.file) }
            catch { printErr("loopbackd: error: \(error)"); return 1 }
        }
        let sigfd = lb_signalfd_stop_signals()
        guard sigfd >= 0, let loop = try? EventLoop(pollMicroseconds: o.poll ? Bench.pollWindowUs : 0) else { return 1 }
        let host = DeviceHost(loop: loop)
        let device: VirtioDevice
        do { device = try d.make() } catch { printErr("loopbackd: error: \(error)"); return 1 }
        loop.startThread()
        let r = loop.executeAndWait { () -> Result<VhostUserBackendServer, DeviceError> in
            do throws(DeviceError) { return .success(try startServer(host: host, name: name, device: device, path: socket)) }
            catch { return .failure(error) }
        }
        guard case .success(let server) = r else { printErr("loopbackd: error: \(r)"); loop.stopAndJoin(); return 1 }
        var p = pollfd(fd: sigfd, events: Int16(POLLIN), revents: 0)
        while poll(&p, 1, -1) <= 0 {}
        loop.executeAndWait { server.stop(); host.shutdown() }
        loop.stopAndJoin()
        return 0
    }
}
