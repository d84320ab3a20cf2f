import Glibc
import Transport

/// `type = "input"` (virtio-input, virtio 1.2 §5.8): the keys its table accepts (documented in loopbackd.conf(5);
/// the reader enforces the list).
///   path        /dev/input/eventN to expose (absolute path)
///   name        or: the evdev device name (EVIOCGNAME), looked up under /dev/input (and again after a hot-unplug)
///   grab        bool, default false: exclusive grab (EVIOCGRAB): the host's own consumers no longer see events
///   simulated   bool, default false: no host device; a fake keyboard+touch screen fed by the simulated workload
///   simulated-replay  bool, default false (only with simulated): test hook; each LED status write of value 1
///               from the driver makes the fake source emit FakeInputSource.replaySequence (no workload needed)
///   queue-size  power of two 2-1024, default 64 (both queues)
/// Forwarded (`backend = "vhost-user:…"`): the back-end has the host device; only `queue-size` applies.
extension DeviceType {
    public static var input: DeviceType {
        // No kernel exposure for `ab --driver virtio-lo`: its socket path's back-end runs in a child process,
        // whose host side this process cannot inject events into.
        DeviceType(name: "input", keys: ["path", "name", "grab", "simulated", "simulated-replay", "queue-size"], factory: makeInput,
                   workload: { d, _ in InputWorkload(d) })
    }

    static func makeInput(_ name: String, _ r: inout OptionReader, _ backend: DeviceBackend) throws(ConfigError)
        -> (DeviceShape, () throws(DeviceError) -> VirtioDevice) {
        let path = try r.string("path")
        let evName = try r.string("name")
        let grab = try r.bool("grab") ?? false
        let simulated = try r.bool("simulated") ?? false
        let replay = try r.bool("simulated-replay") ?? false
        if replay && !simulated { throw r.error("simulated-replay", "needs simulated = true") }
        let qs = try r.int("queue-size", range: 2...1024) ?? 64
        if qs & (qs - 1) != 0 { throw r.error("queue-size", "must be a power of two, found \(qs)") }
        if let path, !path.hasPrefix("/") { throw r.error("path", "must be an absolute path (/dev/input/eventN)") }
        if let evName, evName.isEmpty || evName.utf8.count > 255 { throw r.error("name", "must be 1-255 bytes (the evdev device name)") }
        if backend == .inproc {
            let given = (path != nil ? 1 : 0) + (evName != nil ? 1 : 0) + (simulated ? 1 : 0)
            if given != 1 {
                // Blame the last of the keys given (none given: the table).
                let keys = [("path", path != nil), ("name", evName != nil), ("simulated", simulated)].filter(\.1).map(\.0)
                throw r.error(keys.max { r.line(of: $0) < r.line(of: $1) } ?? "path",
                              "an in-process input device needs exactly one of path (/dev/input/eventN), name (evdev device name) or simulated = true")
            }
        } else if path != nil || evName != nil || simulated || grab {
            let k = path != nil ? "path" : evName != nil ? "name" : simulated ? "simulated" : "grab"
            throw r.error(k, "a forwarded input device's host side is its vhost-user back-end's; only queue-size applies")
        }
        let size = UInt16(qs)
        let shape = DeviceShape(deviceID: VirtioInput.deviceID, queueSizes: [size, size], configSize: VirtioInput.configSize)
        return (shape, { () throws(DeviceError) -> VirtioDevice in
            let source: InputSource
            if simulated {
                let fake = try FakeInputSource()
                fake.replayOnLed = replay
                source = fake
            } else {
                do { source = try EvdevSource(path: path, name: evName, grab: grab) } catch {
                    throw DeviceError("\(name): \(error)")
                }
            }
            return InputDevice(source: source, queueSize: size)
        })
    }
}
