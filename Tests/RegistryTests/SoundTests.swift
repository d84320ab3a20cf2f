import XCTest
import Glibc
import CLinux
import Synchronization
@testable import Registry
import Transport

/// virtio-snd on the simulated driver: the control protocol (queries, SET_PARAMS against the offer, the stream
/// state machine), I/O messages completed on the stream clock (measured and on a fake clock), WAV files
/// byte-exact both ways, back-pressure from a self-paced endpoint, xruns, and hostile requests.
final class SoundTests: XCTestCase {
    var loop: EventLoop!
    var host: DeviceHost!
    var dev: SoundDevice!
    var drv: SimDriver!
    var ctlq: SimQueue { drv.queues[VirtioSnd.controlQueue] }
    var evq: SimQueue { drv.queues[VirtioSnd.eventQueue] }
    var txq: SimQueue { drv.queues[VirtioSnd.txQueue] }
    var rxq: SimQueue { drv.queues[VirtioSnd.rxQueue] }
    var tmp = ""

    override func setUpWithError() throws {
        loop = try EventLoop()
        host = DeviceHost(loop: loop)
        loop.startThread()
        tmp = "/tmp/snd-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        mkdir(tmp, 0o700)
    }
    override func tearDown() {
        loop.stopAndJoin()
        for f in ["out.wav", "in.wav"] { unlink("\(tmp)/\(f)") }
        rmdir(tmp)
    }

    private func start(_ streams: [SoundStreamConfig], xrunEvents: Bool = false) throws {
        dev = SoundDevice(streams: streams, queueSize: 64, xrunEvents: xrunEvents)
        let idx = loop.executeAndWait { self.host.add(name: "snd0", device: self.dev) }
        drv = try SimDriver(host: host, index: idx, ramSize: 8 << 20)
        try drv.start()
    }
    private func defaultDevice(playback: SoundEndpoint = NullSoundEndpoint(), capture: SoundEndpoint? = NullSoundEndpoint()) throws {
        var s = [SoundStreamConfig(direction: VirtioSnd.dOutput, endpoint: playback)]
        if let capture { s.append(SoundStreamConfig(direction: VirtioSnd.dInput, endpoint: capture)) }
        try start(s)
    }

    // MARK: driver helpers

    private func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    private func put(_ bytes: [UInt8]) -> UInt64 {
        let a = drv.alloc(max(bytes.count, 1))
        bytes.withUnsafeBytes { if $0.count > 0 { drv.host(a).copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
        return a
    }
    private func bytes(_ gpa: UInt64, _ n: Int) -> [UInt8] { Array(UnsafeRawBufferPointer(start: drv.host(gpa), count: n)) }

    /// Sends one control request; returns the status, the payload after it and the used length.
    @discardableResult
    private func ctl(_ req: [UInt8], payload: Int = 0, statusRoom: UInt32 = 4) throws -> (status: UInt32, data: [UInt8], len: UInt32) {
        let r = put(req), st = drv.alloc(8), pl = drv.alloc(max(payload, 1))
        drv.host(st).storeBytes(of: 0xdead_beef, as: UInt32.self)
        var w: [(UInt64, UInt32)] = [(st, statusRoom)]
        if payload > 0 { w.append((pl, UInt32(payload))) }
        let h = try XCTUnwrap(ctlq.addChain(readable: [(r, UInt32(req.count))], writable: statusRoom == 0 ? [] : w))
        ctlq.submit(h)
        let u = try XCTUnwrap(ctlq.waitUsed(timeoutMs: 2000), "control completion")
        ctlq.recycle(u.id)
        return (UInt32(littleEndian: drv.host(st).load(as: UInt32.self)), payload > 0 ? bytes(pl, payload) : [], u.len)
    }
    private func query(_ code: UInt32, start: UInt32, count: UInt32, size: UInt32, room: Int? = nil) throws -> (UInt32, [UInt8]) {
        let r = try ctl(le32(code) + le32(start) + le32(count) + le32(size), payload: room ?? Int(count * size))
        return (r.status, r.data)
    }
    private func setParams(_ sid: UInt32, buffer: UInt32 = 19200, period: UInt32 = 4800, features: UInt32 = 0, channels: UInt8 = 2,
                           format: VirtioSnd.Format = .s16, rate: UInt32 = 48000) throws -> UInt32 {
        let rb = VirtioSnd.rateBit(rate) ?? 99
        return try ctl(le32(VirtioSnd.rPcmSetParams) + le32(sid) + le32(buffer) + le32(period) + le32(features)
                       + [channels, format.rawValue, rb, 0]).status
    }
    private func cmd(_ code: UInt32, _ sid: UInt32) throws -> UInt32 { try ctl(le32(code) + le32(sid)).status }

    /// An I/O message on `q`: header (stream id) readable; playback data readable; capture room writable; status.
    struct IO { var head: UInt16; var data: UInt64; var status: UInt64; var n: Int }
    private func io(_ q: SimQueue, sid: UInt32, playback data: [UInt8] = [], captureRoom: Int = 0, split: Bool = false) throws -> IO {
        let hdr = put(le32(sid)), st = drv.alloc(8)
        drv.host(st).storeBytes(of: 0xffff_ffff, as: UInt32.self)
        var r: [(UInt64, UInt32)] = [(hdr, 4)], w: [(UInt64, UInt32)] = []
        var d: UInt64 = 0
        if !data.isEmpty {
            d = put(data)
            if split && data.count > 3 { r += [(d, 3), (d + 3, UInt32(data.count - 3))] } else { r.append((d, UInt32(data.count))) }
        }
        if captureRoom > 0 {
            d = drv.alloc(captureRoom)
            if split && captureRoom > 5 { w += [(d, 5), (d + 5, UInt32(captureRoom - 5))] } else { w.append((d, UInt32(captureRoom))) }
        }
        w.append((st, 8))
        let h = try XCTUnwrap(q.addChain(readable: r, writable: w))
        return IO(head: h, data: d, status: st, n: max(data.count, captureRoom))
    }
    private func status(_ m: IO) -> (UInt32, UInt32) {
        (UInt32(littleEndian: drv.host(m.status).load(as: UInt32.self)),
         UInt32(littleEndian: drv.host(m.status).load(fromByteOffset: 4, as: UInt32.self)))
    }
    private func pattern(_ n: Int, seed: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ seed &* 7 &+ ($0 >> 8)) } }

    // MARK: control protocol

    func testConfigQueriesJackPcmChmap() throws {
        try defaultDevice()
        XCTAssertEqual(drv.readConfig(offset: 0, count: 12), le32(2) + le32(2) + le32(2))
        XCTAssertEqual(drv.info.features.contains(.version1), true)
        var (st, d) = try query(VirtioSnd.rPcmInfo, start: 0, count: 2, size: 32)
        XCTAssertEqual(st, VirtioSnd.sOK)
        XCTAssertEqual(d[24], VirtioSnd.dOutput); XCTAssertEqual(d[32 + 24], VirtioSnd.dInput)
        XCTAssertEqual(d[25], 1); XCTAssertEqual(d[26], 2)
        let formats = d[8..<16].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        XCTAssertEqual(formats, soundLinearFormats)
        XCTAssertEqual(d[16], 0xff, "all rates offered by null")
        // A larger item size than the structure: the rest is zero, items at the driver's stride.
        (st, d) = try query(VirtioSnd.rPcmInfo, start: 1, count: 1, size: 40)
        XCTAssertEqual(st, VirtioSnd.sOK); XCTAssertEqual(d[24], VirtioSnd.dInput); XCTAssertEqual(Array(d[32..<40]), [0, 0, 0, 0, 0, 0, 0, 0])
        (st, d) = try query(VirtioSnd.rJackInfo, start: 0, count: 2, size: 24)
        XCTAssertEqual(st, VirtioSnd.sOK)
        XCTAssertEqual(Array(d[4..<8]), le32(VirtioSnd.jackFRemap)); XCTAssertEqual(d[16], 1, "connected")
        XCTAssertEqual(Array(d[8..<12]), le32(0x0101_4010)); XCTAssertEqual(Array(d[24 + 8..<24 + 12]), le32(0x0181_3020))
        (st, d) = try query(VirtioSnd.rChmapInfo, start: 0, count: 2, size: 24)
        XCTAssertEqual(st, VirtioSnd.sOK)
        XCTAssertEqual(Array(d[4..<8]), [VirtioSnd.dOutput, 2, VirtioSnd.chmapFL, VirtioSnd.chmapFR])
        XCTAssertEqual(d[24 + 4], VirtioSnd.dInput)
        // JACK_REMAP: association and sequence land in the default configuration.
        XCTAssertEqual(try ctl(le32(VirtioSnd.rJackRemap) + le32(1) + le32(5) + le32(3)).status, VirtioSnd.sOK)
        (_, d) = try query(VirtioSnd.rJackInfo, start: 1, count: 1, size: 24)
        XCTAssertEqual(Array(d[8..<12]), le32(0x0181_3053))
        XCTAssertEqual(try ctl(le32(VirtioSnd.rJackRemap) + le32(2) + le32(5) + le32(3)).status, VirtioSnd.sBadMsg, "no jack 2")
        XCTAssertEqual(try ctl(le32(VirtioSnd.rJackRemap) + le32(0) + le32(16) + le32(3)).status, VirtioSnd.sBadMsg)
    }

    func testHostileControlRequests() throws {
        try defaultDevice()
        let bad: [(String, [UInt8], UInt32)] = [
            ("2-byte request", [1, 0], VirtioSnd.sBadMsg),
            ("unknown code", le32(0x0300), VirtioSnd.sNotSupp),
            ("event code as request", le32(VirtioSnd.evtPcmXrun) + le32(0), VirtioSnd.sNotSupp),
            ("query cut short", le32(VirtioSnd.rPcmInfo) + le32(0) + le32(1), VirtioSnd.sBadMsg),
            ("set params cut short", le32(VirtioSnd.rPcmSetParams) + le32(0) + le32(4800), VirtioSnd.sBadMsg),
            ("prepare without stream id", le32(VirtioSnd.rPcmPrepare), VirtioSnd.sBadMsg),
            ("prepare of stream 2", le32(VirtioSnd.rPcmPrepare) + le32(2), VirtioSnd.sBadMsg),
            ("start of stream 0xffffffff", le32(VirtioSnd.rPcmStart) + le32(0xffff_ffff), VirtioSnd.sBadMsg),
        ]
        for (name, req, want) in bad { XCTAssertEqual(try ctl(req, payload: 64).status, want, name) }
        // Query ranges, item sizes, room for the answer.
        XCTAssertEqual(try query(VirtioSnd.rPcmInfo, start: 1, count: 2, size: 32).0, VirtioSnd.sBadMsg, "past the last stream")
        XCTAssertEqual(try query(VirtioSnd.rPcmInfo, start: 0xffff_ffff, count: 2, size: 32).0, VirtioSnd.sBadMsg, "start + count overflows 32 bits")
        XCTAssertEqual(try query(VirtioSnd.rPcmInfo, start: 0, count: 1, size: 31).0, VirtioSnd.sBadMsg, "item smaller than pcm_info")
        XCTAssertEqual(try query(VirtioSnd.rJackInfo, start: 0, count: 1, size: 1 << 20, room: 64).0, VirtioSnd.sBadMsg, "huge item size")
        XCTAssertEqual(try query(VirtioSnd.rPcmInfo, start: 0, count: 2, size: 32, room: 63).0, VirtioSnd.sBadMsg, "no room for 2 items")
        // No room for a status at all: completed with 0 bytes, nothing written.
        let r = try ctl(le32(VirtioSnd.rPcmInfo) + le32(0) + le32(1) + le32(32), statusRoom: 0)
        XCTAssertEqual(r.len, 0)
        XCTAssertEqual(try ctl(le32(VirtioSnd.rPcmInfo) + le32(0) + le32(1) + le32(32), payload: 0, statusRoom: 3).len, 0)
        // Still healthy; errors counted.
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
        XCTAssertEqual(try query(VirtioSnd.rPcmInfo, start: 0, count: 1, size: 32).0, VirtioSnd.sOK)
        XCTAssertEqual(loop.executeAndWait { self.dev.stats.badControl }, 15)
    }

    func testSetParamsCheckedAgainstTheOffer() throws {
        let wav = try writeWav("in.wav", format: .s16, channels: 1, rate: 8000, data: pattern(1600, seed: 1))
        try defaultDevice(capture: try WavSourceEndpoint(path: wav))
        XCTAssertEqual(try setParams(0, format: .u16), VirtioSnd.sNotSupp, "format not offered")
        XCTAssertEqual(try setParams(0, format: .float64), VirtioSnd.sNotSupp)
        XCTAssertEqual(try ctl(le32(VirtioSnd.rPcmSetParams) + le32(0) + le32(19200) + le32(4800) + le32(0) + [2, 200, 7, 0]).status,
                       VirtioSnd.sNotSupp, "format 200")
        XCTAssertEqual(try ctl(le32(VirtioSnd.rPcmSetParams) + le32(0) + le32(19200) + le32(4800) + le32(0) + [2, 5, 14, 0]).status,
                       VirtioSnd.sNotSupp, "rate index 14")
        XCTAssertEqual(try setParams(0, channels: 0), VirtioSnd.sNotSupp)
        XCTAssertEqual(try setParams(0, channels: 3), VirtioSnd.sNotSupp)
        XCTAssertEqual(try setParams(0, features: 1 << 2), VirtioSnd.sNotSupp, "MSG_POLLING not offered")
        XCTAssertEqual(try setParams(0, features: VirtioSnd.pcmFEvtXruns), VirtioSnd.sNotSupp, "xrun events not offered")
        XCTAssertEqual(try setParams(0, buffer: 0, period: 0), VirtioSnd.sBadMsg)
        XCTAssertEqual(try setParams(0, buffer: 4800, period: 0), VirtioSnd.sBadMsg)
        XCTAssertEqual(try setParams(0, buffer: 4800, period: 9600), VirtioSnd.sBadMsg, "period > buffer")
        XCTAssertEqual(try setParams(0, buffer: 0xffff_fff0, period: 4800), VirtioSnd.sBadMsg, "huge buffer")
        XCTAssertEqual(try setParams(0, buffer: 19200, period: 4802), VirtioSnd.sBadMsg, "period not whole frames")
        XCTAssertEqual(try setParams(2, buffer: 19200, period: 4800), VirtioSnd.sBadMsg, "stream 2")
        // The WAV source offers exactly its file: S16 mono 8 kHz.
        XCTAssertEqual(try setParams(1, buffer: 3200, period: 320, channels: 1, format: .s16, rate: 48000), VirtioSnd.sNotSupp)
        XCTAssertEqual(try setParams(1, buffer: 3200, period: 320, channels: 2, format: .s16, rate: 8000), VirtioSnd.sNotSupp)
        XCTAssertEqual(try setParams(1, buffer: 3200, period: 320, channels: 1, format: .s16, rate: 8000), VirtioSnd.sOK)
        XCTAssertEqual(try setParams(0), VirtioSnd.sOK)
        XCTAssertEqual(loop.executeAndWait { self.dev.streamState(0)?.params }, PcmParams(bufferBytes: 19200, periodBytes: 4800, channels: 2, format: .s16, rate: 48000))
    }

    func testStreamStateMachine() throws {
        try defaultDevice()
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sBadMsg, "prepare before set params")
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sBadMsg)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmRelease, 0), VirtioSnd.sBadMsg)
        XCTAssertEqual(try setParams(0), VirtioSnd.sOK)
        XCTAssertEqual(try setParams(0, period: 9600), VirtioSnd.sOK, "set params again")
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sBadMsg, "start before prepare")
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sOK)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sOK, "prepare again")
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStop, 0), VirtioSnd.sBadMsg, "stop before start")
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sOK)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sBadMsg, "start twice")
        XCTAssertEqual(try setParams(0), VirtioSnd.sBadMsg, "set params while running")
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sBadMsg, "prepare while running")
        XCTAssertEqual(try cmd(VirtioSnd.rPcmRelease, 0), VirtioSnd.sBadMsg, "release while running")
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStop, 0), VirtioSnd.sOK)
        XCTAssertEqual(try setParams(0), VirtioSnd.sBadMsg, "set params while stopped")
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sOK, "resume after stop")
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStop, 0), VirtioSnd.sOK)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmRelease, 0), VirtioSnd.sOK)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sBadMsg, "start after release")
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sOK, "prepare after release (same params)")
        XCTAssertEqual(try setParams(0), VirtioSnd.sOK)
        XCTAssertEqual(loop.executeAndWait { self.dev.streamState(0)?.state }, "set-params")
        XCTAssertEqual(loop.executeAndWait { self.dev.streamState(1)?.state }, "initial", "the other stream untouched")
    }

    // MARK: timing

    func testPlaybackCompletesOnlyAfterItsDurationMeasured() throws {
        let mem = MemorySoundEndpoint(capabilities: NullSoundEndpoint().capabilities)
        try defaultDevice(playback: mem, capture: nil)
        XCTAssertEqual(try setParams(0, buffer: 14400, period: 4800), VirtioSnd.sOK)   // 48 kHz S16 stereo: 25 ms periods
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sOK)
        let data = (0..<3).map { pattern(4800, seed: $0) }
        let msgs = try data.map { try io(txq, sid: 0, playback: $0, split: true) }
        for m in msgs { txq.pushAvail(m.head) }
        txq.publish(); txq.kick()
        usleep(30_000)
        XCTAssertNil(txq.reap(), "nothing completes before START, however long it waits")
        let t0 = lb_now_ns()
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sOK)
        for (k, m) in msgs.enumerated() {
            let u = try XCTUnwrap(txq.waitUsed(timeoutMs: 2000), "completion \(k)")
            let dt = lb_now_ns() - t0
            XCTAssertEqual(u.id, m.head, "in order")
            XCTAssertEqual(u.len, 8, "playback: the status only")
            // The device's clock starts after t0, so the k-th period cannot be back before (k+1) * 25 ms.
            XCTAssertGreaterThanOrEqual(dt, UInt64(k + 1) * 25_000_000, "message \(k) completed after \(dt) ns")
            XCTAssertLessThan(dt, UInt64(k + 1) * 25_000_000 + 1_000_000_000, "message \(k) late")
            XCTAssertEqual(status(m).0, VirtioSnd.sOK)
            XCTAssertEqual(status(m).1, UInt32(4800 * (2 - k)), "latency: the bytes still queued behind it")
        }
        XCTAssertEqual(loop.executeAndWait { mem.bytes }, data.flatMap { $0 })
        XCTAssertEqual(loop.executeAndWait { self.dev.stats.bytesPlayed }, 14400)
    }

    func testFakeClockMovesExactlyTheDueFrames() throws {
        let mem = MemorySoundEndpoint(capabilities: NullSoundEndpoint().capabilities)
        try defaultDevice(playback: mem, capture: nil)
        var fake: UInt64 = 1_000_000_000
        loop.executeAndWait { self.dev.clock = { fake } }
        XCTAssertEqual(try setParams(0, buffer: 9600, period: 4800), VirtioSnd.sOK)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sOK)
        let data = [pattern(4800, seed: 3), pattern(4800, seed: 4)]
        let msgs = try data.map { try io(txq, sid: 0, playback: $0) }
        for m in msgs { txq.pushAvail(m.head) }
        txq.publish(); txq.kick()
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sOK)
        func advance(_ ns: UInt64) -> Int {
            loop.executeAndWait { fake += ns; self.dev.pump(self.dev.streams[0]); return mem.recorded }
        }
        XCTAssertEqual(advance(10_000_000), 1920, "10 ms at 48 kHz S16 stereo = 480 frames")
        XCTAssertNil(txq.reap())
        XCTAssertEqual(advance(14_999_000), 4796, "24.999 ms: 1199 whole frames")
        XCTAssertNil(txq.reap(), "one frame short of the period")
        XCTAssertEqual(advance(1_000), 4800)
        let u = try XCTUnwrap(txq.waitUsed(timeoutMs: 1000))
        XCTAssertEqual(u.id, msgs[0].head)
        XCTAssertEqual(status(msgs[0]).1, 4800, "latency: the second period")
        // STOP freezes the clock: time passing while stopped plays nothing; START resumes where it stopped.
        XCTAssertEqual(advance(5_000_000), 4800 + 960)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStop, 0), VirtioSnd.sOK)
        XCTAssertEqual(advance(100_000_000), 5760)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sOK)
        XCTAssertEqual(advance(20_000_000), 9600)
        XCTAssertEqual(try XCTUnwrap(txq.waitUsed(timeoutMs: 1000)).id, msgs[1].head)
        XCTAssertEqual(loop.executeAndWait { mem.bytes }, data[0] + data[1])
        // Ran dry: the clock stops; a buffer that comes later starts a new timeline and counts as an xrun.
        XCTAssertEqual(advance(50_000_000), 9600)
        let late = try io(txq, sid: 0, playback: pattern(480, seed: 9))
        txq.submit(late.head)
        XCTAssertTrue(waitFor { self.loop.executeAndWait { self.dev.stats.xruns } == 1 })
        XCTAssertEqual(advance(2_500_000), 10080)
        XCTAssertEqual(try XCTUnwrap(txq.waitUsed(timeoutMs: 1000)).id, late.head)
    }

    func testSelfPacedEndpointBackPressureAndLatency() throws {
        let mem = MemorySoundEndpoint(capabilities: NullSoundEndpoint().capabilities, selfPaced: true)
        mem.room = 1000
        mem.delay = 40
        try defaultDevice(playback: mem, capture: nil)
        XCTAssertEqual(try setParams(0, buffer: 1920, period: 480), VirtioSnd.sOK)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sOK)
        let data = (0..<4).map { pattern(480, seed: 10 + $0) }
        let msgs = try data.map { try io(txq, sid: 0, playback: $0) }
        for m in msgs { txq.pushAvail(m.head) }
        txq.publish(); txq.kick()
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sOK)
        for k in 0..<2 {
            XCTAssertEqual(try XCTUnwrap(txq.waitUsed(timeoutMs: 1000)).id, msgs[k].head)
        }
        usleep(20_000)
        XCTAssertNil(txq.reap(), "the endpoint is full: the third message waits")
        XCTAssertEqual(status(msgs[1]).1, UInt32(480 * 2 + 40), "latency at its completion: the 2 messages behind it + the endpoint's delay")
        loop.executeAndWait { mem.room = 10_000 }
        // The half-period timer (at least 1 ms) feeds it again.
        for k in 2..<4 { XCTAssertEqual(try XCTUnwrap(txq.waitUsed(timeoutMs: 1000)).id, msgs[k].head) }
        XCTAssertEqual(loop.executeAndWait { mem.bytes }, data.flatMap { $0 })
    }

    /// Not a timed assertion: measures how late playback completions come (against the stream clock) with the
    /// loop otherwise idle, then while a blk device on the same loop serves random 4 KiB reads at queue depth 16
    /// from another thread, and prints both. Asserts only that every message completed and nothing ran dry (the
    /// driver keeps 8 periods of 5 ms queued, 40 ms).
    func testCompletionLatenessNextToABusyBlkDevice() throws {
        let mem = MemorySoundEndpoint(capabilities: NullSoundEndpoint().capabilities, capacity: 1 << 16)
        try defaultDevice(playback: mem, capture: nil)
        let img = "\(tmp)/disk.img"
        writeTestFile(img, size: 64 << 20, byte: 0x5a)
        defer { unlink(img) }
        let blk = try BlockDevice(path: img, readOnly: true, queues: 1, queueSize: 256)
        let bi = loop.executeAndWait { self.host.add(name: "disk0", device: blk) }
        let bdrv = try SimDriver(host: host, index: bi, ramSize: 16 << 20)
        try bdrv.start()
        let bw = try XCTUnwrap(BlkWorkload(bdrv, verify: false))
        let runner = DepthRunner(q: bw.q, requests: try XCTUnwrap(try bw.depthRequests(depth: 16, size: 4096)))
        XCTAssertEqual(try setParams(0, buffer: 7680, period: 960), VirtioSnd.sOK)    // 5 ms periods
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sOK)
        let msgs = try (0..<8).map { k in try io(txq, sid: 0, playback: pattern(960, seed: k)) }
        for m in msgs { txq.pushAvail(m.head) }
        txq.publish(); txq.kick()
        let t0 = lb_now_ns()
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sOK)
        var k: UInt64 = 0
        func phase(_ seconds: UInt64) -> [UInt64] {
            var late: [UInt64] = []
            let end = lb_now_ns() + seconds * 1_000_000_000
            while lb_now_ns() < end {
                guard let u = txq.waitUsed(timeoutMs: 2000) else { break }
                k += 1
                let now = lb_now_ns(), due = t0 + k * 5_000_000
                late.append(now > due ? now - due : 0)
                txq.submit(u.id)
            }
            return late.sorted()
        }
        func report(_ name: String, _ l: [UInt64]) {
            guard !l.isEmpty else { return }
            let us = { (v: UInt64) in String(Double(v) / 1000) }
            print("sound completion lateness, \(name): \(l.count) periods, p50 \(us(l[l.count / 2])) µs, p99 \(us(l[l.count * 99 / 100])) µs, max \(us(l[l.count - 1])) µs")
        }
        let quiet = phase(1)
        let busy = SoundBusyFlag(), box = SoundUnchecked(runner)
        let th = Thread.spawn {
            while busy.on.load(ordering: .acquiring) { _ = box.value.run(count: 0, deadlineNs: lb_now_ns() + 100_000_000, spinNs: 0) }
        }
        let loaded = phase(2)
        busy.on.store(false, ordering: .releasing)
        th.join()
        report("idle loop", quiet)
        report("blk random reads at depth 16 on the same loop", loaded)
        print("blk requests meanwhile: \(runner.completed), errors \(runner.errors); sound xruns: \(loop.executeAndWait { self.dev.stats.xruns })")
        XCTAssertGreaterThan(quiet.count, 100)
        XCTAssertGreaterThan(loaded.count, 200)
        XCTAssertGreaterThan(runner.completed, 1000, "the blk device was busy")
        XCTAssertLessThan(loaded.last ?? 0, 1_000_000_000, "a completion over a second late: the stream stalled")
    }

    // MARK: WAV files

    private func writeWav(_ name: String, format: VirtioSnd.Format, channels: UInt8, rate: UInt32, data: [UInt8]) throws -> String {
        let path = "\(tmp)/\(name)"
        let h = Wav.header(PcmParams(bufferBytes: 0, periodBytes: 0, channels: channels, format: format, rate: rate), dataBytes: UInt32(data.count))
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        let all = h + data
        XCTAssertEqual(all.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }, all.count)
        return path
    }
    private func readFile(_ path: String) -> [UInt8] {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        var out: [UInt8] = [], buf = [UInt8](repeating: 0, count: 65536)
        while true { let n = read(fd, &buf, buf.count); if n <= 0 { break }; out += buf[0..<n] }
        return out
    }

    func testWavSinkIsByteExact() throws {
        let path = "\(tmp)/out.wav"
        try defaultDevice(playback: WavSinkEndpoint(path: path), capture: nil)
        XCTAssertEqual(try setParams(0, buffer: 3840, period: 960, channels: 2, format: .s16, rate: 48000), VirtioSnd.sOK)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sOK)
        var played: [UInt8] = []
        for round in 0..<2 {
            let data = (0..<5).map { pattern(960, seed: 20 + $0 + 5 * round) }
            played += data.flatMap { $0 }
            let msgs = try data.map { try io(txq, sid: 0, playback: $0, split: true) }
            for m in msgs { txq.pushAvail(m.head) }
            txq.publish(); txq.kick()
            if round == 0 { XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sOK) }
            for m in msgs { XCTAssertEqual(try XCTUnwrap(txq.waitUsed(timeoutMs: 2000)).id, m.head); txq.recycle(m.head) }
        }
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStop, 0), VirtioSnd.sOK)
        var file = readFile(path)
        let expectHeader: [UInt8] = Array("RIFF".utf8) + le32(36 + 9600) + Array("WAVEfmt ".utf8) + le32(16) + [1, 0, 2, 0]
            + le32(48000) + le32(192000) + [4, 0, 16, 0] + Array("data".utf8) + le32(9600)
        XCTAssertEqual(Array(file.prefix(44)), expectHeader, "header fixed up at STOP")
        XCTAssertEqual(Array(file.dropFirst(44)), played)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmRelease, 0), VirtioSnd.sOK)
        // Same parameters again: the next session appends; new parameters start a new file.
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sOK)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sOK)
        let more = pattern(480, seed: 77)
        let m = try io(txq, sid: 0, playback: more)
        txq.submit(m.head)
        XCTAssertEqual(try XCTUnwrap(txq.waitUsed(timeoutMs: 2000)).id, m.head)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStop, 0), VirtioSnd.sOK)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmRelease, 0), VirtioSnd.sOK)
        file = readFile(path)
        XCTAssertEqual(Array(file[40..<44]), le32(10080))
        XCTAssertEqual(Array(file.dropFirst(44)), played + more)
        XCTAssertEqual(try setParams(0, buffer: 960, period: 480, channels: 1, format: .s32, rate: 8000), VirtioSnd.sOK)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sOK)
        file = readFile(path)
        XCTAssertEqual(file.count, 44)
        XCTAssertEqual(Array(file[20..<36]), [1, 0, 1, 0] + le32(8000) + le32(32000) + [4, 0, 32, 0])
    }

    func testCaptureFromWavSourceByteExactThenSilence() throws {
        let src = pattern(800, seed: 5)   // 400 frames of S16 mono at 8 kHz = 50 ms
        let wav = try writeWav("in.wav", format: .s16, channels: 1, rate: 8000, data: src)
        try start([SoundStreamConfig(direction: VirtioSnd.dInput, endpoint: try WavSourceEndpoint(path: wav))])
        var (st, d) = try query(VirtioSnd.rPcmInfo, start: 0, count: 1, size: 32)
        XCTAssertEqual(st, VirtioSnd.sOK)
        XCTAssertEqual(Array(d[8..<16]), withUnsafeBytes(of: VirtioSnd.Format.s16.bit.littleEndian) { Array($0) })
        XCTAssertEqual(Array(d[16..<24]), withUnsafeBytes(of: (UInt64(1) << 1).littleEndian) { Array($0) }, "8 kHz only")
        XCTAssertEqual(Array(d[24..<27]), [VirtioSnd.dInput, 1, 1])
        (st, d) = try query(VirtioSnd.rChmapInfo, start: 0, count: 1, size: 24)
        XCTAssertEqual(Array(d[4..<7]), [VirtioSnd.dInput, 1, VirtioSnd.chmapMono])
        XCTAssertEqual(try setParams(0, buffer: 1200, period: 300, channels: 1, format: .s16, rate: 8000), VirtioSnd.sOK)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sOK)
        let msgs = try (0..<4).map { _ in try io(rxq, sid: 0, captureRoom: 300, split: true) }
        for m in msgs { rxq.pushAvail(m.head) }
        rxq.publish(); rxq.kick()
        let t0 = lb_now_ns()
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sOK)
        var got: [UInt8] = []
        for (k, m) in msgs.enumerated() {
            let u = try XCTUnwrap(rxq.waitUsed(timeoutMs: 2000))
            XCTAssertEqual(u.id, m.head)
            XCTAssertEqual(u.len, 308, "captured bytes + status")
            XCTAssertGreaterThanOrEqual(lb_now_ns() - t0, UInt64(k + 1) * 18_750_000, "150 frames at 8 kHz each")
            XCTAssertEqual(status(m).0, VirtioSnd.sOK)
            got += bytes(m.data, 300)
        }
        XCTAssertEqual(Array(got.prefix(800)), src, "the file's samples, in order")
        XCTAssertEqual(Array(got.dropFirst(800)), [UInt8](repeating: 0, count: 400), "then silence")
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStop, 0), VirtioSnd.sOK)
        // RELEASE returns what is held (capture: the status and nothing captured).
        let m = try io(rxq, sid: 0, captureRoom: 300)
        rxq.submit(m.head)
        usleep(20_000)
        XCTAssertNil(rxq.reap())
        XCTAssertEqual(try cmd(VirtioSnd.rPcmRelease, 0), VirtioSnd.sOK)
        XCTAssertEqual(try XCTUnwrap(rxq.waitUsed(timeoutMs: 1000)).len, 8)
    }

    func testWavSourceRejectsWhatItCannotPlay() throws {
        let fd = open("\(tmp)/in.wav", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        _ = "not a wav file at all".withCString { write(fd, $0, 20) }
        close(fd)
        XCTAssertThrowsError(try WavSourceEndpoint(path: "\(tmp)/in.wav"))
        _ = try writeWav("in.wav", format: .s16, channels: 2, rate: 12345, data: [0, 0, 0, 0])
        XCTAssertThrowsError(try WavSourceEndpoint(path: "\(tmp)/in.wav"), "a rate virtio does not name")
        XCTAssertThrowsError(try WavSourceEndpoint(path: "\(tmp)/nonexistent.wav"))
    }

    // MARK: hostile I/O

    func testHostileIOMessagesAreAnsweredNotTrusted() throws {
        try defaultDevice()
        func expectBad(_ m: IO, _ q: SimQueue, _ what: String) throws {
            q.submit(m.head)
            let u = try XCTUnwrap(q.waitUsed(timeoutMs: 1000), what)
            XCTAssertEqual(u.len, 8, what)
            XCTAssertEqual(status(m).0, VirtioSnd.sBadMsg, what)
            q.recycle(u.id)
        }
        try expectBad(io(txq, sid: 0, playback: pattern(480, seed: 1)), txq, "stream not prepared")
        XCTAssertEqual(try setParams(0), VirtioSnd.sOK)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sOK)
        try expectBad(io(txq, sid: 7, playback: pattern(480, seed: 1)), txq, "unknown stream")
        try expectBad(io(txq, sid: 1, playback: pattern(480, seed: 1)), txq, "capture stream on the tx queue")
        try expectBad(io(rxq, sid: 0, captureRoom: 480), rxq, "playback stream on the rx queue")
        // A 2-byte header.
        let hdr = put([0, 0]), st = drv.alloc(8)
        let h = try XCTUnwrap(txq.addChain(readable: [(hdr, 2)], writable: [(st, 8)]))
        txq.submit(h)
        XCTAssertEqual(try XCTUnwrap(txq.waitUsed(timeoutMs: 1000)).len, 8)
        XCTAssertEqual(UInt32(littleEndian: drv.host(st).load(as: UInt32.self)), VirtioSnd.sBadMsg)
        txq.recycle(h)
        // No room for a status: completed empty.
        let h2 = try XCTUnwrap(txq.addChain(readable: [(put(le32(0)), 4), (put(pattern(16, seed: 0)), 16)], writable: [(drv.alloc(8), 7)]))
        txq.submit(h2)
        XCTAssertEqual(try XCTUnwrap(txq.waitUsed(timeoutMs: 1000)).len, 0)
        txq.recycle(h2)
        // A playback message with only the header (no frames) completes once the stream runs; status OK.
        let empty = try io(txq, sid: 0)
        txq.submit(empty.head)
        usleep(10_000)
        XCTAssertNil(txq.reap(), "held while prepared")
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sOK)
        XCTAssertEqual(try XCTUnwrap(txq.waitUsed(timeoutMs: 1000)).id, empty.head)
        XCTAssertEqual(status(empty).0, VirtioSnd.sOK)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0, "nothing latched")
        XCTAssertEqual(loop.executeAndWait { self.dev.stats.badIO }, 6)
        // Reset while a message is held: forgotten, not completed; the device starts over.
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStop, 0), VirtioSnd.sOK)
        txq.submit(try io(txq, sid: 0, playback: pattern(480, seed: 2)).head)
        XCTAssertTrue(waitFor { self.loop.executeAndWait { self.dev.streamState(0)?.held } == 1 })
        drv.reset()
        XCTAssertEqual(loop.executeAndWait { self.dev.streamState(0)?.state }, "initial")
        XCTAssertEqual(loop.executeAndWait { self.dev.streamState(0)?.held }, 0)
        try drv.start()
        XCTAssertEqual(try setParams(0), VirtioSnd.sOK)
    }

    func testXrunEventWhenTheDriverAskedForIt() throws {
        dev = nil
        try start([SoundStreamConfig(direction: VirtioSnd.dOutput, endpoint: NullSoundEndpoint())], xrunEvents: true)
        let (_, d) = try query(VirtioSnd.rPcmInfo, start: 0, count: 1, size: 32)
        XCTAssertEqual(Array(d[4..<8]), le32(VirtioSnd.pcmFEvtXruns))
        let ev = drv.alloc(8)
        evq.submit(try XCTUnwrap(evq.addChain(readable: [], writable: [(ev, 8)])))
        XCTAssertEqual(try setParams(0, buffer: 1920, period: 480, features: VirtioSnd.pcmFEvtXruns), VirtioSnd.sOK)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmPrepare, 0), VirtioSnd.sOK)
        XCTAssertEqual(try cmd(VirtioSnd.rPcmStart, 0), VirtioSnd.sOK)
        let a = try io(txq, sid: 0, playback: pattern(480, seed: 1))   // 2.5 ms
        txq.submit(a.head)
        XCTAssertEqual(try XCTUnwrap(txq.waitUsed(timeoutMs: 1000)).id, a.head)
        XCTAssertNil(evq.reap(), "running dry at the end is not an xrun by itself")
        usleep(20_000)
        let b = try io(txq, sid: 0, playback: pattern(480, seed: 2))
        txq.submit(b.head)
        let u = try XCTUnwrap(evq.waitUsed(timeoutMs: 1000), "XRUN event")
        XCTAssertEqual(u.len, 8)
        XCTAssertEqual(bytes(ev, 8), le32(VirtioSnd.evtPcmXrun) + le32(0))
        XCTAssertEqual(loop.executeAndWait { self.dev.stats.xruns }, 1)
        XCTAssertEqual(try XCTUnwrap(txq.waitUsed(timeoutMs: 1000)).id, b.head)
    }

    func testWorkloadRoundTrips() throws {
        try defaultDevice()
        let w = try XCTUnwrap(SoundWorkload(drv))
        for _ in 0..<200 { XCTAssertTrue(w.runOne(spinNs: 0)) }
    }

    /// ab's stream phase: every period's message completes, none before its due time on the stream clock (the
    /// clock starts when the device handles START, after the driver submitted it), all OK; a second run after
    /// RELEASE (SET_PARAMS again) works on the same chains; the device counted no xrun and no bad request.
    func testWorkloadStreamCompletesEveryPeriodNotBeforeItIsDue() throws {
        try defaultDevice()
        let w = try XCTUnwrap(SoundWorkload(drv))
        for run in 0..<2 {
            let r = w.stream(periods: 40, periodFrames: 240, queued: 4)
            XCTAssertEqual(r.errors, 0, "run \(run)")
            XCTAssertEqual(r.lateness.count, 40, "run \(run)")
            XCTAssertEqual(r.jitter.count, 39, "run \(run)")
            XCTAssertGreaterThanOrEqual(r.lateness.min() ?? -1, 0, "run \(run): a message completed before its last frame was due")
            print("stream run \(run): lateness min \(r.lateness.min()!) ns, max \(r.lateness.max()!) ns")
        }
        let st = loop.executeAndWait { self.dev.stats }
        XCTAssertEqual(st.xruns, 0)
        XCTAssertEqual(st.badIO, 0)
        XCTAssertEqual(st.badControl, 0)
        XCTAssertEqual(st.bytesPlayed, 2 * 40 * 960)
        XCTAssertEqual(loop.executeAndWait { self.dev.streamState(0)?.state }, "released")
    }

    // MARK: configuration

    private func parse(_ text: String) throws(ConfigError) -> DaemonConfig {
        try DaemonConfig.parse(TOML.parse(text, file: "t.conf"))
    }

    func testConfigKeysAndErrors() throws {
        let c = try parse("[device.snd0]\ntype = \"sound\"\nplayback = \"wav:/tmp/x.wav\"\ncapture = \"null\"\nchannels = 4\nqueue-size = 128\n")
        XCTAssertEqual(c.devices[0].shape, DeviceShape(deviceID: 25, queueSizes: [128, 128, 128, 128], configSize: 12))
        let f = try parse("[device.snd0]\ntype = \"sound\"\nbackend = \"vhost-user:/run/snd.sock\"\nqueues = 4\n")
        XCTAssertEqual(f.devices[0].shape.queueSizes.count, 4)
        func fails(_ text: String, line: Int, _ needle: String, file: StaticString = #filePath, l: UInt = #line) {
            do { _ = try parse(text); XCTFail("accepted", file: file, line: l) } catch {
                XCTAssertEqual(error.line, line, "\(error)", file: file, line: l)
                XCTAssertTrue("\(error)".contains(needle), "\(error)", file: file, line: l)
            }
        }
        fails("[device.s]\ntype = \"sound\"\n", line: 1, "playback")
        fails("[device.s]\ntype = \"sound\"\nplayback = \"pulse\"\n", line: 3, "unknown endpoint")
        fails("[device.s]\ntype = \"sound\"\nplayback = \"wav:relative.wav\"\n", line: 3, "absolute")
        fails("[device.s]\ntype = \"sound\"\ncapture = \"hw:0\"\n", line: 3, "hw:CARD,DEV")
        fails("[device.s]\ntype = \"sound\"\nplayback = \"null\"\nchannels = 9\n", line: 4, "channels")
        fails("[device.s]\ntype = \"sound\"\nplayback = \"null\"\nqueue-size = 100\n", line: 4, "power of two")
        fails("[device.s]\ntype = \"sound\"\nplayback = \"null\"\nqueues = 4\n", line: 4, "forwarded")
        fails("[device.s]\ntype = \"sound\"\nplayback = \"wav:/a.wav\"\ncapture = \"wav:/a.wav\"\n", line: 4, "playback file")
        fails("[device.s]\ntype = \"sound\"\nbackend = \"vhost-user:/s\"\nplayback = \"null\"\n", line: 4, "back-end")
    }

    private func waitFor(_ cond: () -> Bool) -> Bool {
        for _ in 0..<200 { if cond() { return true }; usleep(5_000) }
        return cond()
    }
}

final class SoundBusyFlag: Sendable { let on = Atomic<Bool>(true) }
struct SoundUnchecked<T>: @unchecked Sendable { let value: T; init(_ v: T) { value = v } }
