import Glibc
import Transport

/// One scanout as configured and as the driver set it.
struct GpuScanout {
    var mode: GpuMode
    /// Plugged in (display info `enabled`); changed by `setConnected` (hot-plug).
    var connected = true
    /// SET_SCANOUT's resource (0: none) and rectangle.
    var resource: UInt32 = 0
    var rect = GpuRect(x: 0, y: 0, width: 0, height: 0)
    var cursorResource: UInt32 = 0
    var cursorX: UInt32 = 0, cursorY: UInt32 = 0
}

/// A piece of a resource's backing: host memory of the driver's pages.
struct GpuPiece { var base: UnsafeMutableRawPointer; var length: Int }

/// A 2D resource: its host copy (allocated at CREATE, counted against the budget) and the driver pages attached
/// as its backing (translated once at ATTACH_BACKING; valid while the driver's memory is, i.e. until reset).
struct GpuResource {
    var id: UInt32 = 0            // 0: free slot
    var format: GpuFormat = .b8g8r8x8
    var width: UInt32 = 0, height: UInt32 = 0
    var pixels: UnsafeMutableRawPointer? = nil
    var pixelBytes = 0
    var backing: UnsafeMutablePointer<GpuPiece>? = nil
    var pieces = 0
    var backingBytes: UInt64 = 0
    var stride: Int { Int(width) * GpuFormat.bytesPerPixel }
}

/// virtio-gpu 2D (virtio 1.2 §5.7), in-process. The controlq is answered synchronously, in order (so a fenced
/// command's response — flags FENCE, fence_id and ctx_id echoed, §5.7.6.7 — completes its fence when it is
/// used); the cursorq carries UPDATE_CURSOR / MOVE_CURSOR. Each resource's pixels live in host memory allocated
/// at RESOURCE_CREATE_2D (mmap, counted against `memoryBudget`: a CREATE beyond it fails with ERR_OUT_OF_MEMORY),
/// so TRANSFER_TO_HOST_2D is a copy from the driver's pages and RESOURCE_FLUSH hands the host copy to the
/// scanout's `GpuOutput`: nothing is allocated per transfer or flush.
///
/// Every driver value is checked: request and response sizes (short → ERR_UNSPEC; a response with no room for
/// its header is not written and counted), resource ids (0, unknown, duplicate → ERR_INVALID_RESOURCE_ID),
/// scanout ids (ERR_INVALID_SCANOUT_ID), formats and sizes (ERR_INVALID_PARAMETER), every rectangle inside its
/// resource (64-bit sums), TRANSFER's offset + stride × (height − 1) + row bytes inside the attached backing,
/// ATTACH_BACKING's entry count (1…`maxEntries`) and each entry inside the driver's memory (`MemoryView`; an
/// entry may span adjacent regions), backing attached twice or missing (ERR_UNSPEC), unknown and 3D commands
/// (ERR_UNSPEC). A malformed ring latches the queue through the host's fault mechanism as for every device.
public final class GpuDevice: VirtioDevice, GpuFrameSource, CommandableDevice, VhostUserGpuDisplayTaker {
    public let deviceID = VirtioGPU.deviceID
    public let queueMaxSizes: [UInt16]
    public let offeredFeatures: VirtioFeatures
    public let configSize = VirtioGPU.configSize
    public let outputs: [GpuOutput]
    public let memoryBudget: Int
    public let scanoutCount: Int
    /// Resources one device may have, and memory entries one ATTACH_BACKING may list.
    public static let maxResources = 1024
    public static let maxEntries = 16384

    private var queues: UnsafeMutablePointer<SplitQueue>?
    private var queueCount = 0
    private var memory: MemoryView?
    private var configInterrupt: Notifier = .none
    private var faults: FaultReporter = .none
    private var edid = false
    private var started = false
    private var eventsRead: UInt32 = 0

    private let scanouts: UnsafeMutablePointer<GpuScanout>
    private let edids: [[UInt8]]
    // Resource table: open addressing on the id, linear probing, backward-shift deletion (no tombstones).
    private let tableSize = 2 * GpuDevice.maxResources
    private let table: UnsafeMutablePointer<GpuResource>
    public private(set) var resourceCount = 0
    /// Bytes of host memory the driver's resources hold (pixels + backing tables).
    public private(set) var memoryUsed = 0

    private let req = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 16)
    private let resp = UnsafeMutableRawPointer.allocate(byteCount: VirtioGPU.edidResponseSize, alignment: 16)
    private let entry = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16)

    /// Counters (loop thread): commands answered, error responses, malformed chains (no room for a response),
    /// transfers and flushes done, cursor commands, display events raised.
    public private(set) var commands = 0, errors = 0, malformed = 0
    public private(set) var transfers: UInt64 = 0, flushes: UInt64 = 0, cursorCommands = 0, displayEvents = 0
    /// The last error response type (tests).
    public private(set) var lastError: UInt32 = 0

    public init(modes: [GpuMode], outputs: [GpuOutput], memoryBudget: Int = 64 << 20, edid: Bool = true, queueSize: UInt16 = 64) {
        precondition(!modes.isEmpty && modes.count <= VirtioGPU.maxScanouts && outputs.count == modes.count)
        scanoutCount = modes.count
        self.outputs = outputs
        self.memoryBudget = memoryBudget
        queueMaxSizes = [queueSize, queueSize]
        offeredFeatures = edid ? [.version1, .eventIdx, .indirectDesc, VirtioGPU.fEDID] : [.version1, .eventIdx, .indirectDesc]
        scanouts = .allocate(capacity: modes.count)
        for (i, m) in modes.enumerated() { (scanouts + i).initialize(to: GpuScanout(mode: m)) }
        edids = modes.enumerated().map { GpuEDID.block(mode: $0.element, scanout: $0.offset) }
        table = .allocate(capacity: 2 * GpuDevice.maxResources)
        table.initialize(repeating: GpuResource(), count: 2 * GpuDevice.maxResources)
    }
    deinit {
        freeAll()
        if started { for o in outputs { o.stop() } }
        scanouts.deinitialize(count: scanoutCount); scanouts.deallocate()
        table.deinitialize(count: tableSize); table.deallocate()
        req.deallocate(); resp.deallocate(); entry.deallocate()
    }

    public func ackFeatures(_ features: VirtioFeatures) { edid = features.contains(VirtioGPU.fEDID) }

    public func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        var cfg: (UInt32, UInt32, UInt32, UInt32) = (eventsRead.littleEndian, 0, UInt32(scanoutCount).littleEndian, 0)
        withUnsafeBytes(of: &cfg) { c in
            for k in 0..<buffer.count where offset + k < VirtioGPU.configSize { buffer[k] = c[offset + k] }
        }
    }
    /// events_clear (offset 4): each bit written clears that bit of events_read (§5.7.4). Other fields are read-only.
    public func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) {
        var clear: UInt32 = 0
        for (k, b) in buffer.enumerated() where offset + k >= 4 && offset + k < 8 { clear |= UInt32(b) << (8 * UInt32(offset + k - 4)) }
        eventsRead &= ~clear
    }

    // MARK: lifecycle

    public func activate(_ c: DeviceContext) throws(DeviceError) {
        if !started {
            for (i, o) in outputs.enumerated() { try o.start(loop: c.loop, scanout: i, source: self) }
            started = true
        }
        queues = c.queues
        queueCount = c.queueCount
        memory = c.memory
        configInterrupt = c.configInterrupt
        faults = c.faults
        edid = c.features.contains(VirtioGPU.fEDID)
    }

    /// The driver reset: every resource is freed (its backing pointed into driver memory that may be remapped),
    /// every scanout shows nothing, cursors are hidden, pending display events are dropped.
    public func reset() {
        queues = nil
        queueCount = 0
        memory = nil
        configInterrupt = .none
        freeAll()
        eventsRead = 0
        for i in 0..<scanoutCount {
            let had = scanouts[i].resource != 0, cursor = scanouts[i].cursorResource != 0
            scanouts[i].resource = 0; scanouts[i].rect = GpuRect(x: 0, y: 0, width: 0, height: 0); scanouts[i].cursorResource = 0
            if had { show(i, nil) }
            if cursor { showCursor(i, nil, hotX: 0, hotY: 0, x: 0, y: 0) }
        }
    }

    private func freeAll() {
        for k in 0..<tableSize where table[k].id != 0 { release(&table[k]); table[k] = GpuResource() }
        resourceCount = 0
        memoryUsed = 0
    }

    private func release(_ r: inout GpuResource) {
        if let p = r.pixels { munmap(p, r.pixelBytes) }
        if let b = r.backing { b.deallocate() }
        memoryUsed -= r.pixelBytes + r.pieces * MemoryLayout<GpuPiece>.stride
        r.pixels = nil; r.backing = nil; r.pieces = 0; r.backingBytes = 0
    }

    // MARK: presenting (the scanout's output, and the display socket of a front-end serving this device)

    @inline(__always) private func show(_ i: Int, _ f: GpuFrame?) {
        outputs[i].scanoutChanged(frame: f)
        display?.scanoutChanged(i, frame: f)
    }
    @inline(__always) private func showCursor(_ i: Int, _ image: GpuFrame?, hotX: UInt32, hotY: UInt32, x: UInt32, y: UInt32) {
        outputs[i].cursorChanged(image: image, hotX: hotX, hotY: hotY, x: x, y: y)
        display?.cursorChanged(i, image: image, hotX: hotX, hotY: hotY, x: x, y: y)
    }

    /// VHOST_USER_GPU_SET_SOCKET (served through `serve`): from now on the scanouts are also presented to the
    /// front-end (`GpuDisplayLink`), starting with what they show now. A new socket replaces the old one.
    public func takeDisplaySocket(_ fd: Int32, loop: EventLoop) {
        display?.close(nil, log: false)
        let d = GpuDisplayLink(name: "gpu", fd: fd, loop: loop, scanouts: scanoutCount, source: self, replyTimeoutNs: displayReplyTimeoutNs)
        display = d
        for i in 0..<scanoutCount {
            if let f = currentFrame(i) { d.scanoutChanged(i, frame: f) }
            let c = scanouts[i].cursorResource
            if c != 0, let k = find(c), let p = table[k].pixels {
                d.cursorChanged(i, image: GpuFrame(pixels: p, stride: table[k].stride, format: table[k].format,
                                                   rect: GpuRect(x: 0, y: 0, width: table[k].width, height: table[k].height)),
                                hotX: 0, hotY: 0, x: scanouts[i].cursorX, y: scanouts[i].cursorY)
            }
        }
    }
    public func dropDisplaySocket() {
        display?.close(nil)
        display = nil
    }
    /// How long the display link waits for each handshake reply (tests shorten it).
    public var displayReplyTimeoutNs = GpuDisplayLink.replyTimeoutNs
    /// The display link while a front-end gave one (tests, `info`).
    public private(set) var display: GpuDisplayLink?

    // MARK: hot-plug

    /// Plugs scanout `index` in or out: display info reports it, and the driver hears VIRTIO_GPU_EVENT_DISPLAY
    /// through the config interrupt (§5.7.4: it then asks GET_DISPLAY_INFO again). False for a bad index.
    @discardableResult
    public func setConnected(_ index: Int, _ on: Bool) -> Bool {
        guard index >= 0 && index < scanoutCount else { return false }
        guard scanouts[index].connected != on else { return true }
        scanouts[index].connected = on
        if !on { show(index, nil) }
        else if let f = currentFrame(index) { show(index, f) }
        eventsRead |= VirtioGPU.eventDisplay
        displayEvents += 1
        configInterrupt.signal()
        return true
    }
    public func isConnected(_ index: Int) -> Bool { index >= 0 && index < scanoutCount && scanouts[index].connected }

    // MARK: frames

    public func currentFrame(_ s: Int) -> GpuFrame? {
        guard s >= 0 && s < scanoutCount, scanouts[s].connected, scanouts[s].resource != 0,
              let k = find(scanouts[s].resource), let p = table[k].pixels else { return nil }
        return GpuFrame(pixels: p, stride: table[k].stride, format: table[k].format, rect: scanouts[s].rect)
    }

    // MARK: resource table

    @inline(__always) private func home(_ id: UInt32) -> Int { Int((id &* 0x9E37_79B1) >> 7) & (tableSize - 1) }

    @inline(__always) private func find(_ id: UInt32) -> Int? {
        guard id != 0 else { return nil }
        var k = home(id)
        while table[k].id != 0 {
            if table[k].id == id { return k }
            k = (k + 1) & (tableSize - 1)
        }
        return nil
    }

    private func insert(_ r: GpuResource) {
        var k = home(r.id)
        while table[k].id != 0 { k = (k + 1) & (tableSize - 1) }
        table[k] = r
        resourceCount += 1
    }

    /// Removes slot `k` (already released), shifting later members of its probe run back.
    private func remove(_ k: Int) {
        var hole = k
        table[hole] = GpuResource()
        var j = (hole + 1) & (tableSize - 1)
        while table[j].id != 0 {
            let h = home(table[j].id)
            // Move j into the hole if its home is not in (hole, j] cyclically.
            let between = hole <= j ? (h > hole && h <= j) : (h > hole || h <= j)
            if !between {
                table[hole] = table[j]
                table[j] = GpuResource()
                hole = j
            }
            j = (j + 1) & (tableSize - 1)
        }
        resourceCount -= 1
    }

    // MARK: queues

    public func queueNotified(_ index: Int) {
        guard let q = queues, index < queueCount else { return }
        if index == 0 {
            q[0].drain { c in control(c) }
        } else if index == 1 {
            q[1].drain { c in cursor(c) }
        }
        if q[index].faultPending { faults.report(queue: index) }
    }

    /// Writes a response header (type, FENCE echoed with fence_id and ctx_id) followed by `body` bytes already in
    /// `resp` after the header; returns the bytes written (0 if there is no room even for the header).
    @inline(__always)
    private func respond(_ c: borrowing Chain, _ type: UInt32, body: Int = 0) -> UInt32 {
        let room = Int(c.writableBytes)
        guard room >= VirtioGPU.hdrSize else { malformed += 1; return 0 }
        var t = type, len = VirtioGPU.hdrSize + body
        if room < len { t = VirtioGPU.respErrUnspec; len = VirtioGPU.hdrSize }   // no room for the answer
        if t >= VirtioGPU.respErrUnspec { errors += 1; lastError = t }
        let flags = le32(req, 4) & VirtioGPU.flagFence
        put32(resp, 0, t)
        put32(resp, 4, flags)
        put64(resp, 8, flags != 0 ? le64(req, 8) : 0)
        put32(resp, 16, flags != 0 ? le32(req, 16) : 0)
        put32(resp, 20, 0)
        return UInt32(c.write(from: resp, length: len))
    }

    private func control(_ c: borrowing Chain) -> UInt32 {
        commands += 1
        let n = c.read(into: req, length: min(Int(c.readableBytes), 64))
        if n < 64 { memset(req + n, 0, 64 - n) }
        guard n >= VirtioGPU.hdrSize else { return respond(c, VirtioGPU.respErrUnspec) }
        let type = le32(req, 0)
        func need(_ size: Int) -> Bool { n >= size }
        switch type {
        case VirtioGPU.cmdGetDisplayInfo:
            memset(resp + VirtioGPU.hdrSize, 0, VirtioGPU.displayInfoSize - VirtioGPU.hdrSize)
            for i in 0..<scanoutCount where scanouts[i].connected {
                let o = VirtioGPU.hdrSize + 24 * i
                put32(resp, o + 8, scanouts[i].mode.width); put32(resp, o + 12, scanouts[i].mode.height)
                put32(resp, o + 16, 1)
            }
            return respond(c, VirtioGPU.respOKDisplayInfo, body: VirtioGPU.displayInfoSize - VirtioGPU.hdrSize)
        case VirtioGPU.cmdGetEDID:
            guard edid else { return respond(c, VirtioGPU.respErrUnspec) }
            guard need(VirtioGPU.getEDIDSize) else { return respond(c, VirtioGPU.respErrUnspec) }
            let s = Int(le32(req, 24))
            guard s < scanoutCount else { return respond(c, VirtioGPU.respErrInvalidScanoutID) }
            memset(resp + VirtioGPU.hdrSize, 0, VirtioGPU.edidResponseSize - VirtioGPU.hdrSize)
            put32(resp, 24, UInt32(edids[s].count))
            edids[s].withUnsafeBytes { (resp + 32).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            return respond(c, VirtioGPU.respOKEDID, body: VirtioGPU.edidResponseSize - VirtioGPU.hdrSize)
        case VirtioGPU.cmdResourceCreate2D:
            guard need(VirtioGPU.resourceCreate2DSize) else { return respond(c, VirtioGPU.respErrUnspec) }
            return respond(c, create2D(id: le32(req, 24), format: le32(req, 28), width: le32(req, 32), height: le32(req, 36)))
        case VirtioGPU.cmdResourceUnref:
            guard need(VirtioGPU.resourceUnrefSize) else { return respond(c, VirtioGPU.respErrUnspec) }
            return respond(c, unref(le32(req, 24)))
        case VirtioGPU.cmdSetScanout:
            guard need(VirtioGPU.setScanoutSize) else { return respond(c, VirtioGPU.respErrUnspec) }
            return respond(c, setScanout(Int(le32(req, 40)), le32(req, 44), GpuRect.load(req, 24)))
        case VirtioGPU.cmdResourceFlush:
            guard need(VirtioGPU.resourceFlushSize) else { return respond(c, VirtioGPU.respErrUnspec) }
            return respond(c, flush(le32(req, 40), GpuRect.load(req, 24)))
        case VirtioGPU.cmdTransferToHost2D:
            guard need(VirtioGPU.transferToHost2DSize) else { return respond(c, VirtioGPU.respErrUnspec) }
            return respond(c, transfer(le32(req, 48), GpuRect.load(req, 24), offset: le64(req, 40)))
        case VirtioGPU.cmdResourceAttachBacking:
            guard need(VirtioGPU.attachBackingSize) else { return respond(c, VirtioGPU.respErrUnspec) }
            return respond(c, attach(c, le32(req, 24), entries: le32(req, 28)))
        case VirtioGPU.cmdResourceDetachBacking:
            guard need(VirtioGPU.detachBackingSize) else { return respond(c, VirtioGPU.respErrUnspec) }
            guard let k = find(le32(req, 24)) else { return respond(c, VirtioGPU.respErrInvalidResourceID) }
            guard table[k].backing != nil else { return respond(c, VirtioGPU.respErrUnspec) }
            table[k].backing!.deallocate()
            memoryUsed -= table[k].pieces * MemoryLayout<GpuPiece>.stride
            table[k].backing = nil; table[k].pieces = 0; table[k].backingBytes = 0
            return respond(c, VirtioGPU.respOKNoData)
        default:
            // 3D, capsets (num_capsets is 0), blobs, UUIDs and unknown types.
            return respond(c, VirtioGPU.respErrUnspec)
        }
    }

    private func create2D(id: UInt32, format f: UInt32, width: UInt32, height: UInt32) -> UInt32 {
        guard id != 0, find(id) == nil else { return VirtioGPU.respErrInvalidResourceID }
        guard let format = GpuFormat(rawValue: f), width > 0, height > 0 else { return VirtioGPU.respErrInvalidParameter }
        let (px, o1) = UInt64(width).multipliedReportingOverflow(by: UInt64(height))
        let (bytes, o2) = px.multipliedReportingOverflow(by: UInt64(GpuFormat.bytesPerPixel))
        guard !o1, !o2, bytes <= UInt64(memoryBudget), Int(bytes) <= memoryBudget - memoryUsed,
              resourceCount < GpuDevice.maxResources else { return VirtioGPU.respErrOutOfMemory }
        let p = mmap(nil, Int(bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let p, p != MAP_FAILED else { return VirtioGPU.respErrOutOfMemory }
        insert(GpuResource(id: id, format: format, width: width, height: height, pixels: p, pixelBytes: Int(bytes)))
        memoryUsed += Int(bytes)
        return VirtioGPU.respOKNoData
    }

    private func unref(_ id: UInt32) -> UInt32 {
        guard let k = find(id) else { return VirtioGPU.respErrInvalidResourceID }
        // A scanout or cursor showing it shows nothing from now on (QEMU does the same).
        for i in 0..<scanoutCount {
            if scanouts[i].resource == id { scanouts[i].resource = 0; show(i, nil) }
            if scanouts[i].cursorResource == id {
                scanouts[i].cursorResource = 0
                showCursor(i, nil, hotX: 0, hotY: 0, x: scanouts[i].cursorX, y: scanouts[i].cursorY)
            }
        }
        release(&table[k])
        remove(k)
        return VirtioGPU.respOKNoData
    }

    private func setScanout(_ s: Int, _ id: UInt32, _ r: GpuRect) -> UInt32 {
        guard s < scanoutCount else { return VirtioGPU.respErrInvalidScanoutID }
        if id == 0 {
            // Disable the scanout (§5.7.6.8: resource_id 0).
            let had = scanouts[s].resource != 0
            scanouts[s].resource = 0
            if had { show(s, nil) }
            return VirtioGPU.respOKNoData
        }
        guard let k = find(id) else { return VirtioGPU.respErrInvalidResourceID }
        guard !r.isEmpty, r.fits(table[k].width, table[k].height) else { return VirtioGPU.respErrInvalidParameter }
        scanouts[s].resource = id
        scanouts[s].rect = r
        if scanouts[s].connected, let f = currentFrame(s) { show(s, f) }
        return VirtioGPU.respOKNoData
    }

    private func flush(_ id: UInt32, _ r: GpuRect) -> UInt32 {
        guard let k = find(id) else { return VirtioGPU.respErrInvalidResourceID }
        guard r.fits(table[k].width, table[k].height) else { return VirtioGPU.respErrInvalidParameter }
        flushes &+= 1
        guard let p = table[k].pixels, !r.isEmpty else { return VirtioGPU.respOKNoData }
        for i in 0..<scanoutCount where scanouts[i].resource == id && scanouts[i].connected {
            let d = r.intersection(scanouts[i].rect)
            if d.isEmpty { continue }
            let f = GpuFrame(pixels: p, stride: table[k].stride, format: table[k].format, rect: scanouts[i].rect)
            outputs[i].flush(frame: f, damage: d)
            display?.flush(i, frame: f, damage: d)
        }
        return VirtioGPU.respOKNoData
    }

    /// TRANSFER_TO_HOST_2D: row `h` of the rectangle comes from backing offset `offset + stride × h` (the
    /// resource's stride, width × 4: what Linux computes and QEMU reads) into the host copy at (x, y + h).
    private func transfer(_ id: UInt32, _ r: GpuRect, offset: UInt64) -> UInt32 {
        guard let k = find(id) else { return VirtioGPU.respErrInvalidResourceID }
        let res = table[k]
        guard r.fits(res.width, res.height) else { return VirtioGPU.respErrInvalidParameter }
        guard let backing = res.backing, let pixels = res.pixels else { return VirtioGPU.respErrUnspec }
        transfers &+= 1
        guard !r.isEmpty else { return VirtioGPU.respOKNoData }
        let stride = UInt64(res.stride), row = UInt64(r.width) * 4
        // offset + stride × (height − 1) + row ≤ backing size, without wrapping.
        let (span, o1) = stride.multipliedReportingOverflow(by: UInt64(r.height - 1))
        let (a, o2) = offset.addingReportingOverflow(span)
        let (end, o3) = a.addingReportingOverflow(row)
        guard !o1, !o2, !o3, end <= res.backingBytes else { return VirtioGPU.respErrInvalidParameter }
        var piece = 0, pieceStart: UInt64 = 0
        if r.x == 0 && UInt64(r.width) == UInt64(res.width) {
            // Whole rows: one contiguous run.
            gather(backing, res.pieces, &piece, &pieceStart, from: offset, count: Int(span + row),
                   into: pixels + Int(UInt64(r.y) * stride))
        } else {
            for h in 0..<UInt64(r.height) {
                gather(backing, res.pieces, &piece, &pieceStart, from: offset + stride * h, count: Int(row),
                       into: pixels + Int((UInt64(r.y) + h) * stride + UInt64(r.x) * 4))
            }
        }
        return VirtioGPU.respOKNoData
    }

    /// Copies `count` bytes at backing offset `from` (checked to lie inside) to `dst`. `piece`/`pieceStart` is a
    /// cursor that only moves forward (rows come in increasing offsets).
    @inline(__always)
    private func gather(_ b: UnsafeMutablePointer<GpuPiece>, _ n: Int, _ piece: inout Int, _ pieceStart: inout UInt64,
                        from: UInt64, count: Int, into dst: UnsafeMutableRawPointer) {
        while piece < n && pieceStart + UInt64(b[piece].length) <= from { pieceStart += UInt64(b[piece].length); piece += 1 }
        var left = count, at = from, out = dst
        var i = piece, start = pieceStart
        while left > 0 && i < n {
            let off = Int(at - start)
            let m = min(left, b[i].length - off)
            out.copyMemory(from: b[i].base + off, byteCount: m)
            out += m; left -= m; at += UInt64(m)
            start += UInt64(b[i].length); i += 1
        }
    }

    /// RESOURCE_ATTACH_BACKING: `nr` entries (le64 addr, le32 length, le32 padding) follow the 32-byte request;
    /// each must lie in the driver's memory. Pieces are counted against the budget.
    private func attach(_ c: borrowing Chain, _ id: UInt32, entries nr: UInt32) -> UInt32 {
        guard let k = find(id) else { return VirtioGPU.respErrInvalidResourceID }
        guard table[k].backing == nil else { return VirtioGPU.respErrUnspec }
        guard nr >= 1, nr <= UInt32(GpuDevice.maxEntries) else { return VirtioGPU.respErrInvalidParameter }
        guard UInt64(c.readableBytes) >= UInt64(VirtioGPU.attachBackingSize) + UInt64(nr) * 16 else { return VirtioGPU.respErrUnspec }
        guard let mem = memory else { return VirtioGPU.respErrUnspec }
        // Count the pieces first (an entry spanning two regions is two), then fill.
        var count = 0, total: UInt64 = 0, ok = true
        for e in 0..<Int(nr) {
            _ = c.read(into: entry, length: 16, at: VirtioGPU.attachBackingSize + 16 * e)
            let addr = le64(entry, 0), len = UInt64(le32(entry, 8))
            guard len > 0 else { return VirtioGPU.respErrInvalidParameter }
            ok = mem.forEachPiece(addr, len) { _, _ in count += 1; return count <= GpuDevice.maxEntries }
            guard ok else { return count > GpuDevice.maxEntries ? VirtioGPU.respErrInvalidParameter : VirtioGPU.respErrUnspec }
            total += len
        }
        let bytes = count * MemoryLayout<GpuPiece>.stride
        guard bytes <= memoryBudget - memoryUsed else { return VirtioGPU.respErrOutOfMemory }
        let b = UnsafeMutablePointer<GpuPiece>.allocate(capacity: count)
        var i = 0
        for e in 0..<Int(nr) {
            _ = c.read(into: entry, length: 16, at: VirtioGPU.attachBackingSize + 16 * e)
            _ = mem.forEachPiece(le64(entry, 0), UInt64(le32(entry, 8))) { p, l in
                (b + i).initialize(to: GpuPiece(base: p, length: Int(l))); i += 1; return true
            }
        }
        table[k].backing = b
        table[k].pieces = count
        table[k].backingBytes = total
        memoryUsed += bytes
        return VirtioGPU.respOKNoData
    }

    /// cursorq: UPDATE_CURSOR (a 64×64 resource, or 0: hide) and MOVE_CURSOR. Linux gives no room for a
    /// response; one is written (OK_NODATA or an error) when there is.
    private func cursor(_ c: borrowing Chain) -> UInt32 {
        cursorCommands += 1
        let n = c.read(into: req, length: min(Int(c.readableBytes), 64))
        if n < 64 { memset(req + n, 0, 64 - n) }
        let result = cursorCommand(n)
        if result != VirtioGPU.respOKNoData { errors += 1; lastError = result }
        guard c.writableBytes >= UInt32(VirtioGPU.hdrSize) else { return 0 }
        let e = errors
        let w = respond(c, result)
        errors = e
        return w
    }

    private func cursorCommand(_ n: Int) -> UInt32 {
        guard n >= VirtioGPU.cursorSize else { return VirtioGPU.respErrUnspec }
        let type = le32(req, 0), s = Int(le32(req, 24)), x = le32(req, 28), y = le32(req, 32)
        guard type == VirtioGPU.cmdUpdateCursor || type == VirtioGPU.cmdMoveCursor else { return VirtioGPU.respErrUnspec }
        guard s < scanoutCount else { return VirtioGPU.respErrInvalidScanoutID }
        scanouts[s].cursorX = x; scanouts[s].cursorY = y
        if type == VirtioGPU.cmdMoveCursor {
            outputs[s].cursorMoved(x: x, y: y)
            display?.cursorMoved(s, x: x, y: y)
            return VirtioGPU.respOKNoData
        }
        let id = le32(req, 40), hotX = le32(req, 44), hotY = le32(req, 48)
        if id == 0 {
            scanouts[s].cursorResource = 0
            showCursor(s, nil, hotX: 0, hotY: 0, x: x, y: y)
            return VirtioGPU.respOKNoData
        }
        guard let k = find(id) else { return VirtioGPU.respErrInvalidResourceID }
        let side = UInt32(VirtioGPU.cursorSide)
        guard table[k].width == side, table[k].height == side, hotX < side, hotY < side, let p = table[k].pixels else {
            return VirtioGPU.respErrInvalidParameter
        }
        scanouts[s].cursorResource = id
        showCursor(s, GpuFrame(pixels: p, stride: table[k].stride, format: table[k].format, rect: GpuRect(x: 0, y: 0, width: side, height: side)),
                   hotX: hotX, hotY: hotY, x: x, y: y)
        return VirtioGPU.respOKNoData
    }

    /// `loopbackd ctl device NAME …`: `scanout N on|off` (hot-plug), `snapshot [N]` (the output presents the
    /// current picture now), `info`.
    public func command(_ args: [String]) -> (ok: Bool, text: String) {
        switch args.first {
        case "scanout":
            guard args.count == 3, let i = Int(args[1]), i >= 0, i < scanoutCount, args[2] == "on" || args[2] == "off" else {
                return (false, "usage: scanout N on|off (N < \(scanoutCount))")
            }
            setConnected(i, args[2] == "on")
            return (true, "scanout \(i) \(args[2])")
        case "snapshot":
            var which = Array(0..<scanoutCount)
            if args.count == 2 {
                guard let i = Int(args[1]), i >= 0, i < scanoutCount else { return (false, "usage: snapshot [N] (N < \(scanoutCount))") }
                which = [i]
            } else if args.count > 2 { return (false, "usage: snapshot [N]") }
            return (true, which.map { "scanout \($0): " + outputs[$0].snapshot() }.joined(separator: "\n"))
        case "info":
            var lines: [String] = ["resources=\(resourceCount) memory=\(memoryUsed) budget=\(memoryBudget) commands=\(commands) errors=\(errors) transfers=\(transfers) flushes=\(flushes)"]
            for i in 0..<scanoutCount {
                let s = scanouts[i]
                lines.append("scanout \(i) mode=\(s.mode.width)x\(s.mode.height) connected=\(s.connected ? "yes" : "no") resource=\(s.resource) rect=\(s.rect.width)x\(s.rect.height)+\(s.rect.x)+\(s.rect.y) cursor=\(s.cursorResource)@\(s.cursorX),\(s.cursorY) output=\(outputs[i].describe)")
            }
            if let d = display { lines.append(d.describe) }
            return (true, lines.joined(separator: "\n"))
        default:
            return (false, "gpu commands: scanout N on|off, snapshot [N], info")
        }
    }
}
