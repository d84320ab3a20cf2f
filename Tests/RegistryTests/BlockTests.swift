import XCTest
import Glibc
import CLinux
@testable import Registry
import Transport


final class BlockTests: XCTestCase {
    var loop: EventLoop!
    var host: DeviceHost!
    var files: [String] = []

    override func setUp() {
        loop = try! EventLoop()
        host = DeviceHost(loop: loop)
    }
    override func tearDown() {
        loop.stopAndJoin()
        host = nil
        loop = nil
        for f in files { unlink(f) }
    }

    // MARK: helpers

    /// A temp file of `size` bytes filled with `byte` (or random bytes when nil); returns its path.
    private func makeFile(size: Int, byte: UInt8? = 0, dir: String = "/tmp") -> String {
        let path = "\(dir)/loopbackd-blk-\(getpid())-\(files.count)"
        files.append(path)
        writeTestFile(path, size: size, byte: byte)
        return path
    }

    private func fileBytes(_ path: String, offset: Int, count: Int) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        defer { close(fd) }
        var b = [UInt8](repeating: 0, count: count)
        let n = b.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        XCTAssertEqual(n, count)
        return b
    }

    private func start(_ dev: BlockDevice, ram: Int = 8 << 20, queueSize: UInt16 = 64,
                       accept: @escaping (VirtioFeatures) -> VirtioFeatures = { $0 }) throws -> SimDriver {
        let idx = host.add(name: "blk0", device: dev)
        loop.startThread()
        let drv = try SimDriver(host: host, index: idx, ramSize: ram)
        try drv.start(accept: accept, queueSizes: Array(repeating: queueSize, count: dev.queueMaxSizes.count))
        return drv
    }

    private func writeHeader(_ drv: SimDriver, _ b: Buffers, type: UInt32, sector: UInt64) {
        let h = drv.host(b.header)
        h.storeBytes(of: type.littleEndian, as: UInt32.self)
        h.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
        h.storeBytes(of: sector.littleEndian, toByteOffset: 8, as: UInt64.self)
    }

    /// Sends a raw chain and waits for it; returns (used length, status byte).
    @discardableResult
    private func roundTrip(_ drv: SimDriver, _ q: SimQueue, readable: [(UInt64, UInt32)], writable: [(UInt64, UInt32)],
                           statusAt: UInt64?, file: StaticString = #filePath, line: UInt = #line) throws -> (len: UInt32, status: UInt8) {
        if let s = statusAt { drv.host(s).storeBytes(of: UInt8(0xFF), as: UInt8.self) }
        let head = try XCTUnwrap(q.addChain(readable: readable, writable: writable), file: file, line: line)
        q.submit(head)
        let used = try XCTUnwrap(q.waitUsed(), "no completion", file: file, line: line)
        XCTAssertEqual(used.id, head, file: file, line: line)
        q.recycle(head)
        let st = statusAt.map { drv.host($0).load(as: UInt8.self) } ?? 0xFF
        return (used.len, st)
    }

    /// A well-formed request: IN / GET_ID get `dataBytes` writable, OUT gets them readable.
    @discardableResult
    private func request(_ drv: SimDriver, _ q: SimQueue, _ b: Buffers, type: UInt32, sector: UInt64, dataBytes: Int,
                         file: StaticString = #filePath, line: UInt = #line) throws -> (len: UInt32, status: UInt8) {
        writeHeader(drv, b, type: type, sector: sector)
        var readable: [(UInt64, UInt32)] = [(b.header, 16)]
        var writable: [(UInt64, UInt32)] = []
        if dataBytes > 0 {
            if type == VirtioBlk.typeOut || type == VirtioBlk.typeDiscard || type == VirtioBlk.typeWriteZeroes {
                readable.append((b.data, UInt32(dataBytes)))
            } else {
                writable.append((b.data, UInt32(dataBytes)))
            }
        }
        writable.append((b.status, 1))
        return try roundTrip(drv, q, readable: readable, writable: writable, statusAt: b.status, file: file, line: line)
    }

    private func rangeRequest(_ drv: SimDriver, _ q: SimQueue, _ b: Buffers, type: UInt32,
                              ranges: [(UInt64, UInt32, UInt32)]) throws -> (len: UInt32, status: UInt8) {
        let p = drv.host(b.data)
        for (i, r) in ranges.enumerated() {
            p.storeBytes(of: r.0.littleEndian, toByteOffset: 16 * i, as: UInt64.self)
            p.storeBytes(of: r.1.littleEndian, toByteOffset: 16 * i + 8, as: UInt32.self)
            p.storeBytes(of: r.2.littleEndian, toByteOffset: 16 * i + 12, as: UInt32.self)
        }
        return try request(drv, q, b, type: type, sector: 0, dataBytes: 16 * ranges.count)
    }

    private func bytes(_ drv: SimDriver, _ gpa: UInt64, _ n: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: drv.host(gpa), count: n))
    }

    // MARK: open and config

    func testOpenErrorsAndCapacity() throws {
        XCTAssertThrowsError(try BlockDevice(path: "/nonexistent/disk.img", readOnly: false, queues: 1, queueSize: 64)) {
            XCTAssertTrue("\($0)".contains("cannot open /nonexistent/disk.img"), "\($0)")
        }
        XCTAssertThrowsError(try BlockDevice(path: "/tmp", readOnly: true, queues: 1, queueSize: 64)) {
            XCTAssertTrue("\($0)".contains("not a regular file or block device"), "\($0)")
        }
        // A trailing partial sector is not exposed.
        let path = makeFile(size: 512 * 7 + 100)
        let dev = try BlockDevice(path: path, readOnly: true, queues: 1, queueSize: 64)
        XCTAssertEqual(dev.capacity, 7)
    }

    /// Restricted memory: one request must fit in half the device's pool, so seg_max (segments of at most the
    /// pool's 256 KiB largest mapping) is lowered before the driver reads it; never raised, never below 1.
    func testLimitRequestBytesLowersSegMax() throws {
        let path = makeFile(size: 1 << 20)
        let dev = try BlockDevice(path: path, readOnly: false, queues: 1, queueSize: 64)
        func segMax() -> UInt32 {
            var v: UInt32 = 0
            withUnsafeMutableBytes(of: &v) { dev.readConfig(offset: 12, into: $0) }
            return UInt32(littleEndian: v)
        }
        XCTAssertEqual(segMax(), 62)
        dev.limitRequestBytes(1 << 20)                          // a 2 MiB pool: 4 segments of 256 KiB
        XCTAssertEqual(segMax(), 4)
        XCTAssertEqual(dev.segMax, 4)
        dev.limitRequestBytes(64 << 20)                         // never raised again
        XCTAssertEqual(segMax(), 4)
        dev.limitRequestBytes(4096)                             // at least one segment
        XCTAssertEqual(segMax(), 1)
        let any: VirtioDevice = try BlockDevice(path: path, readOnly: false, queues: 1, queueSize: 64)
        any.limitRequestBytes(1 << 20)                          // through the protocol (the kernel link's call)
        var v: UInt32 = 0
        withUnsafeMutableBytes(of: &v) { any.readConfig(offset: 12, into: $0) }
        XCTAssertEqual(UInt32(littleEndian: v), 4)
    }

    func testConfigSpaceAndFeatures() throws {
        let path = makeFile(size: 4 << 20)
        let dev = try BlockDevice(path: path, readOnly: false, queues: 4, queueSize: 128)
        let drv = try start(dev, queueSize: 128)
        let f = drv.info.features
        XCTAssertEqual(drv.info.deviceID, 2)
        XCTAssertEqual(drv.info.configSize, 60)
        XCTAssertEqual(drv.info.queueMaxSizes, [128, 128, 128, 128])
        for bit in [VirtioFeatures.version1, .eventIdx, .indirectDesc, VirtioBlk.segMax, VirtioBlk.blkSize,
                    VirtioBlk.flush, VirtioBlk.mq, VirtioBlk.discard, VirtioBlk.writeZeroes] {
            XCTAssertTrue(f.contains(bit), "missing feature \(bit.rawValue)")
        }
        XCTAssertFalse(f.contains(VirtioBlk.readOnly))
        XCTAssertFalse(f.contains(VirtioBlk.configWCE))
        let c = try XCTUnwrap(drv.readConfig(offset: 0, count: 60))
        func u64(_ o: Int) -> UInt64 { c.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: o, as: UInt64.self).littleEndian } }
        func u32(_ o: Int) -> UInt32 { c.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: o, as: UInt32.self).littleEndian } }
        func u16(_ o: Int) -> UInt16 { c.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: o, as: UInt16.self).littleEndian } }
        XCTAssertEqual(u64(0), UInt64(4 << 20) / 512)
        XCTAssertEqual(u32(12), 126)                 // seg_max
        XCTAssertEqual(u32(20), 512)                 // blk_size
        XCTAssertEqual(u16(34), 4)                   // num_queues
        XCTAssertEqual(u32(36), dev.maxDiscardSectors)
        XCTAssertEqual(u32(40), 1)                   // max_discard_seg
        XCTAssertEqual(u32(44), 1)                   // discard_sector_alignment
        XCTAssertEqual(u32(48), dev.maxWriteZeroesSectors)
        XCTAssertEqual(u32(52), 1)                   // max_write_zeroes_seg
        XCTAssertEqual(c[56], 1)                     // write_zeroes_may_unmap
        XCTAssertEqual(Array(c[57..<60]), [0, 0, 0])
        // Partial reads see the same bytes; writes are ignored; out-of-range reads are refused by the host.
        XCTAssertEqual(drv.readConfig(offset: 34, count: 2), [4, 0])
        drv.writeConfig(offset: 32, bytes: [1])
        XCTAssertEqual(drv.readConfig(offset: 32, count: 1), [0])
        XCTAssertNil(drv.readConfig(offset: 56, count: 8))
    }

    func testReadOnly() throws {
        let path = makeFile(size: 1 << 20, byte: 0x5A)
        let dev = try BlockDevice(path: path, readOnly: true, queues: 1, queueSize: 64)
        XCTAssertTrue(dev.offeredFeatures.contains(VirtioBlk.readOnly))
        XCTAssertFalse(dev.offeredFeatures.contains(VirtioBlk.discard))
        XCTAssertFalse(dev.offeredFeatures.contains(VirtioBlk.writeZeroes))
        XCTAssertFalse(dev.offeredFeatures.contains(VirtioBlk.mq))
        let drv = try start(dev)
        let c = try XCTUnwrap(drv.readConfig(offset: 36, count: 24))
        XCTAssertEqual(c, [UInt8](repeating: 0, count: 24), "no discard/write-zeroes limits on a read-only disk")
        let q = drv.queues[0]
        let b = Buffers(drv, dataBytes: 4096)
        memset(drv.host(b.data), 0x11, 4096)
        var r = try request(drv, q, b, type: VirtioBlk.typeOut, sector: 0, dataBytes: 4096)
        XCTAssertEqual(r.status, VirtioBlk.statusIOErr)
        XCTAssertEqual(r.len, 1)
        XCTAssertEqual(fileBytes(path, offset: 0, count: 4096), [UInt8](repeating: 0x5A, count: 4096))
        r = try rangeRequest(drv, q, b, type: VirtioBlk.typeDiscard, ranges: [(0, 8, 0)])
        XCTAssertEqual(r.status, VirtioBlk.statusUnsupp)
        r = try rangeRequest(drv, q, b, type: VirtioBlk.typeWriteZeroes, ranges: [(0, 8, 0)])
        XCTAssertEqual(r.status, VirtioBlk.statusUnsupp)
        r = try request(drv, q, b, type: VirtioBlk.typeIn, sector: 0, dataBytes: 4096)
        XCTAssertEqual(r.status, VirtioBlk.statusOK)
        XCTAssertEqual(r.len, 4097)
        XCTAssertEqual(bytes(drv, b.data, 4096), [UInt8](repeating: 0x5A, count: 4096))
        XCTAssertEqual(fileBytes(path, offset: 0, count: 4096), [UInt8](repeating: 0x5A, count: 4096))
    }

    // MARK: request types

    func testInOutFlushGetID() throws {
        let path = makeFile(size: 1 << 20, byte: nil)
        let dev = try BlockDevice(path: path, readOnly: false, queues: 1, queueSize: 64, serial: "serial-0123456789-abcdef")
        let drv = try start(dev)
        let q = drv.queues[0]
        let b = Buffers(drv, dataBytes: 64 << 10)

        // IN: 8 sectors at sector 3.
        var r = try request(drv, q, b, type: VirtioBlk.typeIn, sector: 3, dataBytes: 4096)
        XCTAssertEqual(r.status, VirtioBlk.statusOK)
        XCTAssertEqual(r.len, 4097)
        XCTAssertEqual(bytes(drv, b.data, 4096), fileBytes(path, offset: 3 * 512, count: 4096))

        // OUT: 16 sectors at sector 100.
        _ = lb_getrandom(drv.host(b.data), 8192)
        let written = bytes(drv, b.data, 8192)
        r = try request(drv, q, b, type: VirtioBlk.typeOut, sector: 100, dataBytes: 8192)
        XCTAssertEqual(r.status, VirtioBlk.statusOK)
        XCTAssertEqual(r.len, 1)
        XCTAssertEqual(fileBytes(path, offset: 100 * 512, count: 8192), written)

        // The last sector of the disk.
        r = try request(drv, q, b, type: VirtioBlk.typeIn, sector: dev.capacity - 1, dataBytes: 512)
        XCTAssertEqual(r.status, VirtioBlk.statusOK)
        XCTAssertEqual(bytes(drv, b.data, 512), fileBytes(path, offset: Int(dev.capacity - 1) * 512, count: 512))

        // FLUSH.
        r = try request(drv, q, b, type: VirtioBlk.typeFlush, sector: 0, dataBytes: 0)
        XCTAssertEqual(r.status, VirtioBlk.statusOK)
        XCTAssertEqual(r.len, 1)

        // GET_ID: the serial, cut at 20 bytes.
        r = try request(drv, q, b, type: VirtioBlk.typeGetID, sector: 0, dataBytes: 20)
        XCTAssertEqual(r.status, VirtioBlk.statusOK)
        XCTAssertEqual(r.len, 21)
        XCTAssertEqual(String(decoding: bytes(drv, b.data, 20), as: UTF8.self), "serial-0123456789-ab")

        // Scattered layout: header split over two descriptors, header and data sharing a descriptor, data over
        // several descriptors, and the status byte sharing the last data descriptor.
        let h = drv.alloc(16 + 2048, align: 512)
        drv.host(h).storeBytes(of: VirtioBlk.typeOut.littleEndian, as: UInt32.self)
        drv.host(h).storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
        drv.host(h).storeBytes(of: UInt64(200).littleEndian, toByteOffset: 8, as: UInt64.self)
        _ = lb_getrandom(drv.host(h + 16), 2048)
        _ = lb_getrandom(drv.host(b.data), 1024)
        let expect = bytes(drv, h + 16, 2048) + bytes(drv, b.data, 1024)
        r = try roundTrip(drv, q, readable: [(h, 8), (h + 8, 8 + 1000), (h + 1016, 1048), (b.data, 1024)],
                          writable: [(b.status, 1)], statusAt: b.status)
        XCTAssertEqual(r.status, VirtioBlk.statusOK)
        XCTAssertEqual(fileBytes(path, offset: 200 * 512, count: 3072), expect)

        let rd = drv.alloc(3072 + 1, align: 512)
        memset(drv.host(rd), 0, 3073)
        writeHeader(drv, b, type: VirtioBlk.typeIn, sector: 200)
        r = try roundTrip(drv, q, readable: [(b.header, 16)], writable: [(rd, 1000), (rd + 1000, 24), (rd + 1024, 2049)],
                          statusAt: rd + 3072)
        XCTAssertEqual(r.status, VirtioBlk.statusOK)
        XCTAssertEqual(r.len, 3073)
        XCTAssertEqual(bytes(drv, rd, 3072), expect)
        XCTAssertEqual(loop.executeAndWait { dev.badRequests }, 0)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
    }

    /// A live remove completes the in-flight requests on the loop but leaves the image's fdatasync to the caller (a
    /// flush to slow storage must not stall the loop's other devices): the returned closure syncs through its own
    /// duplicate of the fd, still valid after the body is gone, and closes it. Devices with nothing durable return nil.
    func testRemoveReturnsTheFdatasyncForTheCallerAfterTheBodyIsGone() throws {
        let path = makeFile(size: 1 << 20, byte: 0)
        weak var gone: BlockDevice?
        let idx: Int
        do {
            let dev = try BlockDevice(path: path, readOnly: false, queues: 1, queueSize: 64)
            gone = dev
            let drv = try start(dev)
            let b = Buffers(drv, dataBytes: 4096)
            memset(drv.host(b.data), 0x5a, 4096)
            let r = try request(drv, drv.queues[0], b, type: VirtioBlk.typeOut, sector: 8, dataBytes: 4096)
            XCTAssertEqual(r.status, VirtioBlk.statusOK)
            idx = 0
        }
        func fds() -> Int { var n = 0; if let d = opendir("/proc/self/fd") { while readdir(d) != nil { n += 1 }; closedir(d) }; return n }
        let durable = loop.executeAndWait { self.host.remove(idx) }
        XCTAssertNil(gone, "the body is released by remove")
        let before = fds()
        XCTAssertNotNil(durable, "a blk device leaves its fdatasync to the caller")
        durable?()
        XCTAssertEqual(fds(), before - 1, "the closure closes its duplicate of the image fd")
        XCTAssertEqual(fileBytes(path, offset: 8 * 512, count: 4096), [UInt8](repeating: 0x5a, count: 4096))
        let rng = loop.executeAndWait { self.host.add(name: "rng", device: RngDevice()) }
        XCTAssertNil(loop.executeAndWait { self.host.remove(rng) }, "nothing durable: flushed on the loop, nil")
    }

    func testWriteThroughWithoutFlushFeature() throws {
        let path = makeFile(size: 1 << 20)
        let dev = try BlockDevice(path: path, readOnly: false, queues: 1, queueSize: 64)
        let drv = try start(dev, accept: { $0.subtracting(VirtioBlk.flush) })
        let q = drv.queues[0]
        let b = Buffers(drv, dataBytes: 4096)
        memset(drv.host(b.data), 0x77, 4096)
        let r = try request(drv, q, b, type: VirtioBlk.typeOut, sector: 8, dataBytes: 4096)
        XCTAssertEqual(r.status, VirtioBlk.statusOK)
        XCTAssertEqual(fileBytes(path, offset: 8 * 512, count: 4096), [UInt8](repeating: 0x77, count: 4096))
    }

    func testDiscardAndWriteZeroes() throws {
        try discardAndWriteZeroes(dir: "/tmp")
    }

    /// tmpfs has no FALLOC_FL_ZERO_RANGE: write-zeroes without UNMAP falls back to writing zeroes.
    func testWriteZeroesFallbackOnTmpfs() throws {
        guard access("/dev/shm", W_OK) == 0 else { throw XCTSkip("no writable /dev/shm") }
        try discardAndWriteZeroes(dir: "/dev/shm")
    }

    private func discardAndWriteZeroes(dir: String) throws {
        let size = 1 << 20
        let path = makeFile(size: size, byte: 0xAB, dir: dir)
        let dev = try BlockDevice(path: path, readOnly: false, queues: 1, queueSize: 64)
        let drv = try start(dev)
        let q = drv.queues[0]
        let b = Buffers(drv, dataBytes: 4096)
        let zero = [UInt8](repeating: 0, count: 4096)
        let ab = [UInt8](repeating: 0xAB, count: 512)

        // Discard punches a hole in a file: the range reads back as zeroes, its neighbours are untouched.
        var r = try rangeRequest(drv, q, b, type: VirtioBlk.typeDiscard, ranges: [(8, 8, 0)])
        XCTAssertEqual(r.status, VirtioBlk.statusOK)
        XCTAssertEqual(r.len, 1)
        XCTAssertEqual(fileBytes(path, offset: 8 * 512, count: 4096), zero)
        XCTAssertEqual(fileBytes(path, offset: 7 * 512, count: 512), ab)
        XCTAssertEqual(fileBytes(path, offset: 16 * 512, count: 512), ab)

        // Write zeroes, with and without UNMAP.
        r = try rangeRequest(drv, q, b, type: VirtioBlk.typeWriteZeroes, ranges: [(32, 8, 0)])
        XCTAssertEqual(r.status, VirtioBlk.statusOK)
        XCTAssertEqual(fileBytes(path, offset: 32 * 512, count: 4096), zero)
        XCTAssertEqual(fileBytes(path, offset: 31 * 512, count: 512), ab)
        XCTAssertEqual(fileBytes(path, offset: 40 * 512, count: 512), ab)
        r = try rangeRequest(drv, q, b, type: VirtioBlk.typeWriteZeroes, ranges: [(65, 3, VirtioBlk.flagUnmap)])
        XCTAssertEqual(r.status, VirtioBlk.statusOK)
        XCTAssertEqual(fileBytes(path, offset: 65 * 512, count: 1536), Array(zero[0..<1536]))
        XCTAssertEqual(fileBytes(path, offset: 64 * 512, count: 512), ab)
        XCTAssertEqual(fileBytes(path, offset: 68 * 512, count: 512), ab)
        // The read path sees the zeroes too.
        r = try request(drv, q, b, type: VirtioBlk.typeIn, sector: 32, dataBytes: 4096)
        XCTAssertEqual(r.status, VirtioBlk.statusOK)
        XCTAssertEqual(bytes(drv, b.data, 4096), zero)

        // Errors: UNMAP on a discard and unknown flags are unsupported; two segments exceed max_*_seg; ranges past
        // the end, overflowing ranges and over-long ranges fail; an empty payload fails. None changes the file.
        let cap = dev.capacity
        XCTAssertEqual(try rangeRequest(drv, q, b, type: VirtioBlk.typeDiscard, ranges: [(100, 8, VirtioBlk.flagUnmap)]).status, VirtioBlk.statusUnsupp)
        XCTAssertEqual(try rangeRequest(drv, q, b, type: VirtioBlk.typeWriteZeroes, ranges: [(100, 8, 4)]).status, VirtioBlk.statusUnsupp)
        XCTAssertEqual(try rangeRequest(drv, q, b, type: VirtioBlk.typeDiscard, ranges: [(100, 8, 0), (200, 8, 0)]).status, VirtioBlk.statusUnsupp)
        XCTAssertEqual(try rangeRequest(drv, q, b, type: VirtioBlk.typeWriteZeroes, ranges: [(100, 8, 0), (200, 8, 0)]).status, VirtioBlk.statusUnsupp)
        XCTAssertEqual(try rangeRequest(drv, q, b, type: VirtioBlk.typeDiscard, ranges: [(cap - 4, 8, 0)]).status, VirtioBlk.statusIOErr)
        XCTAssertEqual(try rangeRequest(drv, q, b, type: VirtioBlk.typeWriteZeroes, ranges: [(UInt64.max - 2, 8, 0)]).status, VirtioBlk.statusIOErr)
        XCTAssertEqual(try rangeRequest(drv, q, b, type: VirtioBlk.typeWriteZeroes, ranges: [(0, dev.maxWriteZeroesSectors + 1, 0)]).status, VirtioBlk.statusIOErr)
        XCTAssertEqual(try request(drv, q, b, type: VirtioBlk.typeDiscard, sector: 0, dataBytes: 0).status, VirtioBlk.statusIOErr)
        XCTAssertEqual(try request(drv, q, b, type: VirtioBlk.typeDiscard, sector: 0, dataBytes: 8).status, VirtioBlk.statusIOErr)
        XCTAssertEqual(fileBytes(path, offset: 100 * 512, count: 512), ab)
        XCTAssertEqual(fileBytes(path, offset: Int(cap - 4) * 512, count: 512), ab)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
    }

    // MARK: malformed requests

    func testMalformedRequests() throws {
        let path = makeFile(size: 1 << 20, byte: 0x3C)
        let dev = try BlockDevice(path: path, readOnly: false, queues: 1, queueSize: 64)
        let drv = try start(dev)
        let q = drv.queues[0]
        let b = Buffers(drv, dataBytes: 8192)
        let cap = dev.capacity
        memset(drv.host(b.data), 0xEE, 8192)

        // Out of range: past the end, straddling the end, sector near UInt64.max (sector*512 and sector+n overflow).
        for (type, sector, n) in [(VirtioBlk.typeIn, cap, 512), (VirtioBlk.typeIn, cap - 1, 1024),
                                  (VirtioBlk.typeOut, cap - 1, 1024), (VirtioBlk.typeIn, UInt64.max, 512),
                                  (VirtioBlk.typeOut, UInt64.max - 7, 4096), (VirtioBlk.typeIn, UInt64(1) << 55, 512),
                                  (VirtioBlk.typeOut, (UInt64.max / 512) + 1, 512)] {
            let r = try request(drv, q, b, type: type, sector: sector, dataBytes: n)
            XCTAssertEqual(r.status, VirtioBlk.statusIOErr, "type \(type) sector \(sector) bytes \(n)")
            XCTAssertEqual(r.len, type == VirtioBlk.typeIn ? 1 : 1)
        }
        // Data length not a multiple of 512.
        XCTAssertEqual(try request(drv, q, b, type: VirtioBlk.typeIn, sector: 0, dataBytes: 100).status, VirtioBlk.statusIOErr)
        XCTAssertEqual(try request(drv, q, b, type: VirtioBlk.typeOut, sector: 0, dataBytes: 513).status, VirtioBlk.statusIOErr)
        // Unknown type.
        XCTAssertEqual(try request(drv, q, b, type: 99, sector: 0, dataBytes: 512).status, VirtioBlk.statusUnsupp)
        XCTAssertEqual(try request(drv, q, b, type: 2, sector: 0, dataBytes: 0).status, VirtioBlk.statusUnsupp)

        // Short header (8 bytes), header split short across two descriptors: IOERR, one byte written.
        writeHeader(drv, b, type: VirtioBlk.typeIn, sector: 0)
        var r = try roundTrip(drv, q, readable: [(b.header, 8)], writable: [(b.data, 512), (b.status, 1)], statusAt: b.status)
        XCTAssertEqual(r.status, VirtioBlk.statusIOErr)
        XCTAssertEqual(r.len, 1)
        r = try roundTrip(drv, q, readable: [(b.header, 4), (b.header + 4, 4)], writable: [(b.status, 1)], statusAt: b.status)
        XCTAssertEqual(r.status, VirtioBlk.statusIOErr)
        // No readable part at all.
        r = try roundTrip(drv, q, readable: [], writable: [(b.data, 512), (b.status, 1)], statusAt: b.status)
        XCTAssertEqual(r.status, VirtioBlk.statusIOErr)

        // No writable status byte: nothing can be reported; completed with 0 bytes written.
        writeHeader(drv, b, type: VirtioBlk.typeOut, sector: 0)
        r = try roundTrip(drv, q, readable: [(b.header, 16), (b.data, 512)], writable: [], statusAt: nil)
        XCTAssertEqual(r.len, 0)
        writeHeader(drv, b, type: VirtioBlk.typeIn, sector: 0)
        r = try roundTrip(drv, q, readable: [(b.header, 16)], writable: [], statusAt: nil)
        XCTAssertEqual(r.len, 0)

        // IN with readable data; OUT with writable data.
        writeHeader(drv, b, type: VirtioBlk.typeIn, sector: 0)
        r = try roundTrip(drv, q, readable: [(b.header, 16), (b.data, 512)], writable: [(b.data + 512, 512), (b.status, 1)], statusAt: b.status)
        XCTAssertEqual(r.status, VirtioBlk.statusIOErr)
        writeHeader(drv, b, type: VirtioBlk.typeOut, sector: 0)
        r = try roundTrip(drv, q, readable: [(b.header, 16)], writable: [(b.data, 512), (b.status, 1)], statusAt: b.status)
        XCTAssertEqual(r.status, VirtioBlk.statusIOErr)
        XCTAssertEqual(bytes(drv, b.data, 512), [UInt8](repeating: 0xEE, count: 512), "IOERR must not touch data")

        // Nothing reached the file, the device still works and the queue is healthy.
        XCTAssertEqual(fileBytes(path, offset: 0, count: 4096), [UInt8](repeating: 0x3C, count: 4096))
        XCTAssertEqual(fileBytes(path, offset: Int(cap - 1) * 512, count: 512), [UInt8](repeating: 0x3C, count: 512))
        r = try request(drv, q, b, type: VirtioBlk.typeIn, sector: 0, dataBytes: 512)
        XCTAssertEqual(r.status, VirtioBlk.statusOK)
        XCTAssertEqual(bytes(drv, b.data, 512), [UInt8](repeating: 0x3C, count: 512))
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)
        XCTAssertGreaterThan(loop.executeAndWait { dev.badRequests }, 0)
    }

    /// The file shrinks under the device: a read across the new end comes back short, the remainder is resubmitted,
    /// hits end of file, and the request fails with IOERR (never OK with partial data).
    func testShortReadIsResubmittedThenFails() throws {
        let path = makeFile(size: 1 << 20, byte: 0x42)
        let dev = try BlockDevice(path: path, readOnly: false, queues: 1, queueSize: 64)
        let drv = try start(dev)
        let q = drv.queues[0]
        let b = Buffers(drv, dataBytes: 4096)
        XCTAssertEqual(truncate(path, off_t(1020 * 512 + 100)), 0)
        memset(drv.host(b.data), 0, 4096)
        let r = try request(drv, q, b, type: VirtioBlk.typeIn, sector: 1020, dataBytes: 4096)
        XCTAssertEqual(r.status, VirtioBlk.statusIOErr)
        XCTAssertEqual(r.len, 101, "used length counts the 100 bytes read plus the status byte")
        XCTAssertEqual(bytes(drv, b.data, 100), [UInt8](repeating: 0x42, count: 100))
        // Entirely inside the file still works.
        XCTAssertEqual(try request(drv, q, b, type: VirtioBlk.typeIn, sector: 1000, dataBytes: 4096).status, VirtioBlk.statusOK)
    }

    // MARK: multiqueue

    func testMultiqueueEachQueueServes() throws {
        let path = makeFile(size: 1 << 20)
        let dev = try BlockDevice(path: path, readOnly: false, queues: 3, queueSize: 64)
        let drv = try start(dev)
        XCTAssertEqual(drv.queues.count, 3)
        for (n, q) in drv.queues.enumerated() {
            let b = Buffers(drv, dataBytes: 4096)
            memset(drv.host(b.data), Int32(0x40 + n), 4096)
            XCTAssertEqual(try request(drv, q, b, type: VirtioBlk.typeOut, sector: UInt64(n * 64), dataBytes: 4096).status, VirtioBlk.statusOK)
            memset(drv.host(b.data), 0, 4096)
            XCTAssertEqual(try request(drv, q, b, type: VirtioBlk.typeIn, sector: UInt64(n * 64), dataBytes: 4096).status, VirtioBlk.statusOK)
            XCTAssertEqual(bytes(drv, b.data, 4096), [UInt8](repeating: UInt8(0x40 + n), count: 4096))
            XCTAssertEqual(try request(drv, q, b, type: VirtioBlk.typeFlush, sector: 0, dataBytes: 0).status, VirtioBlk.statusOK)
        }
    }

    // MARK: random I/O integrity

    func testRandomIOIntegrity() throws {
        try randomIO(queues: 4, ioDepth: 256, outstanding: 48, ops: 10_000, fileSize: 32 << 20, seed: 0x5EED_0001)
    }

    /// Fewer request slots than requests in flight: queues stall, undo their pop and resume on completions.
    func testRandomIOIntegrityWithSlotExhaustion() throws {
        let stalls = try randomIO(queues: 2, ioDepth: 8, outstanding: 32, ops: 3_000, fileSize: 8 << 20, seed: 0x5EED_0002)
        XCTAssertGreaterThan(stalls, 0, "the slot table never ran out")
    }

    /// The same with the event loop's busy-poll window on (queues polled, kicks disabled while polling).
    func testRandomIOIntegrityPolling() throws {
        loop = try EventLoop(pollMicroseconds: 50)
        host = DeviceHost(loop: loop)
        try randomIO(queues: 2, ioDepth: 16, outstanding: 24, ops: 2_000, fileSize: 8 << 20, seed: 0x5EED_0003)
    }

    /// Random reads and writes (1-64 sectors) on several queues with many requests in flight; every read is checked
    /// against a shadow copy, and at the end the whole file. Requests in flight never overlap a write in flight.
    /// Returns the device's slot-stall count.
    @discardableResult
    private func randomIO(queues nq: Int, ioDepth: Int, outstanding: Int, ops: Int, fileSize: Int, seed: UInt64) throws -> Int {
        let path = makeFile(size: fileSize, byte: nil)
        let sectors = fileSize / 512
        let shadow = UnsafeMutableRawPointer.allocate(byteCount: fileSize, alignment: 4096)
        defer { shadow.deallocate() }
        do {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            defer { close(fd) }
            XCTAssertEqual(pread(fd, shadow, fileSize, 0), fileSize)
        }
        let dev = try BlockDevice(path: path, readOnly: false, queues: nq, queueSize: 256, ioDepth: ioDepth)
        let maxBytes = 64 * 512
        let drv = try start(dev, ram: 4 << 20 + nq * outstanding * (maxBytes + 1024), queueSize: 256)
        XCTAssertEqual(drv.queues.count, nq)

        struct Req { var active = false; var write = false; var sector = 0; var count = 0; var head: UInt16 = 0 }
        var bufs: [[Buffers]] = []
        var reqs: [[Req]] = []
        var byHead: [[Int]] = []
        for _ in 0..<nq {
            bufs.append((0..<outstanding).map { _ in Buffers(drv, dataBytes: maxBytes) })
            reqs.append([Req](repeating: Req(), count: outstanding))
            byHead.append([Int](repeating: -1, count: 256))
        }
        var readers = [UInt16](repeating: 0, count: sectors)
        var writers = [UInt8](repeating: 0, count: sectors)
        var rng = SplitMix(state: seed)
        var submitted = 0, completed = 0, reads = 0, writes = 0, conflicts = 0
        var pfds = drv.queues.map { pollfd(fd: $0.interruptFD.raw, events: Int16(POLLIN), revents: 0) }
        let deadline = lb_now_ns() + 120_000_000_000

        while completed < ops {
            // Fill every queue up to `outstanding`, publishing once per queue.
            for qi in 0..<nq {
                let q = drv.queues[qi]
                let old = q.availIdx
                var pushed = false
                for k in 0..<outstanding where !reqs[qi][k].active && submitted < ops {
                    let write = rng.next() & 1 == 0
                    let count = Int(rng.next() % 64) + 1
                    var sector = 0
                    var found = false
                    for _ in 0..<8 {
                        sector = Int(rng.next() % UInt64(sectors - count + 1))
                        found = (sector..<sector + count).allSatisfy { writers[$0] == 0 && (!write || readers[$0] == 0) }
                        if found { break }
                        conflicts += 1
                    }
                    guard found else { continue }
                    let b = bufs[qi][k]
                    let bytes = count * 512
                    writeHeader(drv, b, type: write ? VirtioBlk.typeOut : VirtioBlk.typeIn, sector: UInt64(sector))
                    drv.host(b.status).storeBytes(of: UInt8(0xFF), as: UInt8.self)
                    let head: UInt16?
                    if write {
                        _ = lb_getrandom(drv.host(b.data), bytes)
                        (shadow + sector * 512).copyMemory(from: drv.host(b.data), byteCount: bytes)
                        for s in sector..<sector + count { writers[s] = 1 }
                        // Alternate single and split data descriptors.
                        if count > 1 && k & 1 == 1 {
                            let half = UInt32(count / 2 * 512)
                            head = q.addChain(readable: [(b.header, 16), (b.data, half), (b.data + UInt64(half), UInt32(bytes) - half)],
                                              writable: [(b.status, 1)])
                        } else {
                            head = q.addChain(readable: [(b.header, 16), (b.data, UInt32(bytes))], writable: [(b.status, 1)])
                        }
                        writes += 1
                    } else {
                        memset(drv.host(b.data), 0xE5, bytes)
                        for s in sector..<sector + count { readers[s] += 1 }
                        if count > 1 && k & 1 == 1 {
                            let half = UInt32(count / 2 * 512)
                            head = q.addChain(readable: [(b.header, 16)],
                                              writable: [(b.data, half), (b.data + UInt64(half), UInt32(bytes) - half), (b.status, 1)])
                        } else {
                            head = q.addChain(readable: [(b.header, 16)], writable: [(b.data, UInt32(bytes)), (b.status, 1)])
                        }
                        reads += 1
                    }
                    let h = try XCTUnwrap(head, "ring full")
                    reqs[qi][k] = Req(active: true, write: write, sector: sector, count: count, head: h)
                    byHead[qi][Int(h)] = k
                    q.pushAvail(h)
                    pushed = true
                    submitted += 1
                }
                if pushed { q.publish(); q.kickIfNeeded(old: old) }
            }

            // Reap; sleep on the interrupt eventfds when nothing is ready.
            var reaped = 0
            for qi in 0..<nq {
                let q = drv.queues[qi]
                while let u = q.reap() {
                    let k = byHead[qi][Int(u.id)]
                    guard k >= 0, reqs[qi][k].active else { XCTFail("unexpected used id \(u.id) on queue \(qi)"); return 0 }
                    let r = reqs[qi][k]
                    let b = bufs[qi][k]
                    let st = drv.host(b.status).load(as: UInt8.self)
                    XCTAssertEqual(st, VirtioBlk.statusOK, "\(r.write ? "write" : "read") sector \(r.sector) count \(r.count)")
                    if r.write {
                        XCTAssertEqual(u.len, 1)
                        for s in r.sector..<r.sector + r.count { writers[s] = 0 }
                    } else {
                        XCTAssertEqual(u.len, UInt32(r.count * 512 + 1))
                        if memcmp(drv.host(b.data), shadow + r.sector * 512, r.count * 512) != 0 {
                            XCTFail("read of sector \(r.sector) count \(r.count) on queue \(qi) differs from the shadow")
                            return 0
                        }
                        for s in r.sector..<r.sector + r.count { readers[s] -= 1 }
                    }
                    byHead[qi][Int(u.id)] = -1
                    reqs[qi][k].active = false
                    q.recycle(u.id)
                    completed += 1
                    reaped += 1
                }
            }
            if reaped == 0 {
                for q in drv.queues { q.enableInterrupts() }
                if drv.queues.contains(where: { $0.usedIdx != $0.lastUsed }) { continue }
                let n = pfds.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t(nq), 5000) }
                for q in drv.queues { _ = FD.drain(q.interruptFD.raw) }
                if n == 0 {
                    XCTFail("no completion for 5 s (\(completed)/\(ops) done, in flight: \(loop.executeAndWait { dev.inFlight }))")
                    return 0
                }
                for i in pfds.indices { pfds[i].revents = 0 }
            }
            if lb_now_ns() > deadline { XCTFail("random I/O took too long"); return 0 }
        }
        XCTAssertGreaterThan(reads, ops / 3)
        XCTAssertGreaterThan(writes, ops / 3)
        XCTAssertEqual(loop.executeAndWait { dev.inFlight }, 0)
        XCTAssertEqual(loop.executeAndWait { dev.badRequests }, 0)
        XCTAssertEqual(drv.status & DeviceStatus.needsReset, 0)

        // The whole backing file equals the shadow.
        let stalls = loop.executeAndWait { dev.slotStalls }
        drv.reset()
        let check = UnsafeMutableRawPointer.allocate(byteCount: fileSize, alignment: 4096)
        defer { check.deallocate() }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        defer { close(fd) }
        XCTAssertEqual(pread(fd, check, fileSize, 0), fileSize)
        if memcmp(check, shadow, fileSize) != 0 {
            var first = 0
            while check.load(fromByteOffset: first, as: UInt8.self) == shadow.load(fromByteOffset: first, as: UInt8.self) { first += 1 }
            XCTFail("backing file differs from the shadow at byte \(first) (sector \(first / 512))")
        }
        return stalls
    }

    // MARK: reset

    /// Driver reset while reads and (write-through, so slow) writes are in flight: reset returns only once the
    /// kernel is done with guest memory; the device then serves a fresh driver.
    /// quiesce (what a vhost-user backend does before answering GET_VRING_BASE): every request popped so far is
    /// completed into the used ring, so the reported ring position never counts a request that will not complete.
    func testQuiesceCompletesEveryPoppedRequest() throws {
        let path = makeFile(size: 8 << 20, byte: nil)
        let dev = try BlockDevice(path: path, readOnly: false, queues: 1, queueSize: 256, ioDepth: 64)
        let idx = host.add(name: "blk0", device: dev)
        loop.startThread()
        let drv = try SimDriver(host: host, index: idx, ramSize: 24 << 20)
        // Write-through writes (no FLUSH negotiated: RWF_DSYNC): reads of a file in the page cache complete inline
        // while io_uring submits them and are reaped in the same step, so they would leave nothing in flight.
        try drv.start(accept: { $0.subtracting(VirtioBlk.flush) }, queueSizes: [256])
        let q = drv.queues[0]
        let bufs = (0..<80).map { _ in Buffers(drv, dataBytes: 32 << 10) }   // 80 chains x 3 descriptors <= 256
        let old = q.availIdx
        for (k, b) in bufs.enumerated() {
            writeHeader(drv, b, type: VirtioBlk.typeOut, sector: UInt64(k * 64))
            drv.host(b.status).storeBytes(of: 0xff, as: UInt8.self)
            q.pushAvail(try XCTUnwrap(q.addChain(readable: [(b.header, 16), (b.data, 32 << 10)], writable: [(b.status, 1)])))
        }
        _ = old
        q.publish()
        // On the loop thread, in one step: take the chains (io_uring submits them), quiesce, then compare chains
        // taken with used entries published. No completion can be reaped in between.
        let (taken, used, inFlightBefore, inFlightAfter) = loop.executeAndWait { () -> (UInt16, UInt16, Int, Int) in
            self.host.kick(idx, 0)
            let before = dev.inFlight
            dev.quiesce()
            return (self.host.lastAvail(idx, 0) ?? 0, q.usedIdx, before, dev.inFlight)
        }
        XCTAssertGreaterThan(inFlightBefore, 0, "no request was in flight when quiesce ran")
        XCTAssertEqual(used, taken, "a chain the device took has no used entry after quiesce")
        XCTAssertEqual(inFlightAfter, 0)
        // (Afterwards the device resumes the chains it could not take for lack of slots; that is normal.)
        drv.reset()
    }

    func testResetWithRequestsInFlight() throws {
        let path = makeFile(size: 8 << 20, byte: nil)
        let dev = try BlockDevice(path: path, readOnly: false, queues: 2, queueSize: 256, ioDepth: 64)
        let idx = host.add(name: "blk0", device: dev)
        loop.startThread()
        let drv = try SimDriver(host: host, index: idx, ramSize: 24 << 20)
        var sawInFlight = false
        let bufs = (0..<160).map { _ in Buffers(drv, dataBytes: 32 << 10) }
        for round in 0..<4 {
            try drv.start(accept: { round % 2 == 0 ? $0.subtracting(VirtioBlk.flush) : $0 }, queueSizes: [256, 256])
            for (qi, q) in drv.queues.enumerated() {
                let old = q.availIdx
                for k in 0..<80 {
                    let b = bufs[qi * 80 + k]
                    let write = k % 2 == 0
                    writeHeader(drv, b, type: write ? VirtioBlk.typeOut : VirtioBlk.typeIn, sector: UInt64((qi * 80 + k) * 64))
                    let head = write
                        ? q.addChain(readable: [(b.header, 16), (b.data, 32 << 10)], writable: [(b.status, 1)])
                        : q.addChain(readable: [(b.header, 16)], writable: [(b.data, 32 << 10), (b.status, 1)])
                    q.pushAvail(try XCTUnwrap(head))
                }
                q.publish()
                q.kickIfNeeded(old: old)
            }
            // Give the loop a moment to pop and submit, then reset under load.
            var spins = 0
            while loop.executeAndWait({ dev.inFlight }) == 0 && spins < 1000 { sched_yield(); spins += 1 }
            if loop.executeAndWait({ dev.inFlight }) > 0 { sawInFlight = true }
            drv.reset()
            XCTAssertEqual(loop.executeAndWait { dev.inFlight }, 0)
            XCTAssertFalse(loop.executeAndWait { self.host.isActive(idx) })
        }
        XCTAssertTrue(sawInFlight, "reset never raced with in-flight requests")

        // A fresh driver gets working I/O.
        try drv.start(queueSizes: [64, 64])
        let q = drv.queues[1]
        let b = Buffers(drv, dataBytes: 4096)
        memset(drv.host(b.data), 0x99, 4096)
        XCTAssertEqual(try request(drv, q, b, type: VirtioBlk.typeOut, sector: 5, dataBytes: 4096).status, VirtioBlk.statusOK)
        memset(drv.host(b.data), 0, 4096)
        XCTAssertEqual(try request(drv, q, b, type: VirtioBlk.typeIn, sector: 5, dataBytes: 4096).status, VirtioBlk.statusOK)
        XCTAssertEqual(bytes(drv, b.data, 4096), [UInt8](repeating: 0x99, count: 4096))
        // Shutdown path: flush completes anything in flight and syncs.
        loop.executeAndWait { self.host.shutdown() }
    }
}

/// `transport = "vduse"`: which devices it takes, the per-device override.
final class VDUSEConfigTests: XCTestCase {
    func parse(_ t: String) throws(ConfigError) -> DaemonConfig { try DaemonConfig.parse(TOML.parse(t, file: "v.conf")) }

    func testVDUSETakesBlkAndRefusesOtherTypesClearly() throws {
        let c = try parse("[daemon]\ntransport = \"vduse\"\n[device.d0]\ntype = \"blk\"\npath = \"/tmp/x.img\"\n")
        XCTAssertEqual(c.transport, .vduse)
        XCTAssertNil(c.devices[0].transport)
        XCTAssertThrowsError(try parse("[daemon]\ntransport = \"vduse\"\n[device.r0]\ntype = \"rng\"\n")) { e in
            XCTAssertTrue("\(e)".contains("VDUSE admits only blk"), "\(e)")
            XCTAssertTrue("\(e)".contains("transport = \"virtio-lo\""), "\(e)")
        }
    }

    func testPerDeviceTransport() throws {
        // both at once: rng through the module, blk through VDUSE
        let c = try parse("[daemon]\ntransport = \"vduse\"\n[device.r0]\ntype = \"rng\"\ntransport = \"virtio-lo\"\n[device.d0]\ntype = \"blk\"\npath = \"/tmp/x.img\"\n")
        XCTAssertEqual(c.devices[0].transport, .virtioLo)
        let m = try parse("[daemon]\ntransport = \"virtio-lo\"\n[device.d0]\ntype = \"blk\"\npath = \"/tmp/x.img\"\ntransport = \"vduse\"\n")
        XCTAssertEqual(m.devices[0].transport, .vduse)
        XCTAssertThrowsError(try parse("[daemon]\ntransport = \"virtio-lo\"\n[device.r0]\ntype = \"rng\"\ntransport = \"vduse\"\n"))
        XCTAssertThrowsError(try parse("[daemon]\ntransport = \"sim\"\n[device.d0]\ntype = \"blk\"\npath = \"/tmp/x.img\"\ntransport = \"vduse\"\n"))
        XCTAssertThrowsError(try parse("[daemon]\ntransport = \"vduse\"\n[device.d0]\ntype = \"blk\"\npath = \"/tmp/x.img\"\ntransport = \"usb\"\n"))
        XCTAssertThrowsError(try parse("[daemon]\ntransport = \"vduse\"\n[device.d0]\ntype = \"blk\"\npath = \"/tmp/x.img\"\nbackend = \"vhost-user:/tmp/q.sock\"\n"))
    }
}
