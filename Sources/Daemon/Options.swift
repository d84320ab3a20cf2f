import Glibc
import CLinux
import Transport

/// The parsed command line. Parsing is strict: unknown flags, missing values and bad numbers are usage errors
/// (exit status 2) with one clear line.
public struct Options: Equatable {
    public enum Command: Equatable { case run, check, bench, ab, abServe, ctl, version, help }
    public var command: Command = .run
    public var configPath: String?
    public var logLevel: Log.Level?
    public var duration: Int?
    public var json = false
    public var requests = 20_000
    public var device: String?
    public var socket: String?
    /// ab with a vsock device and --socket: the back-end's hybrid vsock path (its driver connections reach PATH_PORT).
    public var udsPath: String?
    public var poll = false
    /// bench: every device of the file at once on one event loop (one driver thread per device).
    public var concurrent = false
    public var relay = false
    public var direct = false
    /// ab --driver virtio-lo --restricted: the second path is the same body in-process with restricted memory.
    public var restricted = false
    /// ab's driver side: "sim", "virtio-lo", or nil = auto.
    public var driver: String?
    public var rounds = 5
    /// Throughput mode (any of the three given): requests in flight per queue, payload bytes per request (nil: the
    /// workload's default), seconds per path/mode instead of a request count.
    public var depth: Int?
    public var size: Int?
    public var seconds: Int?
    /// Write an SVG picture of the run here (latency CDF per path; throughput runs add MB/s and IOPS bars).
    public var plot: String?
    public var throughput: Bool { depth != nil || size != nil || seconds != nil }
    /// `ctl`: the command and its arguments (`status`, `remove NAME`, ...).
    public var ctlArgs: [String] = []

    public struct UsageError: Error, CustomStringConvertible { public var description: String }

    public static func parse(_ args: [String]) throws(UsageError) -> Options {
        var o = Options()
        var i = 0
        if let first = args.first, !first.hasPrefix("-") {
            switch first {
            case "bench": o.command = .bench
            case "ab": o.command = .ab
            case "run": o.command = .run
            case "check": o.command = .check
            case "ctl": o.command = .ctl
            case "ab-serve": o.command = .abServe   // internal: the socket side of `ab`
            default: throw UsageError(description: "unknown command \"\(first)\" (commands: run, check, bench, ab, ctl)")
            }
            i = 1
        }
        func value(_ flag: String) throws(UsageError) -> String {
            i += 1
            guard i < args.count, !args[i].isEmpty else { throw UsageError(description: "\(flag) needs a value") }
            return args[i]
        }
        func number(_ flag: String, _ range: ClosedRange<Int>) throws(UsageError) -> Int {
            let v = try value(flag)
            guard let n = Int(v), range.contains(n) else {
                throw UsageError(description: "\(flag) must be a number in \(range.lowerBound)...\(range.upperBound), found \"\(v)\"")
            }
            return n
        }
        while i < args.count {
            let a = args[i]
            switch a {
            case "-c", "--config": o.configPath = try value(a)
            case "--check": o.command = .check
            case "--version", "-V": o.command = .version
            case "--help", "-h": o.command = .help
            case "--log-level":
                let v = try value(a)
                guard let l = Log.Level(name: v) else { throw UsageError(description: "--log-level must be error, warning, info or debug") }
                o.logLevel = l
            case "--duration": o.duration = try number(a, 1...86_400_000)
            case "--json": o.json = true
            case "--requests": o.requests = try number(a, 100...10_000_000)
            case "--rounds": o.rounds = try number(a, 1...1000)
            case "--depth": o.depth = try number(a, 1...1024)
            case "--size": o.size = try number(a, 1...(16 << 20))
            case "--seconds": o.seconds = try number(a, 1...3600)
            case "--plot":
                let v = try value(a)
                guard v.hasSuffix(".svg") else { throw UsageError(description: "--plot needs a FILE.svg path, found \"\(v)\"") }
                o.plot = v
            case "--device": o.device = try value(a)
            case "--socket": o.socket = try value(a)
            case "--uds-path": o.udsPath = try value(a)
            case "--poll": o.poll = true
            case "--concurrent": o.concurrent = true
            case "--relay": o.relay = true
            case "--direct": o.direct = true
            case "--restricted": o.restricted = true
            case "--driver":
                let v = try value(a)
                guard ["sim", "virtio-lo", "auto"].contains(v) else { throw UsageError(description: "--driver must be sim, virtio-lo or auto") }
                o.driver = v == "auto" ? nil : v
            default:
                // ctl: the first word that is not a flag starts the control command; the rest are its arguments.
                if o.command == .ctl && !a.hasPrefix("-") || !o.ctlArgs.isEmpty {
                    o.ctlArgs.append(a)
                } else {
                    throw UsageError(description: "unknown option \"\(a)\" (see --help)")
                }
            }
            i += 1
        }
        if let d = o.depth, let z = o.size, d * z > 256 << 20 {
            throw UsageError(description: "--depth x --size must stay within 256 MiB of driver buffers, found \(d) x \(z)")
        }
        if o.command == .ctl {
            guard let cmd = o.ctlArgs.first else { throw UsageError(description: "ctl needs a command: status, stats, add [TOML], remove NAME, reload") }
            let arity = ["status": 0...0, "stats": 0...0, "reload": 0...0, "remove": 1...1, "add": 0...1, "device": 2...12]
            guard let r = arity[cmd] else { throw UsageError(description: "unknown ctl command \"\(cmd)\" (status, stats, add, remove, reload, device)") }
            guard r.contains(o.ctlArgs.count - 1) else { throw UsageError(description: "ctl \(cmd): wrong number of arguments") }
        }
        return o
    }

    public static let usage = """
    usage: loopbackd [-c FILE] [--log-level LEVEL] [--duration SECONDS]
           loopbackd --check -c FILE
           loopbackd bench [-c FILE] [--device NAME] [--requests N | --seconds S] [--depth N] [--size BYTES] [--plot FILE.svg] [--json]
           loopbackd bench --concurrent [-c FILE] [--seconds S] [--json]
           loopbackd ab -c FILE --device NAME [--socket PATH [--uds-path PATH]] [--driver sim|virtio-lo|auto] [--poll] [--relay | --direct | --restricted]
                        [--rounds N] [--requests N | --seconds S] [--depth N] [--size BYTES] [--plot FILE.svg] [--json]
           loopbackd ctl [--socket PATH | -c FILE] [--json] status | stats | add [TOML] | remove NAME | reload | device NAME WORD...
           loopbackd --version | --help

    Serves the virtio devices of FILE (default /etc/loopbackd.conf, else the embedded default) to the
    configured driver side: the virtio-loopback kernel module, or the simulated driver.
      -c, --config FILE     configuration file (TOML)
      --check               validate the configuration and exit (status 2 on errors)
      --log-level LEVEL     error, warning, info or debug (overrides the file)
      --duration SECONDS    stop by itself after SECONDS (as on SIGTERM)
    bench: latency and throughput of the file's rng and blk devices (in-process, or forwarded to their
           vhost-user backend) through the simulated driver, with notifications and with busy-polling; a table,
           then one JSON line (--json: only JSON)
    ab:    the same device and workload in-process and through a vhost-user socket, interleaved in rounds; driver
           side: the kernel module when its node opens (or the file says virtio-lo), else the simulated driver;
           default: kicks and interrupts pass loopbackd, the backend reads a shadow avail ring (exact replay on
           reconnect); --direct: both straight between driver and backend (reconnect = "reset"); --relay: both
           through loopbackd without the shadow ring, like the original adapter; --restricted (kernel driver only):
           full RAM mapping against restricted memory (the module's bounce pool), both in-process
    bench --concurrent: every device of FILE with a workload at once, all on one event loop (pinned to the first
           CPU when there are two or more), one simulated driver thread per device doing queue-depth-1 round trips
           in notify mode for S seconds (default 5) after 1 s of warm-up: per-device req/s, p50/p99/max, the
           aggregate, fairness within each type (slowest/fastest device) and the loop thread's CPU use
    bench and ab measure queue-depth-1 latency by default; any of these selects throughput mode (MB/s, IOPS and
    p50/p99 latency at that depth, per path and mode):
      --depth N             requests in flight per queue (1 to 1024; default 1)
      --size BYTES          payload per request: rng read size (default 64; the device fills at most 64 KiB),
                            blk read size, a multiple of 512 (default 4096)
      --seconds S           run each path/mode for S seconds (ab: split over the rounds) instead of --requests
      --plot FILE.svg       write a self-contained SVG: latency CDF per path/mode; throughput runs add MB/s and
                            IOPS bars
    With the kernel driver (ab --driver virtio-lo) only queue-depth-1 latency is measured: depth N through the
    kernel's driver would need io_uring or Linux AIO on its node from user space (not implemented), so
    --depth/--size/--seconds are refused there (--plot works).
    ctl:   talks to a running loopbackd over its control socket (--socket PATH, else the file's [daemon] control,
           else /run/loopbackd/control.sock): status (per device: driver side, bound, features, queues,
           NEEDS_RESET, back-end connection), stats (requests, bytes, errors, in flight, loop-time histogram),
           add (a [device.NAME] snippet as the argument or on stdin, validated like the file), remove NAME (a
           hot-unplug for its driver), reload (as SIGHUP: re-read the file, restart only changed devices),
           device NAME WORD... (a device's own command: gpu "scanout N on|off", "snapshot [N]", "info");
           --json: one JSON object. Exit status 1 when the daemon answers with an error
    A vhost-user backend socket (backend = "vhost-user:PATH", ab --socket) must accept connections within
    about 5 s of start-up, else loopbackd exits with status 1; once running, a lost backend is reconnected
    without limit.
    """
}
