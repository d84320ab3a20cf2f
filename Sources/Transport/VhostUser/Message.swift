import Glibc

// vhost-user message codec. Reference: QEMU docs/interop/vhost-user.rst ("Message Specification", "Front-end
// message types", "Back-end message types", "Protocol features"). All numbers are in the machine's native byte
// order (the spec's note); loopbackd only runs on little-endian hosts, and the codec uses native loads/stores.

/// Front-end → back-end requests (vhost-user.rst "Front-end message types"; ids checked against the `:id:` fields).
public enum VhostUserRequest: UInt32, Sendable, CaseIterable {
    case getFeatures = 1
    case setFeatures = 2
    case setOwner = 3
    case resetOwner = 4
    case setMemTable = 5
    case setLogBase = 6
    case setLogFD = 7
    case setVringNum = 8
    case setVringAddr = 9
    case setVringBase = 10
    case getVringBase = 11
    case setVringKick = 12
    case setVringCall = 13
    case setVringErr = 14
    case getProtocolFeatures = 15
    case setProtocolFeatures = 16
    case getQueueNum = 17
    case setVringEnable = 18
    case sendRARP = 19
    case netSetMTU = 20
    case setBackendReqFD = 21   // formerly SET_SLAVE_REQ_FD
    case iotlbMsg = 22
    case setVringEndian = 23
    case getConfig = 24
    case setConfig = 25
    case createCryptoSession = 26
    case closeCryptoSession = 27
    case postcopyAdvise = 28
    case postcopyListen = 29
    case postcopyEnd = 30
    case getInflightFD = 31
    case setInflightFD = 32
    case gpuSetSocket = 33
    case resetDevice = 34
    case vringKick = 35
    case getMaxMemSlots = 36
    case addMemReg = 37
    case remMemReg = 38
    case setStatus = 39
    case getStatus = 40
}

/// Back-end → front-end requests on the BACKEND_REQ channel (vhost-user.rst "Back-end message types").
public enum VhostUserBackendRequest: UInt32, Sendable {
    case iotlbMsg = 1
    case configChange = 2
    case vringHostNotifier = 3
    case vringCall = 4
    case vringErr = 5
}

/// vhost-user protocol feature bits (vhost-user.rst "Protocol features").
public struct VhostUserProtocolFeatures: OptionSet, Sendable, Hashable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(bit: Int) { rawValue = 1 << UInt64(bit) }
    public static let mq = VhostUserProtocolFeatures(bit: 0)
    public static let logShmFD = VhostUserProtocolFeatures(bit: 1)
    public static let rarp = VhostUserProtocolFeatures(bit: 2)
    public static let replyAck = VhostUserProtocolFeatures(bit: 3)
    public static let mtu = VhostUserProtocolFeatures(bit: 4)
    public static let backendReq = VhostUserProtocolFeatures(bit: 5)      // formerly SLAVE_REQ
    public static let crossEndian = VhostUserProtocolFeatures(bit: 6)
    public static let cryptoSession = VhostUserProtocolFeatures(bit: 7)
    public static let pagefault = VhostUserProtocolFeatures(bit: 8)
    public static let config = VhostUserProtocolFeatures(bit: 9)
    public static let backendSendFD = VhostUserProtocolFeatures(bit: 10)
    public static let hostNotifier = VhostUserProtocolFeatures(bit: 11)
    public static let inflightShmFD = VhostUserProtocolFeatures(bit: 12)
    public static let resetDevice = VhostUserProtocolFeatures(bit: 13)
    public static let inbandNotifications = VhostUserProtocolFeatures(bit: 14)
    public static let configureMemSlots = VhostUserProtocolFeatures(bit: 15)
    public static let status = VhostUserProtocolFeatures(bit: 16)
}

/// The 12-byte header: request, flags, payload size (vhost-user.rst "Header").
public struct VhostUserHeader: Sendable, Equatable {
    public var request: UInt32
    public var flags: UInt32
    public var size: UInt32
    public init(request: UInt32, flags: UInt32, size: UInt32) { self.request = request; self.flags = flags; self.size = size }

    public static let byteCount = 12
    /// Lower 2 bits: protocol version, currently 1.
    public static let versionMask: UInt32 = 0x3
    public static let version: UInt32 = 0x1
    /// Bit 2: this is a reply (back-end → front-end on the main socket).
    public static let replyFlag: UInt32 = 0x4
    /// Bit 3: the sender wants a REPLY_ACK u64 (vhost-user.rst "REPLY_ACK").
    public static let needReplyFlag: UInt32 = 0x8
    /// Largest payload loopbackd accepts (the biggest real message, SET_MEM_TABLE with 8 regions, is 264 bytes).
    public static let maxPayload: UInt32 = 4096

    public var needsReply: Bool { flags & VhostUserHeader.needReplyFlag != 0 }
    public var isReply: Bool { flags & VhostUserHeader.replyFlag != 0 }

    public init(from p: UnsafeRawPointer) {
        request = p.loadUnaligned(as: UInt32.self)
        flags = p.loadUnaligned(fromByteOffset: 4, as: UInt32.self)
        size = p.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
    }

    /// Checks what a request header must satisfy before its payload is read.
    public func validateRequest() throws(VhostUserError) {
        guard flags & VhostUserHeader.versionMask == VhostUserHeader.version else { throw .badVersion(flags: flags) }
        guard !isReply else { throw .replyFlagInRequest(request: request) }
        guard size <= VhostUserHeader.maxPayload else { throw .payloadTooLarge(request: request, size: size) }
    }
}

/// One memory region (vhost-user.rst "Memory regions description" / "Single memory region description").
public struct VhostUserMemoryRegion: Sendable, Equatable {
    public var guestAddress: UInt64
    public var size: UInt64
    public var userAddress: UInt64
    public var mmapOffset: UInt64
    public init(guestAddress: UInt64, size: UInt64, userAddress: UInt64, mmapOffset: UInt64) {
        self.guestAddress = guestAddress; self.size = size; self.userAddress = userAddress; self.mmapOffset = mmapOffset
    }
    public static let byteCount = 32
}

/// Vring addresses (vhost-user.rst "A vring address description" = Linux `struct vhost_vring_addr`, 40 bytes):
/// index u32, flags u32, desc u64, used u64, avail u64, log u64. Without IOMMU_PLATFORM these are front-end
/// user (virtual) addresses.
public struct VhostUserVringAddress: Sendable, Equatable {
    public var index: Int
    public var flags: UInt32
    public var desc: UInt64
    public var used: UInt64
    public var avail: UInt64
    public var log: UInt64
    public init(index: Int, flags: UInt32, desc: UInt64, used: UInt64, avail: UInt64, log: UInt64) {
        self.index = index; self.flags = flags; self.desc = desc; self.used = used; self.avail = avail; self.log = log
    }
    public static let byteCount = 40
    /// VHOST_VRING_F_LOG (bit 0): log used-ring writes; loopbackd offers no logging.
    public static let logFlag: UInt32 = 1
}

/// Everything that makes a connection unusable. The server closes the connection on any of these (never the
/// daemon); the front-end drops the connection and reconnects.
public enum VhostUserError: Error, Equatable, Sendable, CustomStringConvertible {
    case badVersion(flags: UInt32)
    case replyFlagInRequest(request: UInt32)
    case payloadTooLarge(request: UInt32, size: UInt32)
    case unknownRequest(UInt32)
    case unsupportedRequest(VhostUserRequest)
    case notNegotiated(VhostUserRequest)
    case payloadSize(VhostUserRequest, got: Int, want: String)
    case fdCount(VhostUserRequest, got: Int, want: String)
    case tooManyFDs
    case vringIndex(VhostUserRequest, index: UInt64, queues: Int)
    case vringNum(index: Int, num: UInt32, max: UInt16)
    case vringBase(index: Int, base: UInt32)
    case badFlags(VhostUserRequest, UInt64)
    case badValue(VhostUserRequest, UInt64)
    case configSize(UInt32)
    case tooManyRegions(Int)
    case badRegion(String)
    /// The front-end itself could not prepare a message (a companion's socketpair failed).
    case local(String)
    case featuresNotOffered(UInt64)
    case protocolFeaturesNotOffered(UInt64)
    case ringAddress(index: Int, String)
    case peerClosed(midMessage: Bool)
    case io(Errno)
    case timeout(VhostUserRequest?)
    case badReply(String)
    case rejected(VhostUserRequest, UInt64)
    case notConnected
    /// A region's file shrank under its mapping (caught by the SIGBUS guard): the peer's memory is gone.
    case memoryFault
    /// A file descriptor of the wrong kind where the protocol says eventfd (or a semaphore eventfd as a kick).
    case badFD(VhostUserRequest, String)
    /// A kick fd reported hang-up or error (it can never be read again).
    case kickFault(index: Int)

    public var description: String {
        switch self {
        case .badVersion(let f): return "bad header flags 0x\(String(f, radix: 16)) (version must be 1)"
        case .replyFlagInRequest(let r): return "request \(r) has the REPLY flag"
        case .payloadTooLarge(let r, let s): return "request \(r): payload \(s) bytes exceeds \(VhostUserHeader.maxPayload)"
        case .unknownRequest(let r): return "unknown request \(r)"
        case .unsupportedRequest(let r): return "unsupported request \(r)"
        case .notNegotiated(let r): return "\(r) without negotiating its protocol feature"
        case .payloadSize(let r, let g, let w): return "\(r): payload \(g) bytes, want \(w)"
        case .fdCount(let r, let g, let w): return "\(r): \(g) file descriptors, want \(w)"
        case .tooManyFDs: return "too many file descriptors in one message"
        case .vringIndex(let r, let i, let n): return "\(r): vring index \(i) out of range (\(n) queues)"
        case .vringNum(let i, let n, let m): return "vring \(i): size \(n) not a power of two in 1...\(m)"
        case .vringBase(let i, let b): return "vring \(i): base \(b) exceeds 16 bits"
        case .badFlags(let r, let f): return "\(r): unsupported flags 0x\(String(f, radix: 16))"
        case .badValue(let r, let v): return "\(r): bad value \(v)"
        case .configSize(let s): return "config access of \(s) bytes exceeds 256"
        case .tooManyRegions(let n): return "\(n) memory regions exceed the limit"
        case .badRegion(let s): return "bad memory region: \(s)"
        case .local(let s): return "front-end: \(s)"
        case .featuresNotOffered(let f): return "features 0x\(String(f, radix: 16)) were not offered"
        case .protocolFeaturesNotOffered(let f): return "protocol features 0x\(String(f, radix: 16)) were not offered"
        case .ringAddress(let i, let s): return "vring \(i): \(s)"
        case .peerClosed(let mid): return mid ? "peer closed the connection in the middle of a message" : "peer closed the connection"
        case .io(let e): return "socket error: \(e)"
        case .timeout(let r): return "no reply\(r.map { " to \($0)" } ?? "") within the timeout"
        case .badReply(let s): return "bad reply: \(s)"
        case .rejected(let r, let v): return "back-end rejected \(r) (status \(v))"
        case .notConnected: return "not connected"
        case .memoryFault: return "front-end memory became inaccessible (a region's file was truncated under its mapping)"
        case .badFD(let r, let s): return "\(r): \(s)"
        case .kickFault(let i): return "vring \(i): kick fd reported hang-up or error"
        }
    }
}

/// What the decoder checks against: the served device's queues.
public struct VhostUserLimits: Sendable {
    public var queueMaxSizes: [UInt16]
    /// SET_MEM_TABLE carries at most this many regions (VHOST_MEMORY_BASELINE_NREGIONS; one fd each, SCM_RIGHTS).
    public var maxTableRegions: Int
    public init(queueMaxSizes: [UInt16], maxTableRegions: Int = 8) {
        self.queueMaxSizes = queueMaxSizes; self.maxTableRegions = maxTableRegions
    }
}

/// A decoded, validated front-end request. File descriptors travel separately; `expectedFDs` says how many.
public enum VhostUserMessage: Equatable, Sendable {
    case getFeatures
    case setFeatures(UInt64)
    case setOwner
    case resetOwner
    case setMemTable([VhostUserMemoryRegion])
    case setVringNum(index: Int, num: UInt16)
    case setVringAddr(VhostUserVringAddress)
    case setVringBase(index: Int, base: UInt16)
    case getVringBase(index: Int)
    case setVringKick(index: Int, hasFD: Bool)
    case setVringCall(index: Int, hasFD: Bool)
    case setVringErr(index: Int, hasFD: Bool)
    case getProtocolFeatures
    case setProtocolFeatures(UInt64)
    case getQueueNum
    case setVringEnable(index: Int, enable: Bool)
    case setBackendReqFD
    case getConfig(offset: UInt32, size: UInt32, flags: UInt32)
    case setConfig(offset: UInt32, flags: UInt32, data: [UInt8])
    case resetDevice
    case getMaxMemSlots
    case addMemReg(VhostUserMemoryRegion)
    case remMemReg(VhostUserMemoryRegion)
    case setStatus(UInt8)
    case getStatus
    /// VHOST_USER_GPU_SET_SOCKET: the display socket (one fd) of a gpu (vhost-user-gpu.rst; QEMU sends no payload).
    case gpuSetSocket

    /// KICK/CALL/ERR u64: bits 0-7 vring index, bit 8 "no fd" (polling) (vhost-user.rst SET_VRING_KICK).
    public static let vringIndexMask: UInt64 = 0xff
    public static let noFDFlag: UInt64 = 0x100
    /// GET/SET_CONFIG: 12-byte header (offset, size, flags) then at most 256 bytes (VHOST_USER_MAX_CONFIG_SIZE).
    public static let configHeaderBytes = 12
    public static let maxConfigBytes: UInt32 = 256

    /// The number of file descriptors the request must carry (a closed range: REM_MEM_REG tolerates one, which
    /// the spec says MAY be sent by older front-ends and MUST then be closed unused).
    public var expectedFDs: ClosedRange<Int> {
        switch self {
        case .setMemTable(let r): return r.count...r.count
        case .addMemReg, .setBackendReqFD, .gpuSetSocket: return 1...1
        case .remMemReg: return 0...1
        case .setVringKick(_, let f), .setVringCall(_, let f), .setVringErr(_, let f): return f ? 1...1 : 0...0
        default: return 0...0
        }
    }

    /// Decodes and validates one request. Payload sizes must match exactly; ring indices, sizes and bases are
    /// range-checked; `fdCount` must match `expectedFDs`. The caller closes every received fd it does not keep.
    public static func decode(_ h: VhostUserHeader, payload p: UnsafeRawBufferPointer, fdCount: Int,
                              limits: VhostUserLimits) throws(VhostUserError) -> VhostUserMessage {
        guard let req = VhostUserRequest(rawValue: h.request) else { throw .unknownRequest(h.request) }
        let n = p.count
        guard n == Int(h.size) else { throw .payloadSize(req, got: n, want: "\(h.size) (header)") }
        func size(_ want: Int) throws(VhostUserError) {
            guard n == want else { throw .payloadSize(req, got: n, want: "\(want)") }
        }
        func u32(_ o: Int) -> UInt32 { p.baseAddress!.loadUnaligned(fromByteOffset: o, as: UInt32.self) }
        func u64(_ o: Int) -> UInt64 { p.baseAddress!.loadUnaligned(fromByteOffset: o, as: UInt64.self) }
        let queues = limits.queueMaxSizes.count
        func ring(_ i: UInt64) throws(VhostUserError) -> Int {
            guard i < UInt64(queues) else { throw .vringIndex(req, index: i, queues: queues) }
            return Int(i)
        }
        func region(_ o: Int) -> VhostUserMemoryRegion {
            VhostUserMemoryRegion(guestAddress: u64(o), size: u64(o + 8), userAddress: u64(o + 16), mmapOffset: u64(o + 24))
        }
        let m: VhostUserMessage
        switch req {
        case .getFeatures: try size(0); m = .getFeatures
        case .setFeatures: try size(8); m = .setFeatures(u64(0))
        case .setOwner: try size(0); m = .setOwner
        case .resetOwner: try size(0); m = .resetOwner
        case .setMemTable:
            guard n >= 8 else { throw .payloadSize(req, got: n, want: "8 + 32 * regions") }
            let count = Int(u32(0))
            guard count >= 1, count <= limits.maxTableRegions else { throw .tooManyRegions(count) }
            try size(8 + VhostUserMemoryRegion.byteCount * count)
            m = .setMemTable((0..<count).map { region(8 + VhostUserMemoryRegion.byteCount * $0) })
        case .setVringNum:
            try size(8)
            let i = try ring(UInt64(u32(0)))
            let num = u32(4), max = limits.queueMaxSizes[i]
            guard num >= 1, num <= UInt32(max), num & (num - 1) == 0 else { throw .vringNum(index: i, num: num, max: max) }
            m = .setVringNum(index: i, num: UInt16(num))
        case .setVringAddr:
            try size(VhostUserVringAddress.byteCount)
            let i = try ring(UInt64(u32(0)))
            let flags = u32(4)
            guard flags == 0 else { throw .badFlags(req, UInt64(flags)) }   // only VHOST_VRING_F_LOG exists; no logging
            m = .setVringAddr(VhostUserVringAddress(index: i, flags: flags, desc: u64(8), used: u64(16), avail: u64(24), log: u64(32)))
        case .setVringBase:
            try size(8)
            let i = try ring(UInt64(u32(0)))
            let b = u32(4)
            guard b <= 0xffff else { throw .vringBase(index: i, base: b) }   // split rings: a 16-bit avail index
            m = .setVringBase(index: i, base: UInt16(b))
        case .getVringBase:
            try size(8)
            m = .getVringBase(index: try ring(UInt64(u32(0))))
        case .setVringKick, .setVringCall, .setVringErr:
            try size(8)
            let v = u64(0)
            guard v & ~(vringIndexMask | noFDFlag) == 0 else { throw .badFlags(req, v) }
            let i = try ring(v & vringIndexMask)
            let hasFD = v & noFDFlag == 0
            m = req == .setVringKick ? .setVringKick(index: i, hasFD: hasFD)
                : req == .setVringCall ? .setVringCall(index: i, hasFD: hasFD) : .setVringErr(index: i, hasFD: hasFD)
        case .getProtocolFeatures: try size(0); m = .getProtocolFeatures
        case .setProtocolFeatures: try size(8); m = .setProtocolFeatures(u64(0))
        case .getQueueNum: try size(0); m = .getQueueNum
        case .setVringEnable:
            try size(8)
            let i = try ring(UInt64(u32(0)))
            let e = u32(4)
            guard e <= 1 else { throw .badValue(req, UInt64(e)) }
            m = .setVringEnable(index: i, enable: e == 1)
        case .setBackendReqFD: try size(0); m = .setBackendReqFD
        case .getConfig, .setConfig:
            guard n >= configHeaderBytes else { throw .payloadSize(req, got: n, want: ">= 12") }
            let off = u32(0), sz = u32(4), flags = u32(8)
            guard sz <= maxConfigBytes else { throw .configSize(sz) }
            try size(configHeaderBytes + Int(sz))
            guard flags <= 1 else { throw .badFlags(req, UInt64(flags)) }   // 0 writable fields, 1 live migration
            if req == .getConfig { m = .getConfig(offset: off, size: sz, flags: flags) } else {
                m = .setConfig(offset: off, flags: flags, data: Array(UnsafeRawBufferPointer(rebasing: p[configHeaderBytes...])))
            }
        case .resetDevice: try size(0); m = .resetDevice
        case .getMaxMemSlots: try size(0); m = .getMaxMemSlots
        case .addMemReg, .remMemReg:
            try size(8 + VhostUserMemoryRegion.byteCount)   // u64 padding, then the region
            m = req == .addMemReg ? .addMemReg(region(8)) : .remMemReg(region(8))
        case .setStatus:
            try size(8)
            let v = u64(0)
            guard v <= 0xff else { throw .badValue(req, v) }
            m = .setStatus(UInt8(v))
        case .getStatus: try size(0); m = .getStatus
        case .gpuSetSocket: try size(0); m = .gpuSetSocket
        default:
            throw .unsupportedRequest(req)
        }
        guard m.expectedFDs.contains(fdCount) else {
            let r = m.expectedFDs
            throw .fdCount(req, got: fdCount, want: r.lowerBound == r.upperBound ? "\(r.lowerBound)" : "\(r.lowerBound)...\(r.upperBound)")
        }
        return m
    }
}

/// Builds messages: a header plus a payload in native byte order.
public struct VhostUserWriter {
    public private(set) var bytes: [UInt8]
    public init(request: UInt32, flags: UInt32 = VhostUserHeader.version) {
        bytes = []
        bytes.reserveCapacity(64)
        append(request); append(flags); append(UInt32(0))
    }
    public mutating func append<T: FixedWidthInteger>(_ v: T) {
        withUnsafeBytes(of: v) { bytes.append(contentsOf: $0) }
    }
    public mutating func append(bytes b: [UInt8]) { bytes.append(contentsOf: b) }
    /// The finished message with its size field filled in.
    public var message: [UInt8] {
        var b = bytes
        let size = UInt32(b.count - VhostUserHeader.byteCount)
        withUnsafeBytes(of: size) { for k in 0..<4 { b[8 + k] = $0[k] } }
        return b
    }

    public static func request(_ r: VhostUserRequest, needReply: Bool = false) -> VhostUserWriter {
        VhostUserWriter(request: r.rawValue, flags: VhostUserHeader.version | (needReply ? VhostUserHeader.needReplyFlag : 0))
    }
    public static func reply(_ request: UInt32) -> VhostUserWriter {
        VhostUserWriter(request: request, flags: VhostUserHeader.version | VhostUserHeader.replyFlag)
    }
    public mutating func appendRegion(_ r: VhostUserMemoryRegion) {
        append(r.guestAddress); append(r.size); append(r.userAddress); append(r.mmapOffset)
    }
    public mutating func appendState(_ index: Int, _ num: UInt32) { append(UInt32(index)); append(num) }
}
