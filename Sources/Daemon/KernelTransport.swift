import Transport
import Registry

/// transport = "virtio-lo": every attached device is added to the kernel module; the kernel's drivers bind.
/// Devices come and go one at a time (start-up, `loopbackd ctl add/remove`, reload): ADDDEV and DELDEV of that
/// device only.
final class KernelTransport: DriverSide {
    let host: DeviceHost
    let node: String
    private var link: VirtioLoLink?
    var name: String { "virtio-lo" }
    init(host: DeviceHost, node: String) { self.host = host; self.node = node }
    func start() throws(DeviceError) { link = try VirtioLoLink(host: host, devicePath: node) }
    func attach(_ d: DeviceConfig, index: Int) throws(DeviceError) -> Counters? {
        guard let l = link else { throw DeviceError("device \(d.name): \(node) is not open") }
        do { try l.add(index) } catch {
            try? l.remove(index)   // listed although its queues were refused: DELDEV it again
            throw DeviceError("device \(d.name): \(error)")
        }
        return nil
    }
    func detach(index: Int) throws(DeviceError) {
        guard let l = link else { return }
        try l.remove(index)
    }
    func stop() { link?.removeAll(); link = nil }
    func report(seconds: Double) {}
}

func makeKernelLink(host: DeviceHost, config: DaemonConfig) -> DriverSide {
    KernelTransport(host: host, node: config.deviceNode)
}
