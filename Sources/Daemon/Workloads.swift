import Synchronization
import Transport
import Registry

/// The workload of a configured device, from its type's entry in the registry (nil: the type has none).
public func makeWorkload(type: String, driver: SimDriver, verify: Bool) -> Workload? {
    DeviceRegistry.standard.types[type]?.workload?(driver, verify)
}

/// Per-device counters a workload thread updates and the main thread (report) and the control socket (stats) read.
final class Counters: Sendable {
    let requests = Atomic<Int>(0)
    let errors = Atomic<Int>(0)
    /// The slowest round trip the driver saw (submit to used entry), in ns; one writer (the workload thread).
    let maxLatencyNs = Atomic<UInt64>(0)
    func recordLatency(_ ns: UInt64) {
        if ns > maxLatencyNs.load(ordering: .relaxed) { maxLatencyNs.store(ns, ordering: .relaxed) }
    }
}
