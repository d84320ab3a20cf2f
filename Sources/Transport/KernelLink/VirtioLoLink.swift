import Glibc
import CLinux

/// The kernel link: the driver side is the Linux kernel's own virtio drivers, reached through the virtio-loopback
/// module's `/dev/virtio-lo` (kernel/virtio-loopback/uapi/virtio_lo.h; ABI-compatible with unified-hmi virtio-lo).
///
/// The kernel does the transport: ADDDEV creates a device, the driver probes inside the ioctl, and it returns the
/// negotiated features and the ring physical addresses at DRIVER_OK. loopbackd maps every System RAM range once
/// (mmap at offset = physical address), so the rings and every buffer the driver hands over are reachable without
/// a per-request mmap. Kicks arrive on per-queue eventfds watched by the event loop; interrupts go out with the
/// KICK ioctl (vring_interrupt runs synchronously in our context). With the module's extensions (probed with
/// GETEXT; the upstream unified-hmi driver answers EINVAL, ENOTTY is accepted too) loopbackd also learns driver
/// resets and can set NEEDS_RESET. A device whose config reads depend on its config writes (virtio-input) is added
/// with the SYNC_CONFIG flag: the module then holds each driver config write until the loop has applied it to the
/// device and stored the resulting config (CFG_GET/CFG_ACK, named by the config eventfd, since the driver's probe
/// writes while ADDDEV is still blocked on another thread). On upstream, shutdown never uses DELDEV (it removes the device under a
/// spinlock there: kernel BUG, then a hang): loopbackd unmaps RAM and closes the fd, which removes every device.
///
/// Every value from the module, an ioctl or /proc/iomem is decoded by the pure functions in KernelLinkDecode.swift.
public final class VirtioLoLink: EventHandler, DeviceHostObserver {
    public let host: DeviceHost
    public let path: String
    /// -1 once closed (upstream shutdown).
    private(set) var fd: Int32
    public let flavor: KernelFlavor
    public var extensions: UInt64 { flavor.extensions }
    public private(set) var memory: GuestMemory?
    private var devices: [Linked] = []

    final class Linked {
        let hostIndex: Int
        let name: String
        var kernelIndex: UInt32 = 0
        var added = false
        /// ADDDEV failed: nothing of the device is left in the kernel; the slot stays (tokens are slot numbers).
        var failed = false
        /// Added with VIRTIO_LO_DEV_F_SYNC_CONFIG: config writes are answered on the loop (`answerConfigWrite`).
        var syncConfig = false
        var configSize = 0
        var badWriteLogged = false
        /// Our own copies of the kick eventfds given to the kernel (the host gets dups it may close).
        var kicks: [Int32] = []
        var configKick: Int32 = -1
        var configChanged: Int32 = -1
        var registrations: [(fd: Int32, reg: Int)] = []
        var resetCount: UInt32 = 0
        /// Stopped by a driver reset whose new probe had not reached DRIVER_OK yet (driver reload): follow the new
        /// rings when it does.
        var reprobing = false
        var config: [UInt8] = []
        /// The queue sizes offered at ADDDEV (the kernel must not report more).
        var offered: [UInt16] = []
        var queueCount = 0
        /// Interrupt eventfds registered with the module (irqfd extension), for passthrough devices.
        var irqFDs: [Int32] = []
        /// Restricted memory (extension RESTRICTED): the device's pool, the only memory it is given; its rings and
        /// descriptors carry pool addresses (IOVAs).
        var restricted = false
        var pool: GuestMemory?
        init(hostIndex: Int, name: String) { self.hostIndex = hostIndex; self.name = name }
    }

    /// Opens the module's node and probes its extensions.
    public init(host: DeviceHost, devicePath: String = "/dev/virtio-lo") throws(DeviceError) {
        self.host = host
        path = devicePath
        let f = open(devicePath, O_RDWR | O_CLOEXEC)
        guard f >= 0 else {
            let e = Errno.current
            throw DeviceError("cannot open \(devicePath): \(e)" + (e.rawValue == ENOENT ? " (is the virtio_loopback module loaded?)" : ""))
        }
        fd = f
        var ext = virtio_lo_ext()
        let probe = lb_ioctl_ptr(f, lb_vlo_getext(), &ext) == 0 ? 0 : Errno.current.rawValue
        flavor = KernelFlavor.classify(probeErrno: probe, version: ext.version, extensions: ext.extensions)
        switch flavor {
        case .extended(let v, let e):
            Log.info("\(devicePath): virtio-loopback ABI \(v), extensions 0x\(String(e, radix: 16))")
        case .upstream:
            Log.info("\(devicePath): no extensions (upstream virtio-lo: \(Errno(probe))); devices are removed by closing the node, not DELDEV")
        case .unknown(let e):
            Log.warning("\(devicePath): extension probe failed: \(Errno(e)); treating the module as upstream virtio-lo")
        }
    }

    deinit { if fd >= 0 { FD.close(fd) } }

    public var hasDeviceStatus: Bool { extensions & UInt64(VIRTIO_LO_EXT_DEVSTATUS) != 0 }
    public var hasIRQFD: Bool { extensions & UInt64(VIRTIO_LO_EXT_IRQFD) != 0 }
    public var hasSyncConfig: Bool { extensions & UInt64(VIRTIO_LO_EXT_SYNC_CONFIG) != 0 }
    public var hasRestricted: Bool { extensions & UInt64(VIRTIO_LO_EXT_RESTRICTED) != 0 }
    /// RESTRICT was issued: this fd maps device pools only (System RAM, GET_RAM and unrestricted ADDDEV: EPERM).
    public private(set) var restrictedOnly = false

    /// VIRTIO_LO_RESTRICT (one-way): from now on the module refuses this fd any memory but the devices' pools.
    /// For a configuration whose every device is restricted: a bug in a device body (or anything that takes the
    /// process over later) cannot map kernel memory through the node.
    public func restrict() throws(DeviceError) {
        guard fd >= 0, hasRestricted else { throw DeviceError("\(path): the module has no restricted memory (RESTRICTED extension)") }
        guard lb_ioctl_val(fd, lb_vlo_restrict(), 0) == 0 else { throw DeviceError("\(path): RESTRICT: \(Errno.current)") }
        restrictedOnly = true
        Log.info("\(path): restricted: only device pools can be mapped through this node")
    }

    /// The device's pool, mapped once: one region at the pool's IOVA, backed by the node at its mmap offset.
    private func mapPool(_ d: Linked) throws(DeviceError) -> GuestMemory {
        var p = virtio_lo_pool()
        p.idx = d.kernelIndex
        guard lb_ioctl_ptr(fd, lb_vlo_get_pool(), &p) == 0 else { throw DeviceError("\(d.name): GET_POOL: \(Errno.current)") }
        guard let region = VirtioLoLink.checkPool(iova: p.iova, size: p.size, mmapOffset: p.mmap_offset) else {
            throw DeviceError("\(d.name): GET_POOL: pool 0x\(String(p.iova, radix: 16)) +\(p.size) at offset 0x\(String(p.mmap_offset, radix: 16)) refused")
        }
        let m: Mapping
        do { m = try Mapping(fd: fd, offset: p.mmap_offset, length: region) } catch {
            throw DeviceError("\(d.name): mmap of its pool (\(p.size) bytes): \(error)")
        }
        let info = RegionInfo(guestBase: p.iova, size: p.size, host: m.base, fd: fd, fdOffset: p.mmap_offset,
                              userAddr: UInt64(UInt(bitPattern: m.base)))
        let map = m.release()
        do { return try GuestMemory(regions: [info], mappings: [map], fds: []) } catch {
            throw DeviceError("\(d.name): pool region refused: \(error)")
        }
    }

    // MARK: memory

    /// The System RAM ranges: from the module (GET_RAM) or, with upstream virtio-lo, from /proc/iomem.
    /// Checked (see `checkRAMRanges`): a bad range is logged and left out.
    public func ramRanges() throws(DeviceError) -> [(start: UInt64, size: UInt64)] {
        let page = UInt64(max(sysconf(Int32(_SC_PAGESIZE)), 4096))
        var raw: [(start: UInt64, size: UInt64)]
        if extensions & UInt64(VIRTIO_LO_EXT_RAMLIST) != 0 {
            var capacity = 64
            while true {
                var ranges = [virtio_lo_mem_range](repeating: virtio_lo_mem_range(), count: capacity)
                var list = virtio_lo_ramlist()
                list.count = UInt32(capacity)
                let r = ranges.withUnsafeMutableBufferPointer { b -> Int32 in
                    list.ranges = UInt64(UInt(bitPattern: b.baseAddress))
                    return lb_ioctl_ptr(fd, lb_vlo_get_ram(), &list)
                }
                guard r == 0 else { throw DeviceError("GET_RAM: \(Errno.current)") }
                let (n, retry) = VirtioLoLink.ramListCount(returned: list.count, total: list.total, capacity: capacity)
                if let retry { capacity = retry; continue }
                if Int(list.total) > n { Log.warning("GET_RAM: \(list.total) RAM ranges, using the first \(n)") }
                raw = ranges.prefix(n).map { ($0.start, $0.size) }
                break
            }
        } else {
            let text: String
            do { text = try FD.readText("/proc/iomem") } catch { throw DeviceError("cannot read /proc/iomem: \(error)") }
            raw = try VirtioLoLink.parseIomem(text, pageSize: page)
        }
        let (ok, rejected) = VirtioLoLink.checkRAMRanges(raw, pageSize: page)
        for r in rejected { Log.warning("\(path): ignoring \(r)") }
        guard !ok.isEmpty else { throw DeviceError("\(path): no usable System RAM range") }
        guard ok.count <= GuestMemory.maxRegions else {
            throw DeviceError("\(path): \(ok.count) RAM ranges, at most \(GuestMemory.maxRegions) supported")
        }
        return ok
    }

    /// Maps every RAM range once, shared, at offset = physical address.
    public func mapMemory() throws(DeviceError) {
        var regions: [RegionInfo] = []
        var maps: [(UnsafeMutableRawPointer, Int)] = []
        for (start, size) in try ramRanges() {
            // checkRAMRanges guarantees both conversions; stay defensive anyway.
            guard let len = Int(exactly: size), let off = Int64(exactly: start) else {
                for (q, l) in maps { munmap(q, l) }
                throw DeviceError("RAM range 0x\(String(start, radix: 16)) (+\(size)) cannot be mapped")
            }
            let p = mmap(nil, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(off))
            guard let p, p != MAP_FAILED else {
                for (q, l) in maps { munmap(q, l) }
                throw DeviceError("mmap of RAM 0x\(String(start, radix: 16)) (+\(size)) on \(path): \(Errno.current)")
            }
            maps.append((p, len))
            regions.append(RegionInfo(guestBase: start, size: size, host: p, fd: fd, fdOffset: start,
                                      userAddr: UInt64(UInt(bitPattern: p))))
        }
        // The GuestMemory owns the mappings, not the fd (the link closes it).
        do { memory = try GuestMemory(regions: regions, mappings: maps, fds: []) } catch {
            throw DeviceError("RAM ranges overlap: \(error)")
        }
        // Non-overlapping ranges below 2^63 (checked): the sum cannot overflow.
        Log.info("mapped \(regions.count) RAM range(s), \(regions.reduce(0 as UInt64) { $0 &+ $1.size } >> 20) MiB")
        // Memory hot-plug: RAM added after this point is mapped when a buffer is first found in it (the module
        // lists it in GET_RAM; with RAM_HOTPLUG it also keeps offline blocks out of the mappings).
        memory?.onMiss = { [weak self] addr in self?.mapHotAddedRAM(missed: addr) ?? false }
    }

    /// A driver's address lies in no mapped RAM range: re-read the RAM list and map every part of it not mapped
    /// yet (hot-added memory). True if something was mapped. Runs on the translating thread (the loop), only on a
    /// miss: a buffer outside RAM costs one GET_RAM before its queue latches.
    func mapHotAddedRAM(missed addr: UInt64) -> Bool {
        guard fd >= 0, let memory else { return false }
        guard let ranges = try? ramRanges() else { return false }
        var added = false
        for (start, size) in ranges {
            for (s, n) in VirtioLoLink.unmappedParts(start: start, size: size, of: memory.regions) {
                guard let len = Int(exactly: n), let off = off_t(exactly: s) else { continue }
                let p = mmap(nil, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off)
                guard let p, p != MAP_FAILED else {
                    Log.warning("memory hot-plug: mmap of RAM 0x\(String(s, radix: 16)) (+\(n)): \(Errno.current)")
                    continue
                }
                let r = RegionInfo(guestBase: s, size: n, host: p, fd: fd, fdOffset: s, userAddr: UInt64(UInt(bitPattern: p)))
                do throws(Errno) { try memory.append(r, mapping: (p, len)) } catch {
                    Log.warning("memory hot-plug: RAM 0x\(String(s, radix: 16)) (+\(n)) not added: table full (\(GuestMemory.maxRegions) ranges)")
                    continue
                }
                added = true
                Log.info("memory hot-plug: mapped RAM 0x\(String(s, radix: 16))-0x\(String(s &+ n &- 1, radix: 16)) (\(n >> 20) MiB), for a buffer at 0x\(String(addr, radix: 16))")
            }
        }
        return added
    }

    /// The module's default pool size (parameter pool_kib) for a restricted device added with pool-kib 0; 4096 (the
    /// module's default) if the parameter cannot be read.
    static func modulePoolKiB() -> UInt32 {
        let fd = open("/sys/module/virtio_loopback/parameters/pool_kib", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return 4096 }
        defer { FD.close(fd) }
        var b = [UInt8](repeating: 0, count: 16)
        let n = read(fd, &b, b.count - 1)
        guard n > 0, let v = UInt32(String(decoding: b[0..<n], as: UTF8.self).filter { $0.isNumber }), v > 0 else { return 4096 }
        return v
    }

    /// The parts of `[start, start+size)` that no region covers, in order. Pure (unit-tested).
    public static func unmappedParts(start: UInt64, size: UInt64, of regions: [RegionInfo]) -> [(UInt64, UInt64)] {
        let (end, o) = start.addingReportingOverflow(size)
        guard !o, size > 0 else { return [] }
        var parts: [(UInt64, UInt64)] = []
        var at = start
        for r in regions.sorted(by: { $0.guestBase < $1.guestBase }) {
            let rEnd = r.guestBase &+ r.size
            if rEnd <= at || r.guestBase >= end { continue }
            if r.guestBase > at { parts.append((at, r.guestBase - at)) }
            at = max(at, rEnd)
            if at >= end { break }
        }
        if at < end { parts.append((at, end - at)) }
        return parts
    }

    // MARK: devices

    /// ADDDEV for host device `index`; blocks until the kernel driver has probed (DRIVER_OK), then activates the
    /// device on the loop. Call from a thread other than the loop's.
    /// `restricted`: the device gets VIRTIO_LO_DEV_F_RESTRICTED (a pool of `poolKiB` KiB beyond its rings, 0 = the
    /// module's default) and only its pool is mapped for it; System RAM is mapped only for unrestricted devices.
    public func add(_ index: Int, restricted: Bool = false, poolKiB: UInt32 = 0) throws(DeviceError) {
        guard fd >= 0 else { throw DeviceError("\(path) is closed") }
        if restricted {
            guard hasRestricted else {
                throw DeviceError("device \(index): restricted-memory needs this project's module with the RESTRICTED extension (\(path) lacks it)")
            }
        } else if restrictedOnly {
            throw DeviceError("device \(index): \(path) maps restricted devices only (every configured device was restricted at start-up); set restricted-memory = true")
        } else if memory == nil { try mapMemory() }
        let host = self.host
        let name = host.loop.executeAndWait { host.name(index) }
        let info = host.loop.executeAndWait { host.info(index) }
        let wantsSync = host.loop.executeAndWait { host.device(index).configReadsDependOnWrites }
        let d = Linked(hostIndex: index, name: name)
        let n = info.queueMaxSizes.count
        guard n > 0, n <= Int(VIRTIO_LO_MAX_QUEUES) else { throw DeviceError("\(name): \(n) queues, the module allows 1...\(VIRTIO_LO_MAX_QUEUES)") }
        guard info.configSize >= 0, let configSize = UInt32(exactly: info.configSize) else {
            throw DeviceError("\(name): config size \(info.configSize)")
        }
        do {
            for _ in 0..<n { d.kicks.append(try FD.eventfd().release()) }
            d.configKick = try FD.eventfd().release()
            d.configChanged = try FD.eventfd().release()
        } catch { closeAll(d); throw DeviceError("\(name): eventfd: \(error)") }
        if restricted {
            // One request must fit in the pool with room for another (else the driver retries it for ever).
            let poolBytes = Int(poolKiB != 0 ? poolKiB : VirtioLoLink.modulePoolKiB()) << 10
            host.loop.executeAndWait { host.device(index).limitRequestBytes(poolBytes / 2) }
        }
        var config = [UInt8](repeating: 0, count: info.configSize)
        _ = host.loop.executeAndWait { config.withUnsafeMutableBytes { host.readConfig(index, offset: 0, into: $0) } }
        var qinfo = (0..<n).map { q in virtio_lo_qinfo(kickfd: d.kicks[q], size: UInt32(info.queueMaxSizes[q]), desc: 0, avail: 0, used: 0) }
        var dev = virtio_lo_devinfo()
        dev.device_id = info.deviceID
        dev.vendor_id = 0x1AF4
        dev.nqueues = UInt32(n)   // 1...64, checked above
        dev.features = info.features.rawValue
        dev.config_size = configSize
        dev.config_kick = d.configKick
        if wantsSync {
            if hasSyncConfig {
                dev.flags = UInt32(VIRTIO_LO_DEV_F_SYNC_CONFIG)
                d.syncConfig = true
            } else {
                Log.warning("\(name): its config reads depend on config writes, but \(path) has no synchronous config " +
                            "writes (SYNC_CONFIG): the driver reads the module's copy and may see an empty device")
            }
        }
        d.configSize = info.configSize
        if restricted {
            dev.flags |= UInt32(VIRTIO_LO_DEV_F_RESTRICTED)
            dev.pool_kib = poolKiB
            d.restricted = true
        }
        // Listed (and, with SYNC_CONFIG, its config eventfd watched) before ADDDEV: the driver's probe writes config
        // while ADDDEV blocks this thread, and the loop answers.
        let listed = host.loop.executeAndWait { () -> DeviceError? in
            self.devices.append(d)
            guard d.syncConfig else { return nil }
            do throws(DeviceError) { try self.watchConfigKick(d) } catch { return error }
            return nil
        }
        if let listed { host.loop.executeAndWait { self.forget(d) }; throw listed }
        let r = config.withUnsafeMutableBufferPointer { cb in
            qinfo.withUnsafeMutableBufferPointer { qb -> Int32 in
                dev.config = cb.baseAddress
                dev.qinfo = qb.baseAddress
                return lb_ioctl_ptr(fd, lb_vlo_adddev(), &dev)
            }
        }
        guard r == 0 else {
            let e = Errno.current
            host.loop.executeAndWait { self.forget(d) }
            throw DeviceError("\(name): ADDDEV: \(e)" + (e.rawValue == ENOENT ? " (no driver bound: is the virtio driver for device id \(info.deviceID) loaded?)" : ""))
        }
        let added = dev
        host.loop.executeAndWait {
            d.kernelIndex = added.idx
            d.added = true
            d.config = config
            d.offered = info.queueMaxSizes
        }
        if d.restricted {
            // Listed and added: a failure here leaves it to removeAll/remove (DELDEV).
            let pool = try mapPool(d)
            host.loop.executeAndWait { d.pool = pool }
            Log.info("\(name): restricted memory: pool of \(pool.regions[0].size >> 10) KiB at IOVA 0x\(String(pool.regions[0].guestBase, radix: 16))")
        }
        Log.info("\(name): added as virtio-lo device \(dev.idx), driver features 0x\(String(dev.features, radix: 16))")
        let features = VirtioFeatures(rawValue: dev.features)
        let queues: [QueueConfig]
        do {
            queues = try VirtioLoLink.decodeQueues(qinfo.map { KernelQueueInfo(size: $0.size, desc: $0.desc, avail: $0.avail, used: $0.used) },
                                                   offered: d.offered)
        } catch { throw DeviceError("\(name): ADDDEV: \(error)") }   // the device stays listed: removeAll removes it
        let err = host.loop.executeAndWait { () -> DeviceError? in
            do throws(DeviceError) { try self.activate(d, features: features, queues: queues); return nil } catch { return error }
        }
        if let err { throw err }
    }

    /// On the loop: negotiate, activate with the active queues, watch the config kick and the device's config
    /// interrupt.
    private func activate(_ d: Linked, features: VirtioFeatures, queues: [QueueConfig]) throws(DeviceError) {
        let i = d.hostIndex
        // ACCESS_PLATFORM is the transport's (addresses are pool IOVAs, translated by the pool's region), not the
        // device body's: strip it before the body sees the driver's features.
        let features = d.restricted ? VirtioFeatures(rawValue: features.rawValue & ~VirtioFeatures.accessPlatform.rawValue) : features
        guard host.setFeatures(i, features) else { throw DeviceError("\(d.name): driver features 0x\(String(features.rawValue, radix: 16)) refused") }
        // The driver may set up fewer queues than offered (virtio_blk: one per CPU); decodeQueues kept the prefix.
        let active = queues
        var kicks: [Int32] = []
        for q in 0..<active.count {
            guard let k = try? FD.dup(d.kicks[q]).release() else { for k in kicks { FD.close(k) }; throw DeviceError("\(d.name): dup failed") }
            kicks.append(k)
        }
        var irqs = (0..<active.count).map { Notifier.virtioLoKick(fd: fd, device: d.kernelIndex, queue: Int32($0)) }
        if (host.device(i).passthroughRings || host.device(i).interruptsMayWaitForDevice) && hasIRQFD {
            // A vhost-user backend (or the device, through its Notifier) signals these eventfds; the module turns
            // them into vring interrupts itself, in a kernel worker (see `VirtioDevice.interruptsMayWaitForDevice`).
            if d.irqFDs.isEmpty {
                for q in 0..<d.kicks.count {
                    guard let e = try? FD.eventfd().release() else { break }
                    var req = virtio_lo_irqfd(idx: d.kernelIndex, qidx: UInt32(q), fd: e, flags: 0)
                    guard lb_ioctl_ptr(fd, lb_vlo_set_irqfd(), &req) == 0 else { Log.warning("\(d.name): SET_IRQFD: \(Errno.current)"); FD.close(e); break }
                    d.irqFDs.append(e)
                }
            }
            if d.irqFDs.count >= active.count { irqs = (0..<active.count).map { .eventfd(d.irqFDs[$0]) } }
        }
        guard let memory = d.restricted ? d.pool : self.memory else { throw DeviceError("\(d.name): no memory mapped") }
        d.queueCount = active.count
        try host.activate(i, queues: active, kickFDs: kicks, interrupts: irqs,
                          configInterrupt: .eventfd(d.configChanged), memory: memory)
        try watchConfigKick(d)
        if !d.registrations.contains(where: { $0.fd == d.configChanged }) {
            let slot = UInt32(devices.firstIndex { $0 === d } ?? 0)
            do { d.registrations.append((d.configChanged, try host.loop.register(fd: d.configChanged, handler: self, token: slot << 1 | 1))) }
            catch { throw DeviceError("\(d.name): cannot watch config eventfds: \(error)") }
        }
        host.observer = self
    }

    /// On the loop: watch the config eventfd (driver config writes and status changes), once.
    private func watchConfigKick(_ d: Linked) throws(DeviceError) {
        guard !d.registrations.contains(where: { $0.fd == d.configKick }) else { return }
        let slot = UInt32(devices.firstIndex { $0 === d } ?? 0)
        do { d.registrations.append((d.configKick, try host.loop.register(fd: d.configKick, handler: self, token: slot << 1))) }
        catch { throw DeviceError("\(d.name): cannot watch config eventfds: \(error)") }
    }

    /// On the loop: a device whose ADDDEV failed (the kernel removed it): stop watching, close, keep the slot.
    private func forget(_ d: Linked) {
        for (f, r) in d.registrations { host.loop.unregister(fd: f, registration: r) }
        d.registrations = []
        d.failed = true
        closeAll(d)
    }

    // MARK: events (loop thread)

    public func handleEvent(token: UInt32, events: UInt32) {
        let slot = Int(token >> 1)
        guard slot < devices.count else { return }
        let d = devices[slot]
        guard !d.failed else { return }
        if token & 1 == 0 {
            _ = FD.drain(d.configKick)
            // Before ADDDEV returned (SYNC_CONFIG devices only) there is no device index for anything else. Status
            // first: a driver reset (re-probe) signalled together with the probe's first config write must reset
            // the device before that write is applied, not after (it would forget virtio-input's select).
            if d.added { driverChanged(d) }
            if d.syncConfig { answerConfigWrite(d) }
        } else { _ = FD.drain(d.configChanged); deviceConfigChanged(d) }
    }

    /// SYNC_CONFIG: the driver is waiting in a config write. Apply it to the device, read the device's config back
    /// and store it in the module's copy with the ack; the driver's next read sees the device's answer. The
    /// module keeps one pending write (the driver's writes are serialised), so one CFG_GET per signal suffices; an
    /// ack that comes too late (the module's timeout, a newer write) fails with ESTALE and is dropped.
    private func answerConfigWrite(_ d: Linked) {
        var buf = [UInt8](repeating: 0, count: max(d.configSize, 1))
        var w = virtio_lo_cfgwrite()
        w.fd = d.configKick
        w.len = UInt32(truncatingIfNeeded: d.configSize)   // <= VIRTIO_LO_MAX_CONFIG_SIZE, checked at ADDDEV
        var r = buf.withUnsafeMutableBufferPointer { b -> Int32 in
            w.data = UInt64(UInt(bitPattern: b.baseAddress))
            return lb_ioctl_ptr(fd, lb_vlo_cfg_get(), &w)
        }
        guard r == 0 else {
            // ENODEV: the device is gone (ADDDEV failed, DELDEV): nothing is waiting.
            let e = Errno.current
            if e.rawValue != ENODEV { Log.warning("\(d.name): CFG_GET: \(e)") }
            return
        }
        guard w.seq != 0 else { return }
        let seq = w.seq
        if let range = VirtioLoLink.checkConfigWrite(offset: w.offset, length: w.len, capacity: buf.count, configSize: d.configSize) {
            _ = buf.withUnsafeBytes { b in host.writeConfig(d.hostIndex, offset: range.lowerBound, from: UnsafeRawBufferPointer(rebasing: b[0..<range.count])) }
        } else if !d.badWriteLogged {
            d.badWriteLogged = true
            Log.warning("\(d.name): CFG_GET: config write offset \(w.offset) length \(w.len) outside \(d.configSize) bytes; acked without applying (logged once)")
        }
        var now = [UInt8](repeating: 0, count: d.configSize)
        _ = now.withUnsafeMutableBytes { host.readConfig(d.hostIndex, offset: 0, into: $0) }
        var ack = virtio_lo_cfgwrite()
        ack.fd = d.configKick
        ack.seq = seq
        ack.offset = 0
        ack.len = UInt32(truncatingIfNeeded: now.count)
        r = now.withUnsafeMutableBufferPointer { b -> Int32 in
            ack.data = UInt64(UInt(bitPattern: b.baseAddress))
            return lb_ioctl_ptr(fd, lb_vlo_cfg_ack(), &ack)
        }
        if r == 0 { d.config = now }
        else if Errno.current.rawValue != ESTALE && Errno.current.rawValue != ENODEV { Log.warning("\(d.name): CFG_ACK: \(Errno.current)") }
    }

    /// The driver wrote config or (extension) changed status: forward config writes; follow resets.
    private func driverChanged(_ d: Linked) {
        if hasDeviceStatus {
            var st = virtio_lo_devstatus()
            st.idx = d.kernelIndex
            if lb_ioctl_ptr(fd, lb_vlo_devstatus(), &st) == 0 {
                let driverOK = st.status & UInt32(DeviceStatus.driverOK) != 0
                let act = VirtioLoLink.statusChange(driverOK: driverOK, resetCount: st.reset_count, seen: d.resetCount,
                                                    active: host.isActive(d.hostIndex), reprobing: d.reprobing)
                if act.handled {
                    // The driver reset the device (or is probing again): stop it, then follow the new rings.
                    d.resetCount = st.reset_count
                    d.reprobing = act.reprobing
                    if act.stop { Log.info("\(d.name): driver reset"); host.reset(d.hostIndex) }
                    if act.start { reactivate(d, features: VirtioFeatures(rawValue: st.features)) }
                    return
                }
            }
        }
        guard !d.config.isEmpty else { return }
        var now = [UInt8](repeating: 0, count: d.config.count)
        var c = virtio_lo_config()
        c.idx = d.kernelIndex
        c.offset = 0
        c.len = UInt32(truncatingIfNeeded: now.count)   // = the config size, checked at ADDDEV
        let r = now.withUnsafeMutableBufferPointer { b -> Int32 in c.config = b.baseAddress; return lb_ioctl_ptr(fd, lb_vlo_gconf(), &c) }
        guard r == 0, now != d.config else { return }
        let first = (0..<now.count).first { now[$0] != d.config[$0] } ?? 0
        let last = (0..<now.count).last { now[$0] != d.config[$0] } ?? first
        d.config = now
        _ = now[first...last].withUnsafeBytes { host.writeConfig(d.hostIndex, offset: first, from: $0) }
    }

    /// What a status change read with DEVSTATUS asks of a linked device: `stop` it (the driver reset it), `start`
    /// it on the driver's new rings (DRIVER_OK after a reset), and whether it is now waiting for the new probe's
    /// DRIVER_OK. A driver reload (rmmod/modprobe of the virtio driver) resets the device and probes it again;
    /// the loop may see the reset (reset count changed, or DRIVER_OK gone) and the new DRIVER_OK in two separate
    /// wake-ups with the same reset count, so the stop is remembered until DRIVER_OK comes back. `handled` false:
    /// nothing changed, config writes are for the caller. Pure (unit-tested).
    public static func statusChange(driverOK: Bool, resetCount: UInt32, seen: UInt32, active: Bool, reprobing: Bool)
        -> (handled: Bool, stop: Bool, start: Bool, reprobing: Bool) {
        if resetCount != seen || !driverOK {
            let waiting = (reprobing || active) && !driverOK
            return (true, active, driverOK, waiting)
        }
        if reprobing { return (true, false, true, false) }
        return (false, false, false, false)
    }

    private func reactivate(_ d: Linked, features: VirtioFeatures) {
        var table: [KernelQueueInfo] = []
        for q in 0..<d.kicks.count {
            var gq = virtio_lo_queue()
            gq.idx = d.kernelIndex
            gq.qidx = UInt32(q)   // < 64
            guard lb_ioctl_ptr(fd, lb_vlo_get_queue(), &gq) == 0 else { Log.error("\(d.name): GET_QUEUE: \(Errno.current)"); return }
            let active = gq.flags & UInt32(VIRTIO_LO_QUEUE_F_ACTIVE) != 0
            table.append(KernelQueueInfo(size: active ? gq.size : 0, desc: gq.desc, avail: gq.avail, used: gq.used))
        }
        let queues: [QueueConfig]
        do { queues = try VirtioLoLink.decodeQueues(table, offered: d.offered) }
        catch { Log.error("\(d.name): GET_QUEUE after driver reset: \(error); device left stopped"); return }
        do { try activate(d, features: features, queues: queues); Log.info("\(d.name): re-activated after driver reset") }
        catch { Log.error("\(error)") }
    }

    /// The device changed its config (e.g. capacity): push it to the kernel copy, which interrupts the driver.
    private func deviceConfigChanged(_ d: Linked) {
        guard !d.config.isEmpty else { return }
        var now = [UInt8](repeating: 0, count: d.config.count)
        _ = now.withUnsafeMutableBytes { host.readConfig(d.hostIndex, offset: 0, into: $0) }
        var c = virtio_lo_config()
        c.idx = d.kernelIndex
        c.len = UInt32(truncatingIfNeeded: now.count)   // = the config size, checked at ADDDEV
        let r = now.withUnsafeMutableBufferPointer { b -> Int32 in c.config = b.baseAddress; return lb_ioctl_ptr(fd, lb_vlo_sconf(), &c) }
        if r != 0 { Log.warning("\(d.name): SCONF: \(Errno.current)") } else { d.config = now }
    }

    public func deviceNeedsReset(_ index: Int) {
        guard hasDeviceStatus, let d = devices.first(where: { $0.hostIndex == index && $0.added }) else { return }
        var st = virtio_lo_devstatus()
        st.idx = d.kernelIndex
        st.flags = UInt32(VIRTIO_LO_STATUS_F_NEEDS_RESET)
        if lb_ioctl_ptr(fd, lb_vlo_devstatus(), &st) != 0 { Log.warning("\(d.name): DEVSTATUS NEEDS_RESET: \(Errno.current)") }
    }

    // MARK: teardown

    /// Stops every device (in-flight requests complete, files flush) and removes it from the kernel: with DELDEV
    /// on this project's module; on upstream virtio-lo (whose DELDEV sleeps under a spinlock) by unmapping RAM
    /// and closing the fd, exactly what the kernel does when loopbackd is killed.
    /// Call from a thread other than the loop's.
    public func removeAll() {
        let host = self.host
        host.loop.executeAndWait {
            for d in self.devices where !d.failed && d.added {   // a removed device's host index may belong to another now
                for (f, r) in d.registrations { host.loop.unregister(fd: f, registration: r) }
                d.registrations = []
                host.device(d.hostIndex).flush()
                host.reset(d.hostIndex)
            }
        }
        guard flavor.deleteWithDELDEV else {
            // Upstream: unmap first (the kernel frees the rings when the devices go and holds no page
            // references), then close: release() removes every device of this opener, outside any spinlock.
            for d in devices { d.added = false; closeAll(d) }
            devices = []
            if memory != nil && !isKnownUniquelyReferenced(&memory!) {
                Log.warning("\(path): RAM mapping still referenced at shutdown; the devices go when it is released")
            }
            memory = nil
            if fd >= 0 { FD.close(fd); fd = -1 }
            Log.info("\(path): closed (upstream virtio-lo: devices removed by close, no DELDEV)")
            return
        }
        for d in devices where d.added {
            if lb_ioctl_val(fd, lb_vlo_deldev(), UInt(d.kernelIndex)) != 0 { Log.warning("\(d.name): DELDEV: \(Errno.current)") }
            d.added = false
            closeAll(d)
            d.pool = nil   // after DELDEV (the module keeps the pool while it is mapped)
        }
        devices = []
        // Unmap only after the devices are gone: the kernel frees the rings at DELDEV.
        memory = nil
    }

    /// Removes one device (live remove): stops it on the loop (in-flight requests complete, files flush), then
    /// DELDEV of that device only, which its driver sees as a hot-unplug; the other devices keep running. Refused on
    /// upstream virtio-lo, whose DELDEV is unsafe (there only closing the node removes devices, all of them).
    /// Call from a thread other than the loop's. The entry stays in `devices` (event tokens are positions).
    public func remove(_ hostIndex: Int) throws(DeviceError) {
        let host = self.host
        let found = host.loop.executeAndWait { self.devices.first { $0.hostIndex == hostIndex && $0.added } }
        guard let d = found else { throw DeviceError("device \(hostIndex) is not on \(path)") }
        guard flavor.deleteWithDELDEV else {
            throw DeviceError("\(d.name): upstream virtio-lo cannot remove one device (its DELDEV is unsafe); restart loopbackd instead")
        }
        let durable = host.loop.executeAndWait { () -> (@Sendable () -> Void)? in
            for (f, r) in d.registrations { host.loop.unregister(fd: f, registration: r) }
            d.registrations = []
            d.added = false
            let durable = host.device(d.hostIndex).flushForRemoval()
            host.reset(d.hostIndex)
            return durable
        }
        durable?()   // fdatasync here, not on the loop (other devices keep running)
        if lb_ioctl_val(fd, lb_vlo_deldev(), UInt(d.kernelIndex)) != 0 { Log.warning("\(d.name): DELDEV: \(Errno.current)") }
        closeAll(d)
        host.loop.executeAndWait { d.pool = nil }
        Log.info("\(d.name): removed (DELDEV of virtio-lo device \(d.kernelIndex))")
    }

    /// True once `add(index)` returned and the device was not removed.
    public func isAdded(_ hostIndex: Int) -> Bool { devices.contains { $0.hostIndex == hostIndex && $0.added } }

    private func closeAll(_ d: Linked) {
        for k in d.kicks { FD.close(k) }
        d.kicks = []
        for k in d.irqFDs { FD.close(k) }
        d.irqFDs = []
        if d.configKick >= 0 { FD.close(d.configKick); d.configKick = -1 }
        if d.configChanged >= 0 { FD.close(d.configChanged); d.configChanged = -1 }
    }
}
