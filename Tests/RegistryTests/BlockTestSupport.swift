import Glibc
import CLinux
import Transport

// Helpers shared by the block tests (BlockTests, VhostUserPeerTests).

/// SplitMix64: a reproducible generator for the random-I/O runs.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A driver-side view of one block request: header, data, status byte at fixed guest addresses.
struct Buffers {
    let header: UInt64
    let data: UInt64
    let status: UInt64
    init(_ drv: SimDriver, dataBytes: Int) {
        header = drv.alloc(16)
        data = drv.alloc(max(dataBytes, 16), align: 512)
        status = drv.alloc(16)
    }
}

/// Creates (or truncates) `path` with `size` bytes, all `byte`, or random bytes when `byte` is nil.
func writeTestFile(_ path: String, size: Int, byte: UInt8?) {
    let fd = open(path, O_CREAT | O_TRUNC | O_RDWR | O_CLOEXEC, 0o600)
    precondition(fd >= 0, "cannot create \(path)")
    defer { close(fd) }
    let chunk = 1 << 20
    let buf = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
    defer { buf.deallocate() }
    var off = 0
    while off < size {
        let n = min(chunk, size - off)
        if let b = byte { memset(buf, Int32(b), n) } else { _ = lb_getrandom(buf, n) }
        precondition(pwrite(fd, buf, n, off_t(off)) == n)
        off += n
    }
}
