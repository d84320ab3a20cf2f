import XCTest
import Glibc
import CLinux
@testable import Transport

/// The vhost-user-gpu display protocol codec (Sources/Transport/VhostUser/GpuDisplay.swift): every message and reply
/// round trips; every malformed length, count and value is refused with its error; the sender and receiver move
/// messages through a real socketpair with partial writes and reads.
final class GpuDisplayTests: XCTestCase {
    /// Encodes `m` (with `trailing` bytes of pixels after the fixed part) into wire bytes.
    private func wire(_ m: VhostUserGpuMessage, trailing: [UInt8] = []) -> [UInt8] {
        var b = [UInt8](repeating: 0xEE, count: VhostUserGpuHeader.byteCount + m.fixedBytes)
        let n = b.withUnsafeMutableBytes { m.encode(into: $0) }
        XCTAssertEqual(n, b.count)
        XCTAssertEqual(m.trailingBytes, trailing.count, "\(m)")
        return b + trailing
    }
    private func wire(_ r: VhostUserGpuReply) -> [UInt8] {
        var b = [UInt8](repeating: 0xEE, count: VhostUserGpuHeader.byteCount + r.payloadBytes)
        let n = b.withUnsafeMutableBytes { r.encode(into: $0) }
        XCTAssertEqual(n, b.count)
        return b
    }
    private func decode(_ bytes: [UInt8], fds: Int = 0, limits: VhostUserGpuLimits = VhostUserGpuLimits()) -> Result<VhostUserGpuMessage, VhostUserGpuError> {
        let h = bytes.withUnsafeBytes { VhostUserGpuHeader(from: $0.baseAddress!) }
        return bytes.withUnsafeBytes { b in
            do throws(VhostUserGpuError) {
                return .success(try VhostUserGpuMessage.decode(h, payload: UnsafeRawBufferPointer(rebasing: b[12...]), fdCount: fds, limits: limits))
            } catch { return .failure(error) }
        }
    }
    private func decodeReply(_ bytes: [UInt8], pending: VhostUserGpuRequest?, fds: Int = 0) -> Result<VhostUserGpuReply, VhostUserGpuError> {
        let h = bytes.withUnsafeBytes { VhostUserGpuHeader(from: $0.baseAddress!) }
        return bytes.withUnsafeBytes { b in
            do throws(VhostUserGpuError) {
                return .success(try VhostUserGpuReply.decode(h, payload: UnsafeRawBufferPointer(rebasing: b[12...]), fdCount: fds, pending: pending))
            } catch { return .failure(error) }
        }
    }
    private func u32(_ b: [UInt8], _ o: Int) -> UInt32 { b.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: o, as: UInt32.self) } }
    private func setU32(_ b: inout [UInt8], _ o: Int, _ v: UInt32) { withUnsafeBytes(of: v) { for k in 0..<4 { b[o + k] = $0[k] } } }

    func testRequestNumbersAndFlagsAreThoseOfTheSpec() {
        // vhost-user-gpu.rst "Message types" :id: fields.
        XCTAssertEqual(VhostUserGpuRequest.allCases.map(\.rawValue), Array(1...12))
        XCTAssertEqual(VhostUserGpuRequest.cursorUpdate.rawValue, 6)
        XCTAssertEqual(VhostUserGpuRequest.update.rawValue, 8)
        XCTAssertEqual(VhostUserGpuRequest.getEDID.rawValue, 11)
        XCTAssertEqual(VhostUserGpuHeader.replyFlag, 4)
        XCTAssertEqual(VhostUserGpuProtocolFeatures.edid.rawValue, 1)
        XCTAssertEqual(VhostUserGpuProtocolFeatures.dmabuf2.rawValue, 2)
        XCTAssertEqual(VhostUserGpuMessage.cursorUpdateBytes, 16404)
        XCTAssertEqual(VhostUserGpuReply.displayInfoBytes, 408)
        XCTAssertEqual(VhostUserGpuReply.edidBytes, 1056)
    }

    func testEveryMessageRoundTrips() throws {
        let cursor = (0..<VhostUserGpuMessage.cursorImageBytes).map { UInt8(truncatingIfNeeded: $0 * 7) }
        let pixels = (0..<(3 * 2 * 4)).map { UInt8($0) }
        let cases: [(VhostUserGpuMessage, [UInt8], Int)] = [
            (.getProtocolFeatures, [], 0),
            (.setProtocolFeatures(0x8000_0000_0000_0003), [], 0),
            (.getDisplayInfo, [], 0),
            (.cursorPos(VhostUserGpuCursorPos(scanout: 1, x: 100, y: 200)), [], 0),
            (.cursorPosHide(VhostUserGpuCursorPos(scanout: 15, x: 0xffff_ffff, y: 7)), [], 0),
            (.cursorUpdate(VhostUserGpuCursorPos(scanout: 0, x: 10, y: 20), hotX: 3, hotY: 63), cursor, 0),
            (.scanout(VhostUserGpuScanout(scanout: 2, width: 1920, height: 1080)), [], 0),
            (.scanout(VhostUserGpuScanout(scanout: 0, width: 0, height: 0)), [], 0),
            (.update(VhostUserGpuUpdate(scanout: 0, x: 5, y: 6, width: 3, height: 2)), pixels, 0),
            (.update(VhostUserGpuUpdate(scanout: 0, x: 5, y: 6, width: 0, height: 9)), [], 0),
            (.dmabufScanout(VhostUserGpuDmabufScanout(scanout: 1, x: 0, y: 8, width: 640, height: 472, fdWidth: 640, fdHeight: 480,
                                                      fdStride: 2560, fdFlags: 1, fourcc: 0x3432_5258)), [], 1),
            (.dmabufScanout(VhostUserGpuDmabufScanout(scanout: 1, x: 0, y: 0, width: 0, height: 0, fdWidth: 0, fdHeight: 0,
                                                      fdStride: 0, fdFlags: 0, fourcc: 0)), [], 0),
            (.dmabufScanout(VhostUserGpuDmabufScanout(scanout: 3, x: 1, y: 2, width: 3, height: 4, fdWidth: 64, fdHeight: 64,
                                                      fdStride: 256, fdFlags: 0, fourcc: -1, modifier: 0x0100_0000_0000_0001)), [], 1),
            (.dmabufUpdate(VhostUserGpuUpdate(scanout: 0, x: 1, y: 2, width: 3, height: 4)), [], 0),
            getEDID(scanout: 15),
        ]
        for (m, trailing, fds) in cases {
            let b = wire(m, trailing: trailing)
            XCTAssertEqual(u32(b, 0), m.request.rawValue)
            XCTAssertEqual(u32(b, 4), 0, "requests carry no flags")
            XCTAssertEqual(Int(u32(b, 8)), b.count - 12, "\(m): header size")
            XCTAssertEqual(m.fdCount, fds)
            XCTAssertEqual(try decode(b, fds: fds).get(), m)
        }
        // DMABUF_SCANOUT2 is request 12 and 48 bytes.
        let d2 = wire(.dmabufScanout(VhostUserGpuDmabufScanout(scanout: 0, x: 0, y: 0, width: 1, height: 1, fdWidth: 1, fdHeight: 1,
                                                                fdStride: 4, fdFlags: 0, fourcc: 0, modifier: 0)))
        XCTAssertEqual(u32(d2, 0), 12); XCTAssertEqual(u32(d2, 8), 48)
        // Wire layout of an UPDATE: header, scanout x y w h, then the pixels.
        let up = wire(.update(VhostUserGpuUpdate(scanout: 0, x: 5, y: 6, width: 3, height: 2)), trailing: pixels)
        XCTAssertEqual(up.count, 12 + 20 + 24)
        XCTAssertEqual([u32(up, 12), u32(up, 16), u32(up, 20), u32(up, 24), u32(up, 28)], [0, 5, 6, 3, 2])
        XCTAssertEqual(Array(up[32...]), pixels)
    }

    private func getEDID(scanout: UInt32) -> (VhostUserGpuMessage, [UInt8], Int) { (.getEDID(scanout: scanout), [], 0) }

    func testEveryReplyRoundTrips() throws {
        var modes = Array(repeating: VhostUserGpuDisplayMode(width: 0, height: 0, enabled: 0), count: 16)
        modes[0] = VhostUserGpuDisplayMode(x: 0, y: 0, width: 1280, height: 800, enabled: 1, flags: 0)
        modes[3] = VhostUserGpuDisplayMode(x: 1, y: 2, width: 640, height: 480, enabled: 1, flags: 9)
        let edid = (0..<128).map { UInt8($0) }
        let cases: [VhostUserGpuReply] = [.protocolFeatures(3), .displayInfo(type: 0x1101, modes: modes),
                                          .edid(type: 0x1104, data: edid), .edid(type: 0x1104, data: []), .dmabufUpdateDone]
        for r in cases {
            let b = wire(r)
            XCTAssertEqual(u32(b, 0), r.request.rawValue)
            XCTAssertEqual(u32(b, 4), VhostUserGpuHeader.replyFlag)
            XCTAssertEqual(try decodeReply(b, pending: r.request).get(), r)
        }
        // A display info with fewer than 16 modes is padded with zero modes.
        let short = wire(VhostUserGpuReply.displayInfo(type: 0x1101, modes: [modes[0]]))
        guard case .displayInfo(_, let got) = try decodeReply(short, pending: .getDisplayInfo).get() else { return XCTFail() }
        XCTAssertEqual(got.count, 16); XCTAssertEqual(got[0], modes[0]); XCTAssertEqual(got[1], VhostUserGpuDisplayMode(width: 0, height: 0, enabled: 0))
        // Unencodable replies.
        var buf = [UInt8](repeating: 0, count: 2048)
        XCTAssertNil(buf.withUnsafeMutableBytes { VhostUserGpuReply.edid(type: 0, data: [UInt8](repeating: 0, count: 1025)).encode(into: $0) })
        XCTAssertNil(buf.withUnsafeMutableBytes { VhostUserGpuReply.displayInfo(type: 0, modes: Array(repeating: modes[0], count: 17)).encode(into: $0) })
    }

    func testEncodeNeedsRoom() {
        var small = [UInt8](repeating: 0, count: 23)
        XCTAssertNil(small.withUnsafeMutableBytes { VhostUserGpuMessage.scanout(VhostUserGpuScanout(scanout: 0, width: 1, height: 1)).encode(into: $0) })
        var exact = [UInt8](repeating: 0, count: 24)
        XCTAssertEqual(exact.withUnsafeMutableBytes { VhostUserGpuMessage.scanout(VhostUserGpuScanout(scanout: 0, width: 1, height: 1)).encode(into: $0) }, 24)
        // An UPDATE whose pixels cannot be carried in a u32 payload is not encoded.
        let huge = VhostUserGpuMessage.update(VhostUserGpuUpdate(scanout: 0, x: 0, y: 0, width: 0xffff_ffff, height: 0xffff_ffff))
        XCTAssertNil(huge.trailingBytes)
        var b = [UInt8](repeating: 0, count: 64)
        XCTAssertNil(b.withUnsafeMutableBytes { huge.encode(into: $0) })
        XCTAssertNil(VhostUserGpuUpdate(scanout: 0, x: 0, y: 0, width: 32768, height: 32768).dataBytes)   // exactly 4 GiB
        XCTAssertNotNil(VhostUserGpuUpdate(scanout: 0, x: 0, y: 0, width: 16384, height: 16383).dataBytes)
    }

    func testMalformedRequestsAreRefused() throws {
        func fails(_ b: [UInt8], fds: Int = 0, limits: VhostUserGpuLimits = VhostUserGpuLimits(), _ want: VhostUserGpuError, line: UInt = #line) {
            switch decode(b, fds: fds, limits: limits) {
            case .success(let m): XCTFail("accepted \(m)", line: line)
            case .failure(let e): XCTAssertEqual(e, want, line: line); XCTAssertFalse(e.description.isEmpty)
            }
        }
        let pos = wire(.cursorPos(VhostUserGpuCursorPos(scanout: 0, x: 1, y: 2)))
        // Unknown request numbers: 0, 13, huge.
        for r: UInt32 in [0, 13, 0xffff_ffff] { var b = pos; setU32(&b, 0, r); fails(b, .unknownRequest(r)) }
        // The REPLY flag in a request.
        var rf = pos; setU32(&rf, 4, 4); fails(rf, .replyFlagInRequest(4))
        // Other flag bits are ignored.
        var of = pos; setU32(&of, 4, 0x8001); XCTAssertNoThrow(try decode(of).get())
        // Header size and payload disagree.
        var hs = pos; setU32(&hs, 8, 13); fails(hs, .payloadSize(.cursorPos, got: 12, want: "13 (header)"))
        // Every fixed-size request with one byte less and one byte more.
        let fixed: [VhostUserGpuMessage] = [
            .getProtocolFeatures, .setProtocolFeatures(1), .getDisplayInfo, .cursorPos(VhostUserGpuCursorPos(scanout: 0, x: 0, y: 0)),
            .cursorPosHide(VhostUserGpuCursorPos(scanout: 0, x: 0, y: 0)), .scanout(VhostUserGpuScanout(scanout: 0, width: 1, height: 1)),
            .dmabufUpdate(VhostUserGpuUpdate(scanout: 0, x: 0, y: 0, width: 1, height: 1)), .getEDID(scanout: 0),
            .dmabufScanout(VhostUserGpuDmabufScanout(scanout: 0, x: 0, y: 0, width: 0, height: 0, fdWidth: 0, fdHeight: 0, fdStride: 0, fdFlags: 0, fourcc: 0)),
            .dmabufScanout(VhostUserGpuDmabufScanout(scanout: 0, x: 0, y: 0, width: 0, height: 0, fdWidth: 0, fdHeight: 0, fdStride: 0, fdFlags: 0, fourcc: 0, modifier: 0)),
        ]
        for m in fixed {
            let b = wire(m)
            var longer = b + [0]; setU32(&longer, 8, UInt32(longer.count - 12))
            fails(longer, .payloadSize(m.request, got: longer.count - 12, want: "\(b.count - 12)"))
            if b.count > 12 {
                var shorter = Array(b.dropLast()); setU32(&shorter, 8, UInt32(shorter.count - 12))
                fails(shorter, .payloadSize(m.request, got: shorter.count - 12, want: "\(b.count - 12)"))
            }
        }
        // CURSOR_UPDATE: the image must be all there.
        let cu = wire(.cursorUpdate(VhostUserGpuCursorPos(scanout: 0, x: 0, y: 0), hotX: 0, hotY: 0), trailing: [UInt8](repeating: 1, count: 16384))
        var cus = Array(cu.dropLast(4)); setU32(&cus, 8, UInt32(cus.count - 12))
        fails(cus, .payloadSize(.cursorUpdate, got: 16400, want: "16404"))
        // UPDATE: shorter than its rectangle header, pixels missing or extra, a rectangle whose size overflows.
        var u0 = Array(wire(.update(VhostUserGpuUpdate(scanout: 0, x: 0, y: 0, width: 0, height: 0))).prefix(12 + 19)); setU32(&u0, 8, 19)
        fails(u0, .payloadSize(.update, got: 19, want: ">= 20"))
        let up = wire(.update(VhostUserGpuUpdate(scanout: 0, x: 0, y: 0, width: 2, height: 2)), trailing: [UInt8](repeating: 9, count: 16))
        var miss = Array(up.dropLast(1)); setU32(&miss, 8, UInt32(miss.count - 12))
        fails(miss, .payloadSize(.update, got: 35, want: "36"))
        var extra = up + [0, 0, 0, 0]; setU32(&extra, 8, UInt32(extra.count - 12))
        fails(extra, .payloadSize(.update, got: 40, want: "36"))
        var over = up; setU32(&over, 12 + 12, 0xffff_ffff); setU32(&over, 12 + 16, 0xffff_ffff)
        fails(over, .badValue(.update, "4294967295x4294967295 pixels do not fit a message"))
        // A width × height × 4 that wraps 32 bits to exactly the data present: 0x4000_0000 × 1 × 4 = 2^32 (≡ 0).
        var wrap = wire(.update(VhostUserGpuUpdate(scanout: 0, x: 0, y: 0, width: 0, height: 0))); setU32(&wrap, 12 + 12, 0x4000_0000); setU32(&wrap, 12 + 16, 1)
        fails(wrap, .badValue(.update, "1073741824x1 pixels do not fit a message"))
        // Payload beyond the limit (checked before anything else of the payload).
        fails(up, limits: VhostUserGpuLimits(maxPayload: 35), .payloadTooLarge(request: 8, size: 36, max: 35))
        // Scanout ids at the limit.
        for m in [VhostUserGpuMessage.cursorPos(VhostUserGpuCursorPos(scanout: 4, x: 0, y: 0)), .scanout(VhostUserGpuScanout(scanout: 4, width: 1, height: 1)),
                  .getEDID(scanout: 4), .dmabufUpdate(VhostUserGpuUpdate(scanout: 4, x: 0, y: 0, width: 0, height: 0))] {
            fails(wire(m), limits: VhostUserGpuLimits(scanouts: 4), .scanoutID(m.request, 4, scanouts: 4))
            XCTAssertNoThrow(try decode(wire(m), limits: VhostUserGpuLimits(scanouts: 5)).get())
        }
        fails(wire(.scanout(VhostUserGpuScanout(scanout: 0xffff_ffff, width: 1, height: 1))), .scanoutID(.scanout, 0xffff_ffff, scanouts: 16))
        // File descriptors: none where none belongs, exactly one with an enabling DMABUF scanout, none with a disabling one.
        fails(pos, fds: 1, .fdCount(.cursorPos, got: 1, want: 0))
        let on = VhostUserGpuDmabufScanout(scanout: 0, x: 0, y: 0, width: 4, height: 4, fdWidth: 4, fdHeight: 4, fdStride: 16, fdFlags: 0, fourcc: 0)
        fails(wire(.dmabufScanout(on)), fds: 0, .fdCount(.dmabufScanout, got: 0, want: 1))
        fails(wire(.dmabufScanout(on)), fds: 2, .fdCount(.dmabufScanout, got: 2, want: 1))
        var off = on; off.width = 0
        fails(wire(.dmabufScanout(off)), fds: 1, .fdCount(.dmabufScanout, got: 1, want: 0))
        // DMABUF rectangles outside the buffer (also where u32 sums would wrap), and a stride too small for the rows.
        var out = on; out.x = 1
        fails(wire(.dmabufScanout(out)), fds: 1, .badValue(.dmabufScanout, "rectangle 4x4+1+0 outside the 4x4 DMABUF"))
        var wrapX = on; wrapX.x = 0xffff_fffd; wrapX.width = 4; wrapX.fdWidth = 0xffff_ffff; wrapX.fdStride = 0xffff_ffff
        fails(wire(.dmabufScanout(wrapX)), fds: 1, .badValue(.dmabufScanout, "rectangle 4x4+4294967293+0 outside the 4294967295x4 DMABUF"))
        var stride = on; stride.fdStride = 15
        fails(wire(.dmabufScanout(stride)), fds: 1, .badValue(.dmabufScanout, "stride 15 below 4 × 4 bytes"))
    }

    func testMalformedRepliesAreRefused() throws {
        func fails(_ b: [UInt8], pending: VhostUserGpuRequest?, fds: Int = 0, _ want: VhostUserGpuError, line: UInt = #line) {
            switch decodeReply(b, pending: pending, fds: fds) {
            case .success(let r): XCTFail("accepted \(r)", line: line)
            case .failure(let e): XCTAssertEqual(e, want, line: line); XCTAssertFalse(e.description.isEmpty)
            }
        }
        let pf = wire(VhostUserGpuReply.protocolFeatures(1))
        var noFlag = pf; setU32(&noFlag, 4, 0); fails(noFlag, pending: .getProtocolFeatures, .notAReply(1))
        fails(pf, pending: nil, .unexpectedReply(got: 1, want: nil))
        fails(pf, pending: .getDisplayInfo, .unexpectedReply(got: 1, want: 3))
        fails(pf, pending: .getProtocolFeatures, fds: 1, .fdCount(.getProtocolFeatures, got: 1, want: 0))
        var hs = pf; setU32(&hs, 8, 9); fails(hs, pending: .getProtocolFeatures, .payloadSize(.getProtocolFeatures, got: 8, want: "9 (header)"))
        for r in [VhostUserGpuReply.protocolFeatures(1), .displayInfo(type: 0x1101, modes: []), .edid(type: 0x1104, data: [1]), .dmabufUpdateDone] {
            let b = wire(r)
            var longer = b + [0]; setU32(&longer, 8, UInt32(longer.count - 12))
            fails(longer, pending: r.request, .payloadSize(r.request, got: longer.count - 12, want: "\(b.count - 12)"))
            if b.count > 12 {
                var shorter = Array(b.dropLast()); setU32(&shorter, 8, UInt32(shorter.count - 12))
                fails(shorter, pending: r.request, .payloadSize(r.request, got: shorter.count - 12, want: "\(b.count - 12)"))
            }
        }
        // An EDID size beyond the 1,024-byte block.
        var e = wire(VhostUserGpuReply.edid(type: 0x1104, data: [1, 2]))
        setU32(&e, 12 + 24, 1025); fails(e, pending: .getEDID, .badValue(.getEDID, "EDID size 1025 exceeds 1024"))
        setU32(&e, 12 + 24, 0xffff_ffff); fails(e, pending: .getEDID, .badValue(.getEDID, "EDID size 4294967295 exceeds 1024"))
        setU32(&e, 12 + 24, 1024)
        guard case .edid(_, let data) = try decodeReply(e, pending: .getEDID).get() else { return XCTFail() }
        XCTAssertEqual(data.count, 1024)
        // A pending request that has no reply is never answered.
        var sc = pf; setU32(&sc, 0, 7); fails(sc, pending: .scanout, .unexpectedReply(got: 7, want: nil))
    }

    // MARK: sender and receiver on a socketpair

    private func pair() -> (Int32, Int32) {
        var sv: [Int32] = [-1, -1]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv), 0)
        return (sv[0], sv[1])
    }

    func testSenderAndReceiverThroughASocketWithPartialWritesAndReads() throws {
        let (a, b) = pair()
        defer { close(a); close(b) }
        var small: Int32 = 4096
        setsockopt(a, SOL_SOCKET, SO_SNDBUF, &small, 4)
        setsockopt(b, SOL_SOCKET, SO_RCVBUF, &small, 4)
        let s = VhostUserGpuSender(capacity: 1 << 20)
        let r = VhostUserGpuReceiver(limits: VhostUserGpuLimits(maxPayload: 1 << 20))
        // A 256 x 256 UPDATE (262,164 bytes) written with reserve/commit, then a SCANOUT and a CURSOR_POS.
        let u = VhostUserGpuMessage.update(VhostUserGpuUpdate(scanout: 0, x: 1, y: 2, width: 256, height: 256))
        let total = 12 + 20 + 256 * 256 * 4
        let room = try XCTUnwrap(s.reserve(total))
        let n = try XCTUnwrap(u.encode(into: room))
        for k in 0..<(256 * 256 * 4) { room[n + k] = UInt8(truncatingIfNeeded: k * 13 + 1) }
        s.commit(total)
        XCTAssertTrue(s.append(.scanout(VhostUserGpuScanout(scanout: 0, width: 640, height: 480))))
        XCTAssertTrue(s.append(.cursorPos(VhostUserGpuCursorPos(scanout: 0, x: 5, y: 6))))
        // Interleave: flush until the socket is full, read what arrived, until everything is through.
        var got: [VhostUserGpuMessage] = []
        var blocks = 0
        for _ in 0..<10_000 {
            if try s.flush(a) == .wouldBlock { blocks += 1 }
            while case .message(let h) = try r.receive(b) {
                let m = try VhostUserGpuMessage.decode(h, payload: r.payload, fdCount: r.fdCount)
                if case .update = m {
                    let p = r.payload
                    for k in stride(from: 0, to: 256 * 256 * 4, by: 997) { XCTAssertEqual(p[20 + k], UInt8(truncatingIfNeeded: k * 13 + 1)) }
                }
                got.append(m)
                r.consume()
            }
            if s.isEmpty && got.count == 3 { break }
        }
        XCTAssertEqual(got.count, 3)
        XCTAssertEqual(got[0], u)
        XCTAssertEqual(got[1], .scanout(VhostUserGpuScanout(scanout: 0, width: 640, height: 480)))
        XCTAssertEqual(got[2], .cursorPos(VhostUserGpuCursorPos(scanout: 0, x: 5, y: 6)))
        XCTAssertGreaterThan(blocks, 0, "a 4 KiB socket buffer must have made the sender wait")
        XCTAssertEqual(s.bytesSent, UInt64(total + 24 + 24))
    }

    func testSenderIsBoundedAndCompacts() {
        let s = VhostUserGpuSender(capacity: 100)
        XCTAssertNil(s.reserve(101))
        XCTAssertTrue(s.append(.scanout(VhostUserGpuScanout(scanout: 0, width: 1, height: 1))))   // 24
        XCTAssertTrue(s.append(.scanout(VhostUserGpuScanout(scanout: 0, width: 2, height: 2))))   // 48
        XCTAssertTrue(s.append(.scanout(VhostUserGpuScanout(scanout: 0, width: 3, height: 3))))   // 72
        XCTAssertTrue(s.append(.scanout(VhostUserGpuScanout(scanout: 0, width: 4, height: 4))))   // 96
        XCTAssertFalse(s.append(.scanout(VhostUserGpuScanout(scanout: 0, width: 5, height: 5))), "no room: the caller coalesces")
        XCTAssertEqual(s.pendingBytes, 96)
        // Everything goes out on an empty socket; the buffer is then empty again.
        let (a, b) = pair()
        defer { close(a); close(b) }
        XCTAssertEqual(try s.flush(a), .done)
        XCTAssertTrue(s.isEmpty)
        s.reset()
    }

    func testReceiverRefusesOversizedEndOfFileAndExtraFDs() throws {
        // A header announcing more than the limit: refused before any payload is read.
        do {
            let (a, b) = pair()
            defer { close(a); close(b) }
            let r = VhostUserGpuReceiver(limits: VhostUserGpuLimits(maxPayload: 64))
            var h = [UInt8](repeating: 0, count: 12)
            setU32(&h, 0, 8); setU32(&h, 8, 65)
            XCTAssertEqual(h.withUnsafeBytes { send(a, $0.baseAddress, 12, 0) }, 12)
            XCTAssertThrowsError(try r.receive(b)) { XCTAssertEqual($0 as? VhostUserGpuError, .payloadTooLarge(request: 8, size: 65, max: 64)) }
        }
        // End of file in the middle of a message, and between messages.
        do {
            let (a, b) = pair()
            let r = VhostUserGpuReceiver(limits: VhostUserGpuLimits(maxPayload: 64))
            let m = wire(.cursorPos(VhostUserGpuCursorPos(scanout: 0, x: 1, y: 2)))
            XCTAssertEqual(m.withUnsafeBytes { send(a, $0.baseAddress, 20, 0) }, 20)
            XCTAssertEqual(try r.receive(b), .wouldBlock)
            close(a)
            XCTAssertThrowsError(try r.receive(b)) { XCTAssertEqual($0 as? VhostUserGpuError, .peerClosed(midMessage: true)) }
            close(b)
            let (c, d) = pair()
            close(c)
            XCTAssertThrowsError(try r.receive(d)) { _ in }
            close(d)
        }
        // An fd with a DMABUF scanout: delivered with its message; five fds in one message are refused (and closed).
        do {
            let (a, b) = pair()
            defer { close(a); close(b) }
            let r = VhostUserGpuReceiver(limits: VhostUserGpuLimits())
            let s = VhostUserGpuSender(capacity: 4096)
            let ev = lb_eventfd(0, 1)
            let dm = VhostUserGpuMessage.dmabufScanout(VhostUserGpuDmabufScanout(scanout: 0, x: 0, y: 0, width: 4, height: 4, fdWidth: 4, fdHeight: 4,
                                                                                 fdStride: 16, fdFlags: 0, fourcc: 0))
            XCTAssertTrue(s.append(.cursorPos(VhostUserGpuCursorPos(scanout: 0, x: 1, y: 2))))
            XCTAssertTrue(s.append(dm, fd: ev))
            let ev2 = lb_eventfd(0, 1)
            XCTAssertFalse(s.append(dm, fd: ev2), "one fd at a time")
            close(ev2)
            XCTAssertEqual(try s.flush(a), .done)
            guard case .message(let h1) = try r.receive(b) else { return XCTFail() }
            XCTAssertEqual(r.fdCount, 0, "the fd travels with its own message, not the one before")
            XCTAssertEqual(try VhostUserGpuMessage.decode(h1, payload: r.payload, fdCount: r.fdCount), .cursorPos(VhostUserGpuCursorPos(scanout: 0, x: 1, y: 2)))
            r.consume()
            guard case .message(let h2) = try r.receive(b) else { return XCTFail() }
            XCTAssertEqual(r.fdCount, 1)
            XCTAssertEqual(try VhostUserGpuMessage.decode(h2, payload: r.payload, fdCount: r.fdCount), dm)
            let f = r.takeFD(0)
            XCTAssertGreaterThanOrEqual(f, 0)
            XCTAssertEqual(r.takeFD(0), -1)
            close(f)
            r.consume()
            var fds: [Int32] = (0..<5).map { _ in lb_eventfd(0, 1) }
            let m = wire(.cursorPos(VhostUserGpuCursorPos(scanout: 0, x: 1, y: 2)))
            XCTAssertEqual(m.withUnsafeBytes { b in lb_sendmsg_fds(a, b.baseAddress, b.count, &fds, 5) }, m.count)
            for f in fds { close(f) }
            XCTAssertThrowsError(try r.receive(b)) { XCTAssertEqual($0 as? VhostUserGpuError, .tooManyFDs) }
        }
    }
}
