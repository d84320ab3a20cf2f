import Glibc
import Transport

/// What a driver side must know of a device without building it (a vhost-user frontend gets it from here).
public struct DeviceShape: Sendable, Equatable {
    public var deviceID: UInt32
    public var queueSizes: [UInt16]
    public var configSize: Int
    /// A forwarded type's addition to the vhost-user front-end, also something the back-end cannot be asked for
    /// (a forwarded gpu: its scanouts and outputs, served on the display protocol's socket).
    public var companion: FrontendCompanionMaker? = nil
}

/// Builds a forwarded device's `VhostUserFrontendCompanion` on the device's loop (`makeFrontend`).
public struct FrontendCompanionMaker: @unchecked Sendable, Equatable {
    /// What it is made from (equality: the same options).
    public let what: String
    public let make: (EventLoop) throws(DeviceError) -> VhostUserFrontendCompanion
    public init(what: String, make: @escaping (EventLoop) throws(DeviceError) -> VhostUserFrontendCompanion) {
        self.what = what; self.make = make
    }
    public static func == (a: Self, b: Self) -> Bool { a.what == b.what }
}

/// One device type: its config `type` name, the keys its `[device.NAME]` table accepts besides the common ones
/// (`DeviceRegistry.commonDeviceKeys`), and its factory. Each type declares itself in its own folder
/// (`Rng/RngType.swift`: `extension DeviceType { static var rng }`) and is listed once in `standard`. The key list
/// is enforced: the factory's `OptionReader` traps on a key the type does not declare, and (debug builds) on a
/// declared key the factory never reads, so `keys` is exactly what the file may say; loopbackd.conf(5) is
/// checked against it (Tests/RegistryTests/ManPageTests).
public struct DeviceType {
    public let name: String
    public let keys: [String]
    public let factory: DeviceRegistry.Factory
    /// The simulated driver's demo/bench workload for this type (nil: none; the device idles under transport "sim").
    public var workload: ((SimDriver, _ verify: Bool) -> Workload?)?
    /// How the kernel's own driver exposes the device to user space (`ab --driver virtio-lo`; nil: not supported).
    public var kernel: KernelExposure?
    public init(name: String, keys: [String], factory: @escaping DeviceRegistry.Factory,
                workload: ((SimDriver, _ verify: Bool) -> Workload?)? = nil) {
        self.name = name; self.keys = keys; self.factory = factory; self.workload = workload
    }
}

/// A device body that answers `loopbackd ctl device NAME WORDS…` (on the loop thread): e.g. a gpu's hot-plug
/// (`scanout 1 off`) and on-demand snapshots.
public protocol CommandableDevice: AnyObject {
    func command(_ args: [String]) -> (ok: Bool, text: String)
}

/// The embedded device registry: config `type` → a factory that validates its own options (reading them from the
/// device's table) and returns how to build the device. Adding a device type = its folder (with its
/// `DeviceType`) + one entry in `standard`.
public struct DeviceRegistry {
    /// `(name, options, backend)`; consumes the keys it knows; `finish()` later rejects the rest.
    public typealias Factory = (String, inout OptionReader, DeviceBackend) throws(ConfigError) -> (DeviceShape, () throws(DeviceError) -> VirtioDevice)
    /// By config `type` name.
    public var types: [String: DeviceType]
    public init(types: [DeviceType]) {
        var d: [String: DeviceType] = [:]
        for t in types { precondition(d[t.name] == nil, "device type \(t.name) registered twice"); d[t.name] = t }
        self.types = d
    }

    public static var standard: DeviceRegistry {
        DeviceRegistry(types: [
            .rng,
            .blk,
            .input,
            .i2c,
            .gpio,
            .vsock,
            .sound,
            .can,
            .gpu,
            // Forwarded to a vhost-user back-end (no in-process body in this build): Forwarded/ForwardedTypes.swift.
            .console, .scmi, .fs, .other,
        ])
    }

    /// Keys every `[device.NAME]` table accepts, whatever its type (read by `DaemonConfig.parseDevice`).
    public static let commonDeviceKeys = ["type", "backend", "serve", "reconnect", "transport", "restricted-memory", "pool-kib"]

    public func type(named name: String) -> DeviceType? { types[name] }
    public var factories: [String: Factory] { types.mapValues(\.factory) }

    /// rng: `source` (optional file, default getrandom(2)).
    static func makeRng(_ name: String, _ r: inout OptionReader, _ backend: DeviceBackend) throws(ConfigError) -> (DeviceShape, () throws(DeviceError) -> VirtioDevice) {
        let source = try r.string("source")
        let qs = try r.int("queue-size", range: 1...32768)
        if let qs, qs & (qs - 1) != 0 { throw r.error("queue-size", "must be a power of two, found \(qs)") }
        if let source, !source.hasPrefix("/") { throw r.error("source", "must be an absolute path") }
        let size = UInt16(qs ?? 256)
        return (DeviceShape(deviceID: VirtioID.rng, queueSizes: [size], configSize: 0), { () throws(DeviceError) -> VirtioDevice in
            var fd: Int32 = -1
            if let source {
                fd = open(source, O_RDONLY | O_CLOEXEC)
                if fd < 0 { throw DeviceError("\(name): cannot open source \(source): \(Errno.current)") }
            }
            return RngDevice(sourceFD: fd, queueSize: size)
        })
    }

    /// blk: `path` (required), `readonly`, `queues` (1-16), `queue-size` (power of two, 2-32768), `create-mib`.
    static func makeBlk(_ name: String, _ r: inout OptionReader, _ backend: DeviceBackend) throws(ConfigError) -> (DeviceShape, () throws(DeviceError) -> VirtioDevice) {
        let path = try backend == .inproc ? r.requiredString("path") : (r.string("path") ?? "")
        if backend == .inproc && !path.hasPrefix("/") { throw r.error("path", "must be an absolute path") }
        let ro = try r.bool("readonly") ?? false
        let queues = try r.int("queues", range: 1...16) ?? 1
        let qs = try r.int("queue-size", range: 2...32768) ?? 256
        if qs & (qs - 1) != 0 { throw r.error("queue-size", "must be a power of two, found \(qs)") }
        let createMiB = try r.int("create-mib", range: 1...(1 << 24))
        let shape = DeviceShape(deviceID: VirtioID.block, queueSizes: Array(repeating: UInt16(qs), count: Int(queues)),
                                configSize: VirtioBlk.configSize)
        return (shape, { () throws(DeviceError) -> VirtioDevice in
            if let createMiB, access(path, F_OK) != 0 {
                // A sparse backing file of the requested size, created only if nothing is there.
                let fd = open(path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0o600)
                guard fd >= 0 else { throw DeviceError("\(name): cannot create \(path): \(Errno.current)") }
                defer { FD.close(fd) }
                guard ftruncate(fd, off_t(createMiB) << 20) == 0 else { throw DeviceError("\(name): cannot size \(path): \(Errno.current)") }
            }
            return try BlockDevice(path: path, readOnly: ro, queues: Int(queues), queueSize: UInt16(qs))
        })
    }
}
