import Glibc
import CLinux
import Transport
import Registry

/// The driver side of `loopbackd ab`.
enum ABDriver: String {
    case sim
    case virtioLo = "virtio-lo"

    /// `[daemon] transport = "virtio-lo"` → the kernel module (an error later if its node does not open);
    /// otherwise the kernel module when its node (`device-node`, default /dev/virtio-lo) opens read-write, else the
    /// simulated driver. `requested` ("sim", "virtio-lo"; nil or "auto" = the rule above) is for a `--driver` flag.
    static func choose(_ config: DaemonConfig, requested: String? = nil) -> ABDriver {
        switch requested {
        case "sim": return .sim
        case "virtio-lo": return .virtioLo
        default: break
        }
        if config.transport == .virtioLo { return .virtioLo }
        let f = open(config.deviceNode, O_RDWR | O_CLOEXEC)
        if f >= 0 { FD.close(f); return .virtioLo }
        return .sim
    }
}

extension AB {
    /// Driver side = the kernel's own driver, through the virtio-loopback module. One loop, one VirtioLoLink, two
    /// kernel devices: (a) the device body, (b) a vhost-user frontend forwarding to the backend. The workload is
    /// user-space I/O on the kernel device that belongs to each path (KernelRng, KernelBlk), timed here.
    static func runKernel(_ d: DeviceConfig, _ config: DaemonConfig, _ o: Options, socket: String,
                          pollUs: Int) throws(DeviceError) -> Int32 {
        let loop: EventLoop
        do { loop = try EventLoop(pollMicroseconds: pollUs) } catch { throw DeviceError("event loop: \(error)") }
        let host = DeviceHost(loop: loop)
        let ia = host.add(name: d.name, device: try d.make())
        // --restricted: the same body again, on restricted memory (its own bounce pool), instead of the socket path.
        let ib = o.restricted ? host.add(name: d.name + "-restricted", device: try d.make())
            : host.add(name: d.name + "-socket",
                       device: try makeFrontend(d, socket: socket, loop: loop, relay: o.relay, replay: !o.direct && !o.relay))
        let labels = o.restricted ? ("full", "restricted") : ("inproc", "socket")
        loop.startThread()
        var link: VirtioLoLink?
        var targets: [KernelTarget & RoundTrip] = []
        defer {
            for t in targets { t.close() }
            link?.removeAll()
            loop.executeAndWait { host.shutdown() }
            loop.stopAndJoin()
        }
        let l = try VirtioLoLink(host: host, devicePath: config.deviceNode)
        link = l
        guard let exposure = DeviceRegistry.standard.types[d.type]?.kernel else {
            throw DeviceError("ab --driver virtio-lo: no kernel workload for type \(d.type)")
        }
        let restore = exposure.saveState()
        defer { restore(targets.map(\.name)) }
        for (i, path) in [(ia, labels.0), (ib, labels.1)] {
            let before = KernelTarget.present(), state = exposure.snapshot()
            do { try l.add(i, restricted: o.restricted && i == ib, poolKiB: d.poolKiB) } catch { throw DeviceError("\(path) path: \(error)") }
            let t = try KernelTarget.find(exposure, before: before, state: state)
            Log.info("\(d.name): \(path) path is kernel device \(t.virtio) (\(t.name))")
            targets.append(t)
        }
        return try compare(targets[0], targets[1], d, o, driver: .virtioLo, pollUs: pollUs,
                           socket: socket, targets: (targets[0].name, targets[1].name), labels: labels)
    }
}
