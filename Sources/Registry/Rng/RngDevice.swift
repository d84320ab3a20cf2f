import Glibc
import CLinux
import Transport

/// virtio-rng (virtio 1.2 §5.4): one request queue; the device fills each writable buffer with random bytes from
/// getrandom(2) or a configured source file (e.g. a hardware TRNG's /dev/hwrng on the host).
public final class RngDevice: VirtioDevice {
    public let deviceID = VirtioID.rng
    public let queueMaxSizes: [UInt16]
    public let offeredFeatures: VirtioFeatures = [.version1, .eventIdx, .indirectDesc]
    public let configSize = 0
    private let source: Int32   // -1 = getrandom
    private var queues: UnsafeMutablePointer<SplitQueue>?
    /// Chains that were read-only or empty (driver errors): completed with 0 bytes, counted, logged once.
    public private(set) var badChains = 0
    private var sourceFailed = false
    /// Bytes one request gets at most (Linux asks for at most 64 bytes per read of /dev/hwrng anyway).
    public static let maxBytesPerRequest: UInt32 = 64 << 10

    /// getrandom(2) output fetched 512 bytes at a time for small requests (Linux's hwrng reads 64 bytes or less).
    /// Measured on this machine kind: getrandom costs ~230 ns of system call plus ~1.6 ns per byte (64 B: 337 ns,
    /// 512 B: 1.05 µs, 4 KiB: 6.8 µs), so a 64-byte request costs ~130 ns instead of ~340 and one request in eight
    /// pays the refill (a 4 KiB pool put 6.8 µs on one request in 64: the p99). The bytes are the kernel CSPRNG's
    /// either way; each is handed out once and zeroed as it goes. A configured source file (a host TRNG) is read per
    /// request, unbuffered.
    private static let poolSize = 512
    private let pool: UnsafeMutableRawPointer
    private var poolLeft = 0   // unserved bytes at the pool's end: [poolSize - poolLeft, poolSize)

    /// `sourceFD` is owned by the device (closed in deinit); -1 for getrandom.
    public init(sourceFD: Int32 = -1, queueSize: UInt16 = 256) {
        source = sourceFD
        queueMaxSizes = [queueSize]
        pool = UnsafeMutableRawPointer.allocate(byteCount: RngDevice.poolSize, alignment: 64)
        pool.initializeMemory(as: UInt8.self, repeating: 0, count: RngDevice.poolSize)
    }
    deinit {
        if source >= 0 { FD.close(source) }
        memset(pool, 0, RngDevice.poolSize)
        pool.deallocate()
    }

    public func ackFeatures(_ features: VirtioFeatures) {}
    public func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {}
    public func writeConfig(offset: Int, from buffer: UnsafeRawBufferPointer) {}
    public func activate(_ context: DeviceContext) throws(DeviceError) { queues = context.queues }
    public func reset() { queues = nil }
    /// Every request completes inside `queueNotified`: a queue can stop and start alone at any time.
    public var supportsQueueRestart: Bool { true }

    public func queueNotified(_ index: Int) {
        guard let q = queues, index == 0 else { return }
        q.pointee.drain { chain in
            guard chain.writableBytes > 0 else {
                badChains += 1
                if badChains == 1 { Log.warning("rng: driver sent a chain with no writable buffer; completed with 0 bytes") }
                return 0
            }
            // The device may fill less than the whole buffer (virtio 1.2 §5.4.6.1: "one or more bytes"): a
            // 4 GiB chain (255 descriptors of 16 MiB) must not hold the loop for seconds.
            var written: UInt32 = 0
            for i in chain.readableCount..<chain.count where written < RngDevice.maxBytesPerRequest {
                let s = chain.segments[i]
                let n = min(s.length, RngDevice.maxBytesPerRequest - written)
                guard fill(s.base, Int(n)) else { break }
                written += n
            }
            return written
        }
    }

    /// Fills `len` bytes; false if the source failed (the request then completes short, never hangs).
    private func fill(_ p: UnsafeMutableRawPointer, _ len: Int) -> Bool {
        if source < 0 && len <= RngDevice.poolSize / 4 {
            if poolLeft < len {
                poolLeft = 0   // fewer bytes than asked are left: dropped (overwritten), not kept for later
                guard readSource(into: pool, RngDevice.poolSize) else { return false }
                poolLeft = RngDevice.poolSize
            }
            let from = pool + (RngDevice.poolSize - poolLeft)
            memcpy(p, from, len)
            memset(from, 0, len)
            poolLeft -= len
            return true
        }
        return readSource(into: p, len)
    }

    private func readSource(into p: UnsafeMutableRawPointer, _ len: Int) -> Bool {
        var done = 0
        while done < len {
            let n = source >= 0 ? read(source, p + done, len - done) : lb_getrandom(p + done, len - done)
            if n > 0 { done += n; continue }
            if n < 0 && errno == EINTR { continue }
            if !sourceFailed { sourceFailed = true; Log.error("rng: entropy source failed: \(n == 0 ? "end of file" : "\(Errno.current)")") }
            return false
        }
        return true
    }
}
