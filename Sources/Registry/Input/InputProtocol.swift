import Glibc
import Transport

/// virtio-input (virtio 1.2 §5.8) and the Linux input event constants it carries (linux/input-event-codes.h).
public enum VirtioInput {
    public static let deviceID: UInt32 = 18
    /// struct virtio_input_config: u8 select, u8 subsel, u8 size, u8 reserved[5], union u[128].
    public static let configSize = 136
    public static let unionOffset = 8
    public static let unionSize = 128
    /// struct virtio_input_event: le16 type, le16 code, le32 value.
    public static let eventSize = 8

    // enum virtio_input_config_select (§5.8.2)
    public static let cfgUnset: UInt8 = 0x00
    public static let cfgIDName: UInt8 = 0x01
    public static let cfgIDSerial: UInt8 = 0x02
    public static let cfgIDDevids: UInt8 = 0x03
    public static let cfgPropBits: UInt8 = 0x10
    public static let cfgEVBits: UInt8 = 0x11
    public static let cfgAbsInfo: UInt8 = 0x12

    // Event types and codes (linux/input-event-codes.h).
    public static let evSyn: UInt16 = 0x00
    public static let evKey: UInt16 = 0x01
    public static let evRel: UInt16 = 0x02
    public static let evAbs: UInt16 = 0x03
    public static let evMsc: UInt16 = 0x04
    public static let evSw: UInt16 = 0x05
    public static let evLed: UInt16 = 0x11
    public static let evSnd: UInt16 = 0x12
    public static let evRep: UInt16 = 0x14
    public static let evFF: UInt16 = 0x15
    public static let evMax: UInt16 = 0x1f
    public static let synReport: UInt16 = 0
    public static let absMax: UInt16 = 0x3f
    /// Codes per type the union can describe: 128 bytes of bitmap.
    public static let maxCodes = 1024
}

/// One input event as the host side reports it (and as the status queue carries it back).
public struct InputEvent: Equatable, Sendable {
    public var type: UInt16
    public var code: UInt16
    public var value: Int32
    public init(type: UInt16, code: UInt16, value: Int32) { self.type = type; self.code = code; self.value = value }
    public static let synReport = InputEvent(type: VirtioInput.evSyn, code: VirtioInput.synReport, value: 0)
    /// The 8 little-endian bytes of struct virtio_input_event.
    @inline(__always) public var wire: UInt64 {
        UInt64(type) | UInt64(code) << 16 | UInt64(UInt32(bitPattern: value)) << 32
    }
    @inline(__always) public init(wire w: UInt64) {
        type = UInt16(truncatingIfNeeded: w); code = UInt16(truncatingIfNeeded: w >> 16)
        value = Int32(bitPattern: UInt32(truncatingIfNeeded: w >> 32))
    }
}

/// struct virtio_input_absinfo (and the evdev struct input_absinfo without its current value).
public struct AbsInfo: Equatable, Sendable {
    public var min: Int32, max: Int32, fuzz: Int32, flat: Int32, res: Int32
    public init(min: Int32, max: Int32, fuzz: Int32 = 0, flat: Int32 = 0, res: Int32 = 0) {
        self.min = min; self.max = max; self.fuzz = fuzz; self.flat = flat; self.res = res
    }
}

/// What a host input device is: the answers to every config selector. Read once from the host device (EVIOCG*
/// ioctls) or given by a fake; the config space is computed from it.
public struct InputCapabilities: Equatable, Sendable {
    public var name: String
    public var serial: String = ""
    /// bustype, vendor, product, version (struct input_id).
    public var bustype: UInt16 = 0x06, vendor: UInt16 = 0, product: UInt16 = 0, version: UInt16 = 0
    /// INPUT_PROP_* bits.
    public var props: [UInt8] = []
    /// Per event type (index = EV_*, 0...0x1f): the bitmap of codes, at most 128 bytes each.
    public var bits: [[UInt8]] = Array(repeating: [], count: 32)
    /// Per ABS axis that is set in bits[EV_ABS].
    public var abs: [UInt16: AbsInfo] = [:]

    public init(name: String) { self.name = name }

    public func has(type: UInt16, code: UInt16) -> Bool {
        guard Int(type) < bits.count else { return false }
        let b = bits[Int(type)], i = Int(code) >> 3
        return i < b.count && b[i] & (1 << (code & 7)) != 0
    }
    public mutating func set(type: UInt16, code: UInt16) {
        guard Int(type) < bits.count, Int(code) < VirtioInput.maxCodes else { return }
        let i = Int(code) >> 3
        if bits[Int(type)].count <= i { bits[Int(type)] += [UInt8](repeating: 0, count: i + 1 - bits[Int(type)].count) }
        bits[Int(type)][i] |= 1 << (code & 7)
    }
    public mutating func setProp(_ p: Int) {
        guard p < VirtioInput.maxCodes else { return }
        if props.count <= p >> 3 { props += [UInt8](repeating: 0, count: (p >> 3) + 1 - props.count) }
        props[p >> 3] |= 1 << (p & 7)
    }
    /// Sets EV_ABS `axis` with its range.
    public mutating func setAbs(_ axis: UInt16, _ info: AbsInfo) {
        set(type: VirtioInput.evAbs, code: axis)
        abs[axis] = info
    }
    /// Event types that have at least one code.
    public var types: [UInt16] { (0..<UInt16(bits.count)).filter { bits[Int($0)].contains { $0 != 0 } } }
}

/// Receives the host device's events, on the loop thread.
public protocol InputSink: AnyObject {
    /// One event; EV_SYN/SYN_REPORT ends a group.
    func inputEvent(_ e: InputEvent)
    /// The host device went away (hot-unplug): no events until `inputSourceBack`.
    func inputSourceLost(_ why: String)
    /// The host device is back (reopened).
    func inputSourceBack()
}

/// The host side of an input device: an evdev node (`EvdevSource`) or a fake (`FakeInputSource`). All methods run
/// on the loop thread except `init` and `capabilities`.
public protocol InputSource: AnyObject {
    /// Fixed for the device's lifetime (the driver reads them once).
    var capabilities: InputCapabilities { get }
    /// Starts delivering events to `sink` (watching the host device on `loop`); called once, at first activation.
    func start(loop: EventLoop, sink: InputSink) throws(DeviceError)
    /// Writes a status event (LED, sound, force feedback) back to the host device; false if it could not.
    func write(_ e: InputEvent) -> Bool
    /// Stops watching (the device is going away).
    func stop()
}
