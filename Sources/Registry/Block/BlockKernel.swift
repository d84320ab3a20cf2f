import Glibc
import Transport

/// How the kernel exposes virtio-blk: the disk's own directory under the device (the /sys/block/vdX link comes a
/// moment later), its size, its node.
struct BlockExposure: KernelExposure {
    var waitsFor: String { "/dev/vdX (\(KernelTarget.root)/virtioN/block)" }
    func find(virtio v: String, before: Set<String>) throws(DeviceError) -> (KernelTarget & RoundTrip)? {
        let root = KernelTarget.root
        guard let disk = Sysfs.list("\(root)/\(v)/block").first(where: { $0.hasPrefix("vd") }),
              let s = Sysfs.read("\(root)/\(v)/block/\(disk)/size"), let sectors = UInt64(s), sectors > 0,
              access("/dev/\(disk)", F_OK) == 0 else { return nil }
        // The node may still be the previous disk's of the same name (6.12 reuses vdX at once): opening it gives
        // ENXIO until the new disk is live. Keep waiting then.
        let probe = open("/dev/\(disk)", O_RDONLY | O_CLOEXEC)
        if probe < 0 {
            if errno == ENXIO || errno == ENOENT || errno == ENODEV { return nil }
        } else { FD.close(probe) }
        return try KernelBlk(virtio: v, disk: disk, sectors: sectors)
    }
}

/// virtio-blk through the kernel's virtio_blk: 4 KiB O_DIRECT reads at random 4 KiB-aligned offsets of /dev/vdX
/// into one aligned buffer (the same xorshift sequence as the simulated driver's BlkWorkload).
public final class KernelBlk: KernelTarget, RoundTrip {
    var fd: Int32
    let buf: UnsafeMutableRawPointer
    let blocks: UInt64
    var rng: UInt64 = 0x9E37_79B9_7F4A_7C15
    /// O_DIRECT (glibc exposes it only with _GNU_SOURCE): asm-generic 0o40000; arm/arm64 0o200000.
    #if arch(arm64) || arch(arm)
    static let oDirect: Int32 = 0o200000
    #else
    static let oDirect: Int32 = 0o40000
    #endif

    init(virtio: String, disk: String, sectors: UInt64) throws(DeviceError) {
        guard sectors >= 8 else { throw DeviceError("/dev/\(disk): smaller than 4 KiB (\(sectors) sectors)") }
        blocks = sectors / 8
        fd = open("/dev/\(disk)", O_RDONLY | KernelBlk.oDirect | O_CLOEXEC)
        guard fd >= 0 else { throw DeviceError("cannot open /dev/\(disk) (O_DIRECT): \(Errno.current)") }
        buf = .allocate(byteCount: 4096, alignment: 4096)
        super.init(virtio: virtio, name: disk)
    }
    deinit { buf.deallocate() }
    public override func close() { if fd >= 0 { Glibc.close(fd); fd = -1 } }

    public func runOne(spinNs: UInt64) -> Bool {
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
        let off = off_t(Int64(bitPattern: (rng % blocks) * 4096))
        while true {
            let n = pread(fd, buf, 4096, off)
            if n < 0 && errno == EINTR { continue }
            return n == 4096
        }
    }
}
