import Glibc
import CLinux
import Transport
import Registry

/// Latency summary of one measured run.
public struct LatencyStats: Equatable {
    public var count: Int
    public var p50, p90, p99, p999, max: UInt64
    public var rps: Double

    /// `samples` in nanoseconds (sorted in place); `elapsedNs` the wall time of the whole run.
    public init(samples: inout [UInt64], elapsedNs: UInt64) {
        samples.sort()
        count = samples.count
        func pct(_ p: Double) -> UInt64 {
            guard !samples.isEmpty else { return 0 }
            return samples[Swift.min(samples.count - 1, Int(Double(samples.count) * p))]
        }
        p50 = pct(0.50); p90 = pct(0.90); p99 = pct(0.99); p999 = pct(0.999)
        max = samples.last ?? 0
        rps = elapsedNs > 0 ? Double(samples.count) * 1e9 / Double(elapsedNs) : 0
    }
    public var json: String {
        "{\"p50_ns\": \(p50), \"p90_ns\": \(p90), \"p99_ns\": \(p99), \"p999_ns\": \(p999), \"max_ns\": \(max), \"rps\": \(Int(rps))}"
    }
}

func fmt2(_ v: Double) -> String {
    let c = Int((v * 100).rounded())
    return "\(c / 100)." + (c % 100 < 10 ? "0" : "") + "\(c % 100)"
}

func micro(_ ns: UInt64) -> String {
    let v = Double(ns) / 1000
    let s = String(Int((v * 10).rounded()))
    let padded = s.count < 2 ? "0" + s : s
    return String(padded.dropLast()) + "." + String(padded.last!)
}
func pad(_ s: String, _ n: Int, left: Bool = false) -> String {
    s.count >= n ? s : (left ? s + String(repeating: " ", count: n - s.count) : String(repeating: " ", count: n - s.count) + s)
}

/// Times `count` queue-depth-1 requests one by one (bench and ab share this loop).
func timeRoundTrips(_ w: RoundTrip, count: Int, spinNs: UInt64) -> (samples: [UInt64], elapsedNs: UInt64, errors: Int) {
    var samples = [UInt64](repeating: 0, count: count)
    var errors = 0
    let t0 = lb_now_ns()
    samples.withUnsafeMutableBufferPointer { s in
        for i in 0..<count {
            let a = lb_now_ns()
            if !w.runOne(spinNs: spinNs) { errors += 1 }
            s[i] = lb_now_ns() &- a
        }
    }
    return (samples, lb_now_ns() - t0, errors)
}

/// Runs `count` QD1 requests of `workload` and times each one (after `warmup` untimed ones).
func measure(_ w: Workload, count: Int, warmup: Int, spinNs: UInt64) -> (LatencyStats, errors: Int, kicks: Double, sleeps: Double) {
    var errors = 0
    for _ in 0..<warmup { if !w.runOne(spinNs: spinNs) { errors += 1 } }
    let k0 = w.q.kicks, s0 = w.q.sleeps
    var r = timeRoundTrips(w, count: count, spinNs: spinNs)
    return (LatencyStats(samples: &r.samples, elapsedNs: r.elapsedNs), errors + r.errors,
            Double(w.q.kicks - k0) / Double(count), Double(w.q.sleeps - s0) / Double(count))
}

/// `loopbackd bench`: rng 64-byte reads and blk 4 KiB random reads through the simulated driver, each with
/// notifications only and with the busy-poll window (device loop polls 50 µs; the driver spins as long for its
/// completion, like a polling kernel driver would). The device body runs in-process, or behind loopbackd's
/// vhost-user front-end (`backend = "vhost-user:…"`: the simulated driver drives the front-end alike).
enum Bench {
    static let pollWindowUs = 50

    static func run(_ config: DaemonConfig, _ o: Options) -> Int32 {
        let withWorkload = Set(DeviceRegistry.standard.types.values.filter { $0.workload != nil }.map(\.name))
        let chosen = config.devices.filter { withWorkload.contains($0.type) && (o.device == nil || $0.name == o.device) }
        guard !chosen.isEmpty else {
            printErr("loopbackd: error: bench: no device with a workload (types \(withWorkload.sorted().joined(separator: ", ")))"
                     + "\(o.device.map { " named \($0)" } ?? "") in \(config.file)")
            return 2
        }
        func body(_ name: String) -> String { chosen.first { $0.name == name }?.backend == .inproc ? "inproc" : "vu" }
        var rows: [(name: String, type: String, mode: String, stats: LatencyStats, errors: Int, kicks: Double, sleeps: Double)] = []
        for d in chosen {
            for pollUs in [0, pollWindowUs] {
                switch runOne(d, pollUs: pollUs, requests: o.requests) {
                case .success(let r):
                    rows.append((d.name, d.type, pollUs == 0 ? "notify" : "poll-\(pollUs)us", r.0, r.1, r.2, r.3))
                case .failure(let e): printErr("loopbackd: error: bench \(d.name): \(e)"); return 1
                }
            }
        }
        if !o.json {
            print("loopbackd bench: simulated driver, queue depth 1, \(o.requests) requests per row (+10% warm-up)"
                  + (chosen.contains { $0.backend != .inproc } ? "; body: inproc, or vu = forwarded to its vhost-user back-end" : ""))
            print("device   type  body   mode        p50_us   p99_us   max_us    req/s  kicks/req  irq-waits/req  errors")
            for r in rows {
                print(pad(r.name, 8, left: true) + " " + pad(r.type, 5, left: true) + " " + pad(body(r.name), 6, left: true) + " " + pad(r.mode, 10, left: true)
                      + pad(micro(r.stats.p50), 8) + " " + pad(micro(r.stats.p99), 8) + " " + pad(micro(r.stats.max), 8)
                      + " " + pad(String(Int(r.stats.rps)), 8) + " " + pad(fmt2(r.kicks), 10) + " " + pad(fmt2(r.sleeps), 14)
                      + " " + pad(String(r.errors), 7))
            }
        }
        let items = rows.map { "{\"device\": \"\($0.name)\", \"type\": \"\($0.type)\", \"body\": \"\(body($0.name) == "vu" ? "vhost-user" : "inproc")\", \"mode\": \"\($0.mode)\", \"requests\": \($0.stats.count), \"errors\": \($0.errors), \"kicks_per_req\": \(fmt2($0.kicks)), \"irq_waits_per_req\": \(fmt2($0.sleeps)), \"stats\": \($0.stats.json)}" }
        print("{\"bench\": [" + items.joined(separator: ", ") + "]}")
        return rows.contains { $0.errors > 0 } ? 1 : 0
    }

    static func runOne(_ d: DeviceConfig, pollUs: Int, requests: Int) -> Result<(LatencyStats, Int, Double, Double), DeviceError> {
        do throws(DeviceError) {
            let loop: EventLoop
            do { loop = try EventLoop(pollMicroseconds: pollUs) } catch { throw DeviceError("event loop: \(error)") }
            let host = DeviceHost(loop: loop)
            let device: VirtioDevice
            switch d.backend {
            case .inproc: device = try d.make()
            case .vhostUser(let path): device = try makeFrontend(d, socket: path, loop: loop)
            }
            let i = host.add(name: d.name, device: device)
            loop.startThread()
            // A front-end closes its connection only on `shutdown` (the loop keeps it alive otherwise): the next row's
            // front-end would wait for a back-end still serving this one.
            defer {
                loop.executeAndWait { host.shutdown(); (device as? VhostUserFrontendDevice)?.shutdown() }
                loop.stopAndJoin()
            }
            let drv: SimDriver
            do { drv = try SimDriver(host: host, index: i, ramSize: 16 << 20) } catch { throw DeviceError("\(error)") }
            try drv.start(queueCount: 1)
            guard let w = makeWorkload(type: d.type, driver: drv, verify: false) else { throw DeviceError("no workload") }
            let r = measure(w, count: requests, warmup: requests / 10, spinNs: UInt64(pollUs) * 1000)
            drv.reset()
            let windows = loop.executeAndWait { loop.pollWindows }
            Log.debug("\(d.name) poll-us \(pollUs): \(windows) poll windows for \(requests + requests / 10) requests")
            return .success((r.0, r.errors, r.kicks, r.sleeps))
        } catch { return .failure(error) }
    }
}
