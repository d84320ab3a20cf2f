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
/// device NAME snapshot`). The loop thread only copies the scanout's rectangle into the writer thread's buffer
/// (the resource changes under later TRANSFERs, so the writer cannot read it); the writer converts, writes and
/// renames (`PPMWriter`). A write still running when the next comes is not waited for: the newest picture waits
/// in the other buffer and replaces any older one waiting there. Buffers grow when the picture does (not per
/// write); a write failing is logged once and counted. `snapshot()` waits for its own write (at most 5 s): the
/// `ctl` reply says whether the file is there.
public final class FileGpuOutput: GpuOutput {
    public enum When: Equatable, Sendable { case flush(intervalNs: UInt64), demand }
    public let path: String
    public let when: When
    private var scanout = 0
    private unowned(unsafe) var source: GpuFrameSource?
    private var timer: LoopTimer?
    private var timerArmed = false
    private var dirty = false
    private var lastWrite: UInt64 = 0
    private let writer: PPMWriter
    /// Flushes seen, cursor updates seen (tests; loop thread).
    public private(set) var flushes = 0, cursorUpdates = 0
    public private(set) var cursorX: UInt32 = 0, cursorY: UInt32 = 0, cursorVisible = false
    /// Files written and writes that failed (by the writer thread; read at any time).
    public var writes: Int { writer.counts().writes }
    public var failures: Int { writer.counts().failures }

    public init(path: String, when: When) {
        self.path = path; self.when = when
        writer = PPMWriter(path: path)
    }
    deinit { timer?.cancel(); writer.stop() }

    public var describe: String { "file:\(path)" }

    public func start(loop: EventLoop, scanout: Int, source: GpuFrameSource) throws(DeviceError) {
        self.scanout = scanout
        self.source = source
        if case .flush = when, timer == nil {
            do { timer = try LoopTimer(loop: loop) { [unowned self] _ in self.timerFired() } }
            catch { throw DeviceError("gpu output \(path): timer: \(error)") }
        }
        writer.start()
    }
    /// Stops the timer and the writer thread (a picture already handed over is written first).
    public func stop() {
        timer?.cancel(); timer = nil; timerArmed = false
        source = nil
        writer.stop()
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
        writer.start()
        let before = writer.counts().failures
        let seq = write(f)
        guard writer.wait(for: seq, timeoutNs: 5_000_000_000) else { return "writing \(path) takes longer than 5 s" }
        return writer.counts().failures == before ? "wrote \(path) (\(f.rect.width)x\(f.rect.height))" : "writing \(path) failed"
    }

    /// Hands the scanout's rectangle to the writer; returns the write's sequence number.
    @discardableResult
    private func write(_ f: GpuFrame) -> UInt64 {
        dirty = false
        lastWrite = lb_now_ns()
        writer.start()   // normally running since start(); a caller that skipped start() still gets its file
        return writer.submit(f)
    }
}

/// The file output's writer thread: two picture buffers (32-bit pixels, the scanout's rectangle, rows packed)
/// owned in turn by the loop (filling one) and the writer (converting the other to P6 in 192 KiB pieces and
/// writing them to `path.tmp`, then renaming). State under one mutex: `pending` (filled, waiting) and `writing`
/// (the writer's); the loop fills the buffer that is not being written, taking a waiting one back (coalescing:
/// the older waiting picture is dropped for the newer). The buffers are in raw memory: the loop fills one while the
/// writer reads the other. The thread starts with the output; `stop()` joins it after writing what is pending.
final class PPMWriter: @unchecked Sendable {
    private let path: String, tmpPath: String
    private let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private struct Picture { var pixels: UnsafeMutableRawPointer? = nil; var capacity = 0; var width = 0, height = 0; var format: GpuFormat = .b8g8r8x8 }
    private let pics = UnsafeMutablePointer<Picture>.allocate(capacity: 2)
    private var pending = -1, writing = -1
    private var submitted: UInt64 = 0, done: UInt64 = 0
    private var stopping = false
    private var thread: Thread?
    private var written = 0, failed = 0
    private static let chunk = 192 * 1024
    private let rgb = UnsafeMutableRawPointer.allocate(byteCount: PPMWriter.chunk, alignment: 16)

    init(path: String) {
        self.path = path; tmpPath = path + ".tmp"
        pthread_mutex_init(lock, nil); pthread_cond_init(cond, nil)
        pics.initialize(repeating: Picture(), count: 2)
    }
    deinit {
        stop()
        pthread_mutex_destroy(lock); pthread_cond_destroy(cond)
        lock.deallocate(); cond.deallocate(); rgb.deallocate()
        pics[0].pixels?.deallocate(); pics[1].pixels?.deallocate()
        pics.deinitialize(count: 2); pics.deallocate()
    }

    func counts() -> (writes: Int, failures: Int) {
        pthread_mutex_lock(lock); defer { pthread_mutex_unlock(lock) }
        return (written, failed)
    }

    /// Starts the thread if it is not running (loop thread).
    func start() {
        guard thread == nil else { return }
        pthread_mutex_lock(lock); stopping = false; pthread_mutex_unlock(lock)
        thread = Thread.spawn { [self] in self.run() }
    }

    /// Writes what is pending, then ends the thread and joins it.
    func stop() {
        guard let t = thread else { return }
        pthread_mutex_lock(lock); stopping = true; pthread_cond_broadcast(cond); pthread_mutex_unlock(lock)
        t.join()
        thread = nil
    }


    /// Loop thread: copies the frame's rectangle into a buffer the writer is not using and hands it over.
    func submit(_ f: GpuFrame) -> UInt64 {
        pthread_mutex_lock(lock)
        // Not the one being written; the pending one if there is one (the newer picture replaces it).
        let i = writing == 0 ? 1 : writing == 1 ? 0 : max(pending, 0)
        pending = -1
        pthread_mutex_unlock(lock)
        var p = pics[i]
        let w = Int(f.rect.width), h = Int(f.rect.height), need = w * h * 4
        if need > p.capacity {
            p.pixels?.deallocate()
            p.pixels = .allocate(byteCount: need, alignment: 16)
            p.capacity = need
        }
        p.width = w; p.height = h; p.format = f.format
        let dst = p.pixels!
        var src = f.pixels + Int(f.rect.y) * f.stride + Int(f.rect.x) * 4
        if f.stride == w * 4 { dst.copyMemory(from: src, byteCount: need) }
        else { for y in 0..<h { (dst + y * w * 4).copyMemory(from: src, byteCount: w * 4); src += f.stride } }
        pics[i] = p
        pthread_mutex_lock(lock)
        pending = i
        submitted &+= 1
        let seq = submitted
        pthread_cond_broadcast(cond)
        pthread_mutex_unlock(lock)
        return seq
    }

    /// Waits until write `seq` (or a later one) is done; false after the timeout.
    func wait(for seq: UInt64, timeoutNs: UInt64) -> Bool {
        let end = lb_now_ns() + timeoutNs
        pthread_mutex_lock(lock); defer { pthread_mutex_unlock(lock) }
        while done < seq {
            let now = lb_now_ns()
            if now >= end { return false }
            var ts = timespec()
            clock_gettime(CLOCK_REALTIME, &ts)
            let ns = UInt64(ts.tv_nsec) + min(end - now, 100_000_000)
            ts.tv_sec += Int(ns / 1_000_000_000); ts.tv_nsec = Int(ns % 1_000_000_000)
            pthread_cond_timedwait(cond, lock, &ts)
        }
        return true
    }

    private func run() {
        pthread_mutex_lock(lock)
        while true {
            while pending < 0 && !stopping { pthread_cond_wait(cond, lock) }
            if pending < 0 { break }
            let i = pending
            pending = -1; writing = i
            let seq = submitted
            pthread_mutex_unlock(lock)
            let ok = encodeAndWrite(pics[i])
            pthread_mutex_lock(lock)
            writing = -1
            if ok { written += 1 } else {
                failed += 1
                if failed == 1 { Log.warning("gpu: cannot write \(path): \(Errno.current); further failures are not logged") }
            }
            done = seq
            pthread_cond_broadcast(cond)
        }
        pthread_mutex_unlock(lock)
    }

    /// Converts one picture to P6 piece by piece and replaces the file (writer thread). No closures capturing
    /// locals (a debug build boxes those on the heap).
    private func encodeAndWrite(_ p: Picture) -> Bool {
        guard let px = p.pixels else { return false }
        let fd = tmpPath.withCString { open($0, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) }
        guard fd >= 0 else { return false }
        // Header "P6\n<w> <h>\n255\n" without String (no allocation).
        var n = 0
        rgb.storeBytes(of: 0x50, toByteOffset: 0, as: UInt8.self)     // "P"
        rgb.storeBytes(of: 0x36, toByteOffset: 1, as: UInt8.self)     // "6"
        rgb.storeBytes(of: 0x0a, toByteOffset: 2, as: UInt8.self)
        n = 3
        number(p.width, &n); rgb.storeBytes(of: 0x20, toByteOffset: n, as: UInt8.self); n += 1
        number(p.height, &n); rgb.storeBytes(of: 0x0a, toByteOffset: n, as: UInt8.self); n += 1
        number(255, &n); rgb.storeBytes(of: 0x0a, toByteOffset: n, as: UInt8.self); n += 1
        var ok = writeAll(fd, rgb, n)
        let (ro, go, bo) = p.format.rgbOffsets
        var src = UnsafeRawPointer(px)
        var left = p.width * p.height
        while ok && left > 0 {
            let m = min(left, PPMWriter.chunk / 3)
            var dst = rgb
            for _ in 0..<m {
                dst.storeBytes(of: src.load(fromByteOffset: ro, as: UInt8.self), as: UInt8.self)
                dst.storeBytes(of: src.load(fromByteOffset: go, as: UInt8.self), toByteOffset: 1, as: UInt8.self)
                dst.storeBytes(of: src.load(fromByteOffset: bo, as: UInt8.self), toByteOffset: 2, as: UInt8.self)
                dst += 3; src += 4
            }
            ok = writeAll(fd, rgb, m * 3)
            left -= m
        }
        close(fd)
        if ok { ok = tmpPath.withCString { t in path.withCString { rename(t, $0) } } == 0 }
        return ok
    }

    /// Decimal digits of `v` into `rgb` at `n`.
    private func number(_ v: Int, _ n: inout Int) {
        var d = 1
        while d * 10 <= v { d *= 10 }
        while d > 0 { rgb.storeBytes(of: UInt8(48 + (v / d) % 10), toByteOffset: n, as: UInt8.self); n += 1; d /= 10 }
    }

    private func writeAll(_ fd: Int32, _ from: UnsafeRawPointer, _ count: Int) -> Bool {
        var done = 0
        while done < count {
            let r = Glibc.write(fd, from + done, count - done)
            if r < 0 && errno == EINTR { continue }
            if r <= 0 { return false }
            done += r
        }
        return true
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
