/// Device-independent virtio feature bits (virtio 1.2 §6) as a typed set.
public struct VirtioFeatures: OptionSet, Sendable, Hashable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(bit: Int) { rawValue = 1 << UInt64(bit) }
    public static let notifyOnEmpty = VirtioFeatures(bit: 24)
    public static let anyLayout = VirtioFeatures(bit: 27)
    public static let indirectDesc = VirtioFeatures(bit: 28)
    public static let eventIdx = VirtioFeatures(bit: 29)
    /// Not a virtio feature: vhost-user's "protocol features supported" bit; never offered to a driver.
    public static let vhostUserProtocolFeatures = VirtioFeatures(bit: 30)
    public static let version1 = VirtioFeatures(bit: 32)
    public static let accessPlatform = VirtioFeatures(bit: 33)
    public static let ringPacked = VirtioFeatures(bit: 34)
    public static let inOrder = VirtioFeatures(bit: 35)
    /// What loopbackd's split-ring implementation supports; everything a device offers is masked to
    /// `deviceSpecific ∪ transportSupported` (no packed rings, no IOMMU).
    public static let transportSupported: VirtioFeatures = [.indirectDesc, .eventIdx, .version1, .notifyOnEmpty]
    public static let deviceSpecificMask = VirtioFeatures(rawValue: (1 << 24) - 1)
}

/// Device status bits (virtio 1.2 §2.1).
public enum DeviceStatus {
    public static let acknowledge: UInt8 = 1
    public static let driver: UInt8 = 2
    public static let driverOK: UInt8 = 4
    public static let featuresOK: UInt8 = 8
    public static let needsReset: UInt8 = 0x40
    public static let failed: UInt8 = 0x80
}

/// Virtio device ids (virtio 1.2 §5).
public enum VirtioID {
    public static let block: UInt32 = 2
    public static let console: UInt32 = 3
    public static let rng: UInt32 = 4
}
