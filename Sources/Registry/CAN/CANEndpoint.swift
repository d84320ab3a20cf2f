import Glibc
import CLinux
import Transport

/// What a host CAN endpoint did with a frame the driver sent.
public enum CANSendResult: Equatable {
    /// The socket accepted it (queued for the bus).
    case sent
    /// The socket's send buffer is full: the endpoint reports writable again (the frame waits, nothing is dropped).
    case wouldBlock
    /// The interface's queue is full (SocketCAN's ENOBUFS): no writable edge follows; retry after a pause.
    case retryLater
    /// Refused for good (EINVAL: e.g. an FD frame on an interface whose MTU no longer allows FD): result NOT_OK.
    case rejected(Int32)
    /// The interface is down or gone (ENETDOWN, ENODEV, ENXIO): the controller goes bus-off.
    case down
}

public enum CANReceiveResult: Equatable {
    /// One frame (16 or 72 bytes, SocketCAN layout) was read.
    case frame(size: Int)
    /// Nothing queued now: the endpoint reports readable again.
    case empty
    /// The interface reported bus-off (an error frame) or went down: the controller goes bus-off.
    case busOff
}

/// The device side of an endpoint's events, on the loop thread.
public protocol CANEndpointDelegate: AnyObject {
    /// Frames may be queued (or an error is pending: the next `receive` says `.busOff`).
    func endpointReadable()
    /// A send that would have blocked may succeed now.
    func endpointWritable()
}

/// The host side of a virtio-can device: one CAN interface. The real one is `SocketCANEndpoint` (a CAN_RAW socket,
/// non-blocking on the loop), the fake one `FakeCANBus` (in memory: unit tests, the simulated workload). Frames are in
/// SocketCAN's layout (`LinuxCAN`). Sends and receives never block; after `.wouldBlock`/`.empty` the endpoint tells
/// its delegate when to try again. Loop thread only, except `init`.
public protocol CANEndpoint: AnyObject {
    var description: String { get }
    /// The interface takes CAN FD frames (its MTU is CANFD_MTU): the device offers VIRTIO_CAN_F_CAN_FD.
    var fdCapable: Bool { get }
    /// Watch the endpoint on `loop` (idempotent).
    func start(loop: EventLoop, delegate: CANEndpointDelegate) throws(DeviceError)
    func stop()
    /// After feature negotiation: which frames the driver can take (FD frames, RTR frames).
    func configure(fd: Bool, rtr: Bool)
    /// The controller started (true) or stopped (false): a stopped controller takes no frames from the bus, and
    /// what was queued before the start or stop is discarded. Must not block or take kernel locks a driver may hold
    /// while it waits for the device (RTNL: see `SocketCANEndpoint`).
    func setReceiving(_ on: Bool)
    /// While stopped: drops what arrived; true if it stopped at its bound with more there.
    func discardQueued() -> Bool
    /// Whether the controller can start now (the interface is up).
    var isUp: Bool { get }
    func send(_ frame: UnsafeRawPointer, size: Int) -> CANSendResult
    /// Reads one frame into `frame` (72 bytes of room).
    func receive(into frame: UnsafeMutableRawPointer) -> CANReceiveResult
}

/// An in-memory CAN bus for unit tests and the simulated workload. Frames the test injects wait in a fixed ring
/// (what a socket's receive queue is); with `echo`, every frame sent comes back as a received frame (a peer that
/// answers each frame with itself). `sendCapacity` frames can be sent before `.wouldBlock` (a full socket buffer);
/// `drainSent` frees room and reports writable. Events reach the device through an eventfd on the loop, never by a
/// call from inside `send`/`receive`, as a socket's would. No allocation per frame (the record of sent frames,
/// when `record` is on, appends to an array: tests only).
public final class FakeCANBus: CANEndpoint, EventHandler {
    public let description: String
    public let fdCapable: Bool
    public var up = true
    public var isUp: Bool { up }
    public private(set) var receiving = false
    public private(set) var acceptFD = false, acceptRTR = false
    /// Frames waiting to be received (a ring of 72-byte slots) and their sizes.
    private let ring: UnsafeMutableRawPointer
    private let sizes: UnsafeMutablePointer<Int>
    public let capacity: Int
    private var first = 0
    public private(set) var queued = 0
    /// Frames accepted by `send` and not yet drained (room left: `sendCapacity - inFlight`).
    public var sendCapacity: Int
    public private(set) var inFlight = 0
    public private(set) var sentCount = 0
    /// Frames discarded: injected while not receiving, flushed at a stop, or the ring was full.
    public private(set) var discarded = 0
    public var echo: Bool
    public var record: Bool
    public private(set) var sent: [[UInt8]] = []
    /// Results `send` gives before the normal ones (a test's script: `.retryLater`, `.down`, `.rejected(EINVAL)`).
    public var scriptedSends: [CANSendResult] = []
    /// One `.busOff` from `receive` when set (an error frame).
    public var busOffPending = false
    private var loop: EventLoop?
    private unowned(unsafe) var delegate: CANEndpointDelegate?
    private var event: FileRef?
    private var registration = -1
    private var wantReadable = false, wantWritable = false

    public init(fdCapable: Bool = true, capacity: Int = 4096, sendCapacity: Int = .max, echo: Bool = false, record: Bool = false,
                description: String = "simulated CAN bus") {
        self.fdCapable = fdCapable
        self.capacity = max(capacity, 1)
        self.sendCapacity = sendCapacity
        self.echo = echo
        self.record = record
        self.description = description
        ring = .allocate(byteCount: self.capacity * LinuxCAN.fdMTU, alignment: 8)
        sizes = .allocate(capacity: self.capacity)
    }
    deinit { stop(); ring.deallocate(); sizes.deallocate() }

    public func start(loop: EventLoop, delegate: CANEndpointDelegate) throws(DeviceError) {
        self.delegate = delegate
        guard self.loop == nil else { return }
        do {
            let e = FileRef(adopting: try FD.eventfd().release())
            registration = try loop.register(fd: e.raw, handler: self, token: 0)
            event = e
        } catch { throw DeviceError("simulated CAN bus: \(error)") }
        self.loop = loop
    }

    public func stop() {
        if let e = event, registration >= 0 { loop?.unregister(fd: e.raw, registration: registration) }
        registration = -1
        event = nil
        loop = nil
        delegate = nil
    }

    public func configure(fd: Bool, rtr: Bool) { acceptFD = fd; acceptRTR = rtr }

    public func setReceiving(_ on: Bool) {
        receiving = on
        _ = discardQueued()
    }

    public func discardQueued() -> Bool {
        discarded += queued; queued = 0; first = 0
        return false
    }

    private func notify(readable: Bool) {
        if readable { wantReadable = true } else { wantWritable = true }
        if let e = event { FD.signal(e.raw) }
    }

    public func handleEvent(token: UInt32, events: UInt32) {
        guard let e = event else { return }
        _ = FD.drain(e.raw)
        let r = wantReadable, w = wantWritable
        wantReadable = false; wantWritable = false
        if w { delegate?.endpointWritable() }
        if r { delegate?.endpointReadable() }
    }

    /// A frame from the bus (SocketCAN layout, 16 or 72 bytes): queued if the controller receives and the kind is
    /// one the socket would deliver (FD only when configured, RTR only when configured). Returns false if dropped.
    @discardableResult
    public func inject(_ frame: UnsafeRawPointer, size: Int) -> Bool {
        guard receiving, size == LinuxCAN.mtu || size == LinuxCAN.fdMTU, size == LinuxCAN.mtu || acceptFD,
              size == LinuxCAN.fdMTU || frame.loadUnaligned(as: UInt32.self) & LinuxCAN.rtrFlag == 0 || acceptRTR,
              queued < capacity else { discarded += 1; return false }
        let k = (first + queued) % capacity
        (ring + k * LinuxCAN.fdMTU).copyMemory(from: frame, byteCount: size)
        sizes[k] = size
        queued += 1
        notify(readable: true)
        return true
    }

    /// Builds and injects a frame: `id` with SocketCAN's flags (`LinuxCAN.effFlag`, `rtrFlag`), payload `data`.
    @discardableResult
    public func inject(id: UInt32, data: [UInt8], fd: Bool = false, length: Int? = nil) -> Bool {
        var f = [UInt8](repeating: 0, count: LinuxCAN.fdMTU)
        withUnsafeBytes(of: id) { for i in 0..<4 { f[i] = $0[i] } }
        f[4] = UInt8(length ?? data.count)
        if fd { f[5] = LinuxCAN.fdfFlag }
        for (i, b) in data.enumerated() where 8 + i < f.count { f[8 + i] = b }
        return f.withUnsafeBytes { inject($0.baseAddress!, size: fd ? LinuxCAN.fdMTU : LinuxCAN.mtu) }
    }

    public func send(_ frame: UnsafeRawPointer, size: Int) -> CANSendResult {
        if !scriptedSends.isEmpty { return scriptedSends.removeFirst() }
        guard up else { return .down }
        guard inFlight < sendCapacity else { return .wouldBlock }
        inFlight += 1
        sentCount += 1
        if record { sent.append(Array(UnsafeRawBufferPointer(start: frame, count: size))) }
        if echo { inject(frame, size: size) }
        if sendCapacity == .max { inFlight = 0 }
        return .sent
    }

    /// The bus took `n` sent frames off the socket: room for more, writable reported.
    public func drainSent(_ n: Int) {
        inFlight = max(0, inFlight - n)
        notify(readable: false)
    }

    public func receive(into frame: UnsafeMutableRawPointer) -> CANReceiveResult {
        if busOffPending { busOffPending = false; return .busOff }
        guard queued > 0 else { return .empty }
        frame.copyMemory(from: ring + first * LinuxCAN.fdMTU, byteCount: sizes[first])
        let s = sizes[first]
        first = (first + 1) % capacity
        queued -= 1
        return .frame(size: s)
    }

    /// An error frame with bus-off (or the interface going down): reported through the next `receive`.
    public func raiseBusOff() {
        busOffPending = true
        notify(readable: true)
    }
}
