// The simulated driver's side of a split ring for the device harnesses: a chain written into the descriptor table and
// made available (virtio 1.2 §2.7.5, §2.7.6), as a driver would.

/// Links `segs` (guest address, length, device-writable) through descriptors `ids` of the table at `desc`, in that
/// order, and makes the head available in the avail ring at `avail` (`qsize` entries; `availIdx` advances).
func fuzzMakeAvailable(desc: UnsafeMutableRawPointer, avail: UnsafeMutableRawPointer, ids: [Int],
                       segs: [(UInt64, UInt32, Bool)], availIdx: inout UInt16, qsize: UInt16) {
    for (i, seg) in segs.enumerated() {
        let d = desc + 16 * ids[i]
        d.storeBytes(of: seg.0.littleEndian, as: UInt64.self)
        d.storeBytes(of: seg.1.littleEndian, toByteOffset: 8, as: UInt32.self)
        let flags: UInt16 = (i + 1 < segs.count ? 1 : 0) | (seg.2 ? 2 : 0)   // NEXT, WRITE
        d.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
        d.storeBytes(of: UInt16(i + 1 < segs.count ? ids[i + 1] : 0).littleEndian, toByteOffset: 14, as: UInt16.self)
    }
    avail.storeBytes(of: UInt16(ids[0]).littleEndian, toByteOffset: 4 + 2 * Int(availIdx % qsize), as: UInt16.self)
    availIdx &+= 1
    avail.storeBytes(of: availIdx.littleEndian, toByteOffset: 2, as: UInt16.self)
}
