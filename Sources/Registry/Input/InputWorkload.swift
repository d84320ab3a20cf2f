import Glibc
import Transport

/// virtio-input through the simulated driver: every event buffer of queue 0 posted once (as Linux's
/// virtio_input does), then per request one key press or release group (EV_KEY KEY_A + SYN_REPORT) injected into
/// the device's fake source from this thread; the request ends when the driver has reaped both events (checked)
/// and given the two buffers back. So each request's time is the event-to-driver latency. Needs an in-process
/// device with `simulated = true` (a forwarded or evdev-backed device has no injectable host side: no workload).
public final class InputWorkload: Workload {
    let driver: SimDriver
    let source: FakeInputSource
    public let q: SimQueue
    private let bufs: UInt64
    private let events: UnsafeMutablePointer<InputEvent>
    private var down = true
    public let bytesPerRequest = 16
    public let requestKind = "key events (2-event groups)"
    /// Events that came back with the wrong content or order.
    public private(set) var mismatches = 0

    public init?(_ d: SimDriver) {
        let host = d.host, index = d.index
        guard let dev = host.loop.executeAndWait({ host.device(index) }) as? InputDevice,
              let src = dev.source as? FakeInputSource, let q = d.queues.first else { return nil }
        driver = d; source = src; self.q = q
        bufs = d.alloc(8 * Int(q.size))
        events = .allocate(capacity: 2)
        let old = q.availIdx
        for k in 0..<Int(q.size) {
            guard let h = q.addChain(readable: [], writable: [(bufs + UInt64(8 * k), 8)]) else { return nil }
            q.pushAvail(h)
        }
        q.publish()
        q.kickIfNeeded(old: old)
    }
    deinit { events.deallocate() }

    public func runOne(spinNs: UInt64) -> Bool {
        let value: Int32 = down ? 1 : 0
        down.toggle()
        events[0] = InputEvent(type: VirtioInput.evKey, code: 30, value: value)
        events[1] = .synReport
        guard source.inject(UnsafeBufferPointer(start: events, count: 2)) else { return false }
        var ok = true
        let old = q.availIdx
        for k in 0..<2 {
            guard let u = q.waitUsed(timeoutMs: 1000, spinNs: spinNs) else { return false }
            let e = InputEvent(wire: UInt64(littleEndian: driver.host(bufs + 8 * UInt64(u.id)).loadUnaligned(as: UInt64.self)))
            if u.len != 8 || e != events[k] { mismatches += 1; ok = false }
            q.pushAvail(u.id)
        }
        q.publish()
        q.kickIfNeeded(old: old)
        return ok
    }
}
