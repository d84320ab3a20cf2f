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

    /// `sourceFD` is owned by the device (closed in deinit); -1 for getrandom.
    public init(sourceFD: Int32 = -1, queueSize: UInt16 = 256) {
        source = sourceFD
        queueMaxSizes = [queueSize]
    }
    deinit { if source >= 0 { FD.close(source) } }

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
