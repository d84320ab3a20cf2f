import Glibc
import Transport

/// virtio-gpio (virtio 1.2 §5.17): queue 0 requestq (8-byte request: le16 type, le16 gpio, le32 value; response
/// u8 status, u8 value — GET_NAMES: u8 status + the names block), queue 1 eventq (VIRTIO_GPIO_F_IRQ: readable le16
/// gpio, writable u8 status). Config: le16 ngpio, 2 bytes padding, le32 gpio_names_size.
public enum VirtioGpio {
    public static let deviceID: UInt32 = 41
    public static let configSize = 8
    /// VIRTIO_GPIO_F_IRQ: the eventq exists and lines can interrupt.
    public static let fIRQ = VirtioFeatures(rawValue: 1 << 0)
    public static let requestSize = 8
    public static let responseSize = 2

    public static let msgGetNames: UInt16 = 1
    public static let msgGetDirection: UInt16 = 2
    public static let msgSetDirection: UInt16 = 3
    public static let msgGetValue: UInt16 = 4
    public static let msgSetValue: UInt16 = 5
    public static let msgIRQType: UInt16 = 6

    public static let statusOK: UInt8 = 0
    public static let statusError: UInt8 = 1

    public static let irqNone: UInt8 = 0
    public static let irqEdgeRising: UInt8 = 1
    public static let irqEdgeFalling: UInt8 = 2
    public static let irqEdgeBoth: UInt8 = 3
    public static let irqLevelHigh: UInt8 = 4
    public static let irqLevelLow: UInt8 = 8

    /// eventq response status: INVALID returns a buffer without an interrupt (disabled, reset), VALID is one.
    public static let irqStatusInvalid: UInt8 = 0
    public static let irqStatusValid: UInt8 = 1

    /// Lines one device may have (ngpio is le16; more than this is no GPIO bank).
    public static let maxLines = 1024

    /// The names block GET_NAMES returns: every line's name NUL-terminated, in line order; empty (size 0: the
    /// driver does not ask) when no line has a name.
    public static func namesBlock(_ names: [String]) -> [UInt8] {
        guard names.contains(where: { !$0.isEmpty }) else { return [] }
        var b: [UInt8] = []
        for n in names { b += Array(n.utf8); b.append(0) }
        return b
    }
}

/// A line's direction as the virtio device sees it (the wire values of SET/GET_DIRECTION).
public enum GpioDirection: UInt8, Sendable {
    case none = 0, output = 1, input = 2
}

/// Receives edges seen on host lines (loop thread).
public protocol GpioEventSink: AnyObject {
    /// Line `line` (virtio numbering) changed: `rising` true when it went high.
    func gpioEdge(line: Int, rising: Bool)
    /// After a batch of `gpioEdge` calls: the interrupts they raised are published (one release store).
    func gpioEdgesDone()
}

/// The host side of a virtio-gpio device: a bank of lines. The real one is `GpiodChip` (a gpiochip through
/// libgpiod, a range of its lines mapped to virtio lines 0..n-1), the fake one `FakeGpioChip`. Called on the loop
/// thread only.
public protocol GpioChip: AnyObject {
    var lineCount: Int { get }
    /// One per line ("" for an unnamed line).
    var lineNames: [String] { get }
    /// Starts delivering edges of lines configured with edge detection to `sink`.
    func start(loop: EventLoop, sink: GpioEventSink) throws(DeviceError)
    /// Stops delivering edges and releases every line.
    func stop()
    /// The host's direction of a line the driver has not configured (`.input` or `.output`).
    func hostDirection(_ line: Int) -> GpioDirection
    /// Puts a line in `direction`: `.none` releases it, `.output` drives `value`, `.input` with `edges`
    /// (bit 0 rising, bit 1 falling) detects those edges. False if the host refused (the line keeps no request).
    func configure(_ line: Int, direction: GpioDirection, value: Bool, edges: UInt8) -> Bool
    /// The line's level (0/1), or -1 on a host error.
    func getValue(_ line: Int) -> Int
    /// Drives an output line; false on a host error.
    func setValue(_ line: Int, _ value: Bool) -> Bool
}

/// A fake bank of lines (like the kernel's gpio-sim): each line has a level; an input's level is what `drive`
/// (the outside world) sets, an output's what the driver drives. With `loopback`, lines 0..<n/2 are wired to
/// n/2..<n (an output drives its partner's level), so a driver alone can raise its own interrupts: the simulated
/// workload and the bench use that. `failing` lines refuse every request (a host error).
public final class FakeGpioChip: GpioChip {
    public let lineCount: Int
    public let lineNames: [String]
    public let loopback: Bool
    public private(set) var level: [Bool]
    /// What the device asked the host for, per line (for tests: a reset must leave everything released).
    public private(set) var direction: [GpioDirection]
    public private(set) var edges: [UInt8]
    public private(set) var configures = 0
    public var failing: Set<Int> = []
    private unowned(unsafe) var sink: GpioEventSink?

    public init(lines: Int, names: [String]? = nil, loopback: Bool = false) {
        lineCount = lines
        lineNames = names ?? (0..<lines).map { "sim\($0)" }
        self.loopback = loopback
        level = [Bool](repeating: false, count: lines)
        direction = [GpioDirection](repeating: .none, count: lines)
        edges = [UInt8](repeating: 0, count: lines)
    }
    public func start(loop: EventLoop, sink: GpioEventSink) throws(DeviceError) { self.sink = sink }
    public func stop() {
        sink = nil
        for i in 0..<lineCount { direction[i] = .none; edges[i] = 0 }
    }
    public func hostDirection(_ line: Int) -> GpioDirection { direction[line] == .output ? .output : .input }
    public func configure(_ line: Int, direction d: GpioDirection, value: Bool, edges e: UInt8) -> Bool {
        configures += 1
        guard !failing.contains(line) else { direction[line] = .none; edges[line] = 0; return false }
        direction[line] = d
        edges[line] = d == .input ? e : 0
        if d == .output { setLevel(line, value) }
        return true
    }
    public func getValue(_ line: Int) -> Int { failing.contains(line) ? -1 : (level[line] ? 1 : 0) }
    public func setValue(_ line: Int, _ value: Bool) -> Bool {
        guard !failing.contains(line), direction[line] == .output else { return false }
        setLevel(line, value)
        return true
    }
    private func setLevel(_ line: Int, _ v: Bool) {
        level[line] = v
        if loopback && line < lineCount / 2 { drive(line + lineCount / 2, v) }
    }
    /// The outside world sets an input line's level: an edge reaches the device if it asked for that edge.
    public func drive(_ line: Int, _ v: Bool) {
        guard line < lineCount, direction[line] != .output, level[line] != v else { return }
        level[line] = v
        if direction[line] == .input && edges[line] & (v ? 1 : 2) != 0 {
            sink?.gpioEdge(line: line, rising: v)
            sink?.gpioEdgesDone()
        }
    }
}
