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
func measure(_ w: Workload, count: Int, warmup: Int, spinNs: UInt64)
    -> (LatencyStats, errors: Int, kicks: Double, sleeps: Double, sorted: [UInt64]) {
    var errors = 0
    for _ in 0..<warmup { if !w.runOne(spinNs: spinNs) { errors += 1 } }
    let k0 = w.q.kicks, s0 = w.q.sleeps
    var r = timeRoundTrips(w, count: count, spinNs: spinNs)
    let stats = LatencyStats(samples: &r.samples, elapsedNs: r.elapsedNs)   // sorts r.samples
    return (stats, errors + r.errors, Double(w.q.kicks - k0) / Double(count), Double(w.q.sleeps - s0) / Double(count), r.samples)
}

/// Throughput of one depth-N run (or the sum of an ab path's rounds): MB/s are 10^6 bytes per second.
public struct ThroughputStats {
    public var depth: Int, size: Int
    public var requests: Int, bytes: Int, errors: Int
    public var elapsedNs: UInt64
    public var p50, p99, max: UInt64
    public var mbps: Double { elapsedNs > 0 ? Double(bytes) * 1000 / Double(elapsedNs) : 0 }
    public var iops: Double { elapsedNs > 0 ? Double(requests) * 1e9 / Double(elapsedNs) : 0 }

    /// From a runner's counters (accumulated since its last `resetCounters`) and the measured wall time.
    init(_ r: DepthRunner, elapsedNs: UInt64) {
        depth = r.depth; size = r.requests.size
        requests = r.completed; bytes = r.bytes
        errors = r.errors + r.unexpected + (r.broken ? Swift.max(1, r.outstanding) : 0)
        self.elapsedNs = elapsedNs
        p50 = r.histogram.percentile(0.5); p99 = r.histogram.percentile(0.99); max = r.histogram.max
    }
    public var json: String {
        "{\"depth\": \(depth), \"size\": \(size), \"requests\": \(requests), \"bytes\": \(bytes), \"errors\": \(errors), "
            + "\"elapsed_ns\": \(elapsedNs), \"mbps\": \(fmt2(mbps)), \"iops\": \(Int(iops)), "
            + "\"p50_ns\": \(p50), \"p99_ns\": \(p99), \"max_ns\": \(max)}"
    }
}

/// Throughput mode, shared by bench and ab: the workload's depth-N requests on its first queue.
func makeRunner(_ w: Workload, _ o: Options, type: String) throws(DeviceError) -> DepthRunner {
    guard let reqs = try w.depthRequests(depth: o.depth ?? 1, size: o.size) else {
        throw DeviceError("type \(type) has no depth-N workload (throughput mode: rng and blk; vsock flows in ab)")
    }
    return DepthRunner(q: w.q, requests: reqs)
}

/// One throughput phase: `requests` requests, or `seconds` (when set) of requests.
func runPhase(_ r: DepthRunner, requests: Int, seconds: Double?, spinNs: UInt64) -> UInt64 {
    if let s = seconds { return r.run(count: 0, deadlineNs: lb_now_ns() &+ UInt64(s * 1e9), spinNs: spinNs) }
    return r.run(count: requests, spinNs: spinNs)
}

/// Driver RAM for a simulated driver: the QD1 chains and rings, plus the depth-N buffers.
func simRAM(_ o: Options) -> Int { (16 << 20) + (o.depth ?? 1) * ((o.size ?? 4096) + 8192) }

/// `loopbackd bench`: rng 64-byte reads and blk 4 KiB random reads through the simulated driver, each with
/// notifications only and with the busy-poll window (device loop polls 50 µs; the driver spins as long for its
/// completion, like a polling kernel driver would). The device body runs in-process, or behind loopbackd's
/// vhost-user front-end (`backend = "vhost-user:…"`: the simulated driver drives the front-end alike).
/// Default: queue depth 1, one timed round trip after the other. Throughput mode (`--depth`, `--size`,
/// `--seconds`): `DepthRunner` keeps N requests in flight; MB/s, IOPS and latency at that depth.
enum Bench {
    static let pollWindowUs = 50

    struct Row {
        var name: String, type: String, mode: String
        var stats: LatencyStats
        var errors: Int
        var kicks: Double, sleeps: Double
        var tp: ThroughputStats?
        /// For the plot: latency quantile (ns at fraction p) over `samples` requests.
        var samples: Int
        var quantile: (Double) -> UInt64
    }

    static func run(_ config: DaemonConfig, _ o: Options) -> Int32 {
        if o.concurrent { return BenchConcurrent.run(config, o) }
        let withWorkload = Set(DeviceRegistry.standard.types.values.filter { $0.workload != nil }.map(\.name))
        let chosen = config.devices.filter { withWorkload.contains($0.type) && (o.device == nil || $0.name == o.device) }
        guard !chosen.isEmpty else {
            printErr("loopbackd: error: bench: no device with a workload (types \(withWorkload.sorted().joined(separator: ", ")))"
                     + "\(o.device.map { " named \($0)" } ?? "") in \(config.file)")
            return 2
        }
        func body(_ name: String) -> String { chosen.first { $0.name == name }?.backend == .inproc ? "inproc" : "vu" }
        var rows: [Row] = []
        for d in chosen {
            for pollUs in [0, pollWindowUs] {
                switch runOne(d, pollUs: pollUs, o) {
                case .success(var r):
                    r.mode = pollUs == 0 ? "notify" : "poll-\(pollUs)us"
                    rows.append(r)
                case .failure(let e): printErr("loopbackd: error: bench \(d.name): \(e)"); return 1
                }
            }
        }
        // The machine's floor, measured in the same run: the busy-polled rows are compared against it.
        var floor: LatencyStats?
        if !o.throughput {
            var s = [UInt64](repeating: 0, count: Swift.max(o.requests, 1000))
            let e = s.withUnsafeMutableBufferPointer { lb_spin_floor(UInt64($0.count), $0.baseAddress) }
            if e == 0 { floor = LatencyStats(samples: &s, elapsedNs: 0) } else { printErr("loopbackd: warning: spin floor: errno \(e)") }
        }
        let vuNote = chosen.contains { $0.backend != .inproc } ? "; body: inproc, or vu = forwarded to its vhost-user back-end" : ""
        let amount = o.seconds.map { "\($0) s" } ?? "\(o.requests) requests"
        if !o.json && !o.throughput {
            print("loopbackd bench: simulated driver, queue depth 1, \(o.requests) requests per row (+10% warm-up)" + vuNote)
            print("device   type  body   mode        p50_us   p99_us   max_us    req/s  kicks/req  irq-waits/req  errors")
            for r in rows {
                print(pad(r.name, 8, left: true) + " " + pad(r.type, 5, left: true) + " " + pad(body(r.name), 6, left: true) + " " + pad(r.mode, 10, left: true)
                      + pad(micro(r.stats.p50), 8) + " " + pad(micro(r.stats.p99), 8) + " " + pad(micro(r.stats.max), 8)
                      + " " + pad(String(Int(r.stats.rps)), 8) + " " + pad(fmt2(r.kicks), 10) + " " + pad(fmt2(r.sleeps), 14)
                      + " " + pad(String(r.errors), 7))
            }
            if let f = floor {
                print("floor: spin ring, two threads spinning on shared memory\(lb_allowed_cpus() >= 2 ? " (pinned to two CPUs, as the poll rows)" : ""): p50 \(f.p50) ns, p99 \(f.p99) ns")
                for r in rows where r.mode != "notify" && f.p50 > 0 {
                    print("  \(r.name) \(r.mode): p50 \(r.stats.p50) ns = \(fmt2(Double(r.stats.p50) / Double(f.p50))) x the floor")
                }
            }
        } else if !o.json {
            print("loopbackd bench: simulated driver, throughput at queue depth \(o.depth ?? 1), \(amount) per row (+10% warm-up)" + vuNote)
            print("device   type  body   mode       depth     size      MB/s      IOPS   p50_us   p99_us  kicks/req  irq-waits/req  errors")
            for r in rows {
                guard let t = r.tp else { continue }
                print(pad(r.name, 8, left: true) + " " + pad(r.type, 5, left: true) + " " + pad(body(r.name), 6, left: true) + " " + pad(r.mode, 10, left: true)
                      + pad(String(t.depth), 6) + " " + pad(String(t.size), 8) + " " + pad(fmt2(t.mbps), 9) + " " + pad(String(Int(t.iops)), 9)
                      + " " + pad(micro(t.p50), 8) + " " + pad(micro(t.p99), 8) + " " + pad(fmt2(r.kicks), 10) + " " + pad(fmt2(r.sleeps), 14)
                      + " " + pad(String(r.errors), 7))
            }
        }
        let items = rows.map { r -> String in
            let head = "{\"device\": \"\(r.name)\", \"type\": \"\(r.type)\", \"body\": \"\(body(r.name) == "vu" ? "vhost-user" : "inproc")\", \"mode\": \"\(r.mode)\", "
            if let t = r.tp {
                return head + "\"requests\": \(t.requests), \"errors\": \(r.errors), \"kicks_per_req\": \(fmt2(r.kicks)), \"irq_waits_per_req\": \(fmt2(r.sleeps)), \"throughput\": \(t.json)}"
            }
            return head + "\"requests\": \(r.stats.count), \"errors\": \(r.errors), \"kicks_per_req\": \(fmt2(r.kicks)), \"irq_waits_per_req\": \(fmt2(r.sleeps)), \"stats\": \(r.stats.json)}"
        }
        let floorJSON = floor.map { ", \"floor\": \($0.json)" } ?? ""
        print("{\"bench\": [" + items.joined(separator: ", ") + "]" + floorJSON + "}")
        if let path = o.plot {
            let series = rows.map { r in
                Plot.cdf("\(r.name) \(body(r.name) == "vu" ? "vhost-user" : "inproc") \(r.mode)", samples: r.samples, quantile: r.quantile)
            }
            let svg: String
            if o.throughput {
                var sizes: [String] = []
                for r in rows where !sizes.contains("\(r.name) \(r.tp?.size ?? 0) B") { sizes.append("\(r.name) \(r.tp?.size ?? 0) B") }
                svg = Plot.throughput(title: "loopbackd bench: throughput at queue depth \(o.depth ?? 1)",
                                      subtitle: "simulated driver, requests: \(sizes.joined(separator: ", ")), \(amount) per row; MB/s = 10^6 bytes/s",
                                      bars: rows.map { Plot.Bar(label: "\($0.name) \($0.mode)", mbps: $0.tp?.mbps ?? 0, iops: $0.tp?.iops ?? 0) },
                                      series: series)
            } else {
                svg = Plot.latency(title: "loopbackd bench: round-trip latency, queue depth 1",
                                   subtitle: "simulated driver, \(o.requests) requests per row", series: series)
            }
            do { try Plot.write(svg, to: path) } catch { printErr("loopbackd: error: \(error)"); return 1 }
        }
        return rows.contains { $0.errors > 0 } ? 1 : 0
    }

    static func runOne(_ d: DeviceConfig, pollUs: Int, _ o: Options) -> Result<Row, DeviceError> {
        let requests = o.requests
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
            // Busy polling needs a CPU for each side (the driver spins for its completion, the loop for the next
            // request): pinned to two different CPUs when the machine has them, else the two spinning threads
            // often share one (the scheduler puts them together while other work runs) and measure yields.
            let pin = pollUs > 0 && lb_allowed_cpus() >= 2
            // Loop on the first allowed CPU, driver on the second: on this 2-vCPU VM the spin-ring floor is 0.12 µs
            // that way round and 0.6 µs the other way (the same two vCPUs; measured with the floor alone).
            if pin {
                loop.executeAndWait { _ = lb_pin_self(0) }
                _ = lb_pin_self(1)
            }
            defer { if pin { lb_unpin_self() } }
            // A front-end closes its connection only on `shutdown` (the loop keeps it alive otherwise): the next row's
            // front-end would wait for a back-end still serving this one.
            defer {
                loop.executeAndWait { host.shutdown(); (device as? VhostUserFrontendDevice)?.shutdown() }
                loop.stopAndJoin()
            }
            let drv: SimDriver
            do { drv = try SimDriver(host: host, index: i, ramSize: simRAM(o)) } catch { throw DeviceError("\(error)") }
            try drv.start(queueCount: workloadQueueCount(type: d.type))
            defer { drv.reset() }
            guard let w = makeWorkload(type: d.type, driver: drv, verify: false) else { throw DeviceError("no workload") }
            let spin = UInt64(pollUs) * 1000
            var row: Row
            if o.throughput {
                let r = try makeRunner(w, o, type: d.type)
                _ = runPhase(r, requests: Swift.max(requests / 10, 2 * r.depth), seconds: o.seconds.map { Double($0) / 10 }, spinNs: spin)
                r.resetCounters()
                let k0 = w.q.kicks, s0 = w.q.sleeps
                let elapsed = runPhase(r, requests: requests, seconds: o.seconds.map(Double.init), spinNs: spin)
                let t = ThroughputStats(r, elapsedNs: elapsed)
                var none: [UInt64] = []
                let n = Double(Swift.max(t.requests, 1))
                row = Row(name: d.name, type: d.type, mode: "", stats: LatencyStats(samples: &none, elapsedNs: 0), errors: t.errors,
                          kicks: Double(w.q.kicks - k0) / n, sleeps: Double(w.q.sleeps - s0) / n, tp: t,
                          samples: t.requests, quantile: { r.histogram.percentile($0) })
            } else {
                let m = measure(w, count: requests, warmup: requests / 10, spinNs: spin)
                row = Row(name: d.name, type: d.type, mode: "", stats: m.0, errors: m.errors, kicks: m.kicks, sleeps: m.sleeps, tp: nil,
                          samples: m.sorted.count, quantile: Plot.sortedQuantile(m.sorted))
            }
            let windows = loop.executeAndWait { loop.pollWindows }
            Log.debug("\(d.name) poll-us \(pollUs): \(windows) poll windows")
            return .success(row)
        } catch { return .failure(error) }
    }
}
