import Transport

/// Device types loopbackd forwards to an external vhost-user back-end (rust-vmm vhost-device-*, QEMU's
/// vhost-user-gpu, virtiofsd, …) whether or not it has an in-process body: the original adapter's role. A
/// front-end must know the device id, how many queues to set up and the config space size before it can ask the
/// back-end anything, so each type carries the virtio spec's values (virtio 1.2 §5; CAN: virtio 1.3). The table's
/// `queues` and `queue-size` override them; `type = "other"` with `device-id` (and `config-size`) reaches a type
/// loopbackd does not know. The config space itself is read from the back-end (GET_CONFIG).
struct ForwardedType {
    let name: String
    let deviceID: UInt32
    let queues: Int
    let configSize: Int
    let what: String

    /// Options: `queues` (1-64, default: the type's), `queue-size` (power of two 1-32768, default 256).
    func factory() -> DeviceRegistry.Factory {
        let t = self
        return { (name: String, r: inout OptionReader, backend: DeviceBackend) throws(ConfigError) in
            let q = try r.int("queues", range: 1...64) ?? Int64(t.queues)
            let qs = try r.int("queue-size", range: 1...32768) ?? 256
            if qs & (qs - 1) != 0 { throw r.error("queue-size", "must be a power of two, found \(qs)") }
            var id = t.deviceID, config = t.configSize
            if t.name == "other" {
                guard let v = try r.int("device-id", range: 1...0xffff) else {
                    throw r.error("device-id", "type \"other\" needs device-id (the virtio device id, 1-65535)")
                }
                id = UInt32(v)
                config = Int(try r.int("config-size", range: 0...256) ?? 0)
            }
            guard backend != .inproc else {
                throw r.error("type", "\(t.name) (\(t.what)) has no in-process body in this build: forward it with "
                                  + "backend = \"vhost-user:/path/to/backend.sock\"")
            }
            let shape = DeviceShape(deviceID: id, queueSizes: Array(repeating: UInt16(qs), count: Int(q)), configSize: config)
            return (shape, { () throws(DeviceError) -> VirtioDevice in
                throw DeviceError("\(name): \(t.name) has no in-process body")
            })
        }
    }

    var type: DeviceType {
        DeviceType(name: name, keys: name == "other" ? ["queues", "queue-size", "device-id", "config-size"] : ["queues", "queue-size"],
                   factory: factory())
    }
}

extension DeviceType {
    // Queue counts and config sizes: virtio 1.2 §5.3 console (rx, tx, control rx, control tx with MULTIPORT;
    // config cols, rows, max_nr_ports, emerg_wr), §5.8 input (event, status; select, subsel, size, 5 reserved,
    // 128-byte union), §5.17 gpio (requestq, eventq; ngpio, padding, gpio_names_size), §5.19 i2c (requestq; no
    // config), §5.14 sound (control, event, tx, rx; jacks, streams, chmaps), virtio 1.3 CAN (tx, rx, control;
    // status), §5.17 scmi (cmdq, eventq; none), §5.11 fs (hiprio + 1 request queue; tag[36],
    // num_request_queues).
    public static var scmi: DeviceType { ForwardedType(name: "scmi", deviceID: 32, queues: 2, configSize: 0, what: "virtio-scmi").type }
    public static var fs: DeviceType { ForwardedType(name: "fs", deviceID: 26, queues: 2, configSize: 40, what: "virtio-fs").type }
    /// A type loopbackd does not know: `device-id` required, `queues`, `queue-size`, `config-size`.
    public static var other: DeviceType { ForwardedType(name: "other", deviceID: 0, queues: 1, configSize: 0, what: "any virtio device").type }
}
