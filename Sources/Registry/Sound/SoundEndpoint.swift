import Glibc
import Transport

/// The host side of one PCM stream: where played frames go, where captured frames come from. Real ones: `null`
/// (discards / silence), a WAV file sink or source, an ALSA hardware PCM (`AlsaPcmEndpoint`); the fake one
/// (`MemorySoundEndpoint`) records and replays bytes in memory for the unit tests. All calls run on the loop thread;
/// `play`/`capture` are the per-I/O path and must not allocate.
public protocol SoundEndpoint: AnyObject {
    var description: String { get }
    /// What PCM_INFO offers for this stream (formats, rates, channels).
    var capabilities: PcmCapabilities { get }
    /// True if the endpoint runs on its own clock (hardware): the device pumps it every half period (not only when
    /// a message is due), lets it take less than offered (back-pressure) and reads `delayBytes` for the latency.
    var selfPaced: Bool { get }
    /// Bytes the device may move beyond what its clock says is due: 0 for clock-paced endpoints; a card asks for
    /// some when its queue runs low (clock drift), and capture takes whatever the card has.
    var readAheadBytes: Int { get }
    /// PREPARE with the stream's parameters (open or reconfigure); false fails the request (IO_ERR).
    func prepare(_ p: PcmParams) -> Bool
    /// START / STOP (pause) / RELEASE.
    func start()
    func stop()
    func release()
    /// Playback: takes up to `n` bytes of frames; returns how many it took (a clock-paced endpoint takes all).
    func play(_ p: UnsafeRawPointer, _ n: Int) -> Int
    /// Capture: writes up to `n` bytes of frames; returns how many it produced.
    func capture(_ p: UnsafeMutableRawPointer, _ n: Int) -> Int
    /// Bytes handed to the endpoint and not yet played (playback) / captured and not yet read (capture).
    var delayBytes: Int { get }
    /// Underruns/overruns the endpoint saw itself (hardware xruns), recovered.
    var xruns: UInt64 { get }
    /// Make what was played durable (WAV header, fdatasync): SIGTERM, reset.
    func flush()
}

extension SoundEndpoint {
    public var selfPaced: Bool { false }
    public var readAheadBytes: Int { 0 }
    public var delayBytes: Int { 0 }
    public var xruns: UInt64 { 0 }
    public func start() {}
    public func stop() {}
    public func flush() {}
}

/// Formats the null endpoint and the WAV sink take: the integer PCM formats WAV stores as they are in memory
/// (unsigned 8, signed little-endian 16, 24 in 3 bytes, 32) and 32-bit float.
public let soundLinearFormats: UInt64 = VirtioSnd.Format.u8.bit | VirtioSnd.Format.s16.bit | VirtioSnd.Format.s24_3.bit
    | VirtioSnd.Format.s32.bit | VirtioSnd.Format.float.bit

/// `null`: playback frames are discarded, capture buffers are filled with silence, both at the stream rate.
public final class NullSoundEndpoint: SoundEndpoint {
    public let capabilities: PcmCapabilities
    private var silence: UInt8 = 0
    public private(set) var played: UInt64 = 0
    public init(channelsMax: UInt8 = 2) {
        capabilities = PcmCapabilities(formats: soundLinearFormats, rates: PcmCapabilities.allRates, channelsMin: 1,
                                       channelsMax: channelsMax)
    }
    public var description: String { "null" }
    public func prepare(_ p: PcmParams) -> Bool { silence = p.format.silenceByte; return true }
    public func release() {}
    public func play(_ p: UnsafeRawPointer, _ n: Int) -> Int { played &+= UInt64(n); return n }
    public func capture(_ p: UnsafeMutableRawPointer, _ n: Int) -> Int { p.initializeMemory(as: UInt8.self, repeating: silence, count: n); return n }
}

/// The canonical 44-byte WAV header: RIFF/WAVE, a 16-byte `fmt ` chunk (PCM 1 or IEEE float 3), `data`.
enum Wav {
    static let headerSize = 44
    static func header(_ p: PcmParams, dataBytes: UInt32) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: headerSize)
        func put32(_ v: UInt32, _ o: Int) { for i in 0..<4 { h[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) } }
        func put16(_ v: UInt16, _ o: Int) { h[o] = UInt8(v & 0xff); h[o + 1] = UInt8(v >> 8) }
        h.replaceSubrange(0..<4, with: Array("RIFF".utf8)); put32(36 &+ dataBytes, 4)
        h.replaceSubrange(8..<16, with: Array("WAVEfmt ".utf8)); put32(16, 16)
        put16(p.format == .float ? 3 : 1, 20)
        put16(UInt16(p.channels), 22)
        put32(p.rate, 24)
        put32(UInt32(p.bytesPerSecond), 28)
        put16(UInt16(p.frameBytes), 32)
        put16(UInt16(p.format.bytes * 8), 34)
        h.replaceSubrange(36..<40, with: Array("data".utf8)); put32(dataBytes, 40)
        return h
    }

    /// Reads a WAV file's format and where its samples are: PCM (8 unsigned, 16, 24 in 3 bytes, 32 bits) or IEEE
    /// float 32, plain or WAVE_FORMAT_EXTENSIBLE with those subformats; a rate virtio names; 1-18 channels.
    static func parse(fd: Int32) -> Result<(params: PcmParams, dataOffset: Int64, dataBytes: Int64), DeviceError> {
        var head = [UInt8](repeating: 0, count: 12)
        let got = head.withUnsafeMutableBytes { (try? FD.pread(fd, $0.baseAddress!, 12, 0)) ?? false }
        guard got, Array(head[0..<4]) == Array("RIFF".utf8), Array(head[8..<12]) == Array("WAVE".utf8) else {
            return .failure(DeviceError("not a RIFF/WAVE file"))
        }
        var off: Int64 = 12
        var fmt: (tag: UInt16, channels: UInt16, rate: UInt32, bits: UInt16, sub: UInt16)?
        var chunk = [UInt8](repeating: 0, count: 40)
        for _ in 0..<64 {
            let ok = chunk.withUnsafeMutableBytes { (try? FD.pread(fd, $0.baseAddress!, 8, off)) ?? false }
            guard ok else { break }
            let id = String(decoding: chunk[0..<4], as: UTF8.self)
            let size = Int64(UInt32(chunk[4]) | UInt32(chunk[5]) << 8 | UInt32(chunk[6]) << 16 | UInt32(chunk[7]) << 24)
            if id == "fmt " {
                guard size >= 16 else { return .failure(DeviceError("fmt chunk shorter than 16 bytes")) }
                let n = Int(min(size, 40))
                let ok2 = chunk.withUnsafeMutableBytes { (try? FD.pread(fd, $0.baseAddress!, n, off + 8)) ?? false }
                guard ok2 else { return .failure(DeviceError("fmt chunk cut short")) }
                func u16(_ o: Int) -> UInt16 { UInt16(chunk[o]) | UInt16(chunk[o + 1]) << 8 }
                func u32(_ o: Int) -> UInt32 { UInt32(u16(o)) | UInt32(u16(o + 2)) << 16 }
                fmt = (u16(0), u16(2), u32(4), u16(14), n >= 26 ? u16(24) : 0)
            } else if id == "data" {
                guard let f = fmt else { return .failure(DeviceError("data chunk before the fmt chunk")) }
                let tag = f.tag == 0xfffe ? f.sub : f.tag
                let format: VirtioSnd.Format
                switch (tag, f.bits) {
                case (1, 8): format = .u8
                case (1, 16): format = .s16
                case (1, 24): format = .s24_3
                case (1, 32): format = .s32
                case (3, 32): format = .float
                default: return .failure(DeviceError("unsupported sample format (tag \(f.tag), \(f.bits) bits)"))
                }
                guard VirtioSnd.rateBit(f.rate) != nil else { return .failure(DeviceError("rate \(f.rate) Hz is not one virtio names")) }
                guard (1...VirtioSnd.chmapMaxSize).contains(Int(f.channels)) else { return .failure(DeviceError("\(f.channels) channels")) }
                let p = PcmParams(bufferBytes: 0, periodBytes: 0, channels: UInt8(f.channels), format: format, rate: f.rate)
                var st = stat()
                let fileSize = fstat(fd, &st) == 0 ? Int64(st.st_size) : off + 8 + size
                return .success((p, off + 8, max(0, min(size, fileSize - off - 8))))
            }
            off += 8 + size + (size & 1)
        }
        return .failure(DeviceError("no data chunk"))
    }
}

/// `wav:/path` for playback: what the driver plays is appended to a WAV file. The file is (re)created at the first
/// PREPARE and whenever the parameters change; a later session with the same parameters appends. The header's
/// sizes are fixed up at STOP, RELEASE and flush, so the file is a valid WAV whenever the stream is not running.
public final class WavSinkEndpoint: SoundEndpoint {
    public let path: String
    public let capabilities: PcmCapabilities
    private var fd: Int32 = -1
    private var params: PcmParams?
    public private(set) var dataBytes: UInt64 = 0
    private var writeErrors: UInt64 = 0
    public init(path: String, channelsMax: UInt8 = 2) {
        self.path = path
        capabilities = PcmCapabilities(formats: soundLinearFormats, rates: PcmCapabilities.allRates, channelsMin: 1,
                                       channelsMax: channelsMax)
    }
    deinit { fixup(); if fd >= 0 { Glibc.close(fd) } }
    public var description: String { "wav:\(path)" }

    public func prepare(_ p: PcmParams) -> Bool {
        var shape = p
        shape.bufferBytes = 0; shape.periodBytes = 0; shape.features = 0
        if fd >= 0, params == shape { return true }
        if fd >= 0 { fixup(); Glibc.close(fd); fd = -1 }
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { Log.error("sound: cannot create \(path): \(Errno.current)"); return false }
        params = shape
        dataBytes = 0
        let h = Wav.header(shape, dataBytes: 0)
        let n = h.withUnsafeBytes { b in pwrite(fd, b.baseAddress!, b.count, 0) }
        guard n == Wav.headerSize else {
            Log.error("sound: cannot write \(path): \(Errno.current)")
            return false
        }
        return true
    }
    public func stop() { fixup() }
    public func release() { fixup() }
    public func flush() { fixup(); if fd >= 0 { _ = fdatasync(fd) } }

    public func play(_ p: UnsafeRawPointer, _ n: Int) -> Int {
        guard fd >= 0 else { return n }
        var done = 0
        while done < n {
            let k = pwrite(fd, p + done, n - done, off_t(Wav.headerSize) + off_t(dataBytes) + off_t(done))
            if k < 0 && errno == EINTR { continue }
            if k <= 0 {
                writeErrors &+= 1
                if writeErrors == 1 { Log.error("sound: writing \(path) failed: \(Errno.current); frames dropped") }
                break
            }
            done += k
        }
        dataBytes &+= UInt64(done)
        return n
    }
    public func capture(_ p: UnsafeMutableRawPointer, _ n: Int) -> Int { 0 }

    /// Writes the RIFF and data sizes (capped at 4 GiB, the format's limit).
    private func fixup() {
        guard fd >= 0 else { return }
        let d = UInt32(min(dataBytes, UInt64(UInt32.max) - 36))
        var riff = (36 &+ d).littleEndian, data = d.littleEndian
        _ = withUnsafeBytes(of: &riff) { pwrite(fd, $0.baseAddress, 4, 4) }
        _ = withUnsafeBytes(of: &data) { pwrite(fd, $0.baseAddress, 4, 40) }
    }
}

/// `wav:/path` for capture: the file's samples are what the driver captures, at the stream rate; the stream offers
/// exactly the file's format, rate and channel count. After the end of the data: silence (`loop`: from the start).
public final class WavSourceEndpoint: SoundEndpoint {
    public let path: String
    public let capabilities: PcmCapabilities
    public let fileParams: PcmParams
    private let fd: Int32
    private let dataOffset: Int64
    public let dataBytes: Int64
    private var position: Int64 = 0
    private let loops: Bool
    private var silence: UInt8
    public init(path: String, loop: Bool = false) throws(DeviceError) {
        self.path = path
        fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw DeviceError("cannot open \(path): \(Errno.current)") }
        switch Wav.parse(fd: fd) {
        case .failure(let e): Glibc.close(fd); throw DeviceError("\(path): \(e)")
        case .success(let (p, off, n)):
            fileParams = p; dataOffset = off; dataBytes = n - n % Int64(p.frameBytes)
        }
        loops = loop
        silence = fileParams.format.silenceByte
        capabilities = PcmCapabilities(formats: fileParams.format.bit, rates: 1 << UInt64(VirtioSnd.rateBit(fileParams.rate)!),
                                       channelsMin: fileParams.channels, channelsMax: fileParams.channels)
    }
    deinit { Glibc.close(fd) }
    public var description: String { "wav:\(path)" }
    /// A new session (PREPARE after RELEASE or new parameters) reads from the start of the data again.
    public func prepare(_ p: PcmParams) -> Bool { return true }
    public func release() { position = 0 }
    public func play(_ p: UnsafeRawPointer, _ n: Int) -> Int { n }

    public func capture(_ p: UnsafeMutableRawPointer, _ n: Int) -> Int {
        var done = 0
        while done < n {
            if position >= dataBytes {
                if loops && dataBytes > 0 { position = 0; continue }
                (p + done).initializeMemory(as: UInt8.self, repeating: silence, count: n - done)
                return n
            }
            let want = Int(min(Int64(n - done), dataBytes - position))
            let k = pread(fd, p + done, want, off_t(dataOffset + position))
            if k < 0 && errno == EINTR { continue }
            if k <= 0 { position = dataBytes; continue }
            done += k
            position += Int64(k)
        }
        return n
    }
}

/// The fake endpoint of the unit tests: playback bytes are recorded in a preallocated buffer, capture bytes come
/// from a given pattern (repeated). `room` (when set) makes it self-paced like hardware: it takes at most that
/// many bytes until the test frees more, and reports `delay`.
public final class MemorySoundEndpoint: SoundEndpoint {
    public let capabilities: PcmCapabilities
    public let selfPaced: Bool
    private let store: UnsafeMutableRawBufferPointer
    public private(set) var recorded = 0
    public var pattern: [UInt8]
    private var patternAt = 0
    public var room = Int.max
    public var delay = 0
    /// Self-paced: take what the room allows, whatever the clock says.
    public var readAheadBytes: Int { selfPaced ? 1 << 30 : 0 }
    public private(set) var events: [String] = []
    public init(capabilities: PcmCapabilities, selfPaced: Bool = false, capacity: Int = 1 << 20, pattern: [UInt8] = [0]) {
        self.capabilities = capabilities
        self.selfPaced = selfPaced
        store = .allocate(byteCount: capacity, alignment: 16)
        self.pattern = pattern
    }
    deinit { store.deallocate() }
    public var description: String { "memory" }
    public var bytes: [UInt8] { Array(store[0..<recorded]) }
    public func prepare(_ p: PcmParams) -> Bool { events.append("prepare"); return true }
    public func start() { events.append("start") }
    public func stop() { events.append("stop") }
    public func release() { events.append("release") }
    public var delayBytes: Int { delay }
    public func play(_ p: UnsafeRawPointer, _ n: Int) -> Int {
        let k = min(n, room, store.count - recorded)
        if k > 0 { (store.baseAddress! + recorded).copyMemory(from: p, byteCount: k) }
        recorded += k
        if room != Int.max { room -= k }
        return selfPaced ? k : n
    }
    public func capture(_ p: UnsafeMutableRawPointer, _ n: Int) -> Int {
        let k = min(n, room)
        for i in 0..<k { p.storeBytes(of: pattern[patternAt], toByteOffset: i, as: UInt8.self); patternAt = (patternAt + 1) % pattern.count }
        if room != Int.max { room -= k }
        return k
    }
}
