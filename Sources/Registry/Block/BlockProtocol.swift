import Transport

/// virtio-blk wire constants (virtio 1.2 §5.2).
public enum VirtioBlk {
    // Feature bits (§5.2.3).
    public static let sizeMax = VirtioFeatures(bit: 1)
    public static let segMax = VirtioFeatures(bit: 2)
    public static let readOnly = VirtioFeatures(bit: 5)
    public static let blkSize = VirtioFeatures(bit: 6)
    public static let flush = VirtioFeatures(bit: 9)
    public static let topology = VirtioFeatures(bit: 10)
    public static let configWCE = VirtioFeatures(bit: 11)
    public static let mq = VirtioFeatures(bit: 12)
    public static let discard = VirtioFeatures(bit: 13)
    public static let writeZeroes = VirtioFeatures(bit: 14)

    // Request types (§5.2.6).
    public static let typeIn: UInt32 = 0
    public static let typeOut: UInt32 = 1
    public static let typeFlush: UInt32 = 4
    public static let typeGetID: UInt32 = 8
    public static let typeDiscard: UInt32 = 11
    public static let typeWriteZeroes: UInt32 = 13

    // Status byte values.
    public static let statusOK: UInt8 = 0
    public static let statusIOErr: UInt8 = 1
    public static let statusUnsupp: UInt8 = 2

    /// `virtio_blk_discard_write_zeroes.flags`: the device may deallocate the zeroed range.
    public static let flagUnmap: UInt32 = 1

    public static let sectorSize = 512
    public static let headerSize = 16
    /// One `virtio_blk_discard_write_zeroes` segment: sector u64, num_sectors u32, flags u32.
    public static let rangeSize = 16
    public static let idBytes = 20

    /// `struct virtio_blk_config` through `write_zeroes_may_unmap` plus its 3 padding bytes.
    public static let configSize = 60

    /// Byte offsets into `struct virtio_blk_config`.
    public enum Config {
        public static let capacity = 0                 // u64, 512-byte sectors
        public static let sizeMax = 8                  // u32
        public static let segMax = 12                  // u32
        public static let geometry = 16                // cylinders u16, heads u8, sectors u8
        public static let blkSize = 20                 // u32
        public static let physicalBlockExp = 24        // u8
        public static let alignmentOffset = 25         // u8
        public static let minIOSize = 26               // u16
        public static let optIOSize = 28               // u32
        public static let writeback = 32               // u8
        public static let numQueues = 34               // u16
        public static let maxDiscardSectors = 36       // u32
        public static let maxDiscardSeg = 40           // u32
        public static let discardSectorAlignment = 44  // u32
        public static let maxWriteZeroesSectors = 48   // u32
        public static let maxWriteZeroesSeg = 52       // u32
        public static let writeZeroesMayUnmap = 56     // u8
    }
}
