import Glibc
import CLinux

/// How a queue raises its "used buffer" interrupt (or a device its config interrupt): an eventfd write
/// (simulated driver, vhost-user call fd, the kernel module's interrupt eventfd) or the virtio-lo KICK ioctl.
/// A plain value: no ARC on the hot path.
public struct Notifier: Sendable {
    enum Kind: UInt8, Sendable { case none, eventfd, virtioLoKick, vduseIRQ }
    let kind: Kind
    let fd: Int32
    let device: UInt32
    let queue: Int32

    public static let none = Notifier(kind: .none, fd: -1, device: 0, queue: 0)
    public static func eventfd(_ fd: Int32) -> Notifier { Notifier(kind: .eventfd, fd: fd, device: 0, queue: 0) }
    /// VIRTIO_LO_KICK: `ioctl(fd, 0x4018501E, {idx, qidx})` runs vring_interrupt in the caller's context.
    public static func virtioLoKick(fd: Int32, device: UInt32, queue: Int32) -> Notifier {
        Notifier(kind: .virtioLoKick, fd: fd, device: device, queue: queue)
    }
    /// VDUSE_VQ_INJECT_IRQ on a VDUSE device fd (the kernel runs vring_interrupt from a workqueue).
    public static func vduseIRQ(fd: Int32, queue: Int32) -> Notifier { Notifier(kind: .vduseIRQ, fd: fd, device: 0, queue: queue) }
    public var isNone: Bool { kind == .none }

    @inline(__always)
    public func signal() {
        switch kind {
        case .none: return
        case .eventfd: FD.signal(fd)
        case .virtioLoKick:
            var k: (UInt32, Int32) = (device, queue)
            _ = withUnsafeMutablePointer(to: &k) { lb_ioctl_ptr(fd, 0x4018_501E, UnsafeMutableRawPointer($0)) }
        case .vduseIRQ: _ = lb_vduse_inject_irq(fd, UInt32(bitPattern: queue))
        }
    }
}
