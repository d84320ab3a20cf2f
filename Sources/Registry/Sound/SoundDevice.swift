import Glibc
import CLinux
import Transport

/// One PCM stream of the device: a direction and the host endpoint behind it.
public struct SoundStreamConfig {
    public var direction: UInt8
    public var endpoint: SoundEndpoint
    public init(direction: UInt8, endpoint: SoundEndpoint) { self.direction = direction; self.endpoint = endpoint }
}

/// What the device refused, dropped or lived through (loop thread; `loopbackd ctl` and the tests read it).
public struct SoundStats: Equatable, Sendable {
    /// Control requests answered BAD_MSG or NOT_SUPP, and control chains too short to carry a status.
    public var badControl: UInt64 = 0
    /// I/O messages answered BAD_MSG (bad header, unknown stream, stream on the wrong queue or not prepared,
    /// too fragmented) and chains too short to carry a status.
    public var badIO: UInt64 = 0
    /// Underruns (playback) / overruns (capture): the stream ran out of driver buffers and the driver's next
    /// buffer came late (the gap is audible); plus the xruns the hardware endpoint recovered from.
    public var xruns: UInt64 = 0
    /// Events dropped because the driver gave no event buffers.
    public var eventsDropped: UInt64 = 0
    /// PCM bytes played / captured, I/O messages completed.
    public var bytesPlayed: UInt64 = 0
    public var bytesCaptured: UInt64 = 0
    public var messages: UInt64 = 0
}

final class PcmStream {
    enum State: String { case initial, paramsSet = "set-params", prepared, running, stopped, released }
    let id: Int
    let direction: UInt8
    let endpoint: SoundEndpoint
    let caps: PcmCapabilities
    var state = State.initial
    var params: PcmParams?
    var held: HeldChains
    var timer: LoopTimer?
    /// The stream clock: bytes moved since `base` (ns) are `consumed`; what is due at `now` is bytes(now - base).
    var base: UInt64 = 0
    var consumed: UInt64 = 0
    /// Data bytes in held chains not yet moved (the playback latency the device reports).
    var heldBytes: UInt64 = 0
    var starved = false
    var movedSinceStart = false
    var pumpWanted = false
    var queue: Int { direction == VirtioSnd.dOutput ? VirtioSnd.txQueue : VirtioSnd.rxQueue }
    var isPlayback: Bool { direction == VirtioSnd.dOutput }
    init(id: Int, _ c: SoundStreamConfig, queueSize: Int) {
        self.id = id
        direction = c.direction
        endpoint = c.endpoint
        caps = c.endpoint.capabilities
        held = HeldChains(capacity: queueSize, maxSegments: SoundDevice.maxSegments)
    }
}

/// virtio-snd (virtio 1.2 §5.14): PCM streams whose host side is a `SoundEndpoint`, one jack and one channel map
/// per stream (all on function node 0, so Linux makes one PCM device with a playback and/or a capture substream).
///
/// I/O messages complete on the stream's clock, not on arrival: a playback message is held (`HeldChains`) and its
/// frames are handed to the endpoint when they are due at the stream rate (read from the driver's buffer then, not
/// before: Linux queues every period of its ring at START and the application fills them later); the message
/// completes when its last frame is due. A capture message completes when the stream clock has filled it. One
/// `LoopTimer` per running stream, armed for the moment the oldest held message completes (clock-paced endpoints)
/// or every half period (endpoints on their own clock, such as ALSA hardware). When a running stream has no
/// buffer left, its clock stops (nothing is invented or dropped); if the driver's next buffer comes after the
/// last one ran out, that is counted as an xrun (and sent as an XRUN event if the driver asked for them).
///
/// Every driver-controlled value is checked: request sizes, codes, stream/jack ids, query ranges and item sizes,
/// SET_PARAMS against what the stream offers (format, rate, channels, features) and its buffer/period sizes,
/// commands against the stream's state (virtio 1.2 §5.14.6.6.1), I/O headers, stream ids, direction and state;
/// a bad request is answered BAD_MSG or NOT_SUPP, never trusted.
public final class SoundDevice: VirtioDevice {
    public let deviceID = VirtioSnd.deviceID
    public let queueMaxSizes: [UInt16]
    public let offeredFeatures: VirtioFeatures = [.version1, .eventIdx, .indirectDesc]
    public let configSize = VirtioSnd.configSize
    public static let maxSegments = 132
    public let xrunEvents: Bool
    let streams: [PcmStream]
    private var jackDefconf: [UInt32]
    private var queues: UnsafeMutablePointer<SplitQueue>?
    private var queueCount = 0
    private var faults: FaultReporter = .none
    private var loop: EventLoop?
    /// The stream clock (CLOCK_MONOTONIC ns); tests replace it.
    public var clock: () -> UInt64 = { lb_now_ns() }
    private var eventBuffers: HeldChains
    private let pendingEvents: UnsafeMutablePointer<(UInt32, UInt32)>
    private let pendingCapacity = 64
    private var pendingFirst = 0, pendingCount = 0
    private let request: UnsafeMutableRawPointer
    private let item: UnsafeMutableRawPointer
    private static let maxItemSize = 1024
    private var counters = SoundStats()
    /// The counters, with the xruns the endpoints recovered from themselves (hardware) added.
    public var stats: SoundStats {
        var s = counters
        for k in 0..<streams.count { s.xruns &+= streams[k].endpoint.xruns }
        return s
    }
    private var logged: UInt32 = 0

    public init(streams configs: [SoundStreamConfig], queueSize: UInt16 = 64, xrunEvents: Bool = false) {
        precondition(!configs.isEmpty)
        queueMaxSizes = [queueSize, queueSize, queueSize, queueSize]
        streams = configs.enumerated().map { PcmStream(id: $0.offset, $0.element, queueSize: Int(queueSize)) }
        // HDA default configuration: jack, rear, Line Out (green) / Line In (blue), 1/8", association 1 / 2.
        jackDefconf = configs.map { $0.direction == VirtioSnd.dOutput ? 0x0101_4010 : 0x0181_3020 }
        self.xrunEvents = xrunEvents
        eventBuffers = HeldChains(capacity: Int(queueSize), maxSegments: 4)
        pendingEvents = .allocate(capacity: pendingCapacity)
        request = .allocate(byteCount: 32, alignment: 8)
        item = .allocate(byteCount: SoundDevice.maxItemSize, alignment: 8)
    }
    deinit {
        for s in streams { s.timer?.cancel() }
        pendingEvents.deallocate()
        request.deallocate()
        item.deallocate()
    }

    /// State of stream `id` (tests, status).
    public func streamState(_ id: Int) -> (state: String, params: PcmParams?, held: Int, heldBytes: UInt64)? {
        guard id < streams.count else { return nil }
        let s = streams[id]
        return (s.state.rawValue, s.params, s.held.count, s.heldBytes)
    }
    public func endpoint(_ id: Int) -> SoundEndpoint? { id < streams.count ? streams[id].endpoint : nil }

    public func ackFeatures(_ f: VirtioFeatures) {}

    public func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        withUnsafeTemporaryAllocation(byteCount: VirtioSnd.configSize, alignment: 4) { c in
            c.storeBytes(of: UInt32(streams.count).littleEndian, toByteOffset: 0, as: UInt32.self)   // jacks
            c.storeBytes(of: UInt32(streams.count).littleEndian, toByteOffset: 4, as: UInt32.self)   // streams
            c.storeBytes(of: UInt32(streams.count).littleEndian, toByteOffset: 8, as: UInt32.self)   // chmaps
            for i in 0..<buffer.count { buffer[i] = c[offset + i] }
        }
    }
    public func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) {
        once(1, "driver wrote the read-only config space; ignored")
    }

    public func activate(_ context: DeviceContext) throws(DeviceError) {
        queues = context.queues
        queueCount = context.queueCount
        faults = context.faults
        loop = context.loop
        for s in streams where s.timer == nil {
            do {
                s.timer = try LoopTimer(loop: context.loop) { [unowned self, unowned s] _ in self.pump(s) }
            } catch { throw DeviceError("sound: no timer for stream \(s.id): \(error)") }
        }
    }

    public func reset() {
        for s in streams {
            s.timer?.disarm()
            s.held.removeAll()
            if s.state == .prepared || s.state == .running || s.state == .stopped { s.endpoint.release() }
            s.state = .initial
            s.params = nil
            s.heldBytes = 0
            s.starved = false
        }
        eventBuffers.removeAll()
        pendingCount = 0
        queues = nil
        queueCount = 0
    }

    /// A vhost-user back-end stopping its rings: every held message goes back now (playback status OK with what
    /// was not played dropped, capture with what was captured so far), event buffers empty.
    public func quiesce() {
        guard let qs = queues else { return }
        for s in streams where s.queue < queueCount {
            if s.state == .running { pump(s) }
            while let (h, seg) = s.held.oldest {
                let moved = s.held.progress
                complete(s, h, seg, moved: moved, status: VirtioSnd.sOK, latency: 0)
                _ = s.held.removeOldest()
            }
            s.heldBytes = 0
            qs[s.queue].publish()
        }
        if VirtioSnd.eventQueue < queueCount {
            while let h = eventBuffers.removeOldest() { qs[VirtioSnd.eventQueue].addUsed(head: h.head, written: 0) }
            qs[VirtioSnd.eventQueue].publish()
        }
    }

    public func flush() { for s in streams { s.endpoint.flush() } }

    // MARK: queues

    public func queueNotified(_ index: Int) {
        guard let qs = queues, index < queueCount else { return }
        switch index {
        case VirtioSnd.controlQueue:
            qs[index].drain { c in control(copy c) }
        case VirtioSnd.eventQueue:
            qs[index].drain { c in
                if c.writableBytes >= UInt32(VirtioSnd.eventSize) && eventBuffers.hold(c) { return nil }
                counters.badIO &+= 1
                once(2, "event buffer shorter than 8 bytes or too fragmented; completed empty")
                return 0
            }
            flushEvents()
        case VirtioSnd.txQueue, VirtioSnd.rxQueue:
            qs[index].drain { c in io(copy c, queue: index) }
            // Indices, not the array's iterator (debug builds allocate one: AllocationTests).
            for k in 0..<streams.count where streams[k].pumpWanted {
                let s = streams[k]
                s.pumpWanted = false
                if s.state == .running { pump(s) }
            }
        default:
            qs[index].drain { _ in 0 }
        }
    }

    // MARK: I/O messages

    /// Takes one I/O message: held on its stream (nil), or answered BAD_MSG at once (bytes written).
    private func io(_ c: Chain, queue q: Int) -> UInt32? {
        guard c.readableBytes >= UInt32(VirtioSnd.xferSize), c.writableBytes >= UInt32(VirtioSnd.statusSize) else {
            return badIO(c, "I/O message without a 4-byte header or an 8-byte status")
        }
        var sid: UInt32 = 0
        _ = withUnsafeMutableBytes(of: &sid) { c.read(into: $0.baseAddress!, length: 4) }
        sid = UInt32(littleEndian: sid)
        guard Int(sid) < streams.count else { return badIO(c, "I/O message for a stream that does not exist") }
        let s = streams[Int(sid)]
        guard s.queue == q else { return badIO(c, "I/O message on the other direction's queue") }
        guard s.state == .prepared || s.state == .running || s.state == .stopped else {
            return badIO(c, "I/O message for a stream that is not prepared")
        }
        let data = s.isPlayback ? c.readableBytes - UInt32(VirtioSnd.xferSize) : c.writableBytes - UInt32(VirtioSnd.statusSize)
        guard s.held.hold(c) else { return badIO(c, "I/O message with more than \(SoundDevice.maxSegments) segments") }
        s.heldBytes &+= UInt64(data)
        if s.state == .running && s.starved {
            // Data again after the stream ran dry: the clock restarts now; a gap after frames flowed is an xrun.
            s.starved = false
            s.base = clock()
            s.consumed = 0
            if s.movedSinceStart { xrun(s) }
        }
        s.pumpWanted = true
        return nil
    }

    private func badIO(_ c: Chain, _ why: String) -> UInt32 {
        counters.badIO &+= 1
        once(4, "driver error: \(why); answered BAD_MSG")
        guard c.writableBytes >= UInt32(VirtioSnd.statusSize) else { return 0 }
        var st = (VirtioSnd.sBadMsg.littleEndian, UInt32(0))
        _ = withUnsafeBytes(of: &st) { c.write(from: $0.baseAddress!, length: 8, at: Int(c.writableBytes) - 8) }
        return UInt32(VirtioSnd.statusSize)
    }

    private func xrun(_ s: PcmStream) {
        counters.xruns &+= 1
        once(8, "stream \(s.id): \(s.isPlayback ? "underrun" : "overrun"): the driver's buffers came late (counted in stats)")
        if let p = s.params, p.features & VirtioSnd.pcmFEvtXruns != 0 { sendEvent(VirtioSnd.evtPcmXrun, UInt32(s.id)) }
    }

    /// Moves what is due on stream `s` between the held messages and the endpoint, completes the messages that
    /// are done and arms the timer for the next one.
    func pump(_ s: PcmStream) {
        guard let qs = queues, s.state == .running, let p = s.params else { return }
        let paced = s.endpoint.selfPaced
        let now = clock()
        // What the stream clock says is due, plus what the endpoint may take ahead of it (a card whose queue
        // runs low; capture from a card: whatever it has).
        let due = now > s.base ? p.bytes(inNs: now - s.base) : 0
        var budget: UInt64 = due > s.consumed ? due - s.consumed : 0
        budget = budget &+ UInt64(max(0, s.endpoint.readAheadBytes))
        var completed = false
        while let (h, seg) = s.held.oldest {
            let size = s.isPlayback ? Int(h.readableBytes) - VirtioSnd.xferSize : Int(h.writableBytes) - VirtioSnd.statusSize
            let at = Int(s.held.progress)
            var left = size - at
            if left > 0 && budget > 0 {
                let want = Int(min(UInt64(left), budget))
                let ep = s.endpoint
                let moved: Int
                if s.isPlayback {
                    moved = s.held.forEachReadable(h, seg, from: VirtioSnd.xferSize + at, limit: want) { ptr, n, _ in ep.play(ptr, n) }
                    counters.bytesPlayed &+= UInt64(moved)
                } else {
                    moved = s.held.forEachWritable(h, seg, from: at, limit: want) { ptr, n, _ in ep.capture(ptr, n) }
                    counters.bytesCaptured &+= UInt64(moved)
                }
                s.held.progress &+= UInt32(moved)
                s.consumed &+= UInt64(moved)
                s.heldBytes &-= UInt64(moved)
                budget &-= UInt64(moved)
                left -= moved
                if moved > 0 { s.movedSinceStart = true }
                if moved < want { break }   // the endpoint took less: it is full (hardware back-pressure)
            }
            guard left <= 0 else { break }
            let latency = s.isPlayback ? UInt32(clamping: s.heldBytes &+ UInt64(s.endpoint.delayBytes)) : UInt32(clamping: s.endpoint.delayBytes)
            complete(s, h, seg, moved: UInt32(size), status: VirtioSnd.sOK, latency: latency)
            _ = s.held.removeOldest()
            completed = true
        }
        if completed { qs[s.queue].publish() }
        if let (h, _) = s.held.oldest {
            guard !paced else { return }
            let size = s.isPlayback ? Int(h.readableBytes) - VirtioSnd.xferSize : Int(h.writableBytes) - VirtioSnd.statusSize
            let deadline = s.base &+ p.ns(forBytes: s.consumed &+ UInt64(size - Int(s.held.progress)))
            s.timer?.arm(afterNs: deadline > now ? deadline - now : 1)
        } else if !s.starved {
            s.starved = true
            if !paced { s.timer?.disarm() }
        }
    }

    /// Writes the status (at the end of the writable part) and returns the message: playback used length = the
    /// status, capture = captured bytes + the status.
    private func complete(_ s: PcmStream, _ h: HeldChains.Held, _ seg: UnsafeMutablePointer<Segment>, moved: UInt32,
                          status: UInt32, latency: UInt32) {
        guard let qs = queues else { return }
        var st = (status.littleEndian, latency.littleEndian)
        withUnsafeBytes(of: &st) { b in
            let src = b.baseAddress!
            _ = s.held.forEachWritable(h, seg, from: Int(h.writableBytes) - VirtioSnd.statusSize, limit: VirtioSnd.statusSize) { p, n, done in
                p.copyMemory(from: src + done, byteCount: n)
                return n
            }
        }
        qs[s.queue].addUsed(head: h.head, written: s.isPlayback ? UInt32(VirtioSnd.statusSize) : moved &+ UInt32(VirtioSnd.statusSize))
        counters.messages &+= 1
    }

    /// RELEASE (and SET_PARAMS over queued messages): every held message of `s` completes now, status OK;
    /// playback frames not played are dropped, capture buffers return with what they hold.
    private func returnAll(_ s: PcmStream) {
        guard let qs = queues else { return }
        var any = false
        while let (h, seg) = s.held.oldest {
            complete(s, h, seg, moved: s.isPlayback ? 0 : s.held.progress, status: VirtioSnd.sOK, latency: 0)
            _ = s.held.removeOldest()
            any = true
        }
        s.heldBytes = 0
        if any { qs[s.queue].publish() }
    }

    // MARK: control requests

    /// One control request: the status (and QUERY_INFO items) written into its writable part; returns the bytes
    /// written.
    private func control(_ c: Chain) -> UInt32 {
        guard c.writableBytes >= UInt32(VirtioSnd.hdrSize) else {
            counters.badControl &+= 1
            once(16, "control request without room for a status; completed empty")
            return 0
        }
        request.initializeMemory(as: UInt8.self, repeating: 0, count: 32)
        let n = c.read(into: request, length: 32)
        var payload = 0
        let status: UInt32
        if n < VirtioSnd.hdrSize {
            status = VirtioSnd.sBadMsg
        } else {
            let code = u32(0)
            switch code {
            case VirtioSnd.rJackInfo, VirtioSnd.rPcmInfo, VirtioSnd.rChmapInfo:
                (status, payload) = n >= VirtioSnd.queryInfoSize ? query(code, c) : (VirtioSnd.sBadMsg, 0)
            case VirtioSnd.rJackRemap:
                status = n >= VirtioSnd.jackRemapSize ? jackRemap() : VirtioSnd.sBadMsg
            case VirtioSnd.rPcmSetParams:
                status = n >= VirtioSnd.setParamsSize ? setParams() : VirtioSnd.sBadMsg
            case VirtioSnd.rPcmPrepare, VirtioSnd.rPcmRelease, VirtioSnd.rPcmStart, VirtioSnd.rPcmStop:
                status = n >= VirtioSnd.pcmHdrSize ? command(code) : VirtioSnd.sBadMsg
            default:
                status = VirtioSnd.sNotSupp
            }
        }
        if status != VirtioSnd.sOK {
            counters.badControl &+= 1
            once(32, "control request 0x\(String(u32(0), radix: 16)) answered 0x\(String(status, radix: 16))")
        }
        var st = status.littleEndian
        _ = withUnsafeBytes(of: &st) { c.write(from: $0.baseAddress!, length: 4, at: 0) }
        return UInt32(VirtioSnd.hdrSize + payload)
    }

    @inline(__always) private func u32(_ o: Int) -> UInt32 { UInt32(littleEndian: request.loadUnaligned(fromByteOffset: o, as: UInt32.self)) }

    /// JACK_INFO, PCM_INFO, CHMAP_INFO: items start_id..<start_id+count, each `size` bytes (at least the spec's
    /// structure, at most 1 KiB; zero beyond the structure).
    private func query(_ code: UInt32, _ c: Chain) -> (UInt32, Int) {
        let start = UInt64(u32(4)), count = UInt64(u32(8)), size = Int(u32(12))
        let items = UInt64(streams.count)   // one jack, one stream, one chmap per stream
        let minSize = code == VirtioSnd.rJackInfo ? VirtioSnd.jackInfoSize : code == VirtioSnd.rPcmInfo ? VirtioSnd.pcmInfoSize : VirtioSnd.chmapInfoSize
        guard start + count <= items, size >= minSize, size <= SoundDevice.maxItemSize else { return (VirtioSnd.sBadMsg, 0) }
        let total = Int(count) * size
        guard UInt64(c.writableBytes) >= UInt64(VirtioSnd.hdrSize + total) else { return (VirtioSnd.sBadMsg, 0) }
        for k in 0..<Int(count) {
            let i = Int(start) + k
            let s = streams[i]
            item.initializeMemory(as: UInt8.self, repeating: 0, count: size)
            // hda_fn_nid 0 for every item (bytes 0..<4 stay zero).
            switch code {
            case VirtioSnd.rJackInfo:
                item.storeBytes(of: VirtioSnd.jackFRemap.littleEndian, toByteOffset: 4, as: UInt32.self)
                item.storeBytes(of: jackDefconf[i].littleEndian, toByteOffset: 8, as: UInt32.self)
                let caps: UInt32 = (s.isPlayback ? 1 << 4 : 1 << 5) | 1 << 2   // output/input capable, presence detect
                item.storeBytes(of: caps.littleEndian, toByteOffset: 12, as: UInt32.self)
                item.storeBytes(of: UInt8(1), toByteOffset: 16, as: UInt8.self)
            case VirtioSnd.rPcmInfo:
                let f: UInt32 = xrunEvents ? VirtioSnd.pcmFEvtXruns : 0
                item.storeBytes(of: f.littleEndian, toByteOffset: 4, as: UInt32.self)
                item.storeBytes(of: s.caps.formats.littleEndian, toByteOffset: 8, as: UInt64.self)
                item.storeBytes(of: s.caps.rates.littleEndian, toByteOffset: 16, as: UInt64.self)
                item.storeBytes(of: s.direction, toByteOffset: 24, as: UInt8.self)
                item.storeBytes(of: s.caps.channelsMin, toByteOffset: 25, as: UInt8.self)
                item.storeBytes(of: s.caps.channelsMax, toByteOffset: 26, as: UInt8.self)
            default:
                let ch = min(Int(s.caps.channelsMax), VirtioSnd.chmapMaxSize)
                item.storeBytes(of: s.direction, toByteOffset: 4, as: UInt8.self)
                item.storeBytes(of: UInt8(ch), toByteOffset: 5, as: UInt8.self)
                for (j, pos) in VirtioSnd.defaultPositions(ch).prefix(ch).enumerated() {
                    item.storeBytes(of: pos, toByteOffset: 6 + j, as: UInt8.self)
                }
            }
            _ = c.write(from: item, length: size, at: VirtioSnd.hdrSize + k * size)
        }
        return (VirtioSnd.sOK, total)
    }

    /// JACK_REMAP: the jack's association (0-15) and sequence (0-15) go into its default configuration.
    private func jackRemap() -> UInt32 {
        let jack = Int(u32(4)), assoc = u32(8), seq = u32(12)
        guard jack < jackDefconf.count, assoc <= 15, seq <= 15 else { return VirtioSnd.sBadMsg }
        jackDefconf[jack] = jackDefconf[jack] & ~0xff | assoc << 4 | seq
        return VirtioSnd.sOK
    }

    private func setParams() -> UInt32 {
        let sid = Int(u32(4))
        guard sid < streams.count else { return VirtioSnd.sBadMsg }
        let s = streams[sid]
        switch s.state {
        case .initial, .paramsSet, .prepared, .released: break
        case .running, .stopped: return VirtioSnd.sBadMsg
        }
        let buffer = u32(8), period = u32(12), features = u32(16)
        let channels = request.load(fromByteOffset: 20, as: UInt8.self)
        let fmt = request.load(fromByteOffset: 21, as: UInt8.self), rate = request.load(fromByteOffset: 22, as: UInt8.self)
        guard fmt < 64, s.caps.formats & (1 << UInt64(fmt)) != 0, let format = VirtioSnd.Format(rawValue: fmt), format.bytes > 0,
              Int(rate) < VirtioSnd.rates.count, s.caps.rates & (1 << UInt64(rate)) != 0,
              channels >= s.caps.channelsMin, channels <= s.caps.channelsMax else { return VirtioSnd.sNotSupp }
        let offered: UInt32 = xrunEvents ? VirtioSnd.pcmFEvtXruns : 0
        guard features & ~offered == 0 else { return VirtioSnd.sNotSupp }
        let p = PcmParams(bufferBytes: buffer, periodBytes: period, features: features, channels: channels, format: format,
                          rate: VirtioSnd.rates[Int(rate)])
        let fb = UInt32(p.frameBytes)
        guard period > 0, buffer >= period, buffer <= VirtioSnd.maxBufferBytes, period % fb == 0, buffer % fb == 0 else {
            return VirtioSnd.sBadMsg
        }
        if s.state == .prepared { returnAll(s) }
        s.params = p
        s.state = .paramsSet
        return VirtioSnd.sOK
    }

    /// PREPARE, START, STOP, RELEASE in the order virtio 1.2 §5.14.6.6.1 allows; anything else is BAD_MSG.
    private func command(_ code: UInt32) -> UInt32 {
        let sid = Int(u32(4))
        guard sid < streams.count else { return VirtioSnd.sBadMsg }
        let s = streams[sid]
        switch code {
        case VirtioSnd.rPcmPrepare:
            guard s.state == .paramsSet || s.state == .prepared || s.state == .released, let p = s.params else { return VirtioSnd.sBadMsg }
            guard s.endpoint.prepare(p) else { return VirtioSnd.sIOErr }
            s.state = .prepared
        case VirtioSnd.rPcmStart:
            guard s.state == .prepared || s.state == .stopped, let p = s.params else { return VirtioSnd.sBadMsg }
            s.endpoint.start()
            s.state = .running
            s.base = clock()
            s.consumed = 0
            s.movedSinceStart = false
            s.starved = s.held.isEmpty
            if s.endpoint.selfPaced {
                let periodNs = p.ns(forBytes: UInt64(p.periodBytes))
                s.timer?.arm(everyNs: max(periodNs / 2, 1_000_000))
            }
            pump(s)
        case VirtioSnd.rPcmStop:
            guard s.state == .running else { return VirtioSnd.sBadMsg }
            pump(s)
            s.timer?.disarm()
            s.endpoint.stop()
            s.state = .stopped
        case VirtioSnd.rPcmRelease:
            guard s.state == .prepared || s.state == .stopped else { return VirtioSnd.sBadMsg }
            returnAll(s)
            s.endpoint.release()
            s.state = .released
        default:
            return VirtioSnd.sNotSupp
        }
        return VirtioSnd.sOK
    }

    // MARK: events

    private func sendEvent(_ code: UInt32, _ data: UInt32) {
        guard pendingCount < pendingCapacity else {
            counters.eventsDropped &+= 1
            once(64, "the driver gives no event buffers: events dropped")
            return
        }
        pendingEvents[(pendingFirst + pendingCount) % pendingCapacity] = (code, data)
        pendingCount += 1
        flushEvents()
    }

    private func flushEvents() {
        guard let qs = queues, VirtioSnd.eventQueue < queueCount else { return }
        var sent = false
        while pendingCount > 0, eventBuffers.oldest != nil {
            let (code, data) = pendingEvents[pendingFirst]
            pendingFirst = (pendingFirst + 1) % pendingCapacity
            pendingCount -= 1
            var e = (code.littleEndian, data.littleEndian)
            let n = withUnsafeBytes(of: &e) { eventBuffers.fillOldest(from: $0.baseAddress!, length: VirtioSnd.eventSize) }
            if let h = eventBuffers.removeOldest() { qs[VirtioSnd.eventQueue].addUsed(head: h.head, written: UInt32(n)) }
            sent = true
        }
        if sent { qs[VirtioSnd.eventQueue].publish() }
    }

    /// Logs a warning the first time `bit` is seen (the counters keep the rest).
    private func once(_ bit: UInt32, _ m: @autoclosure () -> String) {
        guard logged & bit == 0 else { return }
        logged |= bit
        Log.warning("sound: " + m())
    }
}
