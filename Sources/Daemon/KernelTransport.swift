import Transport
import Registry

/// transport = "virtio-lo": every attached device is added to the kernel module; the kernel's drivers bind.
final class KernelTransport: DriverSide {
    let host: DeviceHost
    let node: String
    let devices: [(config: DeviceConfig, index: Int)]
    private var link: VirtioLoLink?
    init(host: DeviceHost, node: String, devices: [(config: DeviceConfig, index: Int)]) {
        self.host = host; self.node = node; self.devices = devices
    }
    func start() throws(DeviceError) {
        let l = try VirtioLoLink(host: host, devicePath: node)
        link = l
        for (d, i) in devices {
            do { try l.add(i) } catch { throw DeviceError("device \(d.name): \(error)") }
        }
    }
    func stop() { link?.removeAll(); link = nil }
    func report(seconds: Double) {}
}

func makeKernelLink(host: DeviceHost, config: DaemonConfig, devices: [(config: DeviceConfig, index: Int)]) -> DriverSide? {
    KernelTransport(host: host, node: config.deviceNode, devices: devices)
}
