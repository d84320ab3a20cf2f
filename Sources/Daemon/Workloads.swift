import Synchronization
import Transport
import Registry

/// The workload of a configured device, from its type's entry in the registry (nil: the type has none).
public func makeWorkload(type: String, driver: SimDriver, verify: Bool) -> Workload? {
    DeviceRegistry.standard.types[type]?.workload?(driver, verify)
}

/// How many queues the simulated driver sets up for `type`'s workload: the first only (bench and ab measure it),
/// except where the device stays idle without all of them (vsock: rx, tx, event; can: tx, rx, control) or the
/// workload uses more (sound: its stream phase plays on the tx queue). nil: every queue the device offers.
func workloadQueueCount(type: String) -> Int? { type == "vsock" || type == "can" || type == "sound" ? nil : 1 }

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
