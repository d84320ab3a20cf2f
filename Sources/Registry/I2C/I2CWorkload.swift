import Glibc
import Transport

/// The simulated driver's i2c workload: a register read as Linux's i2c-virtio sends it (i2cget / SMBus read
/// byte data): a 1-byte write of the register index (FAIL_NEXT) and a 4-byte read, one transfer with a repeated
/// start. One round trip = both requests completed. Chains and buffers are built once.
public final class I2CWorkload: Workload {
    let driver: SimDriver
    public let q: SimQueue
    private var heads: (UInt16, UInt16)
    private let status: (UnsafeMutableRawPointer, UnsafeMutableRawPointer)
    public let bytesPerRequest = 4
    public let requestKind = "register reads (write 1 + read 4, one transfer)"
    private var timedOut = false

    public init?(_ d: SimDriver, address: UInt16 = 0x50) {
        guard let q = d.queues.first else { return nil }
        let h1 = d.alloc(8), reg = d.alloc(1), s1 = d.alloc(1), h2 = d.alloc(8), data = d.alloc(4), s2 = d.alloc(1)
        for (h, flags) in [(h1, VirtioI2C.flagFailNext), (h2, VirtioI2C.flagRead)] {
            d.host(h).storeBytes(of: (address << 1).littleEndian, as: UInt16.self)
            d.host(h).storeBytes(of: UInt16(0), toByteOffset: 2, as: UInt16.self)
            d.host(h).storeBytes(of: flags.littleEndian, toByteOffset: 4, as: UInt32.self)
        }
        d.host(reg).storeBytes(of: UInt8(0x10), as: UInt8.self)
        guard let a = q.addChain(readable: [(h1, 8), (reg, 1)], writable: [(s1, 1)]),
              let b = q.addChain(readable: [(h2, 8)], writable: [(data, 4), (s2, 1)]) else { return nil }
        driver = d
        self.q = q
        heads = (a, b)
        status = (d.host(s1), d.host(s2))
    }

    public func runOne(spinNs: UInt64) -> Bool {
        // A timed-out transfer leaves its heads with the device: never offer them again (one attempt per run).
        guard !timedOut else { return false }
        status.0.storeBytes(of: 0xff, as: UInt8.self)
        status.1.storeBytes(of: 0xff, as: UInt8.self)
        let old = q.availIdx
        q.pushAvail(heads.0)
        q.pushAvail(heads.1)
        q.publish()
        q.kickIfNeeded(old: old)
        for _ in 0..<2 {
            guard q.waitUsed(timeoutMs: 1000, spinNs: spinNs) != nil else { timedOut = true; return false }
        }
        return status.0.load(as: UInt8.self) == VirtioI2C.statusOK && status.1.load(as: UInt8.self) == VirtioI2C.statusOK
    }
}
