import Glibc
import Synchronization
import Transport

/// An input source with no host device: capabilities given at init, events injected from any thread (a
/// lock-free single-producer ring plus an eventfd that wakes the loop), status events recorded. Unit tests run
/// the device logic on it; the simulated workload (`bench`, `ab`, the demo) drives it. No allocation per event.
public final class FakeInputSource: InputSource, EventHandler {
    public let capabilities: InputCapabilities
    private let wake: OwnedFD
    private let capacity: Int
    private let slots: UnsafeMutablePointer<UInt64>
    // Producer advances `tail`, consumer `head`; both free-running.
    private let head = Atomic<Int>(0)
    private let tail = Atomic<Int>(0)
    private var loop: EventLoop?
    private var registration = -1
    private unowned(unsafe) var sink: InputSink?
    /// Status events the device wrote back (loop thread; read with `loop.executeAndWait`).
    public private(set) var written: [InputEvent] = []
    /// Events injected while the ring was full (not delivered).
    public let overruns = Atomic<Int>(0)
    /// false: `write` fails (a host device that refuses LED writes).
    public var acceptsWrites = true
    /// Test hook (`simulated-replay = true`): every LED status write of value 1 from the driver makes the source
    /// emit `replaySequence`, so a guest can trigger known events without the simulated workload.
    public var replayOnLed = false
    /// Replays emitted so far (loop thread).
    public private(set) var replays = 0

    /// The known sequence (the same as Tests/guest/tools/inputtool.c's uinput device emits): key A down, up;
    /// touch down at (100, 200); touch up. 14 events in 4 SYN_REPORT groups.
    public static let replaySequence: [InputEvent] = {
        let k = VirtioInput.evKey, a = VirtioInput.evAbs
        return [InputEvent(type: k, code: 30, value: 1), .synReport,
                InputEvent(type: k, code: 30, value: 0), .synReport,
                InputEvent(type: a, code: 0x39, value: 1), InputEvent(type: a, code: 0x35, value: 100),
                InputEvent(type: a, code: 0x36, value: 200), InputEvent(type: k, code: 330, value: 1),
                InputEvent(type: a, code: 0x00, value: 100), InputEvent(type: a, code: 0x01, value: 200), .synReport,
                InputEvent(type: a, code: 0x39, value: -1), InputEvent(type: k, code: 330, value: 0), .synReport]
    }()

    /// A keyboard with LEDs and a multi-touch screen: the capabilities the guest test's uinput device has.
    public static var keyboardAndTouch: InputCapabilities {
        var c = InputCapabilities(name: "loopbackd fake keyboard+touch")
        c.serial = "fake-0001"
        c.bustype = 0x06; c.vendor = 0x1d6b; c.product = 0x0104; c.version = 1
        c.setProp(1)   // INPUT_PROP_DIRECT
        for k in [1, 2, 3, 4, 5, 14, 28, 30, 48, 57, 330] { c.set(type: VirtioInput.evKey, code: UInt16(k)) }  // ESC 1-4 BS ENTER A B SPACE BTN_TOUCH
        c.set(type: VirtioInput.evLed, code: 0); c.set(type: VirtioInput.evLed, code: 1); c.set(type: VirtioInput.evLed, code: 2)
        c.set(type: VirtioInput.evMsc, code: 4)  // MSC_SCAN
        c.setAbs(0x00, AbsInfo(min: 0, max: 1919, res: 10))          // ABS_X
        c.setAbs(0x01, AbsInfo(min: 0, max: 1079, res: 10))          // ABS_Y
        c.setAbs(0x2f, AbsInfo(min: 0, max: 9))                      // ABS_MT_SLOT
        c.setAbs(0x35, AbsInfo(min: 0, max: 1919, fuzz: 2, res: 10)) // ABS_MT_POSITION_X
        c.setAbs(0x36, AbsInfo(min: 0, max: 1079, fuzz: 2, res: 10)) // ABS_MT_POSITION_Y
        c.setAbs(0x39, AbsInfo(min: 0, max: 65535))                  // ABS_MT_TRACKING_ID
        return c
    }

    public init(_ caps: InputCapabilities = FakeInputSource.keyboardAndTouch, capacity: Int = 4096) throws(DeviceError) {
        capabilities = caps
        do { wake = try FD.eventfd() } catch { throw DeviceError("input fake source: eventfd: \(error)") }
        self.capacity = max(capacity, 2)
        slots = .allocate(capacity: self.capacity)
    }
    deinit { slots.deallocate() }

    public func start(loop: EventLoop, sink: InputSink) throws(DeviceError) {
        self.loop = loop
        self.sink = sink
        do { registration = try loop.register(fd: wake.raw, handler: self, token: 0) } catch {
            throw DeviceError("input fake source: cannot watch eventfd: \(error)")
        }
    }

    public func stop() {
        guard let loop, registration >= 0 else { return }
        loop.unregister(fd: wake.raw, registration: registration)
        registration = -1
    }

    public func write(_ e: InputEvent) -> Bool {
        guard acceptsWrites else { return false }
        written.append(e)
        if replayOnLed && e.type == VirtioInput.evLed && e.value == 1 {
            replays += 1
            inject(FakeInputSource.replaySequence)
        }
        return true
    }

    /// Any one thread: queues events and wakes the loop; false (counted) for those that did not fit.
    @discardableResult
    public func inject(_ events: UnsafeBufferPointer<InputEvent>) -> Bool {
        var t = tail.load(ordering: .relaxed)
        let h = head.load(ordering: .acquiring)
        var ok = true
        for e in events {
            if t &- h >= capacity { overruns.add(1, ordering: .relaxed); ok = false; continue }
            slots[t % capacity] = e.wire
            t &+= 1
        }
        tail.store(t, ordering: .releasing)
        FD.signal(wake.raw)
        return ok
    }

    @discardableResult
    public func inject(_ events: [InputEvent]) -> Bool { events.withUnsafeBufferPointer { inject($0) } }

    /// Loop thread: the host device disappears / comes back (what EvdevSource reports on ENODEV and reopen).
    public func unplug() { sink?.inputSourceLost("fake unplug") }
    public func replug() { sink?.inputSourceBack() }

    public func handleEvent(token: UInt32, events: UInt32) {
        _ = FD.drain(wake.raw)
        var h = head.load(ordering: .relaxed)
        let t = tail.load(ordering: .acquiring)
        while h != t {
            let w = slots[h % capacity]
            h &+= 1
            head.store(h, ordering: .releasing)
            sink?.inputEvent(InputEvent(wire: w))
        }
    }
}
