import Glibc
import CLinux
import Transport

/// Transfers on host adapters that speak SMBus only (no I2C_FUNC_I2C: i2c-stub, PC SMBus controllers such as
/// i801 and piix4): their i2c-dev node refuses I2C_RDWR (EOPNOTSUPP), so a transfer is translated into the one
/// SMBus operation that puts the same bytes on the wire (I2C_SMBUS ioctl), as the kernel's i2c-core does the
/// other way round when it emulates SMBus on an I2C adapter (i2c_smbus_xfer_emulated):
///
///   messages (one address)                   SMBus operation            ioctl size
///   write 0 bytes / read 0 bytes             quick write / quick read   QUICK
///   write 1 byte                             send byte                  BYTE
///   read 1 byte                              receive byte               BYTE
///   write 2 bytes (command, data)            write byte data            BYTE_DATA
///   write 3 bytes (command, low, high)       write word data            WORD_DATA
///   write 4-33 bytes (command, 3-32 bytes)   write I2C block            I2C_BLOCK_DATA
///   write 1 (command) + read 1               read byte data             BYTE_DATA
///   write 1 (command) + read 2               read word data             WORD_DATA
///   write 1 (command) + read 3-32            read I2C block             I2C_BLOCK_DATA
///   write 3 (command, low, high) + read 2    process call               PROC_CALL
///
/// Anything else (a read of several bytes without a command, more than 32 data bytes, two addresses, three or
/// more messages) has no SMBus form: the transfer fails (the driver sees an I/O error), it is never split.
/// Word data is little-endian on the wire (low byte first), as the SMBus specification and i2c-core have it.
enum SMBus {
    // linux/i2c.h, linux/i2c-dev.h
    static let ioctlSMBus: UInt = 0x0720          // I2C_SMBUS, struct i2c_smbus_ioctl_data
    static let ioctlSlaveForce: UInt = 0x0706     // I2C_SLAVE_FORCE (as I2C_RDWR: also where a driver is bound)
    static let ioctlFuncs: UInt = 0x0705          // I2C_FUNCS, unsigned long
    static let funcI2C: UInt = 0x0000_0001
    static let read: UInt8 = 1, write: UInt8 = 0
    static let sizeQuick: UInt32 = 0, sizeByte: UInt32 = 1, sizeByteData: UInt32 = 2, sizeWordData: UInt32 = 3,
               sizeProcCall: UInt32 = 4, sizeI2CBlock: UInt32 = 8
    /// union i2c_smbus_data: byte, le16 word, or block[34] (block[0] = length, at most 32).
    static let dataBytes = 34
    static let blockMax = 32

    /// One SMBus operation: i2c_smbus_ioctl_data's read_write, command and size (the data union is filled
    /// separately). `address` is the chip (all messages of the transfer go to it).
    struct Op: Equatable {
        var address: UInt16
        var readWrite: UInt8
        var command: UInt8
        var size: UInt32
    }

    /// The SMBus form of `m`, with the data union `data` (`dataBytes` long) filled for what is sent; nil if the
    /// transfer has none. Pure: no system call.
    static func encode(_ m: UnsafeMutableBufferPointer<I2CMessage>, data: UnsafeMutableRawPointer) -> Op? {
        func byte(_ k: Int, _ i: Int) -> UInt8 { m[k].buffer!.load(fromByteOffset: i, as: UInt8.self) }
        data.initializeMemory(as: UInt8.self, repeating: 0, count: dataBytes)
        switch m.count {
        case 1:
            let a = m[0]
            if a.read {
                switch a.length {
                case 0: return Op(address: a.address, readWrite: read, command: 0, size: sizeQuick)
                case 1: return Op(address: a.address, readWrite: read, command: 0, size: sizeByte)
                default: return nil
                }
            }
            switch a.length {
            case 0: return Op(address: a.address, readWrite: write, command: 0, size: sizeQuick)
            case 1: return Op(address: a.address, readWrite: write, command: byte(0, 0), size: sizeByte)
            case 2:
                data.storeBytes(of: byte(0, 1), as: UInt8.self)
                return Op(address: a.address, readWrite: write, command: byte(0, 0), size: sizeByteData)
            case 3:
                data.storeBytes(of: byte(0, 1), as: UInt8.self)
                data.storeBytes(of: byte(0, 2), toByteOffset: 1, as: UInt8.self)
                return Op(address: a.address, readWrite: write, command: byte(0, 0), size: sizeWordData)
            case 4...(blockMax + 1):
                data.storeBytes(of: UInt8(a.length - 1), as: UInt8.self)
                (data + 1).copyMemory(from: a.buffer! + 1, byteCount: a.length - 1)
                return Op(address: a.address, readWrite: write, command: byte(0, 0), size: sizeI2CBlock)
            default: return nil
            }
        case 2:
            let w = m[0], r = m[1]
            guard !w.read, r.read, w.address == r.address, w.length >= 1 else { return nil }
            if w.length == 3 && r.length == 2 {
                data.storeBytes(of: byte(0, 1), as: UInt8.self)
                data.storeBytes(of: byte(0, 2), toByteOffset: 1, as: UInt8.self)
                return Op(address: w.address, readWrite: write, command: byte(0, 0), size: sizeProcCall)
            }
            guard w.length == 1 else { return nil }
            switch r.length {
            case 1: return Op(address: w.address, readWrite: read, command: byte(0, 0), size: sizeByteData)
            case 2: return Op(address: w.address, readWrite: read, command: byte(0, 0), size: sizeWordData)
            case 3...blockMax:
                data.storeBytes(of: UInt8(r.length), as: UInt8.self)
                return Op(address: w.address, readWrite: read, command: byte(0, 0), size: sizeI2CBlock)
            default: return nil
            }
        default:
            return nil
        }
    }

    /// After a successful operation: the bytes it read, copied into the transfer's read message. False if the
    /// adapter returned a block shorter than asked (the read fails rather than hand back stale bytes).
    static func decode(_ op: Op, _ m: UnsafeMutableBufferPointer<I2CMessage>, data: UnsafeMutableRawPointer) -> Bool {
        guard let r = m.last, r.read, r.length > 0, let dst = r.buffer else { return true }
        switch op.size {
        case sizeByte, sizeByteData:
            dst.copyMemory(from: data, byteCount: 1)
        case sizeWordData, sizeProcCall:
            dst.copyMemory(from: data, byteCount: 2)
        case sizeI2CBlock:
            guard Int(data.load(as: UInt8.self)) >= r.length else { return false }
            dst.copyMemory(from: data + 1, byteCount: r.length)
        default:
            return true
        }
        return true
    }
}
