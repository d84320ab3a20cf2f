import Transport

/// virtio-console wire format (virtio 1.2 §5.3): feature bits, config layout, control messages.
public enum VirtioConsole {
    /// VIRTIO_CONSOLE_F_SIZE: cols/rows in config (single port) or RESIZE control messages (multiport).
    public static let fSize = VirtioFeatures(rawValue: 1 << 0)
    /// VIRTIO_CONSOLE_F_MULTIPORT: control queues, up to max_nr_ports ports.
    public static let fMultiport = VirtioFeatures(rawValue: 1 << 1)
    /// VIRTIO_CONSOLE_F_EMERG_WRITE: a config write to emerg_wr puts one character on port 0.
    public static let fEmergWrite = VirtioFeatures(rawValue: 1 << 2)

    /// struct virtio_console_config { le16 cols; le16 rows; le32 max_nr_ports; le32 emerg_wr; }.
    public static let configSize = 12
    public static let emergWriteOffset = 8
    /// Ports one device offers at most (each needs two queues; 2 + 2 + 2 * 31 = 66 queues).
    public static let maxPorts = 32

    /// struct virtio_console_control { le32 id; le16 event; le16 value; } (8 bytes), PORT_NAME's name after it.
    public static let controlSize = 8

    public enum Event: UInt16, Sendable {
        case deviceReady = 0, portAdd = 1, portRemove = 2, portReady = 3, consolePort = 4, resize = 5, portOpen = 6, portName = 7
    }

    /// Queue index of port `p`'s receiveq (device → driver) and transmitq (driver → device): port 0 uses 0 and 1,
    /// the control queues are 2 (device → driver) and 3 (driver → device), port n ≥ 1 uses 2n + 2 and 2n + 3.
    @inline(__always) public static func rxQueue(_ p: Int) -> Int { p == 0 ? 0 : 2 * p + 2 }
    @inline(__always) public static func txQueue(_ p: Int) -> Int { p == 0 ? 1 : 2 * p + 3 }
    public static let controlRx = 2
    public static let controlTx = 3
    /// Queues a device with `ports` ports has (multiport when ports > 1 or control is wanted).
    public static func queueCount(ports: Int) -> Int { 2 * ports + 2 }
    /// Port of queue `q`, and whether it is its transmitq; nil for the control queues.
    @inline(__always) public static func port(ofQueue q: Int) -> (port: Int, tx: Bool)? {
        if q < 2 { return (0, q == 1) }
        if q < 4 { return nil }
        return ((q - 2) / 2, q & 1 == 1)
    }
}

/// A control message the driver may send (driver → device, virtio 1.2 §5.3.6.2), validated.
public enum ConsoleDriverControl: Equatable, Sendable {
    /// DEVICE_READY: value 1 = the driver is ready for PORT_ADD messages, 0 = it failed.
    case deviceReady(ok: Bool)
    /// PORT_READY: the driver set port `port` up (value 1) or failed to (0).
    case portReady(port: Int, ok: Bool)
    /// PORT_OPEN: a process in the driver's OS opened (1) or closed (0) the port.
    case portOpen(port: Int, open: Bool)
}

/// Why a driver control message was dropped (counted and logged once per reason; the queue keeps running).
public enum ConsoleControlError: String, Error, Sendable, CaseIterable {
    case tooShort = "control message shorter than 8 bytes"
    case unknownEvent = "unknown control event"
    case deviceOnlyEvent = "control event only the device may send"
    case portOutOfRange = "port id not below max_nr_ports"
    case portNotConfigured = "port id of a port the device did not add"
    case badValue = "control value not 0 or 1"
}

extension ConsoleDriverControl {
    /// Decodes one driver → device control message from the bytes the driver wrote (pure: unit and fuzz tested).
    /// `maxPorts` is max_nr_ports; `configured(id)` tells whether the device added port `id`.
    public static func decode(_ b: UnsafeRawBufferPointer, maxPorts: Int,
                              configured: (Int) -> Bool) -> Result<ConsoleDriverControl, ConsoleControlError> {
        guard b.count >= VirtioConsole.controlSize, let base = b.baseAddress else { return .failure(.tooShort) }
        let id = UInt32(littleEndian: base.loadUnaligned(as: UInt32.self))
        let event = UInt16(littleEndian: base.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
        let value = UInt16(littleEndian: base.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
        guard let e = VirtioConsole.Event(rawValue: event) else { return .failure(.unknownEvent) }
        guard value <= 1 else { return .failure(.badValue) }
        switch e {
        case .deviceReady:
            return .success(.deviceReady(ok: value == 1))   // id is unused (the spec leaves it undefined)
        case .portReady, .portOpen:
            guard id < UInt32(maxPorts) else { return .failure(.portOutOfRange) }
            guard configured(Int(id)) else { return .failure(.portNotConfigured) }
            return .success(e == .portReady ? .portReady(port: Int(id), ok: value == 1) : .portOpen(port: Int(id), open: value == 1))
        case .portAdd, .portRemove, .consolePort, .resize, .portName:
            return .failure(.deviceOnlyEvent)
        }
    }
}
