import Glibc
import CLinux
import Transport
import Registry

/// transport = "virtio-lo": every attached device is added to the kernel module; the kernel's drivers bind.
/// Devices come and go one at a time (start-up, `loopbackd ctl add/remove`, reload): ADDDEV and DELDEV of that
/// device only.
final class KernelTransport: DriverSide {
    let host: DeviceHost
    let node: String
    /// `[daemon] restricted-memory`: the default of each device's `restricted-memory`.
    let restrictedDefault: Bool
    /// Every configured device on this link is restricted: the node is RESTRICTed at start (pools only).
    let restrictNode: Bool
    private var link: VirtioLoLink?
    var name: String { "virtio-lo" }
    init(host: DeviceHost, node: String, restrictedDefault: Bool = false, restrictNode: Bool = false) {
        self.host = host; self.node = node; self.restrictedDefault = restrictedDefault; self.restrictNode = restrictNode
    }
    func start() throws(DeviceError) {
        let l = try VirtioLoLink(host: host, devicePath: node)
        if restrictNode { try l.restrict() }
        link = l
    }
    func attach(_ d: DeviceConfig, index: Int) throws(DeviceError) -> Counters? {
        guard let l = link else { throw DeviceError("device \(d.name): \(node) is not open") }
        do { try l.add(index, restricted: d.restrictedMemory ?? restrictedDefault, poolKiB: d.poolKiB) } catch {
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

/// transport = "vduse": each attached device becomes a VDUSE device on the vDPA bus (Sources/Transport/VDUSE/);
/// the kernel's virtio_vdpa + virtio_blk bind it. No out-of-tree module.
final class VDUSETransport: DriverSide {
    let host: DeviceHost
    static let controlPath = "/dev/vduse/control"
    private var control: Int32 = -1
    private var devices: [Int: VDUSEDevice] = [:]
    var name: String { "vduse" }
    init(host: DeviceHost) { self.host = host }
    func start() throws(DeviceError) {
        let f = open(VDUSETransport.controlPath, O_RDWR | O_CLOEXEC)
        guard f >= 0 else {
            let e = Errno.current
            throw DeviceError("cannot open \(VDUSETransport.controlPath): \(e)" + (e.rawValue == ENOENT ?
                " (no VDUSE: Linux 5.15+ with CONFIG_VDPA_USER; modprobe vduse virtio_vdpa)" : ""))
        }
        // API version 0 (the only one before Linux 6.18): what this transport speaks.
        var v: UInt64 = 0
        guard lb_ioctl_ptr(f, lb_vduse_set_api_version(), &v) == 0 else {
            let e = Errno.current
            FD.close(f)
            throw DeviceError("\(VDUSETransport.controlPath): VDUSE_SET_API_VERSION 0: \(e)")
        }
        control = f
    }
    func attach(_ d: DeviceConfig, index: Int) throws(DeviceError) -> Counters? {
        guard control >= 0 else { throw DeviceError("device \(d.name): \(VDUSETransport.controlPath) is not open") }
        let dev = try VDUSEDevice(host: host, index: index, name: "loopbackd-\(d.name)", control: control)
        do { try dev.addToBus() } catch { dev.remove(); throw error }
        devices[index] = dev
        return nil
    }
    func detach(index: Int) throws(DeviceError) {
        guard let dev = devices.removeValue(forKey: index) else { return }
        dev.remove()
        Log.info("\(dev.name): removed (vdpa dev del, VDUSE_DESTROY_DEV)")
    }
    func stop() {
        for (_, dev) in devices { dev.remove() }
        devices = [:]
        if control >= 0 { FD.close(control); control = -1 }
    }
    func report(seconds: Double) {}
}

/// Both kernel transports in one daemon: `[daemon] transport` is the default, a device's own `transport` key
/// picks the other. Each is opened only if some device uses it.
final class KernelTransports: DriverSide {
    let config: DaemonConfig
    let module: KernelTransport
    let vduse: VDUSETransport
    private var started: Set<DaemonConfig.Transport> = []
    private var routes: [Int: DaemonConfig.Transport] = [:]
    var name: String { config.transport.rawValue }
    init(host: DeviceHost, config: DaemonConfig) {
        self.config = config
        module = makeModuleTransport(host: host, config: config)
        vduse = VDUSETransport(host: host)
    }
    private func side(_ t: DaemonConfig.Transport) -> DriverSide { t == .vduse ? vduse : module }
    /// Opens the transports the configured devices use (others open on first use: `ctl add`, reload).
    func start() throws(DeviceError) {
        let used = Set(config.devices.filter { $0.serve == nil }.map { $0.transport ?? config.transport })
        for t in used.isEmpty ? [config.transport] : Array(used).sorted(by: { $0.rawValue < $1.rawValue }) { try open(t) }
    }
    private func open(_ t: DaemonConfig.Transport) throws(DeviceError) {
        guard !started.contains(t) else { return }
        try side(t).start()
        started.insert(t)
    }
    func attach(_ d: DeviceConfig, index: Int) throws(DeviceError) -> Counters? {
        let t = d.transport ?? config.transport
        try open(t)
        let c = try side(t).attach(d, index: index)
        routes[index] = t
        return c
    }
    func detach(index: Int) throws(DeviceError) {
        guard let t = routes.removeValue(forKey: index) else { return }
        try side(t).detach(index: index)
    }
    func stop() {
        if started.contains(.vduse) { vduse.stop() }
        if started.contains(.virtioLo) { module.stop() }
        started = []
    }
    func report(seconds: Double) {}
}

func makeKernelLink(host: DeviceHost, config: DaemonConfig) -> DriverSide {
    let mixed = config.devices.contains { $0.transport != nil && $0.transport != config.transport }
    if config.transport == .virtioLo && !mixed { return makeModuleTransport(host: host, config: config) }
    return KernelTransports(host: host, config: config)
}

/// The module's transport with the restricted-memory settings: the node is RESTRICTed (pools only) when every
/// device it serves is restricted.
func makeModuleTransport(host: DeviceHost, config: DaemonConfig) -> KernelTransport {
    let linked = config.devices.filter { $0.serve == nil && ($0.transport ?? config.transport) == .virtioLo }
    let restricted = !linked.isEmpty && linked.allSatisfy { $0.restrictedMemory ?? config.restrictedMemory }
    return KernelTransport(host: host, node: config.deviceNode, restrictedDefault: config.restrictedMemory, restrictNode: restricted)
}
