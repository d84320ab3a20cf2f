import XCTest
import CMallocCounter
@testable import Daemon
@testable import Registry
import Transport

/// virtio-snd allocates nothing per request: 10,000 PCM_INFO control round trips, and 10,000 playback I/O
/// messages completed by the stream clock (timer → pump → WAV file sink → used ring; the driver resubmits each
/// message as it completes, 16 in flight, 64 bytes = 16 frames at 384 kHz S16 stereo each).
extension AllocationTests {
    func testSoundControlPathDoesNotAllocate() throws {
        let n = try run("sound", { SoundDevice(streams: [SoundStreamConfig(direction: VirtioSnd.dOutput, endpoint: NullSoundEndpoint())]) })
        print("allocations during 10,000 sound PCM_INFO round trips: \(n)")
        XCTAssertLessThan(n, 100)
    }

    func testSoundPlaybackPathDoesNotAllocate() throws {
        let path = "/tmp/snd-alloc-\(getpid()).wav"
        defer { unlink(path) }
        let loop = try EventLoop()
        let host = DeviceHost(loop: loop)
        let dev = SoundDevice(streams: [SoundStreamConfig(direction: VirtioSnd.dOutput, endpoint: WavSinkEndpoint(path: path))])
        let i = host.add(name: "snd", device: dev)
        loop.startThread()
        defer { loop.executeAndWait { host.shutdown() }; loop.stopAndJoin() }
        let drv = try SimDriver(host: host, index: i, ramSize: 8 << 20)
        try drv.start()
        let ctl = drv.queues[VirtioSnd.controlQueue], tx = drv.queues[VirtioSnd.txQueue]
        func control(_ words: [UInt32], tail: [UInt8] = []) throws -> UInt32 {
            var req: [UInt8] = []
            for w in words { withUnsafeBytes(of: w.littleEndian) { req += $0 } }
            req += tail
            let r = drv.alloc(req.count), st = drv.alloc(4)
            req.withUnsafeBytes { drv.host(r).copyMemory(from: $0.baseAddress!, byteCount: req.count) }
            let h = try XCTUnwrap(ctl.addChain(readable: [(r, UInt32(req.count))], writable: [(st, 4)]))
            ctl.submit(h)
            _ = try XCTUnwrap(ctl.waitUsed(timeoutMs: 2000))
            ctl.recycle(h)
            return UInt32(littleEndian: drv.host(st).load(as: UInt32.self))
        }
        let rate384k = VirtioSnd.rateBit(384_000)!
        XCTAssertEqual(try control([VirtioSnd.rPcmSetParams, 0, 1024, 64, 0], tail: [2, VirtioSnd.Format.s16.rawValue, rate384k, 0]), VirtioSnd.sOK)
        XCTAssertEqual(try control([VirtioSnd.rPcmPrepare, 0]), VirtioSnd.sOK)
        var heads: [UInt16] = []
        for _ in 0..<16 {
            let hdr = drv.alloc(4), data = drv.alloc(64), st = drv.alloc(8)
            drv.host(hdr).storeBytes(of: UInt32(0), as: UInt32.self)
            heads.append(try XCTUnwrap(tx.addChain(readable: [(hdr, 4), (data, 64)], writable: [(st, 8)])))
        }
        for h in heads { tx.pushAvail(h) }
        tx.publish(); tx.kick()
        XCTAssertEqual(try control([VirtioSnd.rPcmStart, 0]), VirtioSnd.sOK)
        func play(_ n: Int) -> Int {
            var done = 0
            while done < n {
                guard let u = tx.waitUsed(timeoutMs: 2000) else { break }
                done += 1
                let old = tx.availIdx
                tx.pushAvail(u.id)
                tx.publish()
                tx.kickIfNeeded(old: old)
            }
            return done
        }
        XCTAssertEqual(play(1000), 1000)
        lb_malloc_count_start()
        let done = play(10_000)
        let n = lb_malloc_count_stop()
        XCTAssertEqual(done, 10_000)
        print("allocations during 10,000 sound playback messages (WAV sink, stream clock): \(n)")
        XCTAssertLessThan(n, 100)
        let played = loop.executeAndWait { dev.stats.bytesPlayed }
        XCTAssertGreaterThanOrEqual(played, 11_000 * 64)
        drv.reset()
    }
}
