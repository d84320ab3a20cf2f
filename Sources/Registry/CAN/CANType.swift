import Glibc
import Transport

/// `type = "can"` (virtio-can, virtio 1.3 "CAN Device"): the keys its table accepts (documented in loopbackd.conf(5);
/// the reader enforces the list).
///   interface   a SocketCAN interface (vcan0, can0); required in-process unless `simulated`
///   simulated   bool, default false: no host interface; an in-memory bus that answers every frame with itself
///               (the simulated driver's workload)
///   fd          bool, default: what the interface allows (its MTU is 72). true: fail at start-up unless it
///               allows CAN FD; false: VIRTIO_CAN_F_CAN_FD is not offered
///   queue-size  power of two 2-1024, default 256 (all three queues)
/// Forwarded (`backend = "vhost-user:…"`): the back-end has the interface; only `queue-size` applies (and, as for
/// every forwarded type before, `queues`).
extension DeviceType {
    public static var can: DeviceType {
        DeviceType(name: "can", keys: ["interface", "simulated", "fd", "queue-size", "queues"], factory: makeCAN,
                   workload: { d, verify in CANWorkload(d, verify: verify) })
    }

    static func makeCAN(_ name: String, _ r: inout OptionReader, _ backend: DeviceBackend) throws(ConfigError)
        -> (DeviceShape, () throws(DeviceError) -> VirtioDevice) {
        let interface = try r.string("interface")
        let simulated = try r.bool("simulated") ?? false
        let fd = try r.bool("fd")
        let qs = try r.int("queue-size", range: 2...1024) ?? 256
        if qs & (qs - 1) != 0 { throw r.error("queue-size", "must be a power of two, found \(qs)") }
        let queues = try r.int("queues", range: 1...64)
        let size = UInt16(qs)
        guard backend == .inproc else {
            if interface != nil { throw r.error("interface", "a forwarded can device's interface is its vhost-user back-end's; only queue-size applies") }
            if simulated { throw r.error("simulated", "a forwarded can device's bus is its vhost-user back-end's; only queue-size applies") }
            if fd != nil { throw r.error("fd", "a forwarded can device's features are its vhost-user back-end's; only queue-size applies") }
            let shape = DeviceShape(deviceID: VirtioCAN.deviceID, queueSizes: Array(repeating: size, count: Int(queues ?? 3)),
                                    configSize: VirtioCAN.configSize)
            return (shape, { () throws(DeviceError) -> VirtioDevice in throw DeviceError("\(name): forwarded can has no in-process body") })
        }
        if queues != nil { throw r.error("queues", "an in-process can device has exactly 3 queues (tx, rx, control)") }
        if (interface != nil) == simulated {
            throw r.error(interface != nil ? "simulated" : "interface",
                          "an in-process can device needs exactly one of interface (a SocketCAN interface) or simulated = true")
        }
        if let interface, interface.isEmpty || interface.utf8.count > 15 || interface.contains("/") {
            throw r.error("interface", "must be an interface name of 1 to 15 bytes (vcan0, can0)")
        }
        let shape = DeviceShape(deviceID: VirtioCAN.deviceID, queueSizes: [size, size, size], configSize: VirtioCAN.configSize)
        return (shape, { () throws(DeviceError) -> VirtioDevice in
            let endpoint: CANEndpoint
            if let interface {
                do { endpoint = try SocketCANEndpoint(interface: interface) } catch { throw DeviceError("\(name): \(error)") }
            } else {
                endpoint = FakeCANBus(fdCapable: fd != false, echo: true)
            }
            if fd == true && !endpoint.fdCapable {
                throw DeviceError("\(name): fd = true but \(endpoint.description) does not take CAN FD frames (MTU 16: ip link set \(interface ?? "") type can fd on)")
            }
            return CANDevice(endpoint: endpoint, queueSize: size, offerFD: fd != false)
        })
    }
}
