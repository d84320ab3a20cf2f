// libFuzzer target: the vhost-user request decoder (Sources/Transport/VhostUser/Message.swift):
// `VhostUserHeader(from:)`, `validateRequest()` and `VhostUserMessage.decode` on a fuzzed header, payload, fd count
// and queue limits. Oracle: anything decode accepts satisfies its documented checks, and encoding it again with
// `VhostUserWriter` decodes to the same message.
import Glibc
import Transport

/// The wire form of a decoded request (the inverse of decode, written from vhost-user.rst).
private func encode(_ m: VhostUserMessage) -> (VhostUserRequest, [UInt8]) {
    var w = VhostUserWriter(request: 0)
    let r: VhostUserRequest
    switch m {
    case .getFeatures: r = .getFeatures
    case .setFeatures(let v): r = .setFeatures; w.append(v)
    case .setOwner: r = .setOwner
    case .resetOwner: r = .resetOwner
    case .setMemTable(let regions):
        r = .setMemTable; w.append(UInt32(regions.count)); w.append(UInt32(0)); for x in regions { w.appendRegion(x) }
    case .setVringNum(let i, let num): r = .setVringNum; w.appendState(i, UInt32(num))
    case .setVringAddr(let a):
        r = .setVringAddr; w.append(UInt32(a.index)); w.append(a.flags); w.append(a.desc); w.append(a.used); w.append(a.avail); w.append(a.log)
    case .setVringBase(let i, let b): r = .setVringBase; w.appendState(i, UInt32(b))
    case .getVringBase(let i): r = .getVringBase; w.appendState(i, 0)
    case .setVringKick(let i, let fd): r = .setVringKick; w.append(UInt64(i) | (fd ? 0 : VhostUserMessage.noFDFlag))
    case .setVringCall(let i, let fd): r = .setVringCall; w.append(UInt64(i) | (fd ? 0 : VhostUserMessage.noFDFlag))
    case .setVringErr(let i, let fd): r = .setVringErr; w.append(UInt64(i) | (fd ? 0 : VhostUserMessage.noFDFlag))
    case .getProtocolFeatures: r = .getProtocolFeatures
    case .setProtocolFeatures(let v): r = .setProtocolFeatures; w.append(v)
    case .getQueueNum: r = .getQueueNum
    case .setVringEnable(let i, let e): r = .setVringEnable; w.appendState(i, e ? 1 : 0)
    case .setBackendReqFD: r = .setBackendReqFD
    case .getConfig(let off, let size, let flags):
        r = .getConfig; w.append(off); w.append(size); w.append(flags); w.append(bytes: [UInt8](repeating: 0, count: Int(size)))
    case .setConfig(let off, let flags, let data):
        r = .setConfig; w.append(off); w.append(UInt32(data.count)); w.append(flags); w.append(bytes: data)
    case .resetDevice: r = .resetDevice
    case .getMaxMemSlots: r = .getMaxMemSlots
    case .addMemReg(let x): r = .addMemReg; w.append(UInt64(0)); w.appendRegion(x)
    case .remMemReg(let x): r = .remMemReg; w.append(UInt64(0)); w.appendRegion(x)
    case .setStatus(let s): r = .setStatus; w.append(UInt64(s))
    case .getStatus: r = .getStatus
    case .gpuSetSocket: r = .gpuSetSocket
    }
    return (r, Array(w.bytes[VhostUserHeader.byteCount...]))
}

@_cdecl("LLVMFuzzerTestOneInput")
public func vhostUserDecodeFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var f = FuzzInput(data, size)
    let sel = f.u8()
    let queues = 1 + Int(sel & 3)
    var maxes: [UInt16] = []
    for _ in 0..<queues { let e = f.u8(); maxes.append(e & 0x80 != 0 ? UInt16(e & 0x7f) : UInt16(1) << (e % 16)) }
    let limits = VhostUserLimits(queueMaxSizes: maxes, maxTableRegions: sel & 4 != 0 ? Int(f.u8() % 40) : 8)
    let fdCount = Int(f.u8() % 10)
    var head = [UInt8](repeating: 0, count: VhostUserHeader.byteCount)
    head.withUnsafeMutableBytes { f.fill($0.baseAddress!, VhostUserHeader.byteCount) }
    var h = head.withUnsafeBytes { VhostUserHeader(from: $0.baseAddress!) }
    let payload = Array(f.rest().prefix(Int(VhostUserHeader.maxPayload) + 64))
    // Most inputs: a header whose size matches the payload (else nearly every input stops at the size check).
    if sel & 0x80 == 0 { h.size = UInt32(payload.count) }
    if sel & 0x40 == 0 { h.flags = (h.flags & ~(VhostUserHeader.versionMask | VhostUserHeader.replyFlag)) | VhostUserHeader.version }

    let headerOK: Bool
    do throws(VhostUserError) { try h.validateRequest(); headerOK = true } catch {
        headerOK = false
        _ = error.description
    }
    if headerOK {
        fuzzCheck(h.size <= VhostUserHeader.maxPayload && h.flags & 3 == 1 && !h.isReply, "validateRequest accepted \(h)")
    }
    let result = payload.withUnsafeBytes { p -> Result<VhostUserMessage, VhostUserError> in
        do throws(VhostUserError) { return .success(try VhostUserMessage.decode(h, payload: p, fdCount: fdCount, limits: limits)) }
        catch { return .failure(error) }
    }
    let m: VhostUserMessage
    switch result {
    case .failure(let e): _ = e.description; return 0
    case .success(let v): m = v
    }
    fuzzCheck(Int(h.size) == payload.count, "decode accepted size \(h.size) with a \(payload.count)-byte payload")
    fuzzCheck(m.expectedFDs.contains(fdCount), "decode accepted \(fdCount) fds for \(m)")
    fuzzCheck(VhostUserRequest(rawValue: h.request) != nil, "decode accepted unknown request \(h.request)")
    switch m {
    case .setVringNum(let i, let num):
        fuzzCheck(i < queues && num >= 1 && num <= maxes[i] && num & (num - 1) == 0, "bad accepted vring num \(i) \(num) (max \(maxes))")
    case .setVringAddr(let a): fuzzCheck(a.index < queues && a.flags == 0, "bad accepted vring addr \(a)")
    case .setVringBase(let i, _), .getVringBase(let i), .setVringEnable(let i, _),
         .setVringKick(let i, _), .setVringCall(let i, _), .setVringErr(let i, _):
        fuzzCheck(i >= 0 && i < queues, "vring index \(i) accepted with \(queues) queues")
    case .setMemTable(let r): fuzzCheck(r.count >= 1 && r.count <= limits.maxTableRegions, "\(r.count) regions accepted")
    case .getConfig(_, let s, let fl): fuzzCheck(s <= VhostUserMessage.maxConfigBytes && fl <= 1, "config access \(s) flags \(fl)")
    case .setConfig(_, let fl, let d): fuzzCheck(d.count <= Int(VhostUserMessage.maxConfigBytes) && fl <= 1, "config write \(d.count) flags \(fl)")
    default: break
    }
    _ = "\(m)"
    // Round trip.
    let (req, bytes) = encode(m)
    fuzzCheck(req.rawValue == h.request, "re-encoded as \(req), header said \(h.request)")
    let again = bytes.withUnsafeBytes { p -> VhostUserMessage? in
        let h2 = VhostUserHeader(request: req.rawValue, flags: VhostUserHeader.version, size: UInt32(p.count))
        return try? VhostUserMessage.decode(h2, payload: p, fdCount: fdCount, limits: limits)
    }
    fuzzCheck(again == m, "round trip: \(m) -> \(String(describing: again))")
    return 0
}
