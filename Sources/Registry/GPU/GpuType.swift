import Glibc
import Transport

/// `type = "gpu"` (virtio-gpu 2D, virtio 1.2 §5.7): the keys its table accepts (documented in loopbackd.conf(5);
/// the reader enforces the list).
///   scanouts           1-16, default 1
///   mode               "WxH" (64-4095 each), default "1280x800": every scanout's mode
///   modes              array of "WxH", one per scanout (instead of mode)
///   output             "none" (default), "file:/abs/prefix" (scanout N → /abs/prefix-N.ppm) or
///                      "kms:/dev/dri/cardN[:CONNECTOR]" (a host display), or several joined by "+": every scanout's
///   outputs            array of those, one per scanout (instead of output)
///   file-write         "flush" (default: after flushes, at most once per file-interval-ms, the last one always)
///                      or "demand" (only on `loopbackd ctl device NAME snapshot`)
///   file-interval-ms   10-60000, default 100
///   memory-budget-mib  1-4096, default 64: host memory the driver's resources may take (pixels + backing tables)
///   edid               bool, default true: offer VIRTIO_GPU_F_EDID
///   queue-size         power of two 2-1024, default 64 (both queues); forwarded 1-32768, default 256
///   queues             forwarded only: 1-64, default 2
/// Forwarded (`backend = "vhost-user:…"`, e.g. QEMU's vhost-user-gpu): the back-end has the resources and
/// loopbackd serves the display protocol's front-end side (`GpuDisplayServer`): `scanouts`, `mode(s)`,
/// `output(s)`, `file-write`, `file-interval-ms` as above, `memory-budget-mib` bounds the scanouts' host copies;
/// `edid` does not apply (the back-end offers the feature; loopbackd answers GET_EDID).
extension DeviceType {
    public static var gpu: DeviceType {
        DeviceType(name: "gpu", keys: ["scanouts", "mode", "modes", "output", "outputs", "file-write", "file-interval-ms",
                                       "memory-budget-mib", "edid", "queue-size", "queues"],
                   factory: makeGpu, workload: { d, verify in GpuWorkload(d, verify: verify) })
    }

    static func makeGpu(_ name: String, _ r: inout OptionReader, _ backend: DeviceBackend) throws(ConfigError)
        -> (DeviceShape, () throws(DeviceError) -> VirtioDevice) {
        let scanouts = try r.int("scanouts", range: 1...Int64(VirtioGPU.maxScanouts))
        let mode = try r.string("mode")
        let modes = try r.strings("modes")
        let output = try r.string("output")
        let outputs = try r.strings("outputs")
        let fileWrite = try r.oneOf("file-write", ["flush", "demand"])
        let interval = try r.int("file-interval-ms", range: 10...60_000)
        let budget = try r.int("memory-budget-mib", range: 1...4096)
        let edid = try r.bool("edid")
        let qs = try backend == .inproc ? r.int("queue-size", range: 2...1024) ?? 64 : r.int("queue-size", range: 1...32768) ?? 256
        if qs & (qs - 1) != 0 { throw r.error("queue-size", "must be a power of two, found \(qs)") }
        let queues = try r.int("queues", range: 1...64)
        let size = UInt16(qs)
        if backend == .inproc, queues != nil { throw r.error("queues", "only for a forwarded gpu; in-process it has the spec's 2 queues") }
        if backend != .inproc, edid != nil {
            throw r.error("edid", "a forwarded gpu's back-end offers VIRTIO_GPU_F_EDID itself; loopbackd answers its GET_EDID")
        }
        if backend != .inproc, fileWrite == "demand" {
            throw r.error("file-write", "\"demand\" needs `loopbackd ctl device NAME snapshot`, which a forwarded gpu does not have: use \"flush\"")
        }
        if mode != nil && modes != nil { throw r.error("modes", "give mode (every scanout) or modes (one per scanout), not both") }
        if output != nil && outputs != nil { throw r.error("outputs", "give output (every scanout) or outputs (one per scanout), not both") }
        let n = Int(scanouts ?? Int64(modes?.count ?? outputs?.count ?? 1))
        var ms: [GpuMode] = []
        if let modes {
            guard modes.count == n else { throw r.error("modes", "\(modes.count) modes for \(n) scanouts: give one per scanout") }
            for m in modes {
                guard let g = GpuMode.parse(m) else { throw r.error("modes", "\"\(m)\": want WxH, each 64-4095 (\"1280x800\")") }
                ms.append(g)
            }
        } else {
            guard let g = GpuMode.parse(mode ?? "1280x800") else { throw r.error("mode", "\"\(mode ?? "")\": want WxH, each 64-4095 (\"1280x800\")") }
            ms = Array(repeating: g, count: n)
        }
        var specs: [GpuOutputSpec] = []
        if let outputs {
            guard outputs.count == n else { throw r.error("outputs", "\(outputs.count) outputs for \(n) scanouts: give one per scanout") }
            for o in outputs {
                switch GpuOutputSpec.parse(o) {
                case .success(let s): specs.append(s)
                case .failure(let e): throw r.error("outputs", e.description)
                }
            }
        } else {
            switch GpuOutputSpec.parse(output ?? "none") {
            case .success(let s): specs = Array(repeating: s, count: n)
            case .failure(let e): throw r.error("output", e.description)
            }
        }
        let when: FileGpuOutput.When = fileWrite == "demand" ? .demand : .flush(intervalNs: UInt64(interval ?? 100) * 1_000_000)
        let budgetBytes = Int(budget ?? 64) << 20
        guard backend == .inproc else {
            // Forwarded: the back-end has the resources; loopbackd serves the display protocol (GpuDisplayServer)
            // with these scanouts and outputs, its pictures within the budget.
            let what = "gpu display: modes \(ms.map { "\($0.width)x\($0.height)" }), outputs \(specs), \(when), \(budgetBytes)"
            let companion = FrontendCompanionMaker(what: what) { (loop: EventLoop) throws(DeviceError) -> VhostUserFrontendCompanion in
                var outs: [GpuOutput] = []
                for (i, s) in specs.enumerated() { outs.append(try s.open(scanout: i, when: when, mode: ms[i])) }
                return try GpuDisplayServer(name: name, modes: ms, outputs: outs, memoryBudget: budgetBytes, loop: loop)
            }
            let shape = DeviceShape(deviceID: VirtioGPU.deviceID, queueSizes: Array(repeating: size, count: Int(queues ?? 2)),
                                    configSize: VirtioGPU.configSize, companion: companion)
            return (shape, { () throws(DeviceError) -> VirtioDevice in throw DeviceError("\(name): forwarded gpu has no in-process body") })
        }
        let withEDID = edid ?? true
        let shape = DeviceShape(deviceID: VirtioGPU.deviceID, queueSizes: [size, size], configSize: VirtioGPU.configSize)
        return (shape, { () throws(DeviceError) -> VirtioDevice in
            var outs: [GpuOutput] = []
            for (i, s) in specs.enumerated() { outs.append(try s.open(scanout: i, when: when, mode: ms[i])) }
            return GpuDevice(modes: ms, outputs: outs, memoryBudget: budgetBytes, edid: withEDID, queueSize: size)
        })
    }
}
