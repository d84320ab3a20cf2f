import Glibc
import CGpiod
import Transport

/// The real host side: a gpiochip (/dev/gpiochipN, or its name or label) through libgpiod 1.6, which speaks the
/// kernel's v1 GPIO character-device ABI (line handle and line event requests). A list of the chip's lines (the
/// config's `lines`) is the virtio chip's lines 0..n-1. Each line the driver configures is one request of its
/// own: input, output, or input with edge detection, whose event fd is watched on the loop (edges are read without
/// blocking when epoll says so, never on a blocking read). The chip is opened at start, before any privilege drop.
///
/// Kernels: the v1 ABI is in Debian's 6.1 and 6.12 kernels (CONFIG_GPIO_CDEV_V1=y); Debian's 7.x kernels leave it
/// out, and libgpiod 1.6's line ioctls then fail with EINVAL (libgpiod 2, the v2 ABI, would be needed there).
public final class GpiodChip: GpioChip, EventHandler {
    public let path: String
    public let label: String
    public let lineCount: Int
    /// Lines the host chip has.
    public let hostLineCount: Int
    public let lineNames: [String]
    /// Host line offset of each virtio line.
    public let offsets: [UInt32]
    private let handle: OpaquePointer
    private var loop: EventLoop?
    private unowned(unsafe) var sink: GpioEventSink?
    private var eventFD: [Int32]
    private var registration: [Int]
    private var requested: [Bool]
    private let types = UnsafeMutablePointer<Int32>.allocate(capacity: 16)
    public private(set) var edgesRead: UInt64 = 0

    /// `lines`: host line offsets in virtio order; `names`: override the host's line names (one per line).
    public init(chip: String, lines: [UInt32], names: [String]? = nil) throws(DeviceError) {
        var h: OpaquePointer? = nil
        let r = lb_gpio_open(chip, &h)
        guard r == 0, let h else { throw DeviceError("cannot open GPIO chip \(chip): \(Errno(-r))") }
        handle = h
        path = chip
        var buf = [CChar](repeating: 0, count: 64)
        _ = lb_gpio_label(h, &buf, 64)
        label = GpiodChip.string(buf)
        let n = Int(lb_gpio_num_lines(h))
        hostLineCount = n
        for o in lines where Int(o) >= n {
            lb_gpio_close(h)
            throw DeviceError("\(chip) (\(label)) has \(n) lines; line \(o) does not exist")
        }
        offsets = lines
        lineCount = lines.count
        if let names {
            lineNames = names
        } else {
            var ns: [String] = []
            for o in lines {
                let k = lb_gpio_line_name(h, o, &buf, 64)
                guard k >= 0 else {
                    lb_gpio_close(h)
                    throw DeviceError("\(chip): line \(o): \(GpiodChip.explain(k))")
                }
                ns.append(GpiodChip.string(buf))
            }
            lineNames = ns
        }
        eventFD = [Int32](repeating: -1, count: lines.count)
        registration = [Int](repeating: -1, count: lines.count)
        requested = [Bool](repeating: false, count: lines.count)
    }
    deinit {
        stop()
        lb_gpio_close(handle)
        types.deallocate()
    }

    static func string(_ b: [CChar]) -> String {
        String(decoding: b.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// errno text, with what EINVAL/ENOTTY from a line ioctl means on a kernel without the v1 ABI.
    static func explain(_ r: Int32) -> String {
        let e = Errno(-r)
        if -r == EINVAL || -r == ENOTTY {
            return "\(e) (a kernel without the v1 GPIO character-device ABI, CONFIG_GPIO_CDEV_V1, refuses libgpiod 1.6)"
        }
        return "\(e)"
    }

    public func start(loop: EventLoop, sink: GpioEventSink) throws(DeviceError) {
        self.loop = loop
        self.sink = sink
    }

    public func stop() {
        for l in 0..<lineCount where requested[l] { _ = configure(l, direction: .none, value: false, edges: 0) }
        sink = nil
    }

    public func hostDirection(_ line: Int) -> GpioDirection {
        lb_gpio_line_direction(handle, offsets[line]) == 2 ? .output : .input
    }

    public func configure(_ line: Int, direction: GpioDirection, value: Bool, edges: UInt8) -> Bool {
        unwatch(line)
        let mode: Int32
        switch direction {
        case .none: mode = Int32(LB_GPIO_RELEASE)
        case .output: mode = Int32(LB_GPIO_OUTPUT)
        case .input:
            switch edges & 3 {
            case 1: mode = Int32(LB_GPIO_EDGE_RISING)
            case 2: mode = Int32(LB_GPIO_EDGE_FALLING)
            case 3: mode = Int32(LB_GPIO_EDGE_BOTH)
            default: mode = Int32(LB_GPIO_INPUT)
            }
        }
        var fd: Int32 = -1
        let r = lb_gpio_request(handle, offsets[line], mode, value ? 1 : 0, "loopbackd", &fd)
        requested[line] = r == 0 && direction != .none
        guard r == 0 else {
            Log.warning("gpio: \(path) line \(offsets[line]): request failed: \(GpiodChip.explain(r))")
            return false
        }
        if fd >= 0, let loop {
            do { registration[line] = try loop.register(fd: fd, events: IOEvents.readable.epollMask, handler: self, token: UInt32(line)) } catch {
                Log.warning("gpio: \(path) line \(offsets[line]): cannot watch edges: \(error)")
                _ = lb_gpio_request(handle, offsets[line], Int32(LB_GPIO_RELEASE), 0, "loopbackd", nil)
                requested[line] = false
                return false
            }
            eventFD[line] = fd
        }
        return true
    }

    private func unwatch(_ line: Int) {
        guard eventFD[line] >= 0 else { return }
        loop?.unregister(fd: eventFD[line], registration: registration[line])
        eventFD[line] = -1
        registration[line] = -1
    }

    public func getValue(_ line: Int) -> Int {
        let v = lb_gpio_get(handle, offsets[line])
        return v < 0 ? -1 : Int(v)
    }

    public func setValue(_ line: Int, _ value: Bool) -> Bool {
        lb_gpio_set(handle, offsets[line], value ? 1 : 0) == 0
    }

    /// Edges on line `token`'s event fd: read (non-blocking, at most 64 per turn; epoll reports the rest again).
    public func handleEvent(token: UInt32, events: UInt32) {
        let line = Int(token)
        guard line < lineCount, eventFD[line] >= 0 else { return }
        var rounds = 0
        while rounds < 4 {
            let n = lb_gpio_read_events(handle, offsets[line], types, 16)
            if n < 0 { Log.warning("gpio: \(path) line \(offsets[line]): reading edges: \(Errno(-n))"); break }
            if n == 0 { break }
            for k in 0..<Int(n) { sink?.gpioEdge(line: line, rising: types[k] == 1) }
            edgesRead &+= UInt64(n)
            rounds += 1
        }
        sink?.gpioEdgesDone()
    }
}
