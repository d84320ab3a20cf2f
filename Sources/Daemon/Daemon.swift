import Glibc
import CLinux
import Transport
import Registry

public let loopbackdVersion = "0.1.0"

/// The daemon's entry point: command line, config, wiring, signals. No device or ring logic lives here.
public enum Daemon {
    /// Exit statuses: 0 success, 1 runtime failure, 2 usage or configuration error.
    public static func main() -> Int32 {
        // argv from a C constructor: CommandLine.arguments is empty in a static binary started without /proc.
        var args: [String] = []
        if let argv = lb_argv() {
            for i in 1..<max(Int(lb_argc()), 1) { if let a = argv[i] { args.append(String(cString: a)) } }
        }
        return main(arguments: args)
    }

    public static func main(arguments: [String]) -> Int32 {
        let o: Options
        do { o = try Options.parse(arguments) } catch {
            printErr("loopbackd: \(error)\n\(Options.usage)")
            return 2
        }
        switch o.command {
        case .version: print("loopbackd \(loopbackdVersion)"); return 0
        case .help: print(Options.usage); return 0
        default: break
        }
        let config: DaemonConfig
        do { config = try loadConfig(o.configPath) } catch {
            printErr("loopbackd: error: \(error)")
            return 2
        }
        Log.level = o.logLevel ?? config.logLevel
        Log.detectJournal()   // systemd: stderr is the journal -> <N> priority prefixes (Log.swift)
        switch o.command {
        case .check:
            print("\(config.file): OK: \(config.devices.count) device(s), transport \(config.transport.rawValue)")
            return 0
        case .bench: return Bench.run(config, o)
        case .ab: return AB.run(config, o)
        case .abServe: return AB.serve(config, o)
        default: return Runner(config: config, options: o).run()
        }
    }

    /// `-c FILE`, else /etc/loopbackd.conf if present, else the embedded default.
    static func loadConfig(_ path: String?) throws(ConfigError) -> DaemonConfig {
        if let path { return try DaemonConfig.load(path: path) }
        if access("/etc/loopbackd.conf", F_OK) == 0 { return try DaemonConfig.load(path: "/etc/loopbackd.conf") }
        return try DaemonConfig.parse(TOML.parse(embeddedDefaultConfig, file: "(embedded default)"))
    }
}

func printErr(_ s: String) {
    var line = s + "\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

/// Runs the configured devices until SIGTERM/SIGINT (or --duration).
final class Runner {
    let config: DaemonConfig
    let options: Options
    private var stopping = false
    /// systemd notify protocol (Notify.swift); no-ops without $NOTIFY_SOCKET.
    let service: ServiceNotifier
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
        do { loop = try EventLoop(pollMicroseconds: config.pollMicroseconds) } catch {
            printErr("loopbackd: error: event loop: \(error)"); return 1
        }
        let host = DeviceHost(loop: loop)
        var attached: [(config: DeviceConfig, index: Int)] = []
        var served: [(config: DeviceConfig, device: VirtioDevice)] = []
        // Build every device before starting anything: a bad file means nothing is started.
        for d in config.devices {
            let device: VirtioDevice
            do { device = try makeDevice(d, loop: loop) } catch {
                printErr("loopbackd: error: device \(d.name) (\(config.file):\(d.line)): \(error)")
                return 1
            }
            // A served device has one driver: the vhost-user frontend, not this daemon's transport.
            if d.serve != nil { served.append((d, device)) } else { attached.append((d, host.add(name: d.name, device: device))) }
        }
        loop.startThread()
        service.loopStarted(loop)   // systemd: WATCHDOG=1 from the loop thread
        var link: DriverSide?
        switch config.transport {
        case .sim: link = SimTransport(host: host, devices: attached)
        case .virtioLo: link = makeKernelLink(host: host, config: config, devices: attached)
        case .none: link = nil
        }
        var servers: [VhostUserBackendServer] = []
        do throws(DeviceError) {
            for (d, dev) in served {
                let r = loop.executeAndWait { () -> Result<VhostUserBackendServer, DeviceError> in
                    do throws(DeviceError) { return .success(try startServer(host: host, name: d.name, device: dev, path: d.serve!)) }
                    catch { return .failure(error) }
                }
                servers.append(try r.get())
            }
            try link?.start()
        } catch {
            printErr("loopbackd: error: \(error)")
            service.status("failed: \(error)")
            link?.stop()
            loop.executeAndWait { for s in servers { s.stop() }; host.shutdown(); self.service.stopWatchdog() }
            loop.stopAndJoin()
            return 1
        }
        // systemd: every device is bound (driver side started) or listening (vhost-user servers started).
        service.ready(ServiceNotifier.statusLine(config))
        Log.info("serving \(attached.count) device(s) via \(config.transport.rawValue)\(served.isEmpty ? "" : " and \(served.count) over vhost-user") from \(config.file)")
        let start = lb_now_ns()
        var lastReport = start
        var p = pollfd(fd: sigfd, events: Int16(POLLIN), revents: 0)
        while true {
            let r = poll(&p, 1, 250)
            if r > 0 {
                let sig = lb_read_signalfd(sigfd)
                if sig > 0 { Log.info("signal \(sig): stopping"); break }
            }
            let now = lb_now_ns()
            if now - lastReport >= 1_000_000_000 {
                link?.report(seconds: Double(now - lastReport) / 1e9)
                lastReport = now
                Log.flushSuppressed()   // "suppressed K similar messages" once a rate-limit window ends
            }
            if let d = options.duration, now - start >= UInt64(d) * 1_000_000_000 { Log.info("duration reached: stopping"); break }
        }
        service.stopping()   // systemd: STOPPING=1
        // Orderly stop: driver side first (its in-flight requests complete), then the devices flush and reset.
        link?.stop()
        loop.executeAndWait { for s in servers { s.stop() }; host.shutdown(); self.service.stopWatchdog() }
        loop.stopAndJoin()
        Log.info("stopped")
        return 0
    }

    func makeDevice(_ d: DeviceConfig, loop: EventLoop) throws(DeviceError) -> VirtioDevice {
        switch d.backend {
        case .inproc: return try d.make()
        case .vhostUser(let path): return try makeFrontend(d, socket: path, loop: loop)
        }
    }
}

/// A driver side started by the runner: the simulated driver or the kernel link.
protocol DriverSide: AnyObject {
    func start() throws(DeviceError)
    func stop()
    func report(seconds: Double)
}

/// transport = "sim": one simulated driver per device, each on its own thread with a paced demo workload
/// (rng reads; blk writes verified by read-back), so a person sees the devices work without the kernel module.
final class SimTransport: DriverSide, @unchecked Sendable {
    let host: DeviceHost
    let devices: [(config: DeviceConfig, index: Int)]
    private var threads: [Thread] = []
    private var counters: [Counters] = []
    private let stopFlag = Counters()
    private var lastCounts: [Int] = []

    init(host: DeviceHost, devices: [(config: DeviceConfig, index: Int)]) { self.host = host; self.devices = devices }

    func start() throws(DeviceError) {
        for (d, i) in devices {
            let drv: SimDriver
            do { drv = try SimDriver(host: host, index: i, ramSize: 16 << 20) } catch { throw DeviceError("\(d.name): \(error)") }
            try drv.start()
            guard let w = makeWorkload(type: d.type, driver: drv, verify: true) else {
                Log.warning("\(d.name): no simulated workload for type \(d.type); device is idle"); continue
            }
            let c = Counters()
            counters.append(c)
            lastCounts.append(0)
            let stop = stopFlag
            let box = UncheckedSendable((drv, w))
            threads.append(Thread.spawn {
                let (drv, w) = box.value
                var n = 0
                while stop.requests.load(ordering: .relaxed) == 0 {
                    if w.runOne(spinNs: 0) { c.requests.add(1, ordering: .relaxed) } else { c.errors.add(1, ordering: .relaxed) }
                    n += 1
                    if n % 64 == 0 { usleep(20_000) }   // paced: a demo, not a load test
                }
                drv.reset()
            })
        }
    }

    func stop() {
        stopFlag.requests.store(1, ordering: .relaxed)
        for t in threads { t.join() }
        threads = []
    }

    func report(seconds: Double) {
        var parts: [String] = []
        var k = 0
        for (d, _) in devices where k < counters.count {
            let n = counters[k].requests.load(ordering: .relaxed)
            let e = counters[k].errors.load(ordering: .relaxed)
            let rate = Int(Double(n - lastCounts[k]) / seconds)
            lastCounts[k] = n
            let what = d.type == "blk" ? "verified write+read pairs" : "64-byte reads"
            parts.append("\(d.name): \(rate)/s \(what) (total \(n), errors \(e))")
            k += 1
        }
        if !parts.isEmpty { print("sim: " + parts.joined(separator: " | ")) }
    }
}

struct UncheckedSendable<T>: @unchecked Sendable { let value: T; init(_ v: T) { value = v } }
