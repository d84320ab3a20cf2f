import Glibc
import CLinux
import CURing
import Transport

/// One request the kernel is working on. Plain data in a preallocated table; `iov` points at the slot's own fixed
/// iovec array, whose entries point straight into the driver's mapped buffers (zero copy).
struct BlockSlot {
    var iov: UnsafeMutablePointer<iovec>
    /// Live iovecs are `iov[first..<count]` (`first` advances when a short transfer is resubmitted).
    var first: Int32 = 0
    var count: Int32 = 0
    var op: BlockOp = .read
    var retries: UInt8 = 0
    var queue: UInt16 = 0
    var head: UInt16 = 0
    /// The request's status byte (last writable byte of the chain).
    var status: UnsafeMutableRawPointer? = nil
    /// Byte offset in the backing file.
    var offset: UInt64 = 0
    /// Data bytes to transfer and bytes transferred so far.
    var total: UInt32 = 0
    var done: UInt32 = 0
    var nextFree: Int32 = -1
}

enum BlockOp: UInt8 { case read, write, flush }

/// What handling one chain did.
enum BlockOutcome {
    /// Completed now; `addUsed` with this many written bytes.
    case done(UInt32)
    /// Submitted to io_uring; completed from the CQ later.
    case submitted
    /// No free request slot: give the chain back and stop popping until completions free one.
    case noSlot
}

/// virtio-blk (virtio 1.2 §5.2, device id 2) over a regular file or a block device.
///
/// Reads, writes and flushes go through one io_uring per device: READV/WRITEV with iovecs that point into the
/// driver's mapped buffers, FSYNC(DATASYNC) for FLUSH. Requests live in a preallocated slot table (no allocation per
/// request); the ring's eventfd is registered in the event loop and completions are drained there, each one setting
/// the status byte and adding a used element, with one publish per touched queue. DISCARD and WRITE_ZEROES run
/// synchronously (fallocate / BLKDISCARD / BLKZEROOUT, with a pwrite-zeroes fallback).
public final class BlockDevice: VirtioDevice, EventHandler {
    public let deviceID = VirtioID.block
    public let queueMaxSizes: [UInt16]
    public let offeredFeatures: VirtioFeatures
    public let configSize = VirtioBlk.configSize

    public let path: String
    public let readOnly: Bool
    /// Exposed size in 512-byte sectors (a trailing partial sector of the file is not exposed).
    public let capacity: UInt64
    /// Logical block size reported in `blk_size` (512 for files; the device's for block devices).
    public let blockSize: UInt32
    public let isBlockDevice: Bool
    public private(set) var segMax: UInt32
    public let maxDiscardSectors: UInt32 = 0x3F_FFFF         // just under 2 GiB per discard
    public let maxWriteZeroesSectors: UInt32 = 0x1_0000      // 32 MiB: may fall back to writing zeroes
    public let ioDepth: Int

    private let fd: Int32
    private let config: UnsafeMutableRawPointer
    private let serial: UnsafeMutableRawPointer              // 20 bytes, NUL-padded
    private let scratch: UnsafeMutableRawPointer             // request header / discard segment
    private let zeroes: UnsafeMutableRawPointer
    private static let zeroBytes = 64 << 10

    // io_uring
    private let ring: OpaquePointer
    /// The ring accepts only the operations blk uses (`ctl status` io-uring=restricted); false on Linux < 5.10.
    public let ioUringRestricted: Bool
    private let cqeData: UnsafeMutablePointer<UInt64>      // reap batch
    private let cqeRes: UnsafeMutablePointer<Int32>
    private static let reapBatch = 64
    private let eventFD: Int32
    private let slots: UnsafeMutablePointer<BlockSlot>
    private let iovecs: UnsafeMutablePointer<iovec>
    private let iovPerSlot: Int
    private var freeSlot: Int32
    /// Slots owned by the kernel (submitted or waiting in the SQ).
    public private(set) var inFlight = 0
    /// SQEs prepared but not yet passed to io_uring_submit.
    private var unsubmitted = 0

    // Active state (DRIVER_OK .. reset).
    private var queues: UnsafeMutablePointer<SplitQueue>?
    private var queueCount = 0
    private var loop: EventLoop?
    private var registration = -1
    private let touched: UnsafeMutablePointer<Bool>
    private let blocked: UnsafeMutablePointer<Bool>
    private var anyBlocked = false
    private var resumeFrom = 0
    /// FLUSH not negotiated: the driver assumes a write-through cache, so writes are RWF_DSYNC.
    private var writeThrough = false

    /// Malformed requests (driver bugs), counted and logged once.
    public private(set) var badRequests = 0
    /// Times a queue stopped popping because every request slot was busy.
    public private(set) var slotStalls = 0

    /// Opens `path` (a regular file or a block device). `queues` request queues of at most `queueSize` entries;
    /// `serial` is the GET_ID string (at most 20 bytes used); `ioDepth` is the number of request slots (requests in
    /// flight in the kernel at once, shared by all queues).
    public init(path: String, readOnly: Bool = false, queues: Int = 1, queueSize: UInt16 = 256,
                serial: String = "loopbackd", ioDepth: Int = 256) throws(DeviceError) {
        guard queues >= 1 && queues <= 256 else { throw DeviceError("block \(path): queues must be 1...256, not \(queues)") }
        guard queueSize >= 2 && queueSize <= SplitQueue.maxSize else {
            throw DeviceError("block \(path): queue size must be 2...\(SplitQueue.maxSize), not \(queueSize)")
        }
        guard ioDepth >= 1 && ioDepth <= 4096 else { throw DeviceError("block \(path): io depth must be 1...4096, not \(ioDepth)") }

        let fd = Glibc.open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard fd >= 0 else { throw DeviceError("cannot open \(path): \(Errno.current)") }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = Errno.current; FD.close(fd)
            throw DeviceError("cannot stat \(path): \(e)")
        }
        var bytes: UInt64 = 0
        var lbs: UInt32 = 512
        let kind = st.st_mode & S_IFMT
        if kind == S_IFREG {
            bytes = UInt64(st.st_size)
        } else if kind == S_IFBLK {
            guard lb_blkdev_size(fd, &bytes, &lbs) == 0 else {
                let e = Errno.current; FD.close(fd)
                throw DeviceError("cannot get the size of block device \(path): \(e)")
            }
            if lbs < 512 || lbs > 65536 || lbs & (lbs - 1) != 0 { lbs = 512 }
        } else {
            FD.close(fd)
            throw DeviceError("\(path): not a regular file or block device")
        }

        // One ring for the device; SQ as deep as the slot table so an SQE is always free for a slot, CQ twice that
        // (liburing default) so completions can never overflow.
        var entries: UInt32 = 1
        while entries < UInt32(ioDepth) { entries <<= 1 }
        let efd = lb_eventfd(0, 1)
        guard efd >= 0 else {
            let e = Errno.current; FD.close(fd)
            throw DeviceError("block \(path): eventfd: \(e)")
        }
        var ringOut: OpaquePointer? = nil
        let r = lb_uring_create(entries, efd, &ringOut)
        guard r == 0, let ring = ringOut else {
            FD.close(efd); FD.close(fd)
            throw DeviceError("block \(path): io_uring unavailable (\(Errno(-r))); "
                              + "is io_uring blocked by seccomp or kernel.io_uring_disabled?")
        }
        // Restricted to READV/WRITEV/FSYNC (curing.c); a kernel older than 5.10 cannot: one warning, device served.
        if let why = lb_uring_unrestricted(ring) {
            Log.warning("block \(path): io_uring ring not restricted to its operations (the kernel refused "
                        + "\(String(cString: why)); Linux 5.10+ needed): seccomp does not cover its operations")
        }
        self.ioUringRestricted = lb_uring_unrestricted(ring) == nil

        self.path = path
        self.readOnly = readOnly
        self.fd = fd
        self.isBlockDevice = kind == S_IFBLK
        self.capacity = bytes / 512
        self.blockSize = lbs
        self.segMax = UInt32(max(1, min(126, Int(queueSize) - 2)))
        self.ioDepth = ioDepth
        self.ring = ring
        self.eventFD = efd
        queueMaxSizes = Array(repeating: queueSize, count: queues)

        var f: VirtioFeatures = [.version1, .eventIdx, .indirectDesc, VirtioBlk.segMax, VirtioBlk.blkSize, VirtioBlk.flush]
        if queues > 1 { f.insert(VirtioBlk.mq) }
        if readOnly { f.insert(VirtioBlk.readOnly) } else { f.formUnion([VirtioBlk.discard, VirtioBlk.writeZeroes]) }
        offeredFeatures = f

        // Memory translation may split one descriptor into several pieces: leave room beyond seg_max.
        iovPerSlot = min(1024, Int(segMax) * 2 + 2)
        slots = .allocate(capacity: ioDepth)
        iovecs = .allocate(capacity: ioDepth * iovPerSlot)
        iovecs.initialize(repeating: iovec(), count: ioDepth * iovPerSlot)
        for i in 0..<ioDepth {
            (slots + i).initialize(to: BlockSlot(iov: iovecs + i * iovPerSlot, nextFree: i + 1 < ioDepth ? Int32(i + 1) : -1))
        }
        freeSlot = 0
        cqeData = .allocate(capacity: BlockDevice.reapBatch)
        cqeRes = .allocate(capacity: BlockDevice.reapBatch)
        touched = .allocate(capacity: queues)
        touched.initialize(repeating: false, count: queues)
        blocked = .allocate(capacity: queues)
        blocked.initialize(repeating: false, count: queues)

        scratch = .allocate(byteCount: 64, alignment: 16)
        zeroes = .allocate(byteCount: BlockDevice.zeroBytes, alignment: 4096)
        memset(zeroes, 0, BlockDevice.zeroBytes)
        let id = UnsafeMutableRawPointer.allocate(byteCount: VirtioBlk.idBytes, alignment: 8)
        memset(id, 0, VirtioBlk.idBytes)
        var name = serial
        name.withUTF8 { u in if let b = u.baseAddress { id.copyMemory(from: b, byteCount: min(u.count, VirtioBlk.idBytes)) } }
        self.serial = id

        config = .allocate(byteCount: VirtioBlk.configSize, alignment: 8)
        memset(config, 0, VirtioBlk.configSize)
        typealias C = VirtioBlk.Config
        config.storeBytes(of: capacity.littleEndian, toByteOffset: C.capacity, as: UInt64.self)
        config.storeBytes(of: segMax.littleEndian, toByteOffset: C.segMax, as: UInt32.self)
        config.storeBytes(of: blockSize.littleEndian, toByteOffset: C.blkSize, as: UInt32.self)
        config.storeBytes(of: UInt16(1).littleEndian, toByteOffset: C.minIOSize, as: UInt16.self)
        config.storeBytes(of: UInt16(queues).littleEndian, toByteOffset: C.numQueues, as: UInt16.self)
        if !readOnly {
            config.storeBytes(of: maxDiscardSectors.littleEndian, toByteOffset: C.maxDiscardSectors, as: UInt32.self)
            config.storeBytes(of: UInt32(1).littleEndian, toByteOffset: C.maxDiscardSeg, as: UInt32.self)
            config.storeBytes(of: (blockSize / 512).littleEndian, toByteOffset: C.discardSectorAlignment, as: UInt32.self)
            config.storeBytes(of: maxWriteZeroesSectors.littleEndian, toByteOffset: C.maxWriteZeroesSectors, as: UInt32.self)
            config.storeBytes(of: UInt32(1).littleEndian, toByteOffset: C.maxWriteZeroesSeg, as: UInt32.self)
            config.storeBytes(of: UInt8(1), toByteOffset: C.writeZeroesMayUnmap, as: UInt8.self)
        }
    }

    deinit {
        // The kernel must not write into guest memory (or our iovecs) after we are gone.
        waitAll(deliver: false)
        if let loop, registration >= 0 { loop.unregister(fd: eventFD, registration: registration) }
        lb_uring_destroy(ring)
        cqeData.deallocate(); cqeRes.deallocate()
        FD.close(eventFD)
        FD.close(fd)
        slots.deinitialize(count: ioDepth); slots.deallocate()
        iovecs.deallocate()
        touched.deallocate(); blocked.deallocate()
        scratch.deallocate(); zeroes.deallocate(); serial.deallocate(); config.deallocate()
    }

    // MARK: VirtioDevice

    public func ackFeatures(_ features: VirtioFeatures) {
        writeThrough = !readOnly && !features.contains(VirtioBlk.flush)
    }

    /// Restricted memory: seg_max lowered so that seg_max segments of the pool's largest mapping (256 KiB, the
    /// module's max_mapping_size, which bounds virtio_blk's segment size) fit in `bytes` (at least one segment).
    public func limitRequestBytes(_ bytes: Int) {
        let fit = UInt32(clamping: max(1, bytes / BlockDevice.largestSegment))
        guard fit < segMax else { return }
        segMax = fit
        config.storeBytes(of: segMax.littleEndian, toByteOffset: VirtioBlk.Config.segMax, as: UInt32.self)
    }
    /// The largest segment a driver maps through a restricted device's pool (the module's VLO_MAX_MAP).
    static let largestSegment = 256 << 10

    public func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        guard let b = buffer.baseAddress, buffer.count > 0 else { return }
        b.copyMemory(from: config + offset, byteCount: buffer.count)
    }

    /// CONFIG_WCE is not offered, so nothing in the config space is writable; writes are ignored.
    public func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) {}

    private var faults = FaultReporter.none

    public func activate(_ context: DeviceContext) throws(DeviceError) {
        _ = FD.drain(eventFD)
        do throws(Errno) {
            // Edge-triggered: each completion io_uring posts writes the eventfd and wakes epoll again; nothing
            // reads the counter back (one system call less per completion batch).
            registration = try context.loop.register(fd: eventFD, events: UInt32(LB_EPOLLIN) | LB_EPOLLET, handler: self, token: 0)
        } catch {
            throw DeviceError("block \(path): cannot watch the io_uring eventfd: \(error)")
        }
        loop = context.loop
        queues = context.queues
        faults = context.faults
        queueCount = min(context.queueCount, queueMaxSizes.count)
        for q in 0..<queueMaxSizes.count { touched[q] = false; blocked[q] = false }
        anyBlocked = false
    }

    public func queueNotified(_ index: Int) {
        guard queues != nil, index < queueCount else { return }
        if !blocked[index] { process(index) }   // a blocked queue resumes when a completion frees a slot
        submitAndReap()
    }

    /// Waits until the kernel is done with every request (it writes into guest memory), then forgets the queues.
    /// In-flight requests are not completed into the used rings: the driver reset them.
    public func reset() {
        waitAll(deliver: false)
        if let loop, registration >= 0 { loop.unregister(fd: eventFD, registration: registration) }
        registration = -1
        loop = nil
        queues = nil
        queueCount = 0
        anyBlocked = false
        for q in 0..<queueMaxSizes.count { touched[q] = false; blocked[q] = false }
    }

    /// Completes every in-flight request into its used ring (status written, used entry published).
    public func quiesce() { waitAll(deliver: queues != nil) }

    /// Completes everything in flight (so those writes are covered), then fdatasync.
    public func flush() {
        waitAll(deliver: queues != nil)
        if lb_fdatasync(fd) != 0 { Log.error("block \(path): fdatasync: \(Errno.current)") }
    }

    /// Completes everything in flight on the loop; the fdatasync runs on the caller's thread through a duplicate of
    /// the image's fd (same open file: its completed writes are covered), after this body may be gone.
    public func flushForRemoval() -> (@Sendable () -> Void)? {
        waitAll(deliver: queues != nil)
        let d = dup(fd)
        guard d >= 0 else {
            Log.warning("block \(path): dup for the off-loop fdatasync: \(Errno.current); syncing on the loop")
            if lb_fdatasync(fd) != 0 { Log.error("block \(path): fdatasync: \(Errno.current)") }
            return nil
        }
        let p = path
        return {
            if lb_fdatasync(d) != 0 { Log.error("block \(p): fdatasync: \(Errno.current)") }
            close(d)
        }
    }

    // MARK: EventHandler (the ring's eventfd)

    public func handleEvent(token: UInt32, events: UInt32) {
        // No read of the eventfd (edge-triggered, see `activate`): a CQE posted after the reap's last peek writes
        // the eventfd again, which is a new edge.
        reap()
        resumeBlocked()
        submitAndReap()
    }

    /// Submits the queued SQEs and completes at once what io_uring finished inline. The ring's eventfd signals only
    /// completions posted later (registered "async", curing.c), so every submit must be followed by this reap
    /// before the loop sleeps, or an inline completion would never be seen. Inline completions free slots, which may
    /// let a blocked queue queue more: a few rounds, then another turn of the loop for the rest.
    private func submitAndReap() {
        var rounds = 0
        repeat {
            submit()
            reap()
            resumeBlocked()
            rounds += 1
        } while unsubmitted > 0 && rounds < 4
        // Still queued (io_uring said EAGAIN/EBUSY, or four rounds of inline completions): run again next turn.
        if unsubmitted > 0 && queueCount > 0 { faults.again(queue: 0) }
    }

    // MARK: Queue processing

    /// Pops and starts requests with the no-lost-kick loop; stops early (kicks left disabled) when out of slots.
    private func process(_ q: Int) {
        guard let qs = queues else { return }
        let queue = qs + q
        var stalled = false
        while true {
            queue.pointee.disableNotifications()
            while let c = queue.pointee.pop() {
                switch handle(c, queue: q) {
                case .done(let w): queue.pointee.addUsed(head: c.head, written: w)
                case .submitted: break
                case .noSlot:
                    queue.pointee.undoPop()
                    blocked[q] = true
                    anyBlocked = true
                    slotStalls &+= 1
                    stalled = true
                }
                if stalled { break }
            }
            if stalled || queue.pointee.polling || !queue.pointee.enableNotifications() { break }
        }
        queue.pointee.publish()
        touched[q] = false
        if queue.pointee.faultPending { faults.report(queue: q) }
    }

    /// After completions freed slots: continue the queues that stalled, round-robin from where we stopped last.
    private func resumeBlocked() {
        guard anyBlocked, queues != nil else { return }
        anyBlocked = false
        let n = queueCount
        let start = resumeFrom
        for k in 0..<n {
            let q = (start + k) % n
            guard blocked[q] else { continue }
            if freeSlot < 0 { anyBlocked = true; resumeFrom = q; return }
            blocked[q] = false
            process(q)
        }
        resumeFrom = (start + 1) % max(n, 1)
    }

    @inline(__always)
    private func bad(_ why: StaticString) {
        badRequests &+= 1
        if badRequests == 1 { Log.warning("block \(path): malformed request (\(why)); further ones are not logged") }
    }

    /// Validates one request and starts it.
    private func handle(_ c: borrowing Chain, queue q: Int) -> BlockOutcome {
        // The status byte is the last writable byte; without one there is no way to report anything.
        guard c.writableBytes >= 1, c.count > c.readableCount else { bad("no writable status byte"); return .done(0) }
        let last = c.segments[c.count - 1]
        let status = last.base + Int(last.length) - 1
        guard c.readableBytes >= UInt32(VirtioBlk.headerSize),
              c.read(into: scratch, length: VirtioBlk.headerSize) == VirtioBlk.headerSize else {
            bad("header shorter than 16 bytes")
            return finishNow(status, VirtioBlk.statusIOErr)
        }
        let type = scratch.loadUnaligned(as: UInt32.self).littleEndian
        let sector = scratch.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian
        switch type {
        case VirtioBlk.typeIn:
            // Header only in the readable part; data + status writable.
            guard c.readableBytes == UInt32(VirtioBlk.headerSize) else { bad("IN with readable data"); return finishNow(status, VirtioBlk.statusIOErr) }
            return startIO(c, queue: q, op: .read, sector: sector, length: c.writableBytes - 1, status: status)
        case VirtioBlk.typeOut:
            guard !readOnly else { return finishNow(status, VirtioBlk.statusIOErr) }
            guard c.writableBytes == 1 else { bad("OUT with writable data"); return finishNow(status, VirtioBlk.statusIOErr) }
            return startIO(c, queue: q, op: .write, sector: sector, length: c.readableBytes - UInt32(VirtioBlk.headerSize), status: status)
        case VirtioBlk.typeFlush:
            return startIO(c, queue: q, op: .flush, sector: 0, length: 0, status: status)
        case VirtioBlk.typeGetID:
            let n = min(Int(c.writableBytes - 1), VirtioBlk.idBytes)
            _ = c.write(from: serial, length: n)
            status.storeBytes(of: VirtioBlk.statusOK, as: UInt8.self)
            return .done(UInt32(n) + 1)
        case VirtioBlk.typeDiscard, VirtioBlk.typeWriteZeroes:
            guard !readOnly else { return finishNow(status, VirtioBlk.statusUnsupp) }
            return finishNow(status, discardOrZero(c, writeZeroes: type == VirtioBlk.typeWriteZeroes))
        default:
            return finishNow(status, VirtioBlk.statusUnsupp)
        }
    }

    @inline(__always)
    private func finishNow(_ status: UnsafeMutableRawPointer, _ s: UInt8) -> BlockOutcome {
        status.storeBytes(of: s, as: UInt8.self)
        return .done(1)
    }

    @inline(__always)
    private func inRange(_ sector: UInt64, _ sectors: UInt64) -> Bool {
        sectors <= capacity && sector <= capacity - sectors
    }

    /// IN / OUT / FLUSH: checks, takes a slot, builds the iovecs over the data segments, queues the SQE.
    private func startIO(_ c: borrowing Chain, queue q: Int, op: BlockOp, sector: UInt64, length: UInt32,
                         status: UnsafeMutableRawPointer) -> BlockOutcome {
        if op != .flush {
            guard length % UInt32(VirtioBlk.sectorSize) == 0 else { bad("data length not a multiple of 512"); return finishNow(status, VirtioBlk.statusIOErr) }
            guard inRange(sector, UInt64(length) / 512) else { return finishNow(status, VirtioBlk.statusIOErr) }
            if length == 0 { return finishNow(status, VirtioBlk.statusOK) }
        }
        let idx = freeSlot
        guard idx >= 0 else { return .noSlot }
        let s = slots + Int(idx)
        var n = 0
        if op != .flush {
            // Data segments: for IN the writable part minus the status byte, for OUT the readable part after the
            // header. Either may share a segment with the header / status byte.
            var skip = op == .write ? VirtioBlk.headerSize : 0
            var remaining = Int(length)
            let iov = s.pointee.iov
            var i = op == .write ? 0 : c.readableCount
            let end = op == .write ? c.readableCount : c.count
            while i < end && remaining > 0 {
                let seg = c.segments[i]
                i += 1
                var l = Int(seg.length)
                if skip >= l { skip -= l; continue }
                l -= skip
                let take = min(l, remaining)
                guard n < iovPerSlot else {
                    bad("more data segments than seg_max")
                    return finishNow(status, VirtioBlk.statusIOErr)
                }
                iov[n] = iovec(iov_base: seg.base + skip, iov_len: take)
                n += 1
                remaining -= take
                skip = 0
            }
            guard remaining == 0 else { return finishNow(status, VirtioBlk.statusIOErr) }
        }
        freeSlot = s.pointee.nextFree
        s.pointee.first = 0
        s.pointee.count = Int32(n)
        s.pointee.op = op
        s.pointee.retries = 0
        s.pointee.queue = UInt16(q)
        s.pointee.head = c.head
        s.pointee.status = status
        s.pointee.offset = sector &* 512
        s.pointee.total = length
        s.pointee.done = 0
        inFlight += 1
        prepare(Int(idx))
        return .submitted
    }

    /// Queues the SQE for a slot's (remaining) transfer.
    private func prepare(_ idx: Int) {
        var r = queueSQE(idx)
        if r == -EBUSY { submit(); r = queueSQE(idx) }
        guard r == 0 else {
            // Cannot happen (the SQ is as deep as the slot table); fail the request rather than lose it.
            Log.error("block \(path): io_uring submission queue full")
            finish(idx, VirtioBlk.statusIOErr)
            return
        }
        unsubmitted += 1
    }

    @inline(__always)
    private func queueSQE(_ idx: Int) -> Int32 {
        let s = slots + idx
        let iov = UnsafeRawPointer(s.pointee.iov + Int(s.pointee.first))
        let nvec = UInt32(s.pointee.count - s.pointee.first)
        let off = s.pointee.offset &+ UInt64(s.pointee.done)
        switch s.pointee.op {
        case .read: return lb_uring_readv(ring, fd, iov, nvec, off, UInt64(idx))
        case .write: return lb_uring_writev(ring, fd, iov, nvec, off, writeThrough ? 2 /* RWF_DSYNC */ : 0, UInt64(idx))
        case .flush: return lb_uring_fdatasync(ring, fd, UInt64(idx))
        }
    }

    private func submit() {
        guard unsubmitted > 0 else { return }
        let r = lb_uring_submit(ring)
        if r >= 0 {
            unsubmitted = max(0, unsubmitted - Int(r))
        } else if r != -EINTR && r != -EAGAIN && r != -EBUSY {
            Log.error("block \(path): io_uring_submit: \(Errno(-r))")
        }
        // EAGAIN/EBUSY leave the SQEs queued; the next submit (any completion or kick) retries.
    }

    // MARK: Completions

    /// Drains the CQ: completes finished requests, resubmits short transfers, publishes each touched queue once.
    private func reap() {
        while true {
            let n = Int(lb_uring_reap(ring, cqeData, cqeRes, Int32(BlockDevice.reapBatch)))
            for i in 0..<n where cqeData[i] < UInt64(ioDepth) { completed(Int(cqeData[i]), cqeRes[i], deliver: true) }
            if n < BlockDevice.reapBatch { break }
        }
        publishTouched()
    }

    private func publishTouched() {
        guard let qs = queues else { return }
        for q in 0..<queueCount where touched[q] {
            touched[q] = false
            qs[q].publish()
        }
    }

    /// One CQE for slot `idx`. `deliver` false (reset/deinit): only release the slot, never touch guest memory.
    private func completed(_ idx: Int, _ res: Int32, deliver: Bool) {
        let s = slots + idx
        guard deliver else { release(idx); return }
        if res < 0 {
            if (res == -EINTR || res == -EAGAIN) && s.pointee.retries < 8 {
                s.pointee.retries += 1
                prepare(idx)
                return
            }
            if s.pointee.op == .flush || res != -EIO {
                Log.debug("block \(path): \(s.pointee.op) at \(s.pointee.offset): \(Errno(-res))")
            }
            finish(idx, VirtioBlk.statusIOErr)
            return
        }
        if s.pointee.op == .flush { finish(idx, VirtioBlk.statusOK); return }
        let n = UInt32(res)
        let left = s.pointee.total - s.pointee.done
        guard n <= left else { finish(idx, VirtioBlk.statusIOErr); return }
        s.pointee.done += n
        if n == left { finish(idx, VirtioBlk.statusOK); return }
        // Short transfer: never report OK for partial data. EOF (0) fails; otherwise continue with the remainder.
        guard n > 0 else { finish(idx, VirtioBlk.statusIOErr); return }
        var k = Int(n)
        var f = Int(s.pointee.first)
        let iov = s.pointee.iov
        while k > 0 {
            let l = iov[f].iov_len
            if k >= l { k -= l; f += 1 } else {
                iov[f].iov_base = iov[f].iov_base! + k
                iov[f].iov_len = l - k
                k = 0
            }
        }
        s.pointee.first = Int32(f)
        s.pointee.retries = 0
        prepare(idx)
    }

    /// Writes the status byte, adds the used element (published by the caller), frees the slot.
    private func finish(_ idx: Int, _ st: UInt8) {
        let s = slots + idx
        if let qs = queues, Int(s.pointee.queue) < queueCount, let p = s.pointee.status {
            p.storeBytes(of: st, as: UInt8.self)
            let written: UInt32 = s.pointee.op == .read ? s.pointee.done + 1 : 1
            let q = Int(s.pointee.queue)
            qs[q].addUsed(head: s.pointee.head, written: written)
            touched[q] = true
        }
        release(idx)
    }

    private func release(_ idx: Int) {
        let s = slots + idx
        s.pointee.status = nil
        s.pointee.nextFree = freeSlot
        freeSlot = Int32(idx)
        inFlight -= 1
    }

    /// Blocks until no request is in flight. `deliver`: complete them normally (flush); otherwise just release.
    private func waitAll(deliver: Bool) {
        var failures = 0
        while inFlight > 0 {
            var data: UInt64 = 0
            var res: Int32 = 0
            let w = lb_uring_wait(ring, &data, &res)
            unsubmitted = 0
            if w == -EINTR || w == -EAGAIN { continue }
            guard w == 0 else {
                failures += 1
                if failures > 100 {
                    // Nothing sane is left: the ring is broken. Leak rather than let the caller free memory the
                    // kernel may still write.
                    Log.error("block \(path): io_uring_wait_cqe: \(Errno(-w)); \(inFlight) requests abandoned")
                    return
                }
                continue
            }
            if data < UInt64(ioDepth) { completed(Int(data), res, deliver: deliver) }
        }
        if deliver { publishTouched() }
        unsubmitted = 0
    }

    // MARK: DISCARD / WRITE_ZEROES (synchronous)

    private func discardOrZero(_ c: borrowing Chain, writeZeroes: Bool) -> UInt8 {
        let payload = Int(c.readableBytes) - VirtioBlk.headerSize
        guard payload > 0, payload % VirtioBlk.rangeSize == 0 else { bad("discard/write-zeroes payload size"); return VirtioBlk.statusIOErr }
        let n = payload / VirtioBlk.rangeSize
        guard n <= 1 else { return VirtioBlk.statusUnsupp }   // max_discard_seg = max_write_zeroes_seg = 1
        guard c.read(into: scratch, length: VirtioBlk.rangeSize, at: VirtioBlk.headerSize) == VirtioBlk.rangeSize else {
            return VirtioBlk.statusIOErr
        }
        let sector = scratch.loadUnaligned(as: UInt64.self).littleEndian
        let count = scratch.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian
        let flags = scratch.loadUnaligned(fromByteOffset: 12, as: UInt32.self).littleEndian
        // Unknown flag bits, or UNMAP on a discard: unsupported (virtio 1.2 §5.2.6.2).
        guard flags & ~(writeZeroes ? VirtioBlk.flagUnmap : 0) == 0 else { return VirtioBlk.statusUnsupp }
        guard count <= (writeZeroes ? maxWriteZeroesSectors : maxDiscardSectors),
              inRange(sector, UInt64(count)) else { return VirtioBlk.statusIOErr }
        if count == 0 { return VirtioBlk.statusOK }
        let off = sector * 512, len = UInt64(count) * 512
        if writeZeroes {
            return zeroRange(off, len, unmap: flags & VirtioBlk.flagUnmap != 0) ? VirtioBlk.statusOK : VirtioBlk.statusIOErr
        }
        // Discard is a hint: a backing store that cannot deallocate still succeeds.
        let r = isBlockDevice ? lb_blk_discard(fd, off, len) : lb_punch_hole(fd, off, len)
        if r == 0 || errno == EOPNOTSUPP || errno == ENOTTY || errno == EINVAL { return VirtioBlk.statusOK }
        Log.debug("block \(path): discard: \(Errno.current)")
        return VirtioBlk.statusIOErr
    }

    /// Makes `[off, off+len)` read back as zeroes: deallocating when allowed, else zero-range, else writing zeroes.
    private func zeroRange(_ off: UInt64, _ len: UInt64, unmap: Bool) -> Bool {
        if isBlockDevice {
            if lb_blk_zeroout(fd, off, len) == 0 { return true }
        } else {
            if unmap && lb_punch_hole(fd, off, len) == 0 { return true }
            if lb_zero_range(fd, off, len) == 0 { return true }
        }
        let e = errno
        guard e == EOPNOTSUPP || e == ENOTTY || e == EINVAL || e == ENOSYS else {
            Log.debug("block \(path): write zeroes: \(Errno(e))")
            return false
        }
        return writeZeroesSlowly(off, len)
    }

    private func writeZeroesSlowly(_ off: UInt64, _ len: UInt64) -> Bool {
        var done: UInt64 = 0
        while done < len {
            let n = Int(min(UInt64(BlockDevice.zeroBytes), len - done))
            let w = Glibc.pwrite(fd, zeroes, n, off_t(off + done))
            if w > 0 { done += UInt64(w); continue }
            if w < 0 && errno == EINTR { continue }
            Log.debug("block \(path): writing zeroes: \(w == 0 ? "no progress" : "\(Errno.current)")")
            return false
        }
        return true
    }
}
