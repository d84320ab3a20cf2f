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
