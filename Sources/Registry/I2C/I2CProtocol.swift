import Glibc
import Transport

/// virtio-i2c (virtio 1.2 §5.19): one request queue; each request is an out header (le16 addr, le16 padding,
/// le32 flags), an optional data buffer (readable for a write, writable for a read) and a one-byte status.
enum VirtioI2C {
    static let deviceID: UInt32 = 34
    /// VIRTIO_I2C_F_ZERO_LENGTH_REQUEST: requests without a data buffer (SMBus quick, probing); Linux's driver
    /// refuses a device without it.
    static let fZeroLength = VirtioFeatures(rawValue: 1 << 0)
    static let outHeaderSize = 8
    /// flags: FAIL_NEXT groups requests (set on all but the last of one transfer); M_RD makes it a read.
    static let flagFailNext: UInt32 = 1 << 0
    static let flagRead: UInt32 = 1 << 1
    static let statusOK: UInt8 = 0
    static let statusError: UInt8 = 1
    /// Messages in one transfer (Linux's I2C_RDWR_IOCTL_MAX_MSGS is 42).
    static let maxGroup = 42
}

/// One message of a transfer, as the host adapter sees it: 7-bit address, read or write, and a buffer.
public struct I2CMessage {
    public var address: UInt16
    public var read: Bool
    public var buffer: UnsafeMutableRawPointer?
    public var length: Int
    public init(address: UInt16, read: Bool, buffer: UnsafeMutableRawPointer?, length: Int) {
        self.address = address; self.read = read; self.buffer = buffer; self.length = length
    }
}

/// The host side of a virtio-i2c device: performs one transfer (its messages with repeated starts, as one
/// I2C_RDWR) on the bus a virtual address maps to. The real one is `I2CDevAdapter` (/dev/i2c-N), the fake one
/// `FakeI2CBus` (register files, like the kernel's i2c-stub).
public protocol I2CAdapter: AnyObject {
    /// Where virtual address `addr` goes: the host bus index and address, or nil if nothing answers there.
    func route(_ addr: UInt16) -> (bus: Int, address: UInt16)?
    /// Runs `messages` (already routed: all on `bus`) as one transfer; false if the bus reported an error (NACK).
    func transfer(bus: Int, _ messages: UnsafeMutableBufferPointer<I2CMessage>) -> Bool
}

/// A fake bus of register-file chips (what i2c-stub does in the kernel): a write sets the chip's register pointer
/// (first byte) and writes the following bytes from there; a read reads from the pointer on. Unit tests and the
/// simulated workload use it; `transfers` counts what reached it.
public final class FakeI2CBus: I2CAdapter {
    public private(set) var registers: [UInt16: [UInt8]] = [:]
    private var pointer: [UInt16: Int] = [:]
    public private(set) var transfers = 0
    /// Addresses remapped on the way (virtual → host), as the config's `map` does.
    private let remap: [UInt16: UInt16]
    public init(chips: [UInt16], remap: [UInt16: UInt16] = [:]) {
        self.remap = remap
        for c in chips { registers[c] = [UInt8](repeating: 0, count: 256); pointer[c] = 0 }
    }
    public func route(_ addr: UInt16) -> (bus: Int, address: UInt16)? {
        let a = remap[addr] ?? addr
        return registers[a] != nil ? (0, a) : nil
    }
    public func transfer(bus: Int, _ messages: UnsafeMutableBufferPointer<I2CMessage>) -> Bool {
        transfers += 1
        for m in messages {
            guard var regs = registers[m.address], var p = pointer[m.address] else { return false }
            if m.read {
                for k in 0..<m.length { m.buffer!.storeBytes(of: regs[p & 0xff], toByteOffset: k, as: UInt8.self); p += 1 }
            } else if m.length > 0 {
                p = Int(m.buffer!.load(as: UInt8.self))
                for k in 1..<max(m.length, 1) { regs[p & 0xff] = m.buffer!.load(fromByteOffset: k, as: UInt8.self); p += 1 }
                registers[m.address] = regs
            }
            pointer[m.address] = p & 0xff
        }
        return true
    }
    public func poke(_ chip: UInt16, _ reg: Int, _ v: UInt8) { registers[chip]?[reg & 0xff] = v }
}
