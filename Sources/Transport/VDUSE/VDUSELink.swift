import Glibc
import CLinux

/// One device served to the kernel through VDUSE (Linux's vDPA Device in Userspace; include/uapi/linux/vduse.h,
/// Documentation/userspace-api/vduse.rst): no out-of-tree module. The kernel's own virtio driver (virtio_blk)
/// binds through virtio_vdpa, and the device process sees only the device's IOVA domain: the rings (coherent
/// allocations) and the bounce buffers the kernel copies request data through, never the rest of RAM.
///
/// Life of a device: VDUSE_CREATE_DEV on /dev/vduse/control (id, features + ACCESS_PLATFORM, queue count,
/// config), VDUSE_VQ_SETUP per queue, open /dev/vduse/NAME, then `vdpa dev add` (generic netlink, `lb_vdpa_dev`)
/// puts it on the vDPA bus and the driver probes. The driver's status changes arrive as requests read from the
/// device fd (SET_STATUS; answered on the loop): FEATURES_OK takes the driver's features (VDUSE_DEV_GET_FEATURES),
/// DRIVER_OK reads each ring's addresses (VDUSE_VQ_GET_INFO), maps the IOTLB regions that hold them and the bounce
/// region (VDUSE_IOTLB_GET_FD + mmap) as the device's `GuestMemory`, gives the kernel a kick eventfd per queue
/// (VDUSE_VQ_SETUP_KICKFD) and activates the device; interrupts are VDUSE_VQ_INJECT_IRQ. Status 0 is a reset.
/// Removal: `vdpa dev del` (the driver's last I/O is still served), then close and VDUSE_DESTROY_DEV.
///
/// If loopbackd dies, the kernel keeps the device (its driver's I/O waits); a new loopbackd finds
/// /dev/vduse/NAME, opens it again (VDUSE allows one opener at a time) and resumes the rings where the used index
/// says (`reconnect`). Every value read from the device fd or an ioctl is checked (`VDUSEChecks`).
public final class VDUSEDevice: EventHandler {
    public let host: DeviceHost
    public let hostIndex: Int
    /// The VDUSE and vDPA device name.
    public let name: String
    private let control: Int32
    private(set) var fd: Int32 = -1
    private var queueCount = 0
    private var offered: [UInt16] = []
    private var kicks: [Int32] = []
    private var configChanged: Int32 = -1
    private var registrations: [(fd: Int32, reg: Int)] = []
    private var memory: GuestMemory?
    private var bounceSize: UInt64 = 64 << 20
    private var config: [UInt8] = []
    private var brokenLogged = false
    private var badRequests = 0
    /// The in-flight record (`SplitQueue.attachInflightLog`): a file in /run, mapped shared, one slot per queue, so
    /// that a loopbackd started after this one was killed resumes exactly. nil if it could not be made.
    private var inflightMap: (base: UnsafeMutableRawPointer, length: Int)?
    private var inflightSlots: [Int] = []
    public var inflightPath: String { "/run/\(name).vduse-inflight" }
    /// The device is on the vDPA bus (`vdpa dev add` succeeded or it was there already).
    public private(set) var onBus = false

    /// Device types VDUSE admits (drivers/vdpa/vdpa_user/vduse_dev.c `allowed_device_id`: virtio-blk and
    /// virtio-net, whose drivers were hardened against a malicious device).
    public static let allowedDeviceIDs: [UInt32: String] = [1: "net", 2: "blk"]
    static let vendorID: UInt32 = 0x1AF4

    /// Creates (or, after a crash of a previous loopbackd, reopens) the VDUSE device for host device `index`.
    /// Does not put it on the bus: `addToBus()`. Call from a thread other than the loop's.
    public init(host: DeviceHost, index: Int, name: String, control: Int32) throws(DeviceError) {
        self.host = host
        self.hostIndex = index
        self.name = name
        self.control = control
        let info = host.loop.executeAndWait { host.info(index) }
        guard VDUSEDevice.allowedDeviceIDs[info.deviceID] != nil else {
            throw DeviceError("\(name): VDUSE admits only blk and net devices (device id 2, 1), not device id \(info.deviceID); serve it with transport = \"virtio-lo\"")
        }
        let n = info.queueMaxSizes.count
        guard n > 0, n <= 0xffff, info.configSize >= 0, info.configSize <= 4096 else {
            throw DeviceError("\(name): \(n) queues, config size \(info.configSize): outside what VDUSE takes")
        }
        offered = info.queueMaxSizes
        var cfg = [UInt8](repeating: 0, count: info.configSize)
        _ = host.loop.executeAndWait { cfg.withUnsafeMutableBytes { host.readConfig(index, offset: 0, into: $0) } }
        config = cfg
        // ACCESS_PLATFORM is required by VDUSE (features_is_valid): buffer addresses are IOVAs of the device's domain.
        let features = info.features.rawValue | VirtioFeatures.accessPlatform.rawValue
        let created = cfg.withUnsafeBytes {
            lb_vduse_create_dev(control, name, VDUSEDevice.vendorID, info.deviceID, features, UInt32(n), 4096,
                                $0.baseAddress, UInt32(info.configSize))
        }
        var reopened = false
        if created != 0 {
            let e = Errno.current
            guard e.rawValue == EEXIST else {
                throw DeviceError("\(name): VDUSE_CREATE_DEV: \(e)" + (e.rawValue == EINVAL ? " (features 0x\(String(features, radix: 16)) or config refused)" : ""))
            }
            reopened = true
            Log.info("\(name): a VDUSE device of that name exists (left by a loopbackd that died?): reconnecting to it")
        }
        do throws(DeviceError) {
            let path = "/dev/vduse/\(name)"
            var f: Int32 = -1
            // devtmpfs creates the node as the device is created; allow it a moment.
            for _ in 0..<50 {
                f = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC)
                if f >= 0 || Errno.current.rawValue != ENOENT { break }
                usleep(20_000)
            }
            guard f >= 0 else {
                let e = Errno.current
                throw DeviceError("\(name): cannot open \(path): \(e)" + (e.rawValue == EBUSY ? " (another process serves this VDUSE device)" : ""))
            }
            fd = f
            if !reopened {
                for q in 0..<n {
                    var c = vduse_vq_config()
                    c.index = UInt32(q)
                    c.max_size = info.queueMaxSizes[q]
                    guard lb_ioctl_ptr(f, lb_vduse_vq_setup(), &c) == 0 else { throw DeviceError("\(name): VDUSE_VQ_SETUP \(q): \(Errno.current)") }
                }
            } else {
                // The existing device must have our shape: queue n-1 exists, queue n does not.
                var vi = vduse_vq_info()
                vi.index = UInt32(n - 1)
                var ok = lb_ioctl_ptr(f, lb_vduse_vq_get_info(), &vi) == 0
                vi = vduse_vq_info()
                vi.index = UInt32(n)
                ok = ok && lb_ioctl_ptr(f, lb_vduse_vq_get_info(), &vi) != 0
                guard ok else { throw DeviceError("\(name): the existing VDUSE device does not have \(n) queue(s); remove it (VDUSE_DESTROY_DEV) or rename this device") }
            }
            if let t = try? FD.readText("/sys/class/vduse/\(name)/bounce_size", limit: 64),
               let v = UInt64(t.filter { $0.isNumber }), v >= 4096, v <= 1 << 30 { bounceSize = v }
            do {
                for _ in 0..<n { kicks.append(try FD.eventfd().release()) }
                configChanged = try FD.eventfd().release()
            } catch { throw DeviceError("\(name): eventfd: \(error)") }
            mapInflight(fresh: !reopened)
        } catch {
            closeAll(destroy: !reopened)
            throw error
        }
        queueCount = n
        let err = host.loop.executeAndWait { () -> DeviceError? in
            do {
                self.registrations.append((self.fd, try host.loop.register(fd: self.fd, handler: self, token: 0)))
                self.registrations.append((self.configChanged, try host.loop.register(fd: self.configChanged, handler: self, token: 1)))
            } catch { return DeviceError("\(self.name): cannot watch the VDUSE fd: \(error)") }
            if reopened { self.resume() }
            return nil
        }
        if let err { removeFromLoop(); closeAll(destroy: !reopened); throw err }
    }

    /// `vdpa dev add name NAME mgmtdev vduse`: the driver probes inside this call (the loop answers its status
    /// requests). Call from a thread other than the loop's.
    public func addToBus() throws(DeviceError) {
        let r = lb_vdpa_dev(name, "vduse", 1)
        if r == -EEXIST { onBus = true; return }   // reconnected: still on the bus
        guard r == 0 else {
            let e = Errno(-r)
            throw DeviceError("\(name): vdpa dev add: \(e)" + (r == -ENOENT ? " (no vdpa generic netlink family or no vduse management device: modprobe vdpa vduse)" :
                                                               r == -EPERM ? " (needs CAP_NET_ADMIN)" : ""))
        }
        onBus = true
        let active = host.loop.executeAndWait { self.host.isActive(self.hostIndex) }
        if !active {
            Log.warning("\(name): on the vDPA bus but no driver set DRIVER_OK (is virtio_vdpa loaded, and the device's driver?); it is served when one binds")
        }
    }

    /// Removes the device: `vdpa dev del` while the device still runs (the driver's remove may write back and
    /// flush), then stop, close and VDUSE_DESTROY_DEV. Call from a thread other than the loop's.
    public func remove() {
        if onBus {
            let r = lb_vdpa_dev(name, nil, 0)
            if r != 0 && r != -ENODEV { Log.warning("\(name): vdpa dev del: \(Errno(-r))") }
            onBus = false
        }
        let durable = host.loop.executeAndWait { () -> (@Sendable () -> Void)? in
            var durable: (@Sendable () -> Void)?
            if self.host.isActive(self.hostIndex) {
                durable = self.host.device(self.hostIndex).flushForRemoval()
                self.host.reset(self.hostIndex)
            }
            self.memory = nil
            return durable
        }
        durable?()   // fdatasync on this thread, not on the loop
        removeFromLoop()
        closeAll(destroy: true)
    }

    private func removeFromLoop() {
        host.loop.executeAndWait {
            for (f, r) in self.registrations { self.host.loop.unregister(fd: f, registration: r) }
            self.registrations = []
        }
    }

    /// Maps (creating it for a new device) the in-flight record; without it a reconnect resumes at the used index.
    private func mapInflight(fresh: Bool) {
        var off = 0
        inflightSlots = offered.map { q in defer { off += (SplitQueue.inflightLogBytes(size: q) + 7) & ~7 }; return off }
        let length = max(off, 8)
        let f = open(inflightPath, O_RDWR | O_CLOEXEC | O_NOFOLLOW | (fresh ? O_CREAT | O_TRUNC : 0), 0o600)
        guard f >= 0 else {
            Log.warning("\(name): no in-flight record (\(inflightPath): \(Errno.current)): a reconnect resumes at the used index")
            return
        }
        defer { FD.close(f) }
        var st = stat()
        guard fstat(f, &st) == 0, st.st_mode & S_IFMT == S_IFREG, fresh || Int(st.st_size) == length,
              !fresh || ftruncate(f, off_t(length)) == 0 else {
            Log.warning("\(name): \(inflightPath) does not fit this device: a reconnect resumes at the used index")
            return
        }
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0)
        guard let p, p != MAP_FAILED else { Log.warning("\(name): mmap of \(inflightPath): \(Errno.current)"); return }
        inflightMap = (p, length)
    }

    private func closeAll(destroy: Bool) {
        for k in kicks { FD.close(k) }
        kicks = []
        if configChanged >= 0 { FD.close(configChanged); configChanged = -1 }
        if fd >= 0 { FD.close(fd); fd = -1 }
        if let m = inflightMap { munmap(m.base, m.length); inflightMap = nil }
        guard destroy else { return }
        unlink(inflightPath)
        // The vDPA device is released asynchronously after `dev del`: VDUSE_DESTROY_DEV says EBUSY until then.
        var nameBuf = [CChar](repeating: 0, count: Int(VDUSE_NAME_MAX))
        for (i, c) in name.utf8CString.enumerated() where i < nameBuf.count - 1 { nameBuf[i] = c }
        for attempt in 0..<50 {
            if nameBuf.withUnsafeMutableBufferPointer({ lb_ioctl_ptr(control, lb_vduse_destroy_dev(), $0.baseAddress) }) == 0 { return }
            let e = Errno.current
            guard e.rawValue == EBUSY, attempt < 49 else { Log.warning("\(name): VDUSE_DESTROY_DEV: \(e)"); return }
            usleep(20_000)
        }
    }

    // MARK: requests (loop thread)

    public func handleEvent(token: UInt32, events: UInt32) {
        if token == 1 { _ = FD.drain(configChanged); pushConfig(); return }
        if events & UInt32(LB_EPOLLERR) != 0 && !brokenLogged {
            // vduse_dev_poll: the kernel marked the device broken (a request timed out): nothing more will come.
            brokenLogged = true
            Log.error("\(name): the kernel marked the VDUSE device broken (a request was not answered in time)")
        }
        var req = vduse_dev_request()
        let size = MemoryLayout<vduse_dev_request>.size
        for _ in 0..<64 {
            let r = withUnsafeMutableBytes(of: &req) { read(fd, $0.baseAddress, size) }
            guard r == size else {
                if r < 0 && errno != EAGAIN && errno != EINTR && !brokenLogged {
                    brokenLogged = true
                    Log.error("\(name): read of the VDUSE fd: \(Errno.current)")
                }
                return
            }
            var resp = vduse_dev_response()
            resp.request_id = req.request_id
            resp.result = UInt32(VDUSE_REQ_RESULT_OK)
            switch req.type {
            case UInt32(VDUSE_GET_VQ_STATE.rawValue):
                let q = req.vq_state.index
                if q < UInt32(queueCount) {
                    resp.vq_state.index = q
                    resp.vq_state.split.avail_index = host.lastAvail(hostIndex, Int(q)) ?? 0
                } else { resp.result = UInt32(VDUSE_REQ_RESULT_FAILED); noteBad("GET_VQ_STATE of queue \(q)") }
            case UInt32(VDUSE_SET_STATUS.rawValue):
                if !setStatus(req.s.status) { resp.result = UInt32(VDUSE_REQ_RESULT_FAILED) }
            case UInt32(VDUSE_UPDATE_IOTLB.rawValue):
                iotlbChanged(start: req.iova.start, last: req.iova.last)
            default:
                resp.result = UInt32(VDUSE_REQ_RESULT_FAILED)
                noteBad("request type \(req.type)")
            }
            let w = withUnsafeBytes(of: &resp) { write(fd, $0.baseAddress, MemoryLayout<vduse_dev_response>.size) }
            if w < 0 && errno != ENOENT { Log.warning("\(name): answer to request \(req.request_id): \(Errno.current)") }
        }
        // More requests than one turn takes: the fd stays readable (level-triggered) and the loop comes back.
    }

    private func noteBad(_ what: String) {
        badRequests += 1
        if badRequests <= 3 { Log.warning("\(name): VDUSE \(what): refused") }
    }

    /// SET_STATUS (virtio 1.2 §3.1.1 order). Returns false to refuse the status (the kernel then leaves it unset).
    private func setStatus(_ s: UInt8) -> Bool {
        if s == 0 {
            if host.isActive(hostIndex) { Log.info("\(name): driver reset") }
            host.reset(hostIndex)
            memory = nil
            return true
        }
        if s & DeviceStatus.driverOK != 0 {
            if host.isActive(hostIndex) { return true }
            do throws(DeviceError) { try start(resuming: false); return true } catch {
                Log.error("\(error)")
                return false
            }
        }
        if s & DeviceStatus.featuresOK != 0 && host.status(hostIndex) & DeviceStatus.featuresOK == 0 {
            return negotiate()
        }
        return true
    }

    private func negotiate() -> Bool {
        var f: UInt64 = 0
        guard lb_ioctl_ptr(fd, lb_vduse_dev_get_features(), &f) == 0 else { Log.error("\(name): VDUSE_DEV_GET_FEATURES: \(Errno.current)"); return false }
        // ACCESS_PLATFORM is this transport's business (addresses are IOVAs, translated by the IOTLB map); the
        // device body never offered it.
        let ok = host.setFeatures(hostIndex, VirtioFeatures(rawValue: f & ~VirtioFeatures.accessPlatform.rawValue))
        if !ok { Log.error("\(name): driver features 0x\(String(f, radix: 16)) refused") }
        return ok
    }

    /// A previous loopbackd died with the device running: take it over where the used rings are.
    private func resume() {
        var vi = vduse_vq_info()
        vi.index = 0
        guard lb_ioctl_ptr(fd, lb_vduse_vq_get_info(), &vi) == 0, vi.ready != 0, vi.num != 0 else {
            Log.info("\(name): reconnected; the driver has not started the device yet")
            return
        }
        guard negotiate() else { return }
        do throws(DeviceError) { try start(resuming: true); Log.info("\(name): reconnected to the running device") } catch {
            Log.error("\(error)")
        }
    }

    /// DRIVER_OK: rings from VDUSE_VQ_GET_INFO, their IOTLB regions and the bounce region mapped, kick eventfds
    /// given to the kernel, the device activated.
    private func start(resuming: Bool) throws(DeviceError) {
        var queues: [QueueConfig] = []
        for q in 0..<queueCount {
            var vi = vduse_vq_info()
            vi.index = UInt32(q)
            guard lb_ioctl_ptr(fd, lb_vduse_vq_get_info(), &vi) == 0 else { throw DeviceError("\(name): VDUSE_VQ_GET_INFO \(q): \(Errno.current)") }
            // virtio_blk may set up fewer queues than offered (one per CPU): the ready ones are a prefix.
            guard vi.ready != 0 else { break }
            guard let c = VDUSEChecks.queue(num: vi.num, desc: vi.desc_addr, driver: vi.driver_addr, device: vi.device_addr, offered: offered[q]) else {
                throw DeviceError("\(name): queue \(q): size \(vi.num) (offered \(offered[q])) or ring addresses refused")
            }
            queues.append(c)
        }
        guard !queues.isEmpty else { throw DeviceError("\(name): DRIVER_OK with no ready queue") }
        let mem = try mapIOTLB(queues)
        var lastAvail: [UInt16]? = nil
        if resuming {
            // The used index is what the driver has been given back; resume taking requests there. Exact when no
            // request was in flight at the crash or they completed in order (README: VDUSE transport).
            lastAvail = queues.map { c in
                guard let p = mem.view.translate(c.used + 2, 2) else { return 0 }
                return p.loadUnaligned(as: UInt16.self)
            }
        }
        var hostKicks: [Int32] = []
        for q in 0..<queues.count {
            var e = vduse_vq_eventfd()
            e.index = UInt32(q)
            e.fd = kicks[q]
            guard lb_ioctl_ptr(fd, lb_vduse_vq_setup_kickfd(), &e) == 0 else {
                for k in hostKicks { FD.close(k) }
                throw DeviceError("\(name): VDUSE_VQ_SETUP_KICKFD \(q): \(Errno.current)")
            }
            guard let k = try? FD.dup(kicks[q]).release() else { for k in hostKicks { FD.close(k) }; throw DeviceError("\(name): dup failed") }
            hostKicks.append(k)
        }
        let irqs = (0..<queues.count).map { Notifier.vduseIRQ(fd: fd, queue: Int32($0)) }
        memory = mem
        let logs = inflightMap.map { m in (0..<queues.count).map { m.base + inflightSlots[$0] } }
        try host.activate(hostIndex, queues: queues, kickFDs: hostKicks, interrupts: irqs,
                          configInterrupt: .eventfd(configChanged), memory: mem,
                          lastAvail: lastAvail, usedFromRing: resuming, inflightLogs: logs)
        if resuming, logs != nil {
            let replayed = (0..<queues.count).reduce(0) { $0 + host.replayCount(hostIndex, $1) }
            Log.info("\(name): resumed from the in-flight record: \(replayed) request(s) taken again")
        }
        Log.info("\(name): DRIVER_OK, \(queues.count) queue(s), features 0x\(String(host.features(hostIndex).rawValue, radix: 16)), \(mem.count) IOVA region(s) mapped")
    }

    /// The device's memory: each IOTLB region that holds a ring (VDUSE_IOTLB_GET_FD), and the bounce region
    /// [0, bounce_size) through which the kernel copies every buffer (the same domain file at offset 0; its
    /// IOTLB entry appears only with the first streaming mapping, so it may not exist yet at DRIVER_OK).
    private func mapIOTLB(_ queues: [QueueConfig]) throws(DeviceError) -> GuestMemory {
        let page = UInt64(max(sysconf(Int32(_SC_PAGESIZE)), 4096))
        var regions: [RegionInfo] = []
        var maps: [(UnsafeMutableRawPointer, Int)] = []
        var domainFD: Int32 = -1
        func fail(_ m: String) -> DeviceError {
            for (p, l) in maps { munmap(p, l) }
            if domainFD >= 0 { FD.close(domainFD) }
            return DeviceError("\(name): \(m)")
        }
        func covered(_ a: UInt64) -> Bool { regions.contains { a >= $0.guestBase && a - $0.guestBase < $0.size } }
        func add(start: UInt64, size: UInt64, fileFD: Int32, offset: UInt64) throws(DeviceError) {
            let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, fileFD, off_t(offset))
            guard let p, p != MAP_FAILED else { throw fail("mmap of IOVA 0x\(String(start, radix: 16)) (+\(size)): \(Errno.current)") }
            maps.append((p, Int(size)))
            regions.append(RegionInfo(guestBase: start, size: size, host: p, fd: -1, fdOffset: offset, userAddr: UInt64(UInt(bitPattern: p))))
        }
        for c in queues {
            for a in [c.desc, c.avail, c.used] where !covered(a) {
                var e = vduse_iotlb_entry()
                e.start = a
                e.last = a
                let f = lb_ioctl_ptr(fd, lb_vduse_iotlb_get_fd(), &e)
                guard f >= 0 else { throw fail("VDUSE_IOTLB_GET_FD 0x\(String(a, radix: 16)): \(Errno.current)") }
                guard let r = VDUSEChecks.entry(for: a, start: e.start, last: e.last, offset: e.offset, perm: e.perm, pageSize: page) else {
                    FD.close(f)
                    throw fail("IOTLB entry [0x\(String(e.start, radix: 16)), 0x\(String(e.last, radix: 16))] offset 0x\(String(e.offset, radix: 16)) perm \(e.perm) for 0x\(String(a, radix: 16)) refused")
                }
                if r.start < bounceSize {   // a ring inside the bounce range: not how VDUSE allocates rings
                    FD.close(f)
                    throw fail("ring at IOVA 0x\(String(a, radix: 16)) inside the bounce region")
                }
                do throws(DeviceError) { try add(start: r.start, size: r.size, fileFD: f, offset: e.offset) } catch { FD.close(f); throw error }
                if domainFD < 0 { domainFD = f } else { FD.close(f) }
            }
        }
        // The bounce region: its own IOTLB entry if it exists (checked like the others), else the domain file.
        var e = vduse_iotlb_entry()
        e.start = 0
        e.last = 0
        let f = lb_ioctl_ptr(fd, lb_vduse_iotlb_get_fd(), &e)
        if f >= 0 {
            guard let r = VDUSEChecks.entry(for: 0, start: e.start, last: e.last, offset: e.offset, perm: e.perm, pageSize: page), r.start == 0, r.size <= 1 << 30 else {
                FD.close(f)
                throw fail("bounce IOTLB entry [0x\(String(e.start, radix: 16)), 0x\(String(e.last, radix: 16))] perm \(e.perm) refused")
            }
            do throws(DeviceError) { try add(start: 0, size: r.size, fileFD: f, offset: e.offset) } catch { FD.close(f); throw error }
            FD.close(f)
        } else if domainFD >= 0 {
            try add(start: 0, size: bounceSize, fileFD: domainFD, offset: 0)
        }
        if domainFD >= 0 { FD.close(domainFD); domainFD = -1 }
        do { return try GuestMemory(regions: regions, mappings: maps, fds: []) } catch {
            throw DeviceError("\(name): IOTLB regions overlap")   // GuestMemory unmapped them
        }
    }

    /// UPDATE_IOTLB (sent when a vhost-vdpa user replaces the map; virtio_vdpa never does): a running device whose
    /// mapped regions the range touches is stopped, not left on stale mappings.
    private func iotlbChanged(start: UInt64, last: UInt64) {
        guard start <= last else { noteBad("UPDATE_IOTLB [\(start), \(last)]"); return }
        guard let m = memory, m.regions.contains(where: { $0.guestBase <= last && start - min(start, $0.guestBase) < $0.size }) else { return }
        Log.warning("\(name): IOTLB changed under the running device ([0x\(String(start, radix: 16)), 0x\(String(last, radix: 16))]): device stopped until the next DRIVER_OK")
        host.reset(hostIndex)
        memory = nil
    }

    /// The device changed its config (capacity): the kernel's copy, then the config interrupt.
    private func pushConfig() {
        guard !config.isEmpty, fd >= 0 else { return }
        var now = [UInt8](repeating: 0, count: config.count)
        _ = now.withUnsafeMutableBytes { host.readConfig(hostIndex, offset: 0, into: $0) }
        guard now != config else { return }
        let r = now.withUnsafeBytes { lb_vduse_set_config(fd, 0, $0.baseAddress, UInt32($0.count)) }
        guard r == 0 else { Log.warning("\(name): VDUSE_DEV_SET_CONFIG: \(Errno.current)"); return }
        config = now
        if lb_ioctl_val(fd, lb_vduse_dev_inject_config_irq(), 0) != 0 && Errno.current.rawValue != EINVAL {
            Log.warning("\(name): VDUSE_DEV_INJECT_CONFIG_IRQ: \(Errno.current)")
        }
    }
}

/// Pure checks of what the kernel hands the VDUSE transport (unit-tested).
public enum VDUSEChecks {
    /// A ready queue from VDUSE_VQ_GET_INFO: a power-of-two size within what was offered (virtio 1.2 §2.7), ring
    /// addresses inside 64 bits (SplitQueue checks alignment, overlap and that they are mapped).
    public static func queue(num: UInt32, desc: UInt64, driver: UInt64, device: UInt64, offered: UInt16) -> QueueConfig? {
        guard num > 0, num <= UInt32(offered), num & (num - 1) == 0 else { return nil }
        return QueueConfig(size: UInt16(num), desc: desc, avail: driver, used: device)
    }

    /// An entry from VDUSE_IOTLB_GET_FD asked for address `a`: it must contain `a`, not wrap, be at most 2 GiB
    /// (VDUSE's IOVA space is 1 GiB of bounce + 128 MiB), start and be mmap-able on a page boundary, and be
    /// readable and writable (the device writes used rings and device-writable buffers). Returns (start, size).
    public static func entry(for a: UInt64, start: UInt64, last: UInt64, offset: UInt64, perm: UInt8, pageSize: UInt64)
        -> (start: UInt64, size: UInt64)? {
        guard start <= a, a <= last, last != UInt64.max else { return nil }
        let size = last - start + 1
        guard size <= 1 << 31, start % pageSize == 0, offset % pageSize == 0, offset <= UInt64(Int64.max) - size else { return nil }
        guard perm == UInt8(VDUSE_ACCESS_RW) else { return nil }
        return (start, size)
    }
}
