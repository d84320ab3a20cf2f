// libFuzzer target: the kernel link's pure decoding (Sources/Transport/KernelLink/KernelLinkDecode.swift): the
// /proc/iomem parser, the RAM range checks, the queue table from ADDDEV/GET_QUEUE, the GET_RAM count logic and the
// GETEXT classification, GET_POOL's answer. Oracles: no trap; every accepted RAM range is page aligned, non-empty, does not wrap and
// fits an mmap offset; every decoded queue is a power of two within what was offered, with rings that do not wrap.
import Glibc
import Transport

@_cdecl("LLVMFuzzerTestOneInput")
public func kernelLinkFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var f = FuzzInput(data, size)
    let mode = f.u8()
    let page: UInt64 = mode & 0x80 != 0 ? UInt64(1) << (f.u8() % 64) : 4096
    switch mode % 3 {
    case 0:
        // /proc/iomem text, then the checks every range goes through before it is mapped.
        let text = String(decoding: f.rest(), as: UTF8.self)
        let ranges: [(start: UInt64, size: UInt64)]
        do throws(DeviceError) { ranges = try VirtioLoLink.parseIomem(text, pageSize: page) } catch { _ = error.description; return 0 }
        for r in ranges {
            fuzzCheck(r.size > 0 && r.start & (page - 1) == 0 && r.size & (page - 1) == 0, "parseIomem range \(r) (page \(page))")
            fuzzCheck(!r.start.addingReportingOverflow(r.size).overflow, "parseIomem range wraps: \(r)")
        }
        checkRanges(ranges, page)
    case 1:
        // GET_RAM's table (binary), the count logic.
        let returned = f.u32(), total = f.u32(), capacity = f.below(2048)
        let (read, retry) = VirtioLoLink.ramListCount(returned: returned, total: total, capacity: capacity)
        fuzzCheck(read >= 0 && read <= capacity && read <= Int(returned), "ramListCount read \(read)")
        if let r = retry { fuzzCheck(r > capacity && r <= VirtioLoLink.maxRAMListEntries, "ramListCount retry \(r)") }
        var ranges: [(start: UInt64, size: UInt64)] = []
        while !f.isEmpty && ranges.count < 64 { ranges.append((f.u64(), f.u64())) }
        checkRanges(ranges, page)
    default:
        // ADDDEV / GET_QUEUE queue tables.
        let n = 1 + f.below(8)
        var offered: [UInt16] = []
        var table: [KernelQueueInfo] = []
        for _ in 0..<n { let e = f.u8(); offered.append(e & 0x80 != 0 ? f.u16() : UInt16(1) << (e % 16)) }
        let rows = f.bool() ? n : f.below(9)
        for _ in 0..<rows {
            let s = f.u8()
            let qsize: UInt32 = s & 0x80 != 0 ? f.u32() : s & 0x40 != 0 ? 0 : UInt32(1) << (s % 17)
            table.append(KernelQueueInfo(size: qsize, desc: f.u64(), avail: f.u64(), used: f.u64()))
        }
        let queues: [QueueConfig]
        do throws(DeviceError) { queues = try VirtioLoLink.decodeQueues(table, offered: offered) } catch { _ = error.description; break }
        fuzzCheck(queues.count <= table.count && table.count == offered.count, "decodeQueues \(queues.count) of \(table.count)")
        for (k, q) in queues.enumerated() {
            let sz = Int(q.size)
            fuzzCheck(sz > 0 && sz & (sz - 1) == 0 && q.size <= offered[k] && UInt32(q.size) == table[k].size, "queue \(k): \(q)")
            for (b, l) in [(q.desc, QueueConfig.descBytes(sz)), (q.avail, QueueConfig.availBytes(sz)), (q.used, QueueConfig.usedBytes(sz))] {
                fuzzCheck(b != 0 && !b.addingReportingOverflow(UInt64(l)).overflow, "queue \(k) ring wraps: \(q)")
            }
        }
        _ = KernelFlavor.classify(probeErrno: Int32(bitPattern: f.u32()), version: f.u32(), extensions: f.u64()).deleteWithDELDEV
        // GET_POOL's answer (restricted memory): an accepted pool maps exactly its size, page-aligned, no wrap.
        let (iova, psize, off) = (f.u64(), f.u64(), f.u64())
        if let n = VirtioLoLink.checkPool(iova: iova, size: psize, mmapOffset: off) {
            fuzzCheck(UInt64(n) == psize && psize > 0 && psize % 4096 == 0 && off % 4096 == 0 && iova != 0, "checkPool \(iova) \(psize) \(off)")
            fuzzCheck(!iova.addingReportingOverflow(psize).overflow && off <= UInt64(Int64.max) - psize, "checkPool wraps: \(iova) \(psize) \(off)")
        }
    }
    return 0
}

private func checkRanges(_ ranges: [(start: UInt64, size: UInt64)], _ page: UInt64) {
    let (ok, rejected) = VirtioLoLink.checkRAMRanges(ranges, pageSize: page)
    fuzzCheck(ok.count + rejected.count <= ranges.count, "checkRAMRanges grew the list")
    for r in ok {
        fuzzCheck(r.size > 0 && r.start & (page - 1) == 0 && r.size & (page - 1) == 0, "checked range \(r) not aligned to \(page)")
        let (end, o) = r.start.addingReportingOverflow(r.size)
        fuzzCheck(!o && end <= UInt64(Int64.max), "checked range \(r) wraps or exceeds off_t")
    }
}
