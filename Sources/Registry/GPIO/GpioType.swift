import Glibc
import Transport

/// `type = "gpio"` (virtio-gpio, virtio 1.2 §5.17): the keys its table accepts (documented in loopbackd.conf(5);
/// the reader enforces the list).
///   chip        the host gpiochip: /dev/gpiochipN, or its name or label (through libgpiod 1.6: v1 chardev ABI)
///   lines       host line offsets exposed as virtio lines 0..n-1: "0-7", "4", "0-3, 8-11" (default: all lines)
///   names       array of line names, one per line (default: the host's line names)
///   simulated   bool, default false: no host chip; 8 fake lines (or as many as `lines` lists), lines 0..n/2-1
///               wired to n/2..n-1 (an output raises its partner's edges: the simulated workload)
///   queue-size  power of two 2-1024, default 64 (both queues)
/// Forwarded (`backend = "vhost-user:…"`): the back-end has the chip; only `queue-size` applies.
extension DeviceType {
    public static var gpio: DeviceType {
        DeviceType(name: "gpio", keys: ["chip", "lines", "names", "simulated", "queue-size"], factory: makeGpio,
                   workload: { d, verify in GpioWorkload(d, verify: verify) })
    }

    /// "0-7", "4", "0-3, 8-11": line offsets in order; nil with a message otherwise.
    static func parseLines(_ s: String) -> Result<[UInt32], GpioLinesError> {
        var out: [UInt32] = []
        var seen = Set<UInt32>()
        for item in s.split(separator: ",") {
            let t = item.split(separator: " ", omittingEmptySubsequences: true).joined()
            let ends = t.split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false)
            guard let a = UInt32(ends[0]), a <= 0xffff, let b = ends.count == 2 ? UInt32(ends[1]) : a, b <= 0xffff else {
                return .failure(GpioLinesError("\"\(t)\": want a line offset (0-65535) or a range A-B"))
            }
            guard a <= b else { return .failure(GpioLinesError("\"\(t)\": range runs backwards")) }
            guard out.count + Int(b - a) + 1 <= VirtioGpio.maxLines else {
                return .failure(GpioLinesError("more than \(VirtioGpio.maxLines) lines"))
            }
            for o in a...b {
                guard seen.insert(o).inserted else { return .failure(GpioLinesError("line \(o) listed twice")) }
                out.append(o)
            }
        }
        guard !out.isEmpty else { return .failure(GpioLinesError("no lines")) }
        return .success(out)
    }
    public struct GpioLinesError: Error { public let message: String; init(_ m: String) { message = m } }

    static func makeGpio(_ name: String, _ r: inout OptionReader, _ backend: DeviceBackend) throws(ConfigError)
        -> (DeviceShape, () throws(DeviceError) -> VirtioDevice) {
        let chip = try r.string("chip")
        let linesText = try r.string("lines")
        let names = try r.strings("names")
        let simulated = try r.bool("simulated") ?? false
        let qs = try r.int("queue-size", range: 2...1024) ?? 64
        if qs & (qs - 1) != 0 { throw r.error("queue-size", "must be a power of two, found \(qs)") }
        if let chip, chip.isEmpty || (chip.contains("/") && !chip.hasPrefix("/")) {
            throw r.error("chip", "must be an absolute path (/dev/gpiochipN), a chip name (gpiochipN) or a label")
        }
        var lines: [UInt32]?
        if let linesText {
            switch parseLines(linesText) {
            case .success(let l): lines = l
            case .failure(let e): throw r.error("lines", e.message)
            }
        }
        if let names {
            if let bad = names.first(where: { $0.utf8.count > 255 }) { throw r.error("names", "\"\(bad.prefix(20))…\" is longer than 255 bytes") }
            let want = lines?.count ?? (simulated ? 8 : nil)
            if let want, names.count != want { throw r.error("names", "\(names.count) names for \(want) lines: give one per line") }
        }
        if backend == .inproc {
            if (chip != nil) == simulated {
                throw r.error(chip != nil ? "simulated" : "chip",
                              "an in-process gpio device needs exactly one of chip (a host gpiochip) or simulated = true")
            }
        } else if chip != nil || simulated || lines != nil || names != nil {
            let k = chip != nil ? "chip" : simulated ? "simulated" : lines != nil ? "lines" : "names"
            throw r.error(k, "a forwarded gpio device's chip is its vhost-user back-end's; only queue-size applies")
        }
        let size = UInt16(qs)
        let shape = DeviceShape(deviceID: VirtioGpio.deviceID, queueSizes: [size, size], configSize: VirtioGpio.configSize)
        return (shape, { () throws(DeviceError) -> VirtioDevice in
            if let chip {
                do {
                    var offsets = lines
                    if offsets == nil {
                        // All of the chip's lines: open once to count them.
                        let probe = try GpiodChip(chip: chip, lines: [], names: [])
                        offsets = (0..<UInt32(min(probe.hostLineCount, VirtioGpio.maxLines))).map { $0 }
                    }
                    if let names, names.count != offsets!.count {
                        throw DeviceError("\(names.count) names for \(offsets!.count) lines")
                    }
                    return GpioDevice(chip: try GpiodChip(chip: chip, lines: offsets!, names: names), queueSize: size)
                } catch {
                    throw DeviceError("\(name): \(error)")
                }
            }
            return GpioDevice(chip: FakeGpioChip(lines: lines?.count ?? 8, names: names, loopback: true), queueSize: size)
        })
    }
}
