// A libFuzzer input read as a stream of structured values (in the spirit of LLVM's FuzzedDataProvider): every
// read succeeds; past the end it returns zeros, so any byte string is a valid input.
import Glibc

struct FuzzInput {
    let base: UnsafePointer<UInt8>
    let count: Int
    var pos = 0
    init(_ d: UnsafePointer<UInt8>, _ n: Int) { base = d; count = n }

    var remaining: Int { max(0, count - pos) }
    var isEmpty: Bool { pos >= count }

    mutating func u8() -> UInt8 {
        guard pos < count else { return 0 }
        defer { pos += 1 }
        return base[pos]
    }
    mutating func u16() -> UInt16 { UInt16(u8()) | UInt16(u8()) << 8 }
    mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    mutating func u64() -> UInt64 { UInt64(u32()) | UInt64(u32()) << 32 }
    mutating func bool() -> Bool { u8() & 1 != 0 }
    /// A value in 0..<n (n > 0).
    mutating func below(_ n: Int) -> Int { n <= 256 ? Int(u8()) % n : Int(u32() % UInt32(n)) }
    /// Up to `n` bytes (fewer at the end of the input).
    mutating func bytes(_ n: Int) -> UnsafeBufferPointer<UInt8> {
        let k = min(max(n, 0), remaining)
        defer { pos += k }
        return UnsafeBufferPointer(start: base + pos, count: k)
    }
    /// Copies up to `n` bytes to `dst`, zero-filling the rest.
    mutating func fill(_ dst: UnsafeMutableRawPointer, _ n: Int) {
        let b = bytes(n)
        if b.count > 0 { dst.copyMemory(from: b.baseAddress!, byteCount: b.count) }
        if b.count < n { memset(dst + b.count, 0, n - b.count) }
    }
    /// The rest of the input.
    mutating func rest() -> UnsafeBufferPointer<UInt8> { bytes(remaining) }
    /// `total` bytes at guest address `base` cut into 1-3 buffers at fuzzed places (a driver may split a request
    /// anywhere), each (address, length, device-writable).
    mutating func pieces(_ base: UInt64, _ total: Int, writable: Bool) -> [(UInt64, UInt32, Bool)] {
        guard total > 0 else { return [] }
        let n = 1 + below(3)
        var out: [(UInt64, UInt32, Bool)] = []
        var off = 0
        for i in 0..<n where off < total {
            let len = i == n - 1 ? total - off : 1 + below(max(total - off, 1))
            out.append((base + UInt64(off), UInt32(len), writable))
            off += len
        }
        return out
    }
}

/// Crashes the fuzzer with a message: a violated invariant is a finding, like a sanitizer report.
func fuzzCheck(_ ok: @autoclosure () -> Bool, _ what: @autoclosure () -> String, file: StaticString = #file, line: UInt = #line) {
    if !ok() {
        let m = "fuzz invariant violated: \(what()) (\(file):\(line))\n"
        _ = m.withCString { write(2, $0, strlen($0)) }
        abort()
    }
}
