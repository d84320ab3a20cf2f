import Glibc
import Transport

/// Where a configured device's body runs.
public enum DeviceBackend: Equatable, Sendable {
    /// In this process, on the mapped rings.
    case inproc
    /// Forwarded to an external vhost-user backend listening on this socket path.
    case vhostUser(path: String)
}

/// One `[device.NAME]` table, validated.
public struct DeviceConfig {
    public var name: String
    public var type: String
    public var backend: DeviceBackend
    /// Serve this device as a vhost-user backend on this socket instead of attaching it to the transport.
    public var serve: String?
    /// For a vhost-user backend: replay in-flight requests exactly after a backend restart (interrupts pass
    /// through loopbackd), or pass interrupts straight to the driver and latch NEEDS_RESET instead.
    public var reconnectReplay = true
    /// `transport = "virtio-lo" | "vduse"`: this device's kernel transport when it differs from `[daemon]`'s.
    public var transport: DaemonConfig.Transport?
    /// `restricted-memory` (kernel link): nil = the `[daemon]` default. The module then bounces every buffer of
    /// this device through a pool of its own, and loopbackd maps that pool only (VIRTIO_F_ACCESS_PLATFORM).
    public var restrictedMemory: Bool?
    /// `pool-kib`: the pool's room for buffers, beyond the rings (0 = the module's default, 4096 KiB).
    public var poolKiB: UInt32 = 0
    public var line: Int
    /// The table's keys and values (sorted by key, lines dropped): `reload` restarts a device whose definition
    /// changed and leaves the others alone.
    public var definition: [TOMLEntry] = []
    /// Device id, queue sizes and config size (what a vhost-user frontend cannot ask the backend).
    public var shape: DeviceShape
    /// Builds the device body (opens files); the factory validated every option already.
    public var make: () throws(DeviceError) -> VirtioDevice
}

/// The whole configuration file.
public struct DaemonConfig {
    public enum Transport: String, Sendable { case sim, virtioLo = "virtio-lo", vduse, none }
    public var file: String
    public var transport: Transport = .sim
    public var deviceNode = "/dev/virtio-lo"
    public var logLevel: Log.Level = .info
    public var pollMicroseconds = 0
    /// `[daemon] control`: the control socket's path; nil when the key is absent (then the daemon uses
    /// `defaultControlSocket` when systemd started it), "" for `control = "none"`.
    public var control: String?
    public static let defaultControlSocket = "/run/loopbackd/control.sock"
    /// `[daemon] user`: drop to this account (from /etc/passwd and /etc/group) once the devices are started;
    /// nil keeps the ids loopbackd was started with.
    public var user: Account?
    /// `[daemon] seccomp`: the system call allow-list installed after start-up (Sources/CLinux/privdrop.c).
    public enum Seccomp: String, Sendable { case off, kill, log }
    public var seccomp: Seccomp = .off
    /// `[daemon] restricted-memory`: the default of the devices' `restricted-memory` (off: see the README).
    public var restrictedMemory = false
    public var devices: [DeviceConfig] = []
    /// The keys of `[daemon]` (the reader enforces the list; loopbackd.conf(5) is checked against it).
    public static let daemonKeys = ["transport", "device-node", "log-level", "poll-us", "control", "user", "seccomp", "restricted-memory"]

    /// Parses and validates a config document. Every error names the file, the line and the key.
    public static func parse(_ doc: TOMLDocument, registry: DeviceRegistry = .standard) throws(ConfigError) -> DaemonConfig {
        var c = DaemonConfig(file: doc.file)
        var sawDaemon = false
        for t in doc.tables {
            switch t.name.count {
            case 0:
                if let e = t.entries.first {
                    throw ConfigError(file: doc.file, line: e.line, key: e.key,
                                      message: "keys must be inside a table: [daemon] or [device.NAME]")
                }
            case 1 where t.name[0] == "daemon":
                sawDaemon = true
                var r = OptionReader(table: t, file: doc.file, keys: daemonKeys)
                if let v = try r.oneOf("transport", ["sim", "virtio-lo", "vduse", "none"]) { c.transport = Transport(rawValue: v)! }
                if let v = try r.string("device-node") {
                    guard v.hasPrefix("/") else { throw r.error("device-node", "must be an absolute path") }
                    c.deviceNode = v
                }
                if let v = try r.oneOf("log-level", ["error", "warning", "info", "debug"]) { c.logLevel = Log.Level(name: v)! }
                if let v = try r.int("poll-us", range: 0...1_000_000) { c.pollMicroseconds = Int(v) }
                if let v = try r.string("control") {
                    guard v == "none" || (v.hasPrefix("/") && v.utf8.count < 108) else {
                        throw r.error("control", "must be \"none\" or an absolute socket path shorter than 108 bytes")
                    }
                    c.control = v == "none" ? "" : v
                }
                if let v = try r.string("user") {
                    guard let a = Account.lookup(v) else {
                        throw r.error("user", "no user \"\(v)\" in \(Account.passwdFile)")
                    }
                    c.user = a
                }
                if let v = try r.oneOf("seccomp", ["off", "kill", "log"]) { c.seccomp = Seccomp(rawValue: v)! }
                if let v = try r.bool("restricted-memory") { c.restrictedMemory = v }
                try r.finish()
            case 2 where t.name[0] == "device":
                c.devices.append(try parseDevice(t, file: doc.file, registry: registry))
            case 1 where t.name[0] == "device":
                throw ConfigError(file: doc.file, line: t.line, message: "a device table needs a name: [device.NAME]")
            default:
                let name = t.name.joined(separator: ".")
                throw ConfigError(file: doc.file, line: t.line, message: "unknown table [\(name)]; expected [daemon] or [device.NAME]")
            }
        }
        _ = sawDaemon
        guard !c.devices.isEmpty else { throw ConfigError(file: doc.file, line: 0, message: "no [device.NAME] table: nothing to serve") }
        var sockets: [String: Int] = [:]
        for d in c.devices {
            for p in [d.serve, { if case .vhostUser(let p) = d.backend { return p } else { return nil } }()].compactMap({ $0 }) {
                if let first = sockets[p] {
                    throw ConfigError(file: doc.file, line: d.line, key: "device.\(d.name)",
                                      message: "socket \(p) already used by the device on line \(first)")
                }
                sockets[p] = d.line
            }
        }
        for d in c.devices where d.transport != nil {
            guard c.transport == .virtioLo || c.transport == .vduse else {
                throw ConfigError(file: doc.file, line: d.line, key: "device.\(d.name).transport",
                                  message: "only with [daemon] transport = \"virtio-lo\" or \"vduse\"")
            }
        }
        if c.transport == .virtioLo || c.transport == .vduse {
            for d in c.devices where d.serve == nil && (d.transport ?? c.transport) == .vduse {
                // drivers/vdpa/vdpa_user/vduse_dev.c admits blk and net only (drivers hardened against the device).
                guard VDUSEDevice.allowedDeviceIDs[d.shape.deviceID] != nil else {
                    throw ConfigError(file: doc.file, line: d.line, key: "device.\(d.name)",
                                      message: "type \(d.type): VDUSE admits only blk (and net) devices; set transport = \"virtio-lo\" on this device to serve it through the kernel module")
                }
                guard d.backend == .inproc else {
                    throw ConfigError(file: doc.file, line: d.line, key: "device.\(d.name)",
                                      message: "transport \"vduse\" serves in-process devices only (a vhost-user back-end cannot map the IOVA domain)")
                }
            }
        }
        if c.transport == .none, let d = c.devices.first(where: { $0.serve == nil }) {
            throw ConfigError(file: doc.file, line: d.line, key: "device.\(d.name)",
                              message: "transport = \"none\" needs every device to set serve")
        }
        return c
    }

    static func parseDevice(_ t: TOMLTable, file: String, registry: DeviceRegistry) throws(ConfigError) -> DeviceConfig {
        let name = t.name[1]
        guard !name.isEmpty, name.utf8.count <= 32, name.utf8.allSatisfy({ isalnum(Int32($0)) != 0 || $0 == 0x2d || $0 == 0x5f }) else {
            throw ConfigError(file: file, line: t.line, message: "device name \"\(name)\" must be 1-32 of A-Z a-z 0-9 - _")
        }
        var r = OptionReader(table: t, file: file, keys: DeviceRegistry.commonDeviceKeys)
        let type = try r.requiredString("type")
        guard let deviceType = registry.type(named: type) else {
            throw r.error("type", "unknown device type \"\(type)\"; known: \(registry.types.keys.sorted().joined(separator: ", "))")
        }
        r.declare(deviceType.keys)
        var backend = DeviceBackend.inproc
        if let b = try r.string("backend") {
            if b == "inproc" { backend = .inproc }
            else if b.hasPrefix("vhost-user:"), b.count > 11, b.dropFirst(11).hasPrefix("/") { backend = .vhostUser(path: String(b.dropFirst(11))) }
            else { throw r.error("backend", "must be \"inproc\" or \"vhost-user:/absolute/socket/path\"; found \"\(b)\"") }
        }
        var serve: String?
        if let s = try r.string("serve") {
            guard s.hasPrefix("/"), s.utf8.count < 108 else { throw r.error("serve", "must be an absolute socket path shorter than 108 bytes") }
            guard backend == .inproc else { throw r.error("serve", "only an in-process device can be served") }
            serve = s
        }
        var replay = true
        if let v = try r.oneOf("reconnect", ["replay", "reset"]) {
            guard backend != .inproc else { throw r.error("reconnect", "only for backend = \"vhost-user:...\"") }
            replay = v == "replay"
        }
        var transport: Transport?
        if let v = try r.oneOf("transport", ["virtio-lo", "vduse"]) {
            guard serve == nil else { throw r.error("transport", "a served device has no kernel transport") }
            transport = Transport(rawValue: v)
        }
        let restricted = try r.bool("restricted-memory")
        let poolKiB = try r.int("pool-kib", range: 16...1_048_576)
        let (shape, make) = try deviceType.factory(name, &r, backend)
        try r.finish()
        var d = DeviceConfig(name: name, type: type, backend: backend, serve: serve, line: t.line, shape: shape, make: make)
        d.reconnectReplay = replay
        d.transport = transport
        d.restrictedMemory = restricted
        if let poolKiB { d.poolKiB = UInt32(poolKiB) }
        d.definition = t.entries.map { TOMLEntry(key: $0.key, value: $0.value, line: 0) }.sorted { $0.key < $1.key }
        return d
    }

    /// Reads and validates a config file.
    public static func load(path: String, registry: DeviceRegistry = .standard) throws(ConfigError) -> DaemonConfig {
        try parse(TOML.load(path: path), registry: registry)
    }
}
