import Glibc
import CLinux
import Transport

/// The real host side: Linux i2c-dev adapters (/dev/i2c-N), one transfer = one I2C_RDWR ioctl (repeated starts
/// between its messages). An adapter that speaks SMBus only (no I2C_FUNC_I2C in I2C_FUNCS: i2c-stub, i801,
/// piix4) refuses I2C_RDWR: its transfers become the one SMBus operation with the same bytes on the wire
/// (`SMBus`, I2C_SMBUS ioctl), and fail when there is none. Which virtual addresses reach which adapter and
/// address is the config's map; an address not in the map does not answer (NACK). The adapters are opened at
/// start (before any privilege drop).
public final class I2CDevAdapter: I2CAdapter {
    public struct Route: Equatable, Sendable { public var bus: Int; public var address: UInt16 }
    private let fds: [FileRef]
    private let routes: [UInt16: Route]
    /// Per adapter: true if it takes SMBus operations only; the chip address last set with I2C_SLAVE_FORCE.
    public let smbusOnly: [Bool]
    private var slave: [UInt16]
    /// `buses`: the adapters' paths (index = `Route.bus`); `routes`: virtual address → adapter and address.
    public init(buses: [String], routes: [UInt16: Route]) throws(DeviceError) {
        var f: [FileRef] = []
        var smbus: [Bool] = []
        for p in buses {
            let ref: FileRef
            do { ref = FileRef(try FD.open(p, flags: O_RDWR)) } catch { throw DeviceError("cannot open \(p): \(error)") }
            var funcs: UInt = 0
            guard lb_ioctl_ptr(ref.raw, SMBus.ioctlFuncs, &funcs) == 0 else {
                throw DeviceError("\(p): not an i2c-dev adapter (I2C_FUNCS: \(String(cString: strerror(errno))))")
            }
            if funcs & SMBus.funcI2C == 0 { Log.info("i2c: \(p) speaks SMBus only: transfers go through I2C_SMBUS") }
            f.append(ref)
            smbus.append(funcs & SMBus.funcI2C == 0)
        }
        fds = f
        smbusOnly = smbus
        slave = [UInt16](repeating: 0xffff, count: buses.count)
        self.routes = routes
    }
    public func route(_ addr: UInt16) -> (bus: Int, address: UInt16)? {
        routes[addr].map { ($0.bus, $0.address) }
    }
    // struct i2c_msg { __u16 addr; __u16 flags; __u16 len; __u8 *buf; } (linux/i2c.h: 16 bytes on 64-bit);
    // struct i2c_rdwr_ioctl_data { struct i2c_msg *msgs; __u32 nmsgs; }; I2C_RDWR = 0x0707, I2C_M_RD = 0x0001.
    private let msgs = UnsafeMutableRawPointer.allocate(byteCount: 16 * VirtioI2C.maxGroup, alignment: 8)
    private let data = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 8)
    private let smbusData = UnsafeMutableRawPointer.allocate(byteCount: SMBus.dataBytes, alignment: 8)
    deinit { msgs.deallocate(); data.deallocate(); smbusData.deallocate() }

    public func transfer(bus: Int, _ messages: UnsafeMutableBufferPointer<I2CMessage>) -> Bool {
        guard bus < fds.count, messages.count <= VirtioI2C.maxGroup else { return false }
        if smbusOnly[bus] { return smbusTransfer(bus: bus, messages) }
        for (k, m) in messages.enumerated() {
            let e = msgs + 16 * k
            e.storeBytes(of: m.address, as: UInt16.self)
            e.storeBytes(of: UInt16(m.read ? 1 : 0), toByteOffset: 2, as: UInt16.self)
            e.storeBytes(of: UInt16(m.length), toByteOffset: 4, as: UInt16.self)
            e.storeBytes(of: m.buffer, toByteOffset: 8, as: UnsafeMutableRawPointer?.self)
        }
        data.storeBytes(of: msgs, as: UnsafeMutableRawPointer.self)
        data.storeBytes(of: UInt32(messages.count), toByteOffset: 8, as: UInt32.self)
        // The adapter driver does the transfer synchronously (it is fast: a few hundred µs at 100 kHz for a
        // register read); the request budget keeps one device from holding the loop.
        let r = lb_ioctl_ptr(fds[bus].raw, 0x0707, data)
        return r == Int32(messages.count)
    }

    /// The transfer as one SMBus operation (struct i2c_smbus_ioctl_data { __u8 read_write; __u8 command;
    /// __u32 size; union i2c_smbus_data *data; }: 16 bytes on 64-bit).
    private func smbusTransfer(bus: Int, _ messages: UnsafeMutableBufferPointer<I2CMessage>) -> Bool {
        guard let op = SMBus.encode(messages, data: smbusData) else { return false }
        let fd = fds[bus].raw
        if slave[bus] != op.address {
            guard lb_ioctl_val(fd, SMBus.ioctlSlaveForce, UInt(op.address)) == 0 else { return false }
            slave[bus] = op.address
        }
        data.storeBytes(of: op.readWrite, as: UInt8.self)
        data.storeBytes(of: op.command, toByteOffset: 1, as: UInt8.self)
        data.storeBytes(of: op.size, toByteOffset: 4, as: UInt32.self)
        data.storeBytes(of: smbusData, toByteOffset: 8, as: UnsafeMutableRawPointer.self)
        guard lb_ioctl_ptr(fd, SMBus.ioctlSMBus, data) == 0 else { return false }
        return SMBus.decode(op, messages, data: smbusData)
    }

    /// Parses the config's `map`: "VADDR=/dev/i2c-N[:HADDR], …" (addresses 0x03-0x77, decimal or 0x hex).
    /// Returns the adapters' paths and the routes; an error message otherwise.
    public static func parseMap(_ s: String) -> Result<([String], [UInt16: Route]), MapError> {
        var buses: [String] = []
        var routes: [UInt16: Route] = [:]
        for item in s.split(separator: ",") {
            let t = item.split(separator: " ", omittingEmptySubsequences: true).joined()
            let parts = t.split(separator: "=", maxSplits: 1)
            guard parts.count == 2, let v = address(parts[0]) else { return .failure(MapError("\"\(t)\": want VADDR=/dev/i2c-N[:HADDR] with VADDR in 0x03-0x77")) }
            let target = parts[1].split(separator: ":", maxSplits: 1)
            let path = String(target[0])
            guard path.hasPrefix("/dev/i2c-") || path.hasPrefix("/") else { return .failure(MapError("\"\(path)\": not an absolute adapter path (/dev/i2c-N)")) }
            var h = v
            if target.count == 2 {
                guard let a = address(target[1]) else { return .failure(MapError("\"\(target[1])\": host address not in 0x03-0x77")) }
                h = a
            }
            guard routes[v] == nil else { return .failure(MapError("virtual address 0x\(String(v, radix: 16)) mapped twice")) }
            let bus: Int
            if let b = buses.firstIndex(of: path) { bus = b } else { buses.append(path); bus = buses.count - 1 }
            routes[v] = Route(bus: bus, address: h)
        }
        guard !routes.isEmpty else { return .failure(MapError("empty map")) }
        return .success((buses, routes))
    }
    public struct MapError: Error { public let message: String; init(_ m: String) { message = m } }

    static func address(_ s: Substring) -> UInt16? {
        let v: UInt16? = s.hasPrefix("0x") || s.hasPrefix("0X") ? UInt16(s.dropFirst(2), radix: 16) : UInt16(s)
        guard let v, v >= 0x03, v <= 0x77 else { return nil }
        return v
    }
}
