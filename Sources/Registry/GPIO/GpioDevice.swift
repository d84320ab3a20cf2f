import Glibc
import Transport

/// virtio-gpio (virtio 1.2 §5.17): the driver's line requests (names, direction, value, interrupt type) run on a
/// host `GpioChip`; with VIRTIO_GPIO_F_IRQ the eventq holds one driver buffer per line armed for interrupts until
/// the line's edge or level fires (status VALID), or until the interrupt is disabled (IRQ_TYPE NONE, direction
/// NONE: status INVALID).
///
/// Interrupt rules (§5.17.6.2): an edge seen while the line has no buffer (masked) is latched and delivered when
/// the buffer comes; a level is not latched: a buffer posted while the level holds completes at once; disabling
/// discards the latch. At most one buffer per line: a second one is a driver error, returned INVALID.
///
/// Every driver-controlled field is checked: request size (8 readable bytes), room for the response (2 bytes;
/// GET_NAMES 1 + gpio_names_size), message type, line < ngpio, direction and value enums, interrupt types (0-4, 8),
/// IRQ messages only with F_IRQ and never on an output line, event buffers (2 readable bytes, a status byte, line <
/// ngpio, one per line). A bad request is answered ERR (counted, logged once); nothing latches.
public final class GpioDevice: VirtioDevice, GpioEventSink {
    public let deviceID = VirtioGpio.deviceID
    public let queueMaxSizes: [UInt16]
    public let offeredFeatures: VirtioFeatures = [.version1, .eventIdx, .indirectDesc, VirtioGpio.fIRQ]
    public let configSize = VirtioGpio.configSize
    public let chip: GpioChip
    public let ngpio: Int

    private var queues: UnsafeMutablePointer<SplitQueue>?
    private var queueCount = 0
    private var faults: FaultReporter = .none
    private var irqEnabled = false
    private var started = false

    private let names: UnsafeMutableRawPointer
    public let namesSize: Int
    private let header = UnsafeMutableRawPointer.allocate(byteCount: 8, alignment: 8)
    private let response = UnsafeMutableRawPointer.allocate(byteCount: 2, alignment: 8)

    // Per-line state (preallocated: nothing is allocated per request).
    private let dir: UnsafeMutablePointer<GpioDirection>
    private let outValue: UnsafeMutablePointer<Bool>
    private let irqType: UnsafeMutablePointer<UInt8>
    /// An edge seen while masked (no buffer), delivered when the buffer comes.
    private let latched: UnsafeMutablePointer<Bool>
    /// The line's level as last seen (level interrupts).
    private let level: UnsafeMutablePointer<Bool>
    /// The held eventq buffer: its head and its status byte in driver memory (valid until reset), nil: none.
    private let bufHead: UnsafeMutablePointer<UInt16>
    private let bufStatus: UnsafeMutablePointer<UnsafeMutableRawPointer?>

    /// Requests answered, malformed requests, malformed event buffers, requests the host chip refused,
    /// interrupts delivered, buffers returned INVALID.
    public private(set) var requests = 0, badRequests = 0, badEvents = 0, hostErrors = 0
    public private(set) var interrupts: UInt64 = 0, invalidated = 0
    /// Event buffers held now.
    public private(set) var held = 0

    public init(chip: GpioChip, queueSize: UInt16 = 64) {
        self.chip = chip
        ngpio = min(chip.lineCount, VirtioGpio.maxLines)
        queueMaxSizes = [queueSize, queueSize]
        let block = VirtioGpio.namesBlock(Array(chip.lineNames.prefix(ngpio)))
        namesSize = block.count
        names = .allocate(byteCount: max(block.count, 1), alignment: 8)
        for (k, b) in block.enumerated() { names.storeBytes(of: b, toByteOffset: k, as: UInt8.self) }
        dir = .allocate(capacity: ngpio); dir.initialize(repeating: .none, count: ngpio)
        outValue = .allocate(capacity: ngpio); outValue.initialize(repeating: false, count: ngpio)
        irqType = .allocate(capacity: ngpio); irqType.initialize(repeating: 0, count: ngpio)
        latched = .allocate(capacity: ngpio); latched.initialize(repeating: false, count: ngpio)
        level = .allocate(capacity: ngpio); level.initialize(repeating: false, count: ngpio)
        bufHead = .allocate(capacity: ngpio); bufHead.initialize(repeating: 0, count: ngpio)
        bufStatus = .allocate(capacity: ngpio); bufStatus.initialize(repeating: nil, count: ngpio)
    }
    deinit {
        if started { chip.stop() }
        names.deallocate(); header.deallocate(); response.deallocate()
        dir.deallocate(); outValue.deallocate(); irqType.deallocate(); latched.deallocate(); level.deallocate()
        bufHead.deallocate(); bufStatus.deallocate()
    }

    public func ackFeatures(_ features: VirtioFeatures) { irqEnabled = features.contains(VirtioGpio.fIRQ) }

    public func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        var cfg: (UInt16, UInt16, UInt32) = (UInt16(ngpio).littleEndian, 0, UInt32(namesSize).littleEndian)
        withUnsafeBytes(of: &cfg) { c in
            for k in 0..<buffer.count where offset + k < VirtioGpio.configSize { buffer[k] = c[offset + k] }
        }
    }
    /// The config space is read-only.
    public func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) {}

    // MARK: lifecycle

    public func activate(_ c: DeviceContext) throws(DeviceError) {
        if !started {
            try chip.start(loop: c.loop, sink: self)
            started = true
        }
        queues = c.queues
        queueCount = c.queueCount
        faults = c.faults
        irqEnabled = c.features.contains(VirtioGpio.fIRQ) && c.queueCount > 1
    }

    /// The driver reset its rings: held buffers are forgotten (not completed), every line the driver configured is
    /// released on the host and its state discarded (a reloaded driver starts from lines in direction NONE).
    public func reset() {
        queues = nil
        queueCount = 0
        for l in 0..<ngpio {
            bufStatus[l] = nil
            if dir[l] != .none || irqType[l] != 0 { _ = chip.configure(l, direction: .none, value: false, edges: 0) }
            dir[l] = .none; outValue[l] = false; irqType[l] = 0; latched[l] = false; level[l] = false
        }
        held = 0
    }

    /// Requests complete inside `queueNotified`; held event buffers are given back INVALID (Linux's driver queues
    /// them again while the interrupt is enabled; a latched edge waits for that).
    public func quiesce() { returnAllEvents() }
    public var supportsQueueRestart: Bool { true }
    public func stopQueue(_ index: Int) { if index == 1 { returnAllEvents() } }

    private func returnAllEvents() {
        guard let q = queues, queueCount > 1, held > 0 else { return }
        for l in 0..<ngpio where bufStatus[l] != nil { complete(l, VirtioGpio.irqStatusInvalid) }
        q[1].publish()
        if q[1].faultPending { faults.report(queue: 1) }
    }

    // MARK: queues

    public func queueNotified(_ index: Int) {
        guard let q = queues, index < queueCount else { return }
        if index == 0 {
            q[0].drain { c in request(c) }
            if q[0].faultPending { faults.report(queue: 0) }
        } else if index == 1 {
            q[1].drain { c in event(c) }
        }
        // Interrupts raised while answering requests (an output wired to an input) were added to the eventq.
        if queueCount > 1 {
            q[1].publish()
            if q[1].faultPending { faults.report(queue: 1) }
        }
    }

    private func bad(_ why: @autoclosure () -> String) {
        badRequests += 1
        if badRequests == 1 { Log.warning("gpio: malformed request (\(why())); answered ERR; further ones are not logged") }
    }

    /// One requestq message; returns the bytes written.
    private func request(_ c: borrowing Chain) -> UInt32 {
        requests += 1
        guard c.writableBytes >= 1 else { bad("no room for a response"); return 0 }
        let readable = c.readableBytes, writable = c.writableBytes
        guard readable == UInt32(VirtioGpio.requestSize), c.read(into: header, length: 8) == 8 else {
            bad("request of \(readable) bytes, not 8")
            return respond(c, VirtioGpio.statusError, 0)
        }
        let type = UInt16(littleEndian: header.load(as: UInt16.self))
        let line = Int(UInt16(littleEndian: header.load(fromByteOffset: 2, as: UInt16.self)))
        let value = UInt32(littleEndian: header.load(fromByteOffset: 4, as: UInt32.self))
        if type == VirtioGpio.msgGetNames {
            guard namesSize > 0 else { bad("GET_NAMES without names (gpio_names_size 0)"); return respond(c, VirtioGpio.statusError, 0) }
            guard c.writableBytes >= UInt32(1 + namesSize) else {
                bad("GET_NAMES with room for \(writable) bytes, needs \(1 + namesSize)")
                return respond(c, VirtioGpio.statusError, 0)
            }
            var s = VirtioGpio.statusOK
            _ = c.write(from: &s, length: 1)
            _ = c.write(from: names, length: namesSize, at: 1)
            return UInt32(1 + namesSize)
        }
        guard c.writableBytes >= UInt32(VirtioGpio.responseSize) else {
            bad("response room \(writable) bytes, needs 2")
            return respond(c, VirtioGpio.statusError, 0)
        }
        guard line < ngpio else { bad("line \(line) of \(ngpio)"); return respond(c, VirtioGpio.statusError, 0) }
        switch type {
        case VirtioGpio.msgGetDirection:
            let d = dir[line] != .none ? dir[line] : irqType[line] != 0 ? .input : chip.hostDirection(line)
            return respond(c, VirtioGpio.statusOK, d.rawValue)
        case VirtioGpio.msgSetDirection:
            guard value <= 2, let d = GpioDirection(rawValue: UInt8(value)) else { bad("direction \(value)"); return respond(c, VirtioGpio.statusError, 0) }
            return respond(c, setDirection(line, d) ? VirtioGpio.statusOK : VirtioGpio.statusError, 0)
        case VirtioGpio.msgGetValue:
            let v = chip.getValue(line)
            guard v >= 0 else { hostErrors += 1; return respond(c, VirtioGpio.statusError, 0) }
            return respond(c, VirtioGpio.statusOK, UInt8(v))
        case VirtioGpio.msgSetValue:
            guard value <= 1 else { bad("value \(value)"); return respond(c, VirtioGpio.statusError, 0) }
            // A value set before the direction is OUT (Linux's direction_output sends SET_VALUE first) is the
            // level the line drives once it becomes an output.
            outValue[line] = value == 1
            if dir[line] == .output && !chip.setValue(line, value == 1) { hostErrors += 1; return respond(c, VirtioGpio.statusError, 0) }
            return respond(c, VirtioGpio.statusOK, 0)
        case VirtioGpio.msgIRQType:
            guard irqEnabled else { bad("IRQ_TYPE without VIRTIO_GPIO_F_IRQ"); return respond(c, VirtioGpio.statusError, 0) }
            guard value <= 4 || value == 8 else { bad("interrupt type \(value)"); return respond(c, VirtioGpio.statusError, 0) }
            return respond(c, setIRQ(line, UInt8(value)) ? VirtioGpio.statusOK : VirtioGpio.statusError, 0)
        default:
            bad("message type \(type)")
            return respond(c, VirtioGpio.statusError, 0)
        }
    }

    @inline(__always)
    private func respond(_ c: borrowing Chain, _ status: UInt8, _ value: UInt8) -> UInt32 {
        response.storeBytes(of: status, as: UInt8.self)
        response.storeBytes(of: value, toByteOffset: 1, as: UInt8.self)
        return UInt32(c.write(from: response, length: min(2, Int(c.writableBytes))))
    }

    /// Edges the host must detect for interrupt type `t` (levels are tracked through both edges).
    @inline(__always) private func edges(_ t: UInt8) -> UInt8 { t == 0 ? 0 : t <= 3 ? t : 3 }

    private func setDirection(_ line: Int, _ d: GpioDirection) -> Bool {
        switch d {
        case .output:
            // The driver must disable the line's interrupt before making it an output (§5.17.6.2).
            guard irqType[line] == 0 else { bad("line \(line) made an output with its interrupt enabled"); return false }
            guard chip.configure(line, direction: .output, value: outValue[line], edges: 0) else { hostErrors += 1; return false }
        case .input:
            guard chip.configure(line, direction: .input, value: false, edges: edges(irqType[line])) else { hostErrors += 1; return false }
        case .none:
            // "The device MUST discard all state information corresponding to a GPIO line."
            disarm(line)
            outValue[line] = false
            _ = chip.configure(line, direction: .none, value: false, edges: 0)
        }
        dir[line] = d
        return true
    }

    private func setIRQ(_ line: Int, _ t: UInt8) -> Bool {
        if t == 0 {
            guard irqType[line] != 0 else { return true }
            disarm(line)
            // The line stays what the driver made it (an input keeps its request, without edge detection).
            let d = dir[line]
            if !chip.configure(line, direction: d, value: outValue[line], edges: 0) { hostErrors += 1 }
            return true
        }
        guard dir[line] != .output else { bad("interrupt on output line \(line)"); return false }
        latched[line] = false
        guard chip.configure(line, direction: .input, value: false, edges: edges(t)) else {
            hostErrors += 1
            disarm(line)
            return false
        }
        irqType[line] = t
        if t >= VirtioGpio.irqLevelHigh {
            let v = chip.getValue(line)
            level[line] = v == 1
            if bufStatus[line] != nil && levelActive(line) { fire(line) }
        }
        return true
    }

    /// Disables the line's interrupt: its buffer goes back INVALID, a latched edge is discarded.
    private func disarm(_ line: Int) {
        irqType[line] = 0
        latched[line] = false
        if bufStatus[line] != nil { complete(line, VirtioGpio.irqStatusInvalid) }
    }

    @inline(__always) private func levelActive(_ line: Int) -> Bool {
        let t = irqType[line]
        return (t == VirtioGpio.irqLevelHigh && level[line]) || (t == VirtioGpio.irqLevelLow && !level[line])
    }

    private func badEvent(_ why: @autoclosure () -> String) {
        badEvents += 1
        if badEvents == 1 { Log.warning("gpio: malformed event buffer (\(why())); returned INVALID; further ones are not logged") }
    }

    /// One eventq buffer: held for its line (nil), or returned now.
    private func event(_ c: borrowing Chain) -> UInt32? {
        guard c.writableBytes >= 1 else { badEvent("no status byte"); return 0 }
        var status: UnsafeMutableRawPointer? = nil
        for i in c.readableCount..<c.count where c.segments[i].length > 0 { status = c.segments[i].base; break }
        guard let status else { badEvent("no status byte"); return 0 }
        status.storeBytes(of: VirtioGpio.irqStatusInvalid, as: UInt8.self)
        let readable = c.readableBytes
        guard readable == 2, c.read(into: header, length: 2) == 2 else { badEvent("request of \(readable) bytes, not 2"); return 1 }
        let line = Int(UInt16(littleEndian: header.load(as: UInt16.self)))
        guard irqEnabled, line < ngpio else { badEvent("line \(line) of \(ngpio)"); return 1 }
        guard bufStatus[line] == nil else { badEvent("a second buffer for line \(line)"); invalidated += 1; return 1 }
        guard irqType[line] != 0 else { badEvent("line \(line) has no interrupt enabled"); invalidated += 1; return 1 }
        bufHead[line] = c.head
        bufStatus[line] = status
        held += 1
        // Unmasked: a latched edge or an active level fires now.
        if latched[line] {
            latched[line] = false
            fire(line)
        } else if levelActive(line) {
            fire(line)
        }
        return nil
    }

    /// Completes line `line`'s held buffer with `status` (published by the caller).
    private func complete(_ line: Int, _ status: UInt8) {
        guard let s = bufStatus[line], let q = queues else { return }
        s.storeBytes(of: status, as: UInt8.self)
        bufStatus[line] = nil
        held -= 1
        if status == VirtioGpio.irqStatusValid { interrupts &+= 1 } else { invalidated += 1 }
        q[1].addUsed(head: bufHead[line], written: 1)
    }

    private func fire(_ line: Int) { complete(line, VirtioGpio.irqStatusValid) }

    // MARK: host edges

    public func gpioEdge(line: Int, rising: Bool) {
        guard line < ngpio else { return }
        level[line] = rising
        let t = irqType[line]
        guard t != 0, queues != nil else { return }
        if t <= VirtioGpio.irqEdgeBoth {
            guard t & (rising ? VirtioGpio.irqEdgeRising : VirtioGpio.irqEdgeFalling) != 0 else { return }
            if bufStatus[line] != nil { fire(line) } else { latched[line] = true }
        } else if levelActive(line) && bufStatus[line] != nil {
            fire(line)
        }
    }

    /// Publishes interrupts raised by host edges (the chip calls this after a batch of `gpioEdge`).
    public func gpioEdgesDone() {
        guard let q = queues, queueCount > 1 else { return }
        q[1].publish()
        if q[1].faultPending { faults.report(queue: 1) }
    }
}
