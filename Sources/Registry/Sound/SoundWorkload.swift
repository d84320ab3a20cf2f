import Glibc
import CLinux
import Transport

/// The simulated driver's sound workload: a PCM_INFO query of stream 0 on the control queue (what Linux's
/// virtio_snd sends at probe; I/O messages complete on the stream clock, so they measure the clock, not the
/// device path). One round trip = the request answered S_OK with one 32-byte item. Chain and buffers built once.
public final class SoundWorkload: Workload {
    let driver: SimDriver
    public let q: SimQueue
    private let head: UInt16
    private let status: UnsafeMutableRawPointer
    private let info: UnsafeMutableRawPointer
    public let bytesPerRequest = VirtioSnd.pcmInfoSize
    public let requestKind = "PCM_INFO queries"
    let slot: QD1Slot
    var streamChains: StreamChains?

    public init?(_ d: SimDriver) {
        guard let q = d.queues.first else { return nil }
        let req = d.alloc(VirtioSnd.queryInfoSize), st = d.alloc(4), inf = d.alloc(VirtioSnd.pcmInfoSize)
        let r = d.host(req)
        r.storeBytes(of: VirtioSnd.rPcmInfo.littleEndian, as: UInt32.self)
        r.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
        r.storeBytes(of: UInt32(1).littleEndian, toByteOffset: 8, as: UInt32.self)
        r.storeBytes(of: UInt32(VirtioSnd.pcmInfoSize).littleEndian, toByteOffset: 12, as: UInt32.self)
        guard let h = q.addChain(readable: [(req, UInt32(VirtioSnd.queryInfoSize))],
                                 writable: [(st, 4), (inf, UInt32(VirtioSnd.pcmInfoSize))]) else { return nil }
        driver = d
        self.q = q
        head = h
        status = d.host(st)
        info = d.host(inf)
        slot = QD1Slot(q)
    }

    public func runOne(spinNs: UInt64) -> Bool {
        status.storeBytes(of: 0, as: UInt32.self)
        guard let u = slot.run(head, timeoutMs: 1000, spinNs: spinNs) else { return false }
        return u.len == UInt32(4 + VirtioSnd.pcmInfoSize) && UInt32(littleEndian: status.load(as: UInt32.self)) == VirtioSnd.sOK
    }
}

/// What one playback stream run saw (`SoundWorkload.stream`): per period, when its I/O message completed.
public struct SoundStreamRun {
    /// Completion time minus due time, ns: message k (0-based) is due when its last frame is due on the stream
    /// clock, START's submission + (k + 1) periods; the device starts its clock when it handles START, so this
    /// includes the START request's way to the device and each completion's way back.
    public var lateness: [Int64] = []
    /// |interval between consecutive completions − one period|, ns.
    public var jitter: [Int64] = []
    /// Messages answered with a status other than OK, control requests refused, waits that timed out.
    public var errors = 0
}

extension SoundWorkload {
    /// The stream phase of `ab` on a sound device: stream 0 (playback) at 48 kHz S16_LE stereo, `periodFrames` per
    /// I/O message, `queued` messages kept in flight the way Linux's virtio_snd keeps its ring's periods queued
    /// (each completed message is resubmitted at once with the next period), for `periods` periods:
    /// SET_PARAMS, PREPARE, the first `queued` messages, START (timed from its submission), then every
    /// completion timed against its due time; STOP and RELEASE at the end. Chains are built on first use and kept
    /// (the driver's RAM is bump-allocated). Needs the driver started with all four queues.
    public func stream(periods: Int, periodFrames: Int = 240, queued: Int = 4) -> SoundStreamRun {
        var run = SoundStreamRun()
        guard driver.queues.count > VirtioSnd.txQueue, periods > 0, queued > 0 else { run.errors = 1; return run }
        let rate = 48000, frameBytes = 4, periodBytes = periodFrames * frameBytes
        let periodNs = Int64(periodFrames) * 1_000_000_000 / Int64(rate)
        let tx = driver.queues[VirtioSnd.txQueue]
        if streamChains == nil || streamChains!.tx.count != queued || streamChains!.periodBytes != periodBytes {
            guard streamChains == nil else { run.errors = 1; return run }   // one geometry per workload
            let req = driver.alloc(VirtioSnd.setParamsSize), st = driver.alloc(4)
            guard let ch = q.addChain(readable: [(req, UInt32(VirtioSnd.setParamsSize))], writable: [(st, 4)]) else { run.errors = 1; return run }
            var heads: [UInt16] = [], stats: [UnsafeMutableRawPointer] = []
            for _ in 0..<queued {
                let b = driver.alloc(VirtioSnd.xferSize + periodBytes), s = driver.alloc(VirtioSnd.statusSize)
                let p = driver.host(b)
                p.storeBytes(of: UInt32(0), as: UInt32.self)   // stream_id 0
                for i in 0..<periodBytes { (p + VirtioSnd.xferSize + i).storeBytes(of: UInt8(truncatingIfNeeded: i &* 7 | 1), as: UInt8.self) }
                guard let h = tx.addChain(readable: [(b, UInt32(VirtioSnd.xferSize + periodBytes))], writable: [(s, UInt32(VirtioSnd.statusSize))]) else {
                    run.errors = 1; return run
                }
                heads.append(h); stats.append(driver.host(s))
            }
            streamChains = StreamChains(ctlHead: ch, ctlReq: driver.host(req), ctlStatus: driver.host(st), tx: heads,
                                        txStatus: stats, periodBytes: periodBytes)
        }
        let c = streamChains!
        func control(_ code: UInt32) -> Bool {
            c.ctlReq.initializeMemory(as: UInt8.self, repeating: 0, count: VirtioSnd.setParamsSize)
            c.ctlReq.storeBytes(of: code.littleEndian, as: UInt32.self)
            if code == VirtioSnd.rPcmSetParams {
                c.ctlReq.storeBytes(of: UInt32(queued * periodBytes).littleEndian, toByteOffset: 8, as: UInt32.self)
                c.ctlReq.storeBytes(of: UInt32(periodBytes).littleEndian, toByteOffset: 12, as: UInt32.self)
                c.ctlReq.storeBytes(of: UInt8(2), toByteOffset: 20, as: UInt8.self)                               // channels
                c.ctlReq.storeBytes(of: VirtioSnd.Format.s16.rawValue, toByteOffset: 21, as: UInt8.self)
                c.ctlReq.storeBytes(of: VirtioSnd.rateBit(UInt32(rate))!, toByteOffset: 22, as: UInt8.self)
            }
            c.ctlStatus.storeBytes(of: 0, as: UInt32.self)
            guard slot.run(c.ctlHead, timeoutMs: 1000, spinNs: 0) != nil else { return false }
            return UInt32(littleEndian: c.ctlStatus.load(as: UInt32.self)) == VirtioSnd.sOK
        }
        guard control(VirtioSnd.rPcmSetParams), control(VirtioSnd.rPcmPrepare) else { run.errors += 1; return run }
        run.lateness.reserveCapacity(periods); run.jitter.reserveCapacity(periods)
        var submitted = 0
        let old = tx.availIdx
        for h in c.tx where submitted < periods { c.txStatus[submitted].storeBytes(of: 0, as: UInt32.self); tx.pushAvail(h); submitted += 1 }
        tx.publish(); tx.kickIfNeeded(old: old)
        let t0 = Int64(lb_now_ns())
        guard control(VirtioSnd.rPcmStart) else { run.errors += 1; _ = control(VirtioSnd.rPcmRelease); return run }
        var last = t0
        for k in 0..<periods {
            guard let u = tx.waitUsed(timeoutMs: 1000) else { run.errors += 1; break }
            let now = Int64(lb_now_ns())
            run.lateness.append(now - (t0 + Int64(k + 1) * periodNs))
            if k > 0 { run.jitter.append(abs(now - last - periodNs)) }
            last = now
            guard let slotIndex = c.tx.firstIndex(of: u.id) else { run.errors += 1; continue }
            if UInt32(littleEndian: c.txStatus[slotIndex].load(as: UInt32.self)) != VirtioSnd.sOK { run.errors += 1 }
            if submitted < periods {
                c.txStatus[slotIndex].storeBytes(of: 0, as: UInt32.self)
                tx.submit(u.id)
                submitted += 1
            }
        }
        if !control(VirtioSnd.rPcmStop) { run.errors += 1 }
        if !control(VirtioSnd.rPcmRelease) { run.errors += 1 }
        while tx.reap() != nil {}   // RELEASE returned anything still held
        return run
    }
}

/// The stream phase's chains (built once per workload).
struct StreamChains {
    let ctlHead: UInt16
    let ctlReq: UnsafeMutableRawPointer, ctlStatus: UnsafeMutableRawPointer
    let tx: [UInt16]
    let txStatus: [UnsafeMutableRawPointer]
    let periodBytes: Int
}
