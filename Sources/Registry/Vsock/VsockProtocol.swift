import Glibc
import Transport

/// virtio-vsock (virtio 1.2 §5.10): queues rx (0), tx (1), event (2); config `le64 guest_cid`; every packet starts
/// with a 44-byte little-endian header (`VsockHeader`), followed by `len` payload bytes for RW.
public enum VirtioVsock {
    public static let deviceID: UInt32 = 19
    public static let configSize = 8
    public static let headerSize = 44
    public static let rxQueue = 0, txQueue = 1, eventQueue = 2
    /// The host's CID (VMADDR_CID_HOST): the only destination this device serves.
    public static let hostCID: UInt64 = 2
    /// VIRTIO_VSOCK_F_STREAM (1.2: offered by a device that supports streams; a driver that knows no feature
    /// bit gets streams anyway) and F_SEQPACKET (not offered: only STREAM packets are accepted).
    public static let fStream = VirtioFeatures(rawValue: 1 << 0)
    public static let fSeqpacket = VirtioFeatures(rawValue: 1 << 1)
    public static let typeStream: UInt16 = 1
    public static let typeSeqpacket: UInt16 = 2
    /// Shutdown flags: the sender will receive no more (RCV) / send no more (SEND).
    public static let shutdownRcv: UInt32 = 1
    public static let shutdownSend: UInt32 = 2
    /// virtio_vsock_event.id: VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (the driver drops every connection and re-reads
    /// the guest CID).
    public static let eventTransportReset: UInt32 = 0
    public static let eventSize = 4
    /// The largest payload one RX packet carries (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
    public static let maxPacketPayload = 64 << 10

    public enum Op: UInt16, Sendable {
        case request = 1, response = 2, rst = 3, shutdown = 4, rw = 5, creditUpdate = 6, creditRequest = 7
    }
}

/// struct virtio_vsock_hdr: src_cid, dst_cid (le64), src_port, dst_port, len (le32), type, op (le16), flags,
/// buf_alloc, fwd_cnt (le32). Loads and stores are unaligned-safe (Linux aligns it; a hostile driver need not).
public struct VsockHeader: Equatable, Sendable {
    public var srcCID: UInt64 = 0
    public var dstCID: UInt64 = 0
    public var srcPort: UInt32 = 0
    public var dstPort: UInt32 = 0
    public var len: UInt32 = 0
    public var type: UInt16 = VirtioVsock.typeStream
    public var op: UInt16 = 0
    public var flags: UInt32 = 0
    public var bufAlloc: UInt32 = 0
    public var fwdCnt: UInt32 = 0

    public init(srcCID: UInt64 = 0, dstCID: UInt64 = 0, srcPort: UInt32 = 0, dstPort: UInt32 = 0, len: UInt32 = 0,
                type: UInt16 = VirtioVsock.typeStream, op: VirtioVsock.Op, flags: UInt32 = 0, bufAlloc: UInt32 = 0, fwdCnt: UInt32 = 0) {
        self.srcCID = srcCID; self.dstCID = dstCID; self.srcPort = srcPort; self.dstPort = dstPort; self.len = len
        self.type = type; self.op = op.rawValue; self.flags = flags; self.bufAlloc = bufAlloc; self.fwdCnt = fwdCnt
    }

    @inline(__always)
    public init(from p: UnsafeRawPointer) {
        srcCID = UInt64(littleEndian: p.loadUnaligned(as: UInt64.self))
        dstCID = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        srcPort = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 16, as: UInt32.self))
        dstPort = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 20, as: UInt32.self))
        len = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 24, as: UInt32.self))
        type = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 28, as: UInt16.self))
        op = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 30, as: UInt16.self))
        flags = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 32, as: UInt32.self))
        bufAlloc = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 36, as: UInt32.self))
        fwdCnt = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 40, as: UInt32.self))
    }

    @inline(__always)
    public func store(to p: UnsafeMutableRawPointer) {
        p.storeBytes(of: srcCID.littleEndian, as: UInt64.self)
        p.storeBytes(of: dstCID.littleEndian, toByteOffset: 8, as: UInt64.self)
        p.storeBytes(of: srcPort.littleEndian, toByteOffset: 16, as: UInt32.self)
        p.storeBytes(of: dstPort.littleEndian, toByteOffset: 20, as: UInt32.self)
        p.storeBytes(of: len.littleEndian, toByteOffset: 24, as: UInt32.self)
        p.storeBytes(of: type.littleEndian, toByteOffset: 28, as: UInt16.self)
        p.storeBytes(of: op.littleEndian, toByteOffset: 30, as: UInt16.self)
        p.storeBytes(of: flags.littleEndian, toByteOffset: 32, as: UInt32.self)
        p.storeBytes(of: bufAlloc.littleEndian, toByteOffset: 36, as: UInt32.self)
        p.storeBytes(of: fwdCnt.littleEndian, toByteOffset: 40, as: UInt32.self)
    }
}

/// Why a driver packet was refused: answered with RST where the spec says so (the packet names a connection),
/// otherwise dropped. Counted per reason (`VsockStats`).
public enum VsockPacketError: String, CaseIterable, Sendable {
    case shortHeader = "chain shorter than the 44-byte header"
    case badLength = "len larger than the chain's payload, or payload on a packet that carries none"
    case badType = "socket type not STREAM (SEQPACKET is not offered)"
    case badOp = "unknown op"
    case badSourceCID = "src_cid is not the guest CID"
    case badDestinationCID = "dst_cid is not the host (2)"
    case noConnection = "packet for a connection that does not exist"
    case creditExceeded = "more data than the credit the device gave"
    case tableFull = "too many connections"
}

/// Validates the fixed part of a driver packet (everything but the connection state): returns the error or nil.
/// `payload`: readable bytes after the header.
@inline(__always)
func validateVsockHeader(_ h: VsockHeader, payload: Int, guestCID: UInt64) -> VsockPacketError? {
    guard h.type == VirtioVsock.typeStream else { return .badType }
    guard let op = VirtioVsock.Op(rawValue: h.op) else { return .badOp }
    guard h.srcCID == guestCID else { return .badSourceCID }
    guard h.dstCID == VirtioVsock.hostCID else { return .badDestinationCID }
    if op == .rw { guard Int(h.len) <= payload else { return .badLength } }
    else { guard h.len == 0 else { return .badLength } }
    return nil
}
