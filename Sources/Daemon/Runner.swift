import Glibc
import CLinux
import Synchronization
import Transport
import Registry

/// A driver side started by the runner: the simulated driver or the kernel link. Devices are attached and
/// detached one at a time (start-up, `loopbackd ctl add/remove`, reload), from the main thread.
protocol DriverSide: AnyObject {
    /// "sim" or "virtio-lo" (status).
    var name: String { get }
    /// Opens what the driver side needs (the module's node); attaches nothing.
    func start() throws(DeviceError)
    /// Binds host device `index`; returns driver-side counters when the driver side has some (sim).
    func attach(_ d: DeviceConfig, index: Int) throws(DeviceError) -> Counters?
    /// The driver lets go of device `index` (a hot-unplug); the host then removes it.
    func detach(index: Int) throws(DeviceError)
    /// Detaches everything (SIGTERM).
    func stop()
    func report(seconds: Double)
}

/// One device the runner started: its config, its index in the host, and how its driver reaches it.
final class RunningDevice {
    let config: DeviceConfig
    let index: Int
    /// The body as built (a `VhostUserFrontendDevice` for a forwarded device).
    let body: VirtioDevice
    /// `serve = PATH`: the vhost-user server that is its driver side.
    let server: VhostUserBackendServer?
    /// Driver-side counters (sim workload), if any.
    let driverCounters: Counters?
    init(config: DeviceConfig, index: Int, body: VirtioDevice, server: VhostUserBackendServer?, driverCounters: Counters?) {
        self.config = config; self.index = index; self.body = body; self.server = server; self.driverCounters = driverCounters
    }
}

/// Runs the configured devices until SIGTERM/SIGINT (or --duration). SIGHUP and `loopbackd ctl reload` re-read
/// the file; `ctl add`/`remove` change the running set. The main thread does every start and stop (they may
/// block: ADDDEV waits for the driver's probe), one at a time; the event loop keeps serving meanwhile.
final class Runner: @unchecked Sendable {
    /// The file as last loaded (start, reload).
    private(set) var config: DaemonConfig
    let options: Options
    /// systemd notify protocol (Notify.swift); no-ops without $NOTIFY_SOCKET.
    let service: ServiceNotifier
    private(set) var loop: EventLoop!
    private(set) var host: DeviceHost!
    private(set) var link: DriverSide?
    /// The running devices in start order. Changed only on the loop thread (inside `executeAndWait` from the main
    /// thread), so the control socket reads it on the loop without a lock.
    private(set) var devices: [RunningDevice] = []
    private var control: ControlServer?
    /// Control requests the main thread runs (add, remove, reload), and the eventfd that wakes it.
    private let ops = Mutex<[ControlJob]>([])
    private var opsFD: OwnedFD?

    init(config: DaemonConfig, options: Options, service: ServiceNotifier = ServiceNotifier()) {
        self.config = config; self.options = options; self.service = service
    }

    func run() -> Int32 {
        // Block the stop signals before any thread exists, so every thread inherits the mask and they arrive
        // only through the signalfd.
        let sigfd = lb_signalfd_stop_signals()
        guard sigfd >= 0 else { printErr("loopbackd: error: signalfd: \(Errno.current)"); return 1 }
        defer { FD.close(sigfd); _ = lb_unblock_stop_signals() }
        let loop: EventLoop
        do { loop = try EventLoop(pollMicroseconds: config.pollMicroseconds); opsFD = try FD.eventfd() } catch {
            printErr("loopbackd: error: event loop: \(error)"); return 1
        }
        self.loop = loop
        let host = DeviceHost(loop: loop)
        self.host = host
        // Build every device before starting anything: a bad file means nothing is started.
        var built: [(DeviceConfig, VirtioDevice)] = []
        for d in config.devices {
            do { built.append((d, try makeDevice(d, loop: loop))) } catch {
                printErr("loopbackd: error: device \(d.name) (\(config.file):\(d.line)): \(error)")
                return 1
            }
        }
        loop.startThread()
        service.loopStarted(loop)   // systemd: WATCHDOG=1 from the loop thread
        switch config.transport {
        case .sim: link = SimTransport(host: host)
        case .virtioLo, .vduse: link = makeKernelLink(host: host, config: config)
        case .none: link = nil
        }
        do throws(DeviceError) {
            try startControl()
            // Served devices listen first, then the driver side binds the others (as before: a served device
            // never waits for the kernel's probes).
            for (d, body) in built where d.serve != nil { try startDevice(d, body: body) }
            try link?.start()
            for (d, body) in built where d.serve == nil { try startDevice(d, body: body) }
            // Least privilege: everything the configured devices need is open, mapped and bound (Privileges.swift).
            if let e = Privileges.apply(config, loop: loop) { throw DeviceError(e) }
        } catch {
            printErr("loopbackd: error: \(error)")
            service.status("failed: \(error)")
            shutdown()
            return 1
        }
        // systemd: every device is bound (driver side started) or listening (vhost-user servers started).
        service.ready(ServiceNotifier.statusLine(config))
        let served = devices.filter { $0.server != nil }.count
        Log.info("serving \(devices.count - served) device(s) via \(config.transport.rawValue)\(served == 0 ? "" : " and \(served) over vhost-user") from \(config.file)")
        let start = lb_now_ns()
        var lastReport = start
        var fds = [pollfd(fd: sigfd, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: opsFD?.raw ?? -1, events: Int16(POLLIN), revents: 0)]
        while true {
            let r = poll(&fds, 2, 250)
            if r > 0 && fds[0].revents != 0 {
                let sig = lb_read_signalfd(sigfd)
                if sig == SIGHUP {
                    Log.info("SIGHUP: reloading \(config.file)")
                    let result = reload()
                    if result.ok { Log.info("reload: \(result.text.split(separator: "\n").joined(separator: "; "))") }
                    else { Log.error("reload: \(result.text.split(separator: "\n").joined(separator: "; "))") }
                } else if sig > 0 { Log.info("signal \(sig): stopping"); break }
            }
            if r > 0 && fds[1].revents != 0 { runControlJobs() }
            let now = lb_now_ns()
            if now - lastReport >= 1_000_000_000 {
                link?.report(seconds: Double(now - lastReport) / 1e9)
                lastReport = now
                Log.flushSuppressed()   // "suppressed K similar messages" once a rate-limit window ends
            }
            if let d = options.duration, now - start >= UInt64(d) * 1_000_000_000 { Log.info("duration reached: stopping"); break }
        }
        service.stopping()   // systemd: STOPPING=1
        shutdown()
        Log.info("stopped")
        return 0
    }

    /// Orderly stop: the control socket, the driver side (its in-flight requests complete), the servers, then the
    /// devices flush and reset.
    private func shutdown() {
        if let c = control { loop.executeAndWait { c.stop() } }
        link?.stop()
        let running = devices
        loop.executeAndWait {
            for d in running { d.server?.stop() }
            self.host.shutdown()
            for d in running { (d.body as? VhostUserFrontendDevice)?.shutdown() }
            self.service.stopWatchdog()
        }
        loop.stopAndJoin()
    }

    func makeDevice(_ d: DeviceConfig, loop: EventLoop) throws(DeviceError) -> VirtioDevice {
        switch d.backend {
        case .inproc: return try d.make()
        case .vhostUser(let path): return try makeFrontend(d, socket: path, loop: loop)
        }
    }

    // MARK: one device at a time (main thread)

    /// Starts one device: its vhost-user server listens, or its driver side binds it. On failure nothing of it
    /// is left in the host.
    func startDevice(_ d: DeviceConfig, body built: VirtioDevice? = nil) throws(DeviceError) {
        let body: VirtioDevice
        if let built { body = built } else { body = try makeDevice(d, loop: loop) }
        let host = self.host!
        let running: RunningDevice
        if let path = d.serve {
            let server: VhostUserBackendServer
            do { server = try startServer(host: host, name: d.name, device: body, path: path) } catch {
                discard(body, nil)
                throw error
            }
            running = RunningDevice(config: d, index: server.index, body: body, server: server, driverCounters: nil)
        } else {
            guard let link else {
                discard(body, nil)
                throw DeviceError("device \(d.name): transport = \"none\" serves only devices that set serve")
            }
            let index = loop.executeAndWait { host.add(name: d.name, device: body) }
            let counters: Counters?
            do { counters = try link.attach(d, index: index) } catch {
                discard(body, index)
                throw error
            }
            running = RunningDevice(config: d, index: index, body: body, server: nil, driverCounters: counters)
        }
        loop.executeAndWait { self.devices.append(running) }
    }

    private func discard(_ body: VirtioDevice, _ index: Int?) {
        let host = self.host!
        let durable = loop.executeAndWait { () -> (@Sendable () -> Void)? in
            let durable = index.flatMap { host.remove($0) }
            (body as? VhostUserFrontendDevice)?.shutdown()
            return durable
        }
        durable?()
    }

    /// Stops one device: its driver sees a hot-unplug (DELDEV on the kernel link, the simulated driver resets,
    /// the vhost-user server closes its connection and socket); then it is flushed and released, and a forwarded
    /// device's front-end closes its back-end connection.
    func stopDevice(_ d: RunningDevice) throws(DeviceError) {
        if let s = d.server { s.stop() } else { try link?.detach(index: d.index) }
        let host = self.host!
        let durable = loop.executeAndWait { () -> (@Sendable () -> Void)? in
            let durable = host.remove(d.index)
            (d.body as? VhostUserFrontendDevice)?.shutdown()
            self.devices.removeAll { $0 === d }
            return durable
        }
        durable?()   // the image's fdatasync on this (main) thread: the loop serves the other devices meanwhile
        Log.info("\(d.config.name): removed")
    }

    // MARK: control requests (main thread)

    struct Outcome { var ok: Bool; var text: String; var json: String }

    /// `ctl add`: one or more [device.NAME] tables, validated like the file (FILE:LINE errors), then started.
    func add(snippet: [UInt8]) -> Outcome {
        let file = "<ctl add>"
        let parsed: DaemonConfig
        do throws(ConfigError) {
            let doc = try TOML.parse(bytes: snippet, file: file)
            let stray = doc.tables.first { !($0.name.count == 2 && $0.name[0] == "device") && !($0.name.isEmpty && $0.entries.isEmpty) }
            if let t = stray {
                let name = t.name.isEmpty ? (t.entries.first?.key ?? "") : "[" + t.name.joined(separator: ".") + "]"
                throw ConfigError(file: file, line: t.name.isEmpty ? (t.entries.first?.line ?? 0) : t.line,
                                  message: "add takes [device.NAME] tables only; found \(name)")
            }
            parsed = try DaemonConfig.parse(doc)
            for d in parsed.devices {
                if devices.contains(where: { $0.config.name == d.name }) {
                    throw ConfigError(file: file, line: d.line, key: "device.\(d.name)", message: "a device named \(d.name) is already running")
                }
                for p in [d.serve, d.backendSocket].compactMap({ $0 }) {
                    if let other = devices.first(where: { $0.config.serve == p || $0.config.backendSocket == p }) {
                        throw ConfigError(file: file, line: d.line, key: "device.\(d.name)",
                                          message: "socket \(p) already used by running device \(other.config.name)")
                    }
                }
                if config.transport == .none && d.serve == nil {
                    throw ConfigError(file: file, line: d.line, key: "device.\(d.name)",
                                      message: "transport = \"none\" needs every device to set serve")
                }
            }
        } catch {
            return Outcome(ok: false, text: "\(error)", json: #""error":"# + JSON.string("\(error)"))
        }
        var added: [String] = [], errors: [String] = []
        for d in parsed.devices {
            do { try startDevice(d); added.append(d.name) } catch { errors.append("\(error)") }
        }
        return outcome(added: added, removed: [], restarted: [], unchanged: nil, errors: errors)
    }

    /// `ctl remove NAME`.
    func remove(name: String) -> Outcome {
        guard let d = devices.first(where: { $0.config.name == name }) else {
            let known = devices.map(\.config.name).joined(separator: ", ")
            let msg = "no running device named \"\(ControlServer.printable(name))\"; running: \(known.isEmpty ? "none" : known)"
            return Outcome(ok: false, text: msg, json: #""error":"# + JSON.string(msg))
        }
        do { try stopDevice(d) } catch {
            return Outcome(ok: false, text: "\(error)", json: #""error":"# + JSON.string("\(error)"))
        }
        return outcome(added: [], removed: [name], restarted: [], unchanged: nil, errors: [])
    }

    /// `ctl reload` and SIGHUP: re-read the file; stop the devices whose table is gone or changed, start the new
    /// and changed ones; the others are not touched. A file with errors changes nothing; so does a change in
    /// [daemon] other than log-level (those need a restart).
    func reload() -> Outcome {
        let new: DaemonConfig
        do { new = try Daemon.loadConfig(options.configPath) } catch {
            return Outcome(ok: false, text: "\(error)", json: #""error":"# + JSON.string("\(error)"))
        }
        var fixed: [String] = []
        if new.transport != config.transport { fixed.append("transport") }
        if new.deviceNode != config.deviceNode { fixed.append("device-node") }
        if new.pollMicroseconds != config.pollMicroseconds { fixed.append("poll-us") }
        if new.control != config.control { fixed.append("control") }
        if new.user != config.user { fixed.append("user") }
        if new.seccomp != config.seccomp { fixed.append("seccomp") }
        guard fixed.isEmpty else {
            let msg = "\(new.file): [daemon] \(fixed.joined(separator: ", ")) changed: restart loopbackd to apply; nothing reloaded"
            return Outcome(ok: false, text: msg, json: #""error":"# + JSON.string(msg))
        }
        if options.logLevel == nil { Log.level = new.logLevel }
        let newByName = Dictionary(new.devices.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var removed: [String] = [], restarted: [String] = [], added: [String] = [], errors: [String] = []
        var unchanged = 0
        // Stop first: a changed device may reuse its own socket or file.
        for d in devices {
            if let n = newByName[d.config.name] {
                if n.definition == d.config.definition { unchanged += 1; continue }
                do { try stopDevice(d); restarted.append(d.config.name) } catch { errors.append("\(d.config.name): \(error)") }
            } else {
                do { try stopDevice(d); removed.append(d.config.name) } catch { errors.append("\(d.config.name): \(error)") }
            }
        }
        for d in new.devices where !devices.contains(where: { $0.config.name == d.name }) {
            do { try startDevice(d); if !restarted.contains(d.name) { added.append(d.name) } } catch {
                restarted.removeAll { $0 == d.name }
                errors.append("device \(d.name) (\(new.file):\(d.line)): \(error)")
            }
        }
        config = new
        return outcome(added: added, removed: removed, restarted: restarted, unchanged: unchanged, errors: errors)
    }

    private func outcome(added: [String], removed: [String], restarted: [String], unchanged: Int?, errors: [String]) -> Outcome {
        var lines: [String] = []
        for n in removed { lines.append("removed \(n)") }
        for n in restarted { lines.append("restarted \(n)") }
        for n in added { lines.append("added \(n)") }
        if let unchanged { lines.append("unchanged \(unchanged)") }
        for e in errors { lines.append("error: \(e)") }
        func list(_ a: [String]) -> String { "[" + a.map(JSON.string).joined(separator: ",") + "]" }
        var json = #""added":\#(list(added)),"removed":\#(list(removed)),"restarted":\#(list(restarted))"#
        if let unchanged { json += #","unchanged":\#(unchanged)"# }
        json += #","errors":\#(list(errors))"#
        if !errors.isEmpty { json += #","error":"# + JSON.string(errors.joined(separator: "; ")) }
        return Outcome(ok: errors.isEmpty, text: lines.joined(separator: "\n"), json: json)
    }

    // MARK: the control socket

    /// `[daemon] control`, or under systemd (`$NOTIFY_SOCKET`) the default path; a failure to listen on the
    /// default is a warning, on a configured path an error.
    private func startControl() throws(DeviceError) {
        let explicit = config.control
        let path: String
        if let explicit { guard !explicit.isEmpty else { return }; path = explicit }
        else if getenv("NOTIFY_SOCKET") != nil { path = DaemonConfig.defaultControlSocket }
        else { return }
        let server = ControlServer(loop: loop, path: path, runner: self)
        let err = loop.executeAndWait { () -> Errno? in
            do throws(Errno) { try server.start(); return nil } catch { return error }
        }
        if let err {
            if explicit != nil { throw DeviceError("control socket \(path): \(err)") }
            Log.warning("control socket \(path): \(err); running without one")
            return
        }
        control = server
    }

    /// Loop thread: queue a request for the main thread.
    func submit(_ job: ControlJob) {
        ops.withLock { $0.append(job) }
        if let fd = opsFD?.raw { FD.signal(fd) }
    }

    private func runControlJobs() {
        if let fd = opsFD?.raw { _ = FD.drain(fd) }
        while let job = ops.withLock({ q -> ControlJob? in q.isEmpty ? nil : q.removeFirst() }) {
            let r: Outcome
            switch job.op {
            case .add(let snippet): r = add(snippet: snippet)
            case .remove(let name): r = remove(name: name)
            case .reload: r = reload()
            }
            let box = UncheckedSendable((control, ControlServer.render(r, json: job.json)))
            let id = job.client
            loop.execute { box.value.0?.finish(client: id, reply: box.value.1) }
        }
    }
}

extension DeviceConfig {
    /// The back-end socket of a forwarded device.
    var backendSocket: String? { if case .vhostUser(let p) = backend { return p } else { return nil } }
}
