import Glibc
import CLinux
import Transport

/// A SocketCAN interface through one CAN_RAW socket (AF_CAN), non-blocking, watched edge-triggered on the loop.
///
/// Set-up (Linux `include/uapi/linux/can.h`, `can/raw.h`), all of it once, when the device is built: bound to the
/// interface; CAN_RAW_LOOPBACK stays on (other sockets on the host, candump say, see what the driver sends) and
/// CAN_RAW_RECV_OWN_MSGS off (the driver's own frames do not come back: Linux's virtio_can echoes them itself when
/// the transmission completes); CAN_RAW_ERR_FILTER = CAN_ERR_BUSOFF (bus-off error frames reach the device);
/// CAN_RAW_FD_FRAMES when the interface takes FD frames; the receive filter passes every frame.
///
/// Nothing here may take the RTNL lock once the driver runs: Linux's virtio_can sends START and STOP from its
/// ndo_open/ndo_stop, which hold RTNL while they wait for the device's answer, and raw_setsockopt(CAN_RAW_FILTER,
/// CAN_RAW_ERR_FILTER) and bind() take RTNL. Changing the filter on the loop thread for a STOP deadlocked the guest
/// (`ip link set can0 up` and loopbackd both in D state, seen in the guest case). So a stopped controller does not
/// filter in the kernel: what the socket receives meanwhile is read and dropped (`discardQueued`), and the frame
/// kinds the driver did not negotiate are dropped by the device. SIOCGIFFLAGS (`isUp`) runs under RCU only.
///
/// The same code serves any datagram socket (`init(datagramFD:)`: the unit tests' socketpair, one frame per
/// datagram); the CAN socket options are then skipped.
public final class SocketCANEndpoint: CANEndpoint, EventHandler {
    public let interface: String
    public let description: String
    public let fdCapable: Bool
    private let fd: Int32
    private let isCAN: Bool
    private var loop: EventLoop?
    private unowned(unsafe) var delegate: CANEndpointDelegate?
    private var registration = -1
    private var receiving = false
    /// Receive errors other than EAGAIN and interface-down (logged once).
    public private(set) var receiveErrors = 0

    // Linux ABI constants (uapi: linux/socket.h, linux/can.h, linux/can/raw.h, linux/sockios.h, net/if.h).
    static let afCAN: Int32 = 29, canRaw: Int32 = 1, solCANRaw: Int32 = 101
    static let rawFilter: Int32 = 1, rawErrFilter: Int32 = 2, rawFDFrames: Int32 = 5
    static let siocgifindex: UInt = 0x8933, siocgifmtu: UInt = 0x8921, siocgifflags: UInt = 0x8913
    static let iffUp: Int16 = 0x1
    private static let epollET: UInt32 = 1 << 31

    /// Opens `interface` (a CAN netdev: vcan0, can0). Throws with what is missing.
    public init(interface: String) throws(DeviceError) {
        guard !interface.isEmpty, interface.utf8.count < 16 else { throw DeviceError("CAN interface name must be 1 to 15 bytes: \(interface)") }
        let s = Glibc.socket(Self.afCAN, Int32(SOCK_RAW.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), Self.canRaw)
        guard s >= 0 else {
            let e = Errno.current
            throw DeviceError("cannot open a SocketCAN socket: \(e)" + (e.rawValue == EAFNOSUPPORT ? " (this kernel has no AF_CAN: modprobe can-raw)" : ""))
        }
        var ifr = [UInt8](repeating: 0, count: 40)
        for (i, b) in interface.utf8.enumerated() { ifr[i] = b }
        func ioctl(_ req: UInt) -> Bool { ifr.withUnsafeMutableBytes { lb_ioctl_ptr(s, req, $0.baseAddress) } == 0 }
        guard ioctl(Self.siocgifindex) else {
            let e = Errno.current
            Glibc.close(s)
            throw DeviceError("no CAN interface \(interface): \(e)" + (e.rawValue == ENODEV ? " (create it: ip link add \(interface) type vcan)" : ""))
        }
        let index = ifr.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 16, as: Int32.self) }
        guard ioctl(Self.siocgifmtu) else { let e = Errno.current; Glibc.close(s); throw DeviceError("\(interface): SIOCGIFMTU: \(e)") }
        let mtu = ifr.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 16, as: Int32.self) }
        guard mtu == Int32(LinuxCAN.mtu) || mtu == Int32(LinuxCAN.fdMTU) else {
            Glibc.close(s)
            throw DeviceError("\(interface) is not a CAN interface (MTU \(mtu), not 16 or 72)")
        }
        fd = s
        isCAN = true
        self.interface = interface
        fdCapable = mtu == Int32(LinuxCAN.fdMTU)
        description = "SocketCAN \(interface)" + (fdCapable ? " (FD)" : "")
        // Every frame (a stopped controller drops what it reads), bus-off error frames, FD frames if the MTU allows.
        var all: (UInt32, UInt32) = (0, 0)
        _ = setsockopt(s, Self.solCANRaw, Self.rawFilter, &all, 8)
        var fdOn: Int32 = mtu == Int32(LinuxCAN.fdMTU) ? 1 : 0
        _ = setsockopt(s, Self.solCANRaw, Self.rawFDFrames, &fdOn, 4)
        // A receive queue for bursts while the driver has no free buffers (a CAN interface cannot slow its sender
        // down: what overflows the socket's queue, the kernel drops): 8 MiB, about 8,000 frames; SO_RCVBUFFORCE
        // needs CAP_NET_ADMIN, else SO_RCVBUF (capped by net.core.rmem_max).
        var rcv: Int32 = 8 << 20
        if setsockopt(s, SOL_SOCKET, 33 /* SO_RCVBUFFORCE */, &rcv, 4) != 0 { _ = setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcv, 4) }
        var errMask = LinuxCAN.errBusOff
        _ = setsockopt(s, Self.solCANRaw, Self.rawErrFilter, &errMask, 4)
        // struct sockaddr_can: can_family (2 bytes), 2 bytes padding, can_ifindex (int), 16 bytes of address union.
        var addr = [UInt8](repeating: 0, count: 24)
        addr[0] = UInt8(Self.afCAN)
        withUnsafeBytes(of: index) { for i in 0..<4 { addr[4 + i] = $0[i] } }
        let r = addr.withUnsafeBytes { Glibc.bind(s, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), 24) }
        guard r == 0 else { let e = Errno.current; Glibc.close(s); throw DeviceError("\(interface): bind: \(e)") }
    }

    /// Any datagram socket, one frame per datagram (tests). Takes ownership of `datagramFD` (made non-blocking).
    public init(datagramFD: Int32, fdCapable: Bool = true) {
        fd = datagramFD
        isCAN = false
        interface = "socket \(datagramFD)"
        self.fdCapable = fdCapable
        description = "datagram socket \(datagramFD)"
        _ = lb_set_nonblocking(datagramFD)
    }
    deinit { stop(); Glibc.close(fd) }

    public func start(loop: EventLoop, delegate: CANEndpointDelegate) throws(DeviceError) {
        self.delegate = delegate
        guard self.loop == nil else { return }
        do {
            registration = try loop.register(fd: fd, events: UInt32(LB_EPOLLIN | LB_EPOLLOUT) | Self.epollET, handler: self, token: 0)
        } catch { throw DeviceError("\(description): cannot watch: \(error)") }
        self.loop = loop
    }

    public func stop() {
        if registration >= 0 { loop?.unregister(fd: fd, registration: registration) }
        registration = -1
        loop = nil
        delegate = nil
    }

    public func handleEvent(token: UInt32, events: UInt32) {
        let e = IOEvents(epoll: events)
        if e.contains(.writable) { delegate?.endpointWritable() }
        if !e.isDisjoint(with: [.readable, .hangUp, .error]) { delegate?.endpointReadable() }
    }

    /// Nothing to change in the kernel (see the type's comment): the device drops the kinds the driver cannot take.
    public func configure(fd wantFD: Bool, rtr: Bool) {}

    public func setReceiving(_ on: Bool) {
        receiving = on
        _ = discardQueued()
    }

    /// Reads and drops what the socket holds (a stopped controller receives nothing); true when it stopped at its
    /// bound of 1,024 frames with more there (the caller asks for another turn).
    public func discardQueued() -> Bool {
        var buf = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        for _ in 0..<1024 {
            let n = withUnsafeMutableBytes(of: &buf) { Glibc.recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n == 0 { return false }   // a datagram peer's end of file (see `receive`)
            if n < 0 && errno == EINTR { continue }
            if n < 0 && errno != EAGAIN && errno != ENETDOWN && errno != ENODEV && errno != ENXIO { continue }
            if n < 0 { return false }
        }
        return true
    }

    public var isUp: Bool {
        guard isCAN else { return true }
        var ifr = [UInt8](repeating: 0, count: 40)
        for (i, b) in interface.utf8.enumerated() { ifr[i] = b }
        guard ifr.withUnsafeMutableBytes({ lb_ioctl_ptr(fd, Self.siocgifflags, $0.baseAddress) }) == 0 else { return false }
        let flags = ifr.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 16, as: Int16.self) }
        return flags & Self.iffUp != 0
    }

    public func send(_ frame: UnsafeRawPointer, size: Int) -> CANSendResult {
        while true {
            let n = Glibc.send(fd, frame, size, Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL))
            if n == size { return .sent }
            if n >= 0 { return .rejected(EMSGSIZE) }
            switch errno {
            case EINTR: continue
            case EAGAIN: return .wouldBlock
            case ENOBUFS: return .retryLater
            case ENETDOWN, ENODEV, ENXIO: return .down
            default: return .rejected(errno)
            }
        }
    }

    public func receive(into frame: UnsafeMutableRawPointer) -> CANReceiveResult {
        while true {
            let n = Glibc.recv(fd, frame, LinuxCAN.fdMTU, Int32(MSG_DONTWAIT))
            if n < 0 {
                switch errno {
                case EINTR: continue
                case EAGAIN: return .empty
                case ENETDOWN, ENODEV, ENXIO: if receiving { return .busOff } else { continue }
                default:
                    receiveErrors += 1
                    if receiveErrors == 1 { Log.warning("can: \(description): recv: \(Errno.current)") }
                    return .empty
                }
            }
            // 0: a datagram socket's peer closed (a CAN socket never reads 0 bytes): nothing more comes, and reading
            // on would spin (it did: the unit tests' socketpair closed under a running loop).
            if n == 0 { return .empty }
            guard receiving else { continue }
            guard n == LinuxCAN.mtu || n == LinuxCAN.fdMTU else { continue }
            let id = frame.load(as: UInt32.self)
            if id & LinuxCAN.errFlag != 0 {
                if id & LinuxCAN.errBusOff != 0 { return .busOff }
                continue
            }
            return .frame(size: n)
        }
    }
}
