import Glibc
import CLinux
import Transport

/// `hw:CARD,DEV`: an ALSA hardware PCM through the kernel's PCM interface (`/dev/snd/pcmC<CARD>D<DEV>p|c`, the
/// SNDRV_PCM_IOCTL_* calls in `Sources/CLinux/alsapcm.c`; no alsa-lib). The node is opened non-blocking at start
/// and kept; what it accepts (formats, rates, channels: HW_REFINE) is what the stream offers. The endpoint runs
/// on the card's clock (`selfPaced`: pumped every half period, non-blocking WRITEI/READI). Playback frames are
/// read from the driver's buffers when the stream clock says they are due, never earlier (Linux 6.1 queues every
/// period at START, before the application has written them), except for at most one period when the card's
/// queue runs below one period (the card's crystal and CLOCK_MONOTONIC drift apart); the card starts once two
/// periods are queued, so it plays about two periods behind the stream clock, and a message completes when the
/// card has taken its frames. Capture completes messages with what the card delivered. The latency reported is
/// the card's DELAY plus what is still queued. Xruns (EPIPE) are recovered at once
/// (PREPARE, and START for capture), counted and logged once. A frame split across two of the driver's buffer
/// segments goes through a one-frame carry.
public final class AlsaPcmEndpoint: SoundEndpoint {
    public let card: Int, device: Int, playback: Bool
    public let capabilities: PcmCapabilities
    public let selfPaced = true
    private let fd: Int32
    private var frameBytes = 0
    private var periodFrames: UInt32 = 0
    private let carry: UnsafeMutableRawPointer
    private var carryLen = 0
    public private(set) var xruns: UInt64 = 0
    private var ioErrors: UInt64 = 0
    private var prepared = false

    public init(card: Int, device: Int, playback: Bool) throws(DeviceError) {
        self.card = card; self.device = device; self.playback = playback
        let r = lb_alsa_open(Int32(card), Int32(device), playback ? 1 : 0)
        guard r >= 0 else {
            throw DeviceError("hw:\(card),\(device): cannot open /dev/snd/pcmC\(card)D\(device)\(playback ? "p" : "c"): \(Errno(-r))")
        }
        fd = r
        var formats: UInt64 = 0
        var chMin: UInt32 = 0, chMax: UInt32 = 0
        let c = lb_alsa_caps(fd, &formats, &chMin, &chMax)
        guard c == 0 else { Glibc.close(fd); throw DeviceError("hw:\(card),\(device): HW_REFINE: \(Errno(-c))") }
        var rates: UInt64 = 0
        for (bit, hz) in VirtioSnd.rates.enumerated() where lb_alsa_rate_ok(fd, hz) == 1 { rates |= 1 << UInt64(bit) }
        let lo = max(chMin, 1), hi = min(chMax, UInt32(VirtioSnd.chmapMaxSize))
        guard formats != 0, rates != 0, lo <= hi else {
            Glibc.close(fd)
            throw DeviceError("hw:\(card),\(device): no format, rate or channel count virtio-snd can offer (formats 0x\(String(formats, radix: 16)), rates 0x\(String(rates, radix: 16)), channels \(chMin)-\(chMax))")
        }
        capabilities = PcmCapabilities(formats: formats, rates: rates, channelsMin: UInt8(lo), channelsMax: UInt8(hi))
        carry = .allocate(byteCount: 64, alignment: 16)
    }
    deinit {
        _ = lb_alsa_drop(fd)
        Glibc.close(fd)
        carry.deallocate()
    }
    public var description: String { "hw:\(card),\(device)" }

    public func prepare(_ p: PcmParams) -> Bool {
        frameBytes = p.frameBytes
        guard frameBytes > 0, frameBytes <= 64 else { return false }
        var period = max(UInt32(p.periodBytes) / UInt32(frameBytes), 1)
        // Eight of the driver's periods at the card, or its buffer if that is larger; playback starts at two.
        var buffer = max(UInt32(p.bufferBytes) / UInt32(frameBytes), period * 8)
        let r = lb_alsa_setup(fd, Int32(p.format.rawValue), UInt32(p.channels), p.rate, &period, &buffer, period * 2)
        guard r == 0 else {
            Log.error("sound: \(description): cannot set \(p.channels) channels, format \(p.format), \(p.rate) Hz: \(Errno(-r))")
            return false
        }
        periodFrames = period
        carryLen = 0
        prepared = true
        Log.info("sound: \(description): \(p.channels) ch, \(p.format), \(p.rate) Hz, period \(period) frames, buffer \(buffer) frames")
        return true
    }
    public func start() {
        guard prepared, !playback else { return }
        let r = lb_alsa_start(fd)
        if r < 0 { note("START", Int(r)) }
    }
    /// STOP: the card drops what it holds (a pause loses at most its buffer) and is ready to start again.
    public func stop() {
        guard prepared else { return }
        _ = lb_alsa_drop(fd)
        _ = lb_alsa_prepare(fd)
        carryLen = 0
    }
    public func release() {
        guard prepared else { return }
        _ = lb_alsa_drop(fd)
        _ = lb_alsa_prepare(fd)
        carryLen = 0
    }

    /// Playback: one period when the card holds less than one (drift), else nothing; capture: whatever it has.
    public var readAheadBytes: Int {
        guard prepared else { return 0 }
        guard playback else { return 1 << 30 }
        let d = lb_alsa_delay(fd)
        let period = Int(periodFrames) * frameBytes
        return lb_alsa_state(fd) == 3 && d >= 0 && d * frameBytes < period ? period : 0
    }

    public var delayBytes: Int {
        guard prepared else { return 0 }
        let d = lb_alsa_delay(fd)
        return (d > 0 ? d * frameBytes : 0) + (playback ? carryLen : 0)
    }

    private func recover(_ r: Int) {
        if r == -Int(EPIPE) || r == -Int(ESTRPIPE) {
            xruns &+= 1
            if xruns == 1 { Log.warning("sound: \(description): \(playback ? "underrun" : "overrun") at the card; recovered (counted, logged once)") }
            _ = lb_alsa_prepare(fd)
            if !playback { _ = lb_alsa_start(fd) }
        } else if r != -Int(EAGAIN) {
            note(playback ? "WRITEI" : "READI", r)
        }
    }
    private func note(_ what: String, _ r: Int) {
        ioErrors &+= 1
        if ioErrors == 1 { Log.error("sound: \(description): \(what): \(Errno(Int32(-r))) (logged once)") }
    }

    /// Whole frames go straight from the driver's buffer; a frame cut by a segment boundary is gathered in `carry`.
    public func play(_ p: UnsafeRawPointer, _ n: Int) -> Int {
        guard prepared, frameBytes > 0 else { return 0 }
        let fb = frameBytes
        var off = 0
        if carryLen > 0 {
            let k = min(fb - carryLen, n)
            (carry + carryLen).copyMemory(from: p, byteCount: k)
            carryLen += k
            off = k
            guard carryLen == fb else { return off }
            let r = lb_alsa_writei(fd, carry, 1)
            guard r == 1 else { if r < 0 { recover(r) }; return off }
            carryLen = 0
        }
        let whole = (n - off) / fb
        if whole > 0 {
            var r = lb_alsa_writei(fd, p + off, UInt(whole))
            if r == -Int(EPIPE) { recover(r); r = lb_alsa_writei(fd, p + off, UInt(whole)) }
            guard r > 0 else { if r < 0 { recover(r) }; return off }
            off += r * fb
            if r < whole { return off }
        }
        let tail = n - off
        if tail > 0 {
            carry.copyMemory(from: p + off, byteCount: tail)
            carryLen = tail
            off += tail
        }
        return off
    }

    public func capture(_ p: UnsafeMutableRawPointer, _ n: Int) -> Int {
        guard prepared, frameBytes > 0 else { return 0 }
        let fb = frameBytes
        var off = 0
        if carryLen > 0 {
            // Bytes of a frame read earlier that did not fit the previous piece.
            let k = min(carryLen, n)
            p.copyMemory(from: carry + (fb - carryLen), byteCount: k)
            carryLen -= k
            off = k
            if off == n { return off }
        }
        let whole = (n - off) / fb
        if whole > 0 {
            var r = lb_alsa_readi(fd, p + off, UInt(whole))
            if r == -Int(EPIPE) { recover(r); r = lb_alsa_readi(fd, p + off, UInt(whole)) }
            guard r > 0 else { if r < 0 { recover(r) }; return off }
            off += r * fb
            if r < whole { return off }
        }
        let tail = n - off
        if tail > 0 {
            let r = lb_alsa_readi(fd, carry, 1)
            guard r == 1 else { if r < 0 { recover(r) }; return off }
            (p + off).copyMemory(from: carry, byteCount: tail)
            carryLen = fb - tail
            off += tail
        }
        return off
    }
}
