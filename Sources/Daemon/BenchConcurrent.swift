import Glibc
import Synchronization
import CLinux
import Transport
import Registry

/// `loopbackd bench --concurrent`: how many devices one loop thread carries, and what busy devices do to each
/// other. Every device of the file that has a workload runs at once on ONE event loop (pinned to the first allowed
/// CPU when there are two or more: "one core" literally); each gets its own simulated driver thread doing
/// queue-depth-1 round trips in notify mode. Reports per-device rate and latency, the aggregate, fairness within
/// each type (slowest / fastest device of the type: the per-turn budget is what keeps a busy device from starving
/// the others) and the loop thread's CPU use (utime + stime from /proc).
enum BenchConcurrent {
    final class Driver: @unchecked Sendable {
        let name: String, type: String
        let drv: SimDriver
        let workload: Workload
        let histogram = LatencyHistogram()
        var requests = 0, errors = 0
        init(name: String, type: String, drv: SimDriver, workload: Workload) {
            self.name = name; self.type = type; self.drv = drv; self.workload = workload
        }
    }

    /// utime + stime of thread `tid` of this process, in seconds.
    static func threadCPU(_ tid: Int32) -> Double {
        let fd = open("/proc/self/task/\(tid)/stat", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 1024)
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, 1023) }
        guard n > 0 else { return 0 }
        let text = String(decoding: buf[0..<n], as: UTF8.self)
        // Fields after the ")" of the command name: state is field 3, utime 14, stime 15 (proc(5)).
        guard let close = text.lastIndex(of: ")") else { return 0 }
        let f = text[text.index(after: close)...].split(separator: " ")
        guard f.count > 13, let u = Double(f[11]), let s = Double(f[12]) else { return 0 }
        return (u + s) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    static func run(_ config: DaemonConfig, _ o: Options) -> Int32 {
        let withWorkload = Set(DeviceRegistry.standard.types.values.filter { $0.workload != nil }.map(\.name))
        let chosen = config.devices.filter { withWorkload.contains($0.type) && $0.backend == .inproc }
        guard !chosen.isEmpty else {
            printErr("loopbackd: error: bench --concurrent: no in-process device with a workload in \(config.file)")
            return 2
        }
        let seconds = Double(o.seconds ?? 5)
        do throws(DeviceError) {
            let loop: EventLoop
            do { loop = try EventLoop() } catch { throw DeviceError("event loop: \(error)") }
            let host = DeviceHost(loop: loop)
            var indices: [Int] = []
            for d in chosen { indices.append(host.add(name: d.name, device: try d.make())) }
            loop.startThread()
            let pinned = lb_allowed_cpus() >= 2 ? loop.executeAndWait { lb_pin_self(0) } : -1
            defer {
                loop.executeAndWait { host.shutdown() }
                loop.stopAndJoin()
            }
            var drivers: [Driver] = []
            for (d, i) in zip(chosen, indices) {
                let drv: SimDriver
                do { drv = try SimDriver(host: host, index: i, ramSize: 16 << 20) } catch { throw DeviceError("\(d.name): \(error)") }
                try drv.start(queueCount: workloadQueueCount(type: d.type))
                guard let w = makeWorkload(type: d.type, driver: drv, verify: false) else { throw DeviceError("\(d.name): no workload") }
                drivers.append(Driver(name: d.name, type: d.type, drv: drv, workload: w))
            }
            defer { for d in drivers { d.drv.reset() } }
            // Every driver thread starts at the same instant, warms up for 1 s, then counts for `seconds`.
            let t0 = lb_now_ns() &+ 100_000_000
            let measureFrom = t0 &+ 1_000_000_000, end = measureFrom &+ UInt64(seconds * 1e9)
            // With the loop on the first CPU, every driver thread goes on the second: otherwise whichever driver the
            // scheduler puts next to the loop is woken without an IPI and runs 4x as many round trips (seen: one rng
            // of four at 49,800/s, the others 11,600/s), which measures the scheduler, not the loop's fairness.
            let pinDrivers = pinned >= 0
            let threads = drivers.map { d in
                Transport.Thread.spawn {
                    if pinDrivers { _ = lb_pin_self(1) }
                    while lb_now_ns() < t0 { usleep(1000) }
                    while true {
                        let a = lb_now_ns()
                        if a >= end { break }
                        let ok = d.workload.runOne(spinNs: 0)
                        let b = lb_now_ns()
                        if a >= measureFrom {
                            d.histogram.record(b &- a)
                            d.requests += 1
                            if !ok { d.errors += 1 }
                        }
                    }
                }
            }
            while lb_now_ns() < measureFrom { usleep(1000) }
            let tid = loop.loopThreadID
            let cpu0 = threadCPU(tid), w0 = lb_now_ns()
            while lb_now_ns() < end { usleep(10_000) }
            let cpu1 = threadCPU(tid), w1 = lb_now_ns()
            for t in threads { t.join() }
            let wall = Double(w1 &- w0) / 1e9
            let loopCPU = (cpu1 - cpu0) / wall

            let total = drivers.reduce(0) { $0 + $1.requests }
            let errors = drivers.reduce(0) { $0 + $1.errors }
            var types: [String] = []
            for d in drivers where !types.contains(d.type) { types.append(d.type) }
            if !o.json {
                print("loopbackd bench --concurrent: \(drivers.count) devices on one event loop"
                      + (pinned >= 0 ? " (pinned to CPU \(pinned); the driver threads share the next CPU)" : "") + ", one driver thread each, queue depth 1, notify mode, "
                      + "\(Int(seconds)) s after 1 s of warm-up; \(lb_allowed_cpus()) CPUs")
                print("device     type         req/s   p50_us   p99_us   max_us  errors")
                for d in drivers {
                    print(pad(d.name, 10, left: true) + " " + pad(d.type, 6, left: true) + pad(String(Int(Double(d.requests) / seconds)), 12)
                          + " " + pad(micro(d.histogram.percentile(0.5)), 8) + " " + pad(micro(d.histogram.percentile(0.99)), 8)
                          + " " + pad(micro(d.histogram.max), 8) + " " + pad(String(d.errors), 7))
                }
                print("aggregate: \(Int(Double(total) / seconds)) req/s, \(errors) errors; loop thread CPU \(fmt2(loopCPU * 100))% "
                      + "(\(fmt2(loopCPU * 1e6 / max(Double(total) / seconds, 1))) us of loop CPU per request)")
                for t in types {
                    let rates = drivers.filter { $0.type == t }.map { $0.requests }
                    guard rates.count > 1, let lo = rates.min(), let hi = rates.max(), hi > 0 else { continue }
                    print("fairness \(t): \(rates.count) devices, slowest / fastest = \(fmt2(Double(lo) / Double(hi)))")
                }
            }
            let items = drivers.map { d in
                "{\"device\": \"\(d.name)\", \"type\": \"\(d.type)\", \"requests\": \(d.requests), \"errors\": \(d.errors), "
                    + "\"rps\": \(Int(Double(d.requests) / seconds)), \"p50_ns\": \(d.histogram.percentile(0.5)), "
                    + "\"p99_ns\": \(d.histogram.percentile(0.99)), \"max_ns\": \(d.histogram.max)}"
            }
            print("{\"concurrent\": [" + items.joined(separator: ", ") + "], \"aggregate_rps\": \(Int(Double(total) / seconds)), "
                  + "\"loop_cpu\": \(fmt2(loopCPU)), \"seconds\": \(Int(seconds))}")
            let starved = drivers.filter { $0.requests == 0 }.map(\.name)
            if !starved.isEmpty { printErr("loopbackd: error: bench --concurrent: starved (no request completed): \(starved.joined(separator: ", "))") }
            return errors > 0 || !starved.isEmpty ? 1 : 0
        } catch {
            printErr("loopbackd: error: bench --concurrent: \(error)")
            return 1
        }
    }
}
