import Glibc
import CLinux
import Transport

/// One scanout's picture as an output sees it: the resource's host copy (valid during the call only; an output
/// that needs it later asks its `GpuFrameSource` again), its stride and format, and the scanout's rectangle inside
/// the resource (SET_SCANOUT's rect).
public struct GpuFrame {
    public let pixels: UnsafeRawPointer
    /// Bytes per resource row (width × 4).
    public let stride: Int
    public let format: GpuFormat
    /// The scanout's rectangle in resource pixels.
    public let rect: GpuRect
    public init(pixels: UnsafeRawPointer, stride: Int, format: GpuFormat, rect: GpuRect) {
        self.pixels = pixels; self.stride = stride; self.format = format; self.rect = rect
    }
}

/// What an output may ask the device at any time on the loop thread (a rate-limited or on-demand writer): the
/// current picture of a scanout, nil when it shows nothing.
public protocol GpuFrameSource: AnyObject {
    func currentFrame(_ scanout: Int) -> GpuFrame?
}

/// Where a scanout's flushed frames go (`output = "none" | "file:/prefix"`; a KMS output and the vhost-user-gpu
/// display protocol implement the same calls). All calls come on the device's loop thread; none may block for
/// long or allocate per call (a flush is on the data path).
public protocol GpuOutput: AnyObject {
    /// For logs and `ctl`: "none", "file:/tmp/gpu0-0.ppm".
    var describe: String { get }
    /// Once, when the device is built on its loop.
    func start(loop: EventLoop, scanout: Int, source: GpuFrameSource) throws(DeviceError)
    /// The device is going away: release everything (pending writes may be dropped).
    func stop()
    /// SET_SCANOUT or a hot-plug: the scanout now shows `frame` (nil: nothing: no resource, or unplugged).
    func scanoutChanged(frame: GpuFrame?)
    /// RESOURCE_FLUSH: `damage` (resource pixels, inside `frame.rect`) of the shown picture changed.
    func flush(frame: GpuFrame, damage: GpuRect)
    /// UPDATE_CURSOR: a 64×64 image (nil: hidden) with its hot spot, at (x, y) in scanout pixels.
    func cursorChanged(image: GpuFrame?, hotX: UInt32, hotY: UInt32, x: UInt32, y: UInt32)
    /// MOVE_CURSOR.
    func cursorMoved(x: UInt32, y: UInt32)
    /// `loopbackd ctl device NAME snapshot`: present the current picture now; what happened, for the reply.
    func snapshot() -> String
}

/// `output = "none"`: frames go nowhere (the device still checks and copies everything).
public final class NullGpuOutput: GpuOutput {
    public private(set) var flushes = 0
    public init() {}
    public var describe: String { "none" }
    public func start(loop: EventLoop, scanout: Int, source: GpuFrameSource) throws(DeviceError) {}
    public func stop() {}
    public func scanoutChanged(frame: GpuFrame?) {}
    public func flush(frame: GpuFrame, damage: GpuRect) { flushes &+= 1 }
    public func cursorChanged(image: GpuFrame?, hotX: UInt32, hotY: UInt32, x: UInt32, y: UInt32) {}
    public func cursorMoved(x: UInt32, y: UInt32) {}
    public func snapshot() -> String { "output none: nothing written" }
}

/// `output = "file:/prefix"`: the scanout's picture as a binary PPM (P6, 8-bit RGB) at `/prefix-N.ppm` (N: the
/// scanout index), replaced atomically (written to `….tmp`, then rename(2)). Conversion: each 4-byte pixel's red,
/// green and blue bytes are taken at the format's offsets (`GpuFormat.rgbOffsets`: B8G8R8X8 → bytes 2, 1, 0);
/// alpha / X is dropped. Only the scanout's rectangle of the resource is written.
///
/// `when = .flush(interval)`: written after a flush, at most once per interval (default 100 ms): a flush inside
/// the interval arms a `LoopTimer` for its end, which writes the picture as it is then, so the last flushed
/// frame is always on disk within one interval. `when = .demand`: only through `snapshot()` (`loopbackd ctl
/// device NAME snapshot`). The RGB buffer grows when the picture does (not per write); a write failing is
/// logged once and counted.
public final class FileGpuOutput: GpuOutput {
    public enum When: Equatable, Sendable { case flush(intervalNs: UInt64), demand }
    public let path: String
    public let when: When
    private let tmpPath: String
    private var scanout = 0
    private unowned(unsafe) var source: GpuFrameSource?
    private var timer: LoopTimer?
    private var timerArmed = false
    private var dirty = false
    private var lastWrite: UInt64 = 0
    private var buf: UnsafeMutableRawPointer?
    private var bufSize = 0
    /// Files written, writes that failed, flushes seen, cursor updates seen (tests).
    public private(set) var writes = 0, failures = 0, flushes = 0, cursorUpdates = 0
    public private(set) var cursorX: UInt32 = 0, cursorY: UInt32 = 0, cursorVisible = false

    public init(path: String, when: When) {
        self.path = path; self.when = when; tmpPath = path + ".tmp"
    }
    deinit { buf?.deallocate(); timer?.cancel() }

    public var describe: String { "file:\(path)" }

    public func start(loop: EventLoop, scanout: Int, source: GpuFrameSource) throws(DeviceError) {
        self.scanout = scanout
        self.source = source
        if case .flush = when, timer == nil {
            do { timer = try LoopTimer(loop: loop) { [unowned self] _ in self.timerFired() } }
            catch { throw DeviceError("gpu output \(path): timer: \(error)") }
        }
    }
    public func stop() {
        timer?.cancel(); timer = nil; timerArmed = false
        source = nil
    }

    public func scanoutChanged(frame: GpuFrame?) {
        // A new picture (or none): nothing to write until it is flushed.
        if frame == nil { dirty = false }
    }

    public func flush(frame: GpuFrame, damage: GpuRect) {
        flushes &+= 1
        guard case .flush(let interval) = when else { return }
        dirty = true
        if timerArmed { return }
        let now = lb_now_ns()
        if now &- lastWrite >= interval {
            write(frame)
        } else {
            timerArmed = true
            timer?.arm(afterNs: max(1, interval - (now &- lastWrite)))
        }
    }

    private func timerFired() {
        timerArmed = false
        guard dirty, let f = source?.currentFrame(scanout) else { return }
        write(f)
    }

    public func cursorChanged(image: GpuFrame?, hotX: UInt32, hotY: UInt32, x: UInt32, y: UInt32) {
        cursorUpdates &+= 1; cursorVisible = image != nil; cursorX = x; cursorY = y
    }
    public func cursorMoved(x: UInt32, y: UInt32) { cursorX = x; cursorY = y }

    public func snapshot() -> String {
        guard let f = source?.currentFrame(scanout) else { return "scanout \(scanout) shows nothing: \(path) not written" }
        let before = failures
        write(f)
        return failures == before ? "wrote \(path) (\(f.rect.width)x\(f.rect.height))" : "writing \(path) failed"
    }

    /// Converts the scanout's rectangle to P6 and replaces the file.
    private func write(_ f: GpuFrame) {
        dirty = false
        lastWrite = lb_now_ns()
        let w = Int(f.rect.width), h = Int(f.rect.height)
        let need = 32 + w * h * 3
        if need > bufSize {
            buf?.deallocate()
            buf = .allocate(byteCount: need, alignment: 16)
            bufSize = need
        }
        guard let out = buf else { return }
        // Header "P6\n<w> <h>\n255\n" without String (no allocation).
        var n = 0
        func put(_ b: UInt8) { out.storeBytes(of: b, toByteOffset: n, as: UInt8.self); n += 1 }
        func num(_ v: Int) {
            var d = 1
            while d * 10 <= v { d *= 10 }
            while d > 0 { put(UInt8(48 + (v / d) % 10)); d /= 10 }
        }
        put(0x50); put(0x36); put(0x0a); num(w); put(0x20); num(h); put(0x0a); num(255); put(0x0a)
        let (ro, go, bo) = f.format.rgbOffsets
        var dst = out + n
        for y in 0..<h {
            var src = f.pixels + (Int(f.rect.y) + y) * f.stride + Int(f.rect.x) * 4
            for _ in 0..<w {
                dst.storeBytes(of: src.load(fromByteOffset: ro, as: UInt8.self), as: UInt8.self)
                dst.storeBytes(of: src.load(fromByteOffset: go, as: UInt8.self), toByteOffset: 1, as: UInt8.self)
                dst.storeBytes(of: src.load(fromByteOffset: bo, as: UInt8.self), toByteOffset: 2, as: UInt8.self)
                dst += 3; src += 4
            }
        }
        let total = n + w * h * 3
        let fd = tmpPath.withCString { open($0, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) }
        var ok = fd >= 0
        if ok {
            var done = 0
            while done < total {
                let r = Glibc.write(fd, out + done, total - done)
                if r < 0 && errno == EINTR { continue }
                if r <= 0 { ok = false; break }
                done += r
            }
            close(fd)
        }
        if ok { ok = tmpPath.withCString { t in path.withCString { rename(t, $0) } } == 0 }
        if ok { writes &+= 1 } else {
            failures &+= 1
            if failures == 1 { Log.warning("gpu: cannot write \(path): \(Errno.current); further failures are not logged") }
        }
    }
}

/// `output = …` values: "none", "file:/abs/prefix", "kms:/dev/dri/cardN[:CONNECTOR]", or several joined by "+"
/// ("kms:/dev/dri/card0+file:/tmp/gpu0": the scanout goes to each).
public indirect enum GpuOutputSpec: Equatable, Sendable {
    case none
    case file(prefix: String)
    case kms(card: String, connector: String?)
    case tee([GpuOutputSpec])

    public static func parse(_ s: String) -> Result<GpuOutputSpec, GpuSpecError> {
        // "+" joins outputs only where a known kind follows (a file prefix may contain "+").
        var parts: [String] = []
        for piece in s.split(separator: "+", omittingEmptySubsequences: false) {
            if parts.isEmpty || piece.hasPrefix("kms:") || piece.hasPrefix("file:") || piece == "none" { parts.append(String(piece)) }
            else { parts[parts.count - 1] += "+" + piece }
        }
        if parts.count > 1 {
            var specs: [GpuOutputSpec] = []
            for p in parts {
                switch parseOne(p) {
                case .success(let o): specs.append(o)
                case .failure(let e): return .failure(e)
                }
            }
            if specs.filter({ if case .kms = $0 { return true } else { return false } }).count > 1 {
                return .failure(GpuSpecError("\"\(s)\": one kms output per scanout"))
            }
            return .success(.tee(specs))
        }
        return parseOne(s)
    }

    static func parseOne(_ s: String) -> Result<GpuOutputSpec, GpuSpecError> {
        if s == "none" { return .success(.none) }
        if s.hasPrefix("file:") {
            let p = String(s.dropFirst(5))
            guard p.hasPrefix("/"), !p.hasSuffix("/"), p.utf8.count < 4000 else {
                return .failure(GpuSpecError("file: wants an absolute path prefix (\"file:/var/lib/loopbackd/gpu0\": scanout N goes to /var/lib/loopbackd/gpu0-N.ppm)"))
            }
            return .success(.file(prefix: p))
        }
        if s.hasPrefix("kms:") {
            let v = s.dropFirst(4)
            let bits = v.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
            let card = String(bits[0]), conn = bits.count > 1 ? String(bits[1]) : nil
            guard card.hasPrefix("/"), !card.hasSuffix("/"), card.utf8.count < 4000 else {
                return .failure(GpuSpecError("kms: wants a card node and optionally a connector (\"kms:/dev/dri/card0\", \"kms:/dev/dri/card0:HDMI-A-1\")"))
            }
            if let conn {
                guard !conn.isEmpty, conn.utf8.count < 32, conn.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f && $0 != 0x2f }) else {
                    return .failure(GpuSpecError("kms: connector \"\(conn)\": want the kernel's name, e.g. HDMI-A-1, DP-1, Virtual-1"))
                }
            }
            return .success(.kms(card: card, connector: conn))
        }
        return .failure(GpuSpecError("\"\(s)\": want \"none\", \"file:/path/prefix\", \"kms:/dev/dri/cardN[:CONNECTOR]\" or several joined by \"+\""))
    }

    /// The output of scanout `index` (a kms output opens its card at `start`; `open` opens it now).
    public func make(scanout index: Int, when: FileGpuOutput.When, mode: GpuMode = GpuMode(width: 1280, height: 800)) -> GpuOutput {
        switch self {
        case .none: return NullGpuOutput()
        case .file(let p): return FileGpuOutput(path: "\(p)-\(index).ppm", when: when)
        case .kms(let c, let k): return KmsGpuOutput(card: c, connector: k, mode: mode)
        case .tee(let l): return TeeGpuOutput(l.map { $0.make(scanout: index, when: when, mode: mode) })
        }
    }

    /// As `make`, with a kms output's card opened now (when the device is built: before a privilege drop, and a
    /// card that cannot be used is a start-up error).
    public func open(scanout index: Int, when: FileGpuOutput.When, mode: GpuMode) throws(DeviceError) -> GpuOutput {
        let o = make(scanout: index, when: when, mode: mode)
        for k in (o as? TeeGpuOutput)?.outputs ?? [o] { try (k as? KmsGpuOutput)?.open() }
        return o
    }
}
public struct GpuSpecError: Error, CustomStringConvertible { public let description: String; init(_ d: String) { description = d } }
