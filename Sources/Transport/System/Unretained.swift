/// Calling a protocol method on the hot path without ARC traffic.
///
/// A protocol existential called from a table costs a retain/release per call, even when stored `unowned(unsafe)`,
/// and so does a closure loaded from memory (measured with a swift_retain breakpoint: 2-5 per request). A small
/// class trampoline, stored as `Unmanaged` and called with `_withUnsafeGuaranteedRef`, costs one virtual call and
/// no retain. The trampoline holds its target unretained; whoever registered the target keeps both alive (the
/// owning arrays next to each table).

/// Calls `EventHandler.handleEvent`.
class EventTrampoline {
    func handleEvent(token: UInt32, events: UInt32) {}
    static func make<H: EventHandler>(_ h: H) -> EventTrampoline { EventTrampolineFor(h) }
}
final class EventTrampolineFor<H: EventHandler>: EventTrampoline {
    let target: Unmanaged<H>
    init(_ h: H) { target = .passUnretained(h) }
    override func handleEvent(token: UInt32, events: UInt32) {
        target._withUnsafeGuaranteedRef { $0.handleEvent(token: token, events: events) }
    }
}

/// Calls `Poller.poll`.
class PollTrampoline {
    func poll() -> Bool { false }
    static func make<P: Poller>(_ p: P) -> PollTrampoline { PollTrampolineFor(p) }
}
final class PollTrampolineFor<P: Poller>: PollTrampoline {
    let target: Unmanaged<P>
    init(_ p: P) { target = .passUnretained(p) }
    override func poll() -> Bool { target._withUnsafeGuaranteedRef { $0.poll() } }
}

/// Calls `DeferredWork.runDeferred`.
class DeferredTrampoline {
    func runDeferred() {}
    static func make<D: DeferredWork>(_ d: D) -> DeferredTrampoline { DeferredTrampolineFor(d) }
}
final class DeferredTrampolineFor<D: DeferredWork>: DeferredTrampoline {
    let target: Unmanaged<D>
    init(_ d: D) { target = .passUnretained(d) }
    override func runDeferred() { target._withUnsafeGuaranteedRef { $0.runDeferred() } }
}

/// Calls `VirtioDevice.queueNotified`.
class DeviceTrampoline {
    func queueNotified(_ q: Int) {}
    static func make<D: VirtioDevice>(_ d: D) -> DeviceTrampoline { DeviceTrampolineFor(d) }
}
final class DeviceTrampolineFor<D: VirtioDevice>: DeviceTrampoline {
    let target: Unmanaged<D>
    init(_ d: D) { target = .passUnretained(d) }
    override func queueNotified(_ q: Int) { target._withUnsafeGuaranteedRef { $0.queueNotified(q) } }
}

extension Unmanaged where Instance == EventTrampoline {
    @inline(__always) func handleEvent(token: UInt32, events: UInt32) {
        _withUnsafeGuaranteedRef { $0.handleEvent(token: token, events: events) }
    }
}
extension Unmanaged where Instance == PollTrampoline {
    @inline(__always) func poll() -> Bool { _withUnsafeGuaranteedRef { $0.poll() } }
}
extension Unmanaged where Instance == DeviceTrampoline {
    @inline(__always) func queueNotified(_ q: Int) { _withUnsafeGuaranteedRef { $0.queueNotified(q) } }
}
extension Unmanaged where Instance == DeferredTrampoline {
    @inline(__always) func runDeferred() { _withUnsafeGuaranteedRef { $0.runDeferred() } }
}
