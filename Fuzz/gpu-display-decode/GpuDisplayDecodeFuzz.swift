// libFuzzer target: the vhost-user-gpu display protocol decoder (Sources/Transport/VhostUser/GpuDisplay.swift):
// `VhostUserGpuMessage.decode` (back-end requests) and `VhostUserGpuReply.decode` (front-end replies, against a fuzzed
// pending request) on a fuzzed header, payload, fd count and limits. Oracle: whatever decode accepts satisfies the
// documented checks, and encoding it again gives the same bytes (requests: header + fixed part, the trailing pixels
// being the payload's rest; replies: every byte the reply carries) which decode to the same value.
import Glibc
import Transport

@_cdecl("LLVMFuzzerTestOneInput")
public func gpuDisplayDecodeFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var f = FuzzInput(data, size)
    let sel = f.u8()
    let limits = VhostUserGpuLimits(scanouts: 1 + Int(f.u8() % 16), maxPayload: sel & 0x10 != 0 ? Int(f.u16()) : 64 << 10)
    let fdCount = Int(f.u8() % 3)
    let pending = VhostUserGpuRequest(rawValue: 1 + UInt32(f.u8() % 12))   // the reply branch's awaited request
    var head = [UInt8](repeating: 0, count: VhostUserGpuHeader.byteCount)
    head.withUnsafeMutableBytes { f.fill($0.baseAddress!, VhostUserGpuHeader.byteCount) }
    var h = head.withUnsafeBytes { VhostUserGpuHeader(from: $0.baseAddress!) }
    let payload = Array(f.rest().prefix(20 + 64 * 64 * 4 + 64))
    // Most inputs: a known request number and a header size that matches the payload.
    if sel & 0x80 == 0 { h.size = UInt32(payload.count) }
    if sel & 0x40 == 0 { h.request = 1 + h.request % 12 }

    if sel & 0x20 == 0 {
        h.flags &= ~VhostUserGpuHeader.replyFlag
        let r = payload.withUnsafeBytes { p -> Result<VhostUserGpuMessage, VhostUserGpuError> in
            do throws(VhostUserGpuError) { return .success(try VhostUserGpuMessage.decode(h, payload: p, fdCount: fdCount, limits: limits)) }
            catch { return .failure(error) }
        }
        guard case .success(let m) = r else { if case .failure(let e) = r { _ = e.description }; return 0 }
        fuzzCheck(Int(h.size) == payload.count && payload.count <= limits.maxPayload, "accepted size \(h.size) / \(payload.count)")
        fuzzCheck(m.request.rawValue == h.request, "request \(m.request) from \(h.request)")
        fuzzCheck(m.fdCount == fdCount, "fd count \(fdCount) for \(m)")
        guard let trailing = m.trailingBytes else { fuzzCheck(false, "accepted an unencodable \(m)"); return 0 }
        fuzzCheck(m.fixedBytes + trailing == payload.count, "\(m): \(m.fixedBytes) + \(trailing) != \(payload.count)")
        var out = [UInt8](repeating: 0, count: VhostUserGpuHeader.byteCount + m.fixedBytes)
        let n = out.withUnsafeMutableBytes { m.encode(into: $0) }
        fuzzCheck(n == out.count, "encode wrote \(String(describing: n)) of \(out.count)")
        fuzzCheck(Array(out[12...]) == Array(payload.prefix(m.fixedBytes)), "\(m) re-encodes differently")
        let again = (out + payload[m.fixedBytes...]).withUnsafeBytes { b -> VhostUserGpuMessage? in
            let hh = VhostUserGpuHeader(from: b.baseAddress!)
            return try? VhostUserGpuMessage.decode(hh, payload: UnsafeRawBufferPointer(rebasing: b[12...]), fdCount: fdCount, limits: limits)
        }
        fuzzCheck(again == m, "\(m) does not decode to itself")
    } else {
        h.flags |= VhostUserGpuHeader.replyFlag
        let r = payload.withUnsafeBytes { p -> Result<VhostUserGpuReply, VhostUserGpuError> in
            do throws(VhostUserGpuError) { return .success(try VhostUserGpuReply.decode(h, payload: p, fdCount: fdCount, pending: pending)) }
            catch { return .failure(error) }
        }
        guard case .success(let rep) = r else { if case .failure(let e) = r { _ = e.description }; return 0 }
        fuzzCheck(rep.request == pending && h.request == pending?.rawValue && fdCount == 0, "reply \(rep) to \(String(describing: pending))")
        fuzzCheck(rep.payloadBytes == payload.count, "\(rep): \(rep.payloadBytes) bytes from \(payload.count)")
        var out = [UInt8](repeating: 0, count: VhostUserGpuHeader.byteCount + rep.payloadBytes)
        let n = out.withUnsafeMutableBytes { rep.encode(into: $0) }
        fuzzCheck(n == out.count, "reply encode wrote \(String(describing: n))")
        let again = out.withUnsafeBytes { b -> VhostUserGpuReply? in
            try? VhostUserGpuReply.decode(VhostUserGpuHeader(from: b.baseAddress!), payload: UnsafeRawBufferPointer(rebasing: b[12...]),
                                          fdCount: 0, pending: pending)
        }
        fuzzCheck(again == rep, "\(rep) does not decode to itself")
    }
    return 0
}
