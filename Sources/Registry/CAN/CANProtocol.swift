import Transport

/// virtio-can (virtio 1.3 "CAN Device", device id 36; Linux `drivers/net/can/virtio_can.c`): queues tx (0), rx (1)
/// and control (2); config `le16 status` (bit 0: bus-off). Every message starts with a 16-byte little-endian header
/// (`msg_type`, `length`, `reserved_classic_dlc`, `padding`, `reserved_xl_priority`, `flags`, `can_id`), followed by
/// `length` payload bytes; a transmit or control request ends in a one-byte result the device writes.
public enum VirtioCAN {
    public static let deviceID: UInt32 = 36
    public static let configSize = 2
    public static let txQueue = 0, rxQueue = 1, controlQueue = 2
    /// Feature bits (the spec's and Linux 7.x's numbering; an early patch had bits 2 and 3 swapped).
    public static let fClassic = VirtioFeatures(rawValue: 1 << 0)
    public static let fFD = VirtioFeatures(rawValue: 1 << 1)
    public static let fRTR = VirtioFeatures(rawValue: 1 << 2)
    public static let fLateTxAck = VirtioFeatures(rawValue: 1 << 3)
    public static let msgTX: UInt16 = 0x0001
    public static let msgRX: UInt16 = 0x0101
    public static let ctrlStart: UInt16 = 0x0201
    public static let ctrlStop: UInt16 = 0x0202
    public static let flagExtended: UInt32 = 0x8000
    public static let flagFD: UInt32 = 0x4000
    public static let flagRTR: UInt32 = 0x2000
    public static let knownFlags = flagExtended | flagFD | flagRTR
    public static let resultOK: UInt8 = 0
    public static let resultNotOK: UInt8 = 1
    /// config `status`: VIRTIO_CAN_S_CTRL_BUSOFF.
    public static let statusBusOff: UInt16 = 1
    public static let headerSize = 16
    public static let maxClassicLength = 8
    public static let maxFDLength = 64
    /// The payload lengths a CAN FD frame can have on the bus (DLC 0-15).
    @inline(__always)
    public static func isFDLength(_ n: Int) -> Bool {
        n <= 8 || n == 12 || n == 16 || n == 20 || n == 24 || n == 32 || n == 48 || n == 64
    }
}

/// Linux SocketCAN's frame layout (`struct can_frame`, 16 bytes; `struct canfd_frame`, 72 bytes): `can_id` (host
/// order) with the EFF/RTR/ERR flags in its top bits, `len`, `flags` (FD), two reserved bytes (`len8_dlc`), data.
/// Host endpoints read and write frames in this layout.
public enum LinuxCAN {
    public static let effFlag: UInt32 = 0x8000_0000
    public static let rtrFlag: UInt32 = 0x4000_0000
    public static let errFlag: UInt32 = 0x2000_0000
    public static let sffMask: UInt32 = 0x0000_07ff
    public static let effMask: UInt32 = 0x1fff_ffff
    /// CAN_MTU and CANFD_MTU: the write/read size of a classic and an FD frame.
    public static let mtu = 16
    public static let fdMTU = 72
    /// canfd_frame.flags: CANFD_FDF (set on FD frames by Linux 6.0 and later; older ones ignore it).
    public static let fdfFlag: UInt8 = 0x04
    /// Error frame class: CAN_ERR_BUSOFF.
    public static let errBusOff: UInt32 = 0x0000_0040
}

/// Why a transmit request was answered VIRTIO_CAN_RESULT_NOT_OK (or, without room for a result, completed empty).
/// Counted per reason (`CANStats.txRefused`).
public enum CANTxError: String, Error, CaseIterable, Sendable {
    case noResult = "no writable byte for the result"
    case shortHeader = "readable part shorter than the 16-byte header"
    case badMessageType = "msg_type is not VIRTIO_CAN_TX"
    case unknownFlags = "undefined bit in flags"
    case classicNotNegotiated = "classic frame without VIRTIO_CAN_F_CAN_CLASSIC"
    case fdNotNegotiated = "FD frame without VIRTIO_CAN_F_CAN_FD"
    case rtrNotNegotiated = "RTR frame without VIRTIO_CAN_F_RTR_FRAMES"
    case rtrWithFD = "RTR flag on an FD frame"
    case badID = "can_id out of range (11 bits standard, 29 extended)"
    case badLength = "length above 8 (classic, RTR) or not an FD length up to 64"
    case shortPayload = "readable part shorter than header + length"
}

/// A driver's transmit request, decoded and checked: what goes on the bus.
public struct CANTxFrame: Equatable, Sendable {
    public var id: UInt32
    public var length: Int
    public var extended: Bool
    public var fd: Bool
    public var rtr: Bool
}

/// Decodes and checks the 16-byte header of a transmit request against the negotiated features: `readable` is the
/// whole readable part (header and payload). Every field the driver controls is checked: msg_type, flags (only
/// EXTENDED, FD, RTR, each negotiated; RTR not with FD), can_id (11 or 29 bits), length (≤ 8 classic and RTR, an FD
/// length ≤ 64), and that the payload is there (RTR frames carry none; Linux's driver still sends `length` zero
/// bytes, which are ignored).
@inline(__always)
public func decodeCANTx(_ h: UnsafeRawPointer, readable: Int, features: VirtioFeatures) -> Result<CANTxFrame, CANTxError> {
    guard readable >= VirtioCAN.headerSize else { return .failure(.shortHeader) }
    let type = UInt16(littleEndian: h.loadUnaligned(as: UInt16.self))
    let length = Int(UInt16(littleEndian: h.loadUnaligned(fromByteOffset: 2, as: UInt16.self)))
    let flags = UInt32(littleEndian: h.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
    let id = UInt32(littleEndian: h.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
    guard type == VirtioCAN.msgTX else { return .failure(.badMessageType) }
    guard flags & ~VirtioCAN.knownFlags == 0 else { return .failure(.unknownFlags) }
    let fd = flags & VirtioCAN.flagFD != 0, rtr = flags & VirtioCAN.flagRTR != 0, ext = flags & VirtioCAN.flagExtended != 0
    if fd {
        guard features.contains(VirtioCAN.fFD) else { return .failure(.fdNotNegotiated) }
        guard !rtr else { return .failure(.rtrWithFD) }
        guard length <= VirtioCAN.maxFDLength && VirtioCAN.isFDLength(length) else { return .failure(.badLength) }
    } else {
        guard features.contains(VirtioCAN.fClassic) else { return .failure(.classicNotNegotiated) }
        guard !rtr || features.contains(VirtioCAN.fRTR) else { return .failure(.rtrNotNegotiated) }
        guard length <= VirtioCAN.maxClassicLength else { return .failure(.badLength) }
    }
    guard id <= (ext ? LinuxCAN.effMask : LinuxCAN.sffMask) else { return .failure(.badID) }
    guard rtr || readable >= VirtioCAN.headerSize + length else { return .failure(.shortPayload) }
    return .success(CANTxFrame(id: id, length: length, extended: ext, fd: fd, rtr: rtr))
}

/// Writes the SocketCAN frame for `f` at `out` (72 bytes of room; the caller copies the payload to `out + 8`).
/// Returns the write size (16 classic, 72 FD).
@inline(__always)
func storeLinuxFrame(_ f: CANTxFrame, _ out: UnsafeMutableRawPointer) -> Int {
    var id = f.id
    if f.extended { id |= LinuxCAN.effFlag }
    if f.rtr { id |= LinuxCAN.rtrFlag }
    out.storeBytes(of: id, as: UInt32.self)
    out.storeBytes(of: UInt8(f.length), toByteOffset: 4, as: UInt8.self)
    out.storeBytes(of: f.fd ? LinuxCAN.fdfFlag : 0, toByteOffset: 5, as: UInt8.self)
    out.storeBytes(of: UInt16(0), toByteOffset: 6, as: UInt16.self)
    return f.fd ? LinuxCAN.fdMTU : LinuxCAN.mtu
}

/// A received SocketCAN frame (`size` 16 or 72 bytes at `p`) as a virtio-can RX header, or nil when the driver
/// cannot take it with `features` (an error frame, FD without F_CAN_FD, RTR without F_RTR_FRAMES, a classic frame
/// without F_CAN_CLASSIC, a length out of range). `length` is what follows the header in the driver's buffer (RTR:
/// the requested DLC, as zero bytes: Linux's driver wants them there).
@inline(__always)
func decodeLinuxFrame(_ p: UnsafeRawPointer, size: Int, features: VirtioFeatures) -> (id: UInt32, flags: UInt32, length: Int)? {
    guard size == LinuxCAN.mtu || size == LinuxCAN.fdMTU else { return nil }
    let raw = p.loadUnaligned(as: UInt32.self)
    let len = Int(p.load(fromByteOffset: 4, as: UInt8.self))
    guard raw & LinuxCAN.errFlag == 0 else { return nil }
    var flags: UInt32 = 0
    let id: UInt32
    if raw & LinuxCAN.effFlag != 0 { flags |= VirtioCAN.flagExtended; id = raw & LinuxCAN.effMask } else { id = raw & LinuxCAN.sffMask }
    if size == LinuxCAN.fdMTU {
        guard features.contains(VirtioCAN.fFD), len <= VirtioCAN.maxFDLength else { return nil }
        flags |= VirtioCAN.flagFD
    } else {
        guard features.contains(VirtioCAN.fClassic), len <= VirtioCAN.maxClassicLength else { return nil }
        if raw & LinuxCAN.rtrFlag != 0 {
            guard features.contains(VirtioCAN.fRTR) else { return nil }
            flags |= VirtioCAN.flagRTR
        }
    }
    return (id, flags, len)
}

/// Writes a virtio-can RX header (16 bytes) at `out`.
@inline(__always)
func storeRxHeader(_ out: UnsafeMutableRawPointer, id: UInt32, flags: UInt32, length: Int) {
    out.storeBytes(of: VirtioCAN.msgRX.littleEndian, as: UInt16.self)
    out.storeBytes(of: UInt16(length).littleEndian, toByteOffset: 2, as: UInt16.self)
    out.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)   // reserved_classic_dlc, padding, reserved_xl_priority
    out.storeBytes(of: flags.littleEndian, toByteOffset: 8, as: UInt32.self)
    out.storeBytes(of: id.littleEndian, toByteOffset: 12, as: UInt32.self)
}
