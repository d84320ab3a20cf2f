import Glibc
import Transport

/// `type = "i2c"` (virtio-i2c, virtio 1.2 §5.19): the keys its table accepts (documented in loopbackd.conf(5);
/// the reader enforces the list).
///   map         "VADDR=/dev/i2c-N[:HADDR], …": which host adapter and address each virtual address reaches
///               (7-bit addresses 0x03-0x77; HADDR defaults to VADDR); an address not in the map does not answer
///   simulated   bool, default false: no host adapter; fake register-file chips at 0x50-0x57 (i2c-stub-like)
///   queue-size  power of two 2-1024, default 64
/// Forwarded (`backend = "vhost-user:…"`): the back-end has the adapters; only `queue-size` applies.
extension DeviceType {
    public static var i2c: DeviceType {
        DeviceType(name: "i2c", keys: ["map", "simulated", "queue-size"], factory: makeI2C,
                   workload: { d, _ in I2CWorkload(d) })
    }

    static func makeI2C(_ name: String, _ r: inout OptionReader, _ backend: DeviceBackend) throws(ConfigError)
        -> (DeviceShape, () throws(DeviceError) -> VirtioDevice) {
        let map = try r.string("map")
        let simulated = try r.bool("simulated") ?? false
        let qs = try r.int("queue-size", range: 2...1024) ?? 64
        if qs & (qs - 1) != 0 { throw r.error("queue-size", "must be a power of two, found \(qs)") }
        var parsed: ([String], [UInt16: I2CDevAdapter.Route])?
        if let map {
            switch I2CDevAdapter.parseMap(map) {
            case .success(let p): parsed = p
            case .failure(let e): throw r.error("map", e.message)
            }
        }
        if backend == .inproc {
            if (map != nil) == simulated {
                throw r.error(map != nil ? "simulated" : "map",
                              "an in-process i2c device needs exactly one of map (host adapters) or simulated = true")
            }
        } else if map != nil || simulated {
            throw r.error(map != nil ? "map" : "simulated", "a forwarded i2c device's adapters are its vhost-user back-end's; only queue-size applies")
        }
        let size = UInt16(qs)
        let shape = DeviceShape(deviceID: VirtioI2C.deviceID, queueSizes: [size], configSize: 0)
        return (shape, { () throws(DeviceError) -> VirtioDevice in
            if let (buses, routes) = parsed {
                do { return I2CDevice(adapter: try I2CDevAdapter(buses: buses, routes: routes), queueSize: size) } catch {
                    throw DeviceError("\(name): \(error)")
                }
            }
            return I2CDevice(adapter: FakeI2CBus(chips: Array(0x50...0x57)), queueSize: size)
        })
    }
}
