import Glibc
import CLinux
import Transport
import Registry

/// transport = "sim": one simulated driver per device, each on its own thread with a paced demo workload
/// (rng reads; blk writes verified by read-back), so a person sees the devices work without the kernel module.
/// Devices are attached and detached one at a time (start-up, `loopbackd ctl add/remove`, reload).
final class SimTransport: DriverSide, @unchecked Sendable {
    let host: DeviceHost
    var name: String { "sim" }
    /// One per attached device (main thread only).
    private final class Entry {
        let name: String
        let index: Int
        let driver: SimDriver
        /// What a request is and the driver-side counters; nil for a type without a workload (idle device).
        let what: String?
        let counters: Counters
        let stop = Counters()
        var thread: Thread?
        var last = 0
        init(name: String, index: Int, driver: SimDriver, what: String?, counters: Counters) {
            self.name = name; self.index = index; self.driver = driver; self.what = what; self.counters = counters
        }
    }
    private var entries: [Entry] = []

    init(host: DeviceHost) { self.host = host }

    func start() throws(DeviceError) {}

    func attach(_ d: DeviceConfig, index i: Int) throws(DeviceError) -> Counters? {
        let drv: SimDriver
        do { drv = try SimDriver(host: host, index: i, ramSize: 16 << 20) } catch { throw DeviceError("\(d.name): \(error)") }
        do { try drv.start() } catch { drv.reset(); throw error }
        let c = Counters()
        guard let w = makeWorkload(type: d.type, driver: drv, verify: true) else {
            Log.warning("\(d.name): no simulated workload for type \(d.type); device is idle")
            entries.append(Entry(name: d.name, index: i, driver: drv, what: nil, counters: c))
            return nil
        }
        let e = Entry(name: d.name, index: i, driver: drv, what: w.requestKind, counters: c)
        let stop = e.stop
        let box = UncheckedSendable((drv, w))
        e.thread = Thread.spawn {
            let (drv, w) = box.value
            var n = 0
            while stop.requests.load(ordering: .relaxed) == 0 {
                let t0 = lb_now_ns()
                if w.runOne(spinNs: 0) { c.requests.add(1, ordering: .relaxed) } else { c.errors.add(1, ordering: .relaxed) }
                c.recordLatency(lb_now_ns() &- t0)
                n += 1
                if n % 64 == 0 { usleep(20_000) }   // paced: a demo, not a load test
            }
            drv.reset()
        }
        entries.append(e)
        return c
    }

    func detach(index: Int) throws(DeviceError) {
        guard let k = entries.firstIndex(where: { $0.index == index }) else { return }
        let e = entries.remove(at: k)
        e.stop.requests.store(1, ordering: .relaxed)
        if let t = e.thread { t.join() } else { e.driver.reset() }
    }

    func stop() {
        for e in entries { e.stop.requests.store(1, ordering: .relaxed) }
        for e in entries { e.thread?.join() }
        entries = []
    }

    func report(seconds: Double) {
        var parts: [String] = []
        for e in entries {
            guard let what = e.what else { continue }
            let n = e.counters.requests.load(ordering: .relaxed)
            let errors = e.counters.errors.load(ordering: .relaxed)
            let rate = Int(Double(n - e.last) / seconds)
            e.last = n
            parts.append("\(e.name): \(rate)/s \(what) (total \(n), errors \(errors))")
        }
        if !parts.isEmpty { print("sim: " + parts.joined(separator: " | ")) }
    }
}
