// libFuzzer target: the strict TOML-subset parser (Sources/Registry/Config/TOML.swift) and the configuration built
// on it (DaemonConfig.parse with the standard DeviceRegistry: [daemon], [device.NAME], every device factory's
// option validation). Oracles: no trap on any bytes; every error has a message and a line inside the file; a
// parsed document printed back as TOML parses to the same tables, keys and values.
import Glibc
import Transport
@testable import Registry

private func render(_ v: TOMLValue) -> String {
    switch v {
    case .string(let s): return TOML.quoted(s)
    case .integer(let n): return String(n)
    case .bool(let b): return b ? "true" : "false"
    case .array(let a): return "[" + a.map(render).joined(separator: ", ") + "]"
    }
}

private func render(_ doc: TOMLDocument) -> String {
    var out = ""
    for t in doc.tables {
        if !t.name.isEmpty { out += "[\(TOML.dottedName(t.name))]\n" }
        for e in t.entries { out += "\(TOML.dottedName([e.key])) = \(render(e.value))\n" }
    }
    return out
}

private func shape(_ doc: TOMLDocument) -> [[String]] {
    doc.tables.map { t in [TOML.dottedName(t.name)] + t.entries.map { "\($0.key)=\(render($0.value))" } }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func configFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let lines = bytes.reduce(1) { $0 + ($1 == 0x0A ? 1 : 0) }
    let doc: TOMLDocument
    do throws(ConfigError) { doc = try TOML.parse(bytes: bytes, file: "fuzz.toml") } catch {
        fuzzCheck(!error.message.isEmpty && error.line >= 0 && error.line <= lines, "bad error \(error) (\(lines) lines)")
        _ = error.description
        return 0
    }
    fuzzCheck(doc.tables.first?.name == [], "no root table first")
    // Round trip.
    let text = render(doc)
    do throws(ConfigError) {
        let again = try TOML.parse(text, file: "again.toml")
        fuzzCheck(shape(again) == shape(doc), "round trip changed the document:\n\(text)")
    } catch {
        fuzzCheck(false, "printed document does not parse: \(error)\n\(text)")
    }
    // The daemon's configuration on top (no file is opened: factories only validate options).
    do throws(ConfigError) {
        let c = try DaemonConfig.parse(doc, registry: .standard)
        fuzzCheck(!c.devices.isEmpty, "a config without devices was accepted")
        for d in c.devices {
            fuzzCheck(!d.shape.queueSizes.isEmpty && d.shape.queueSizes.allSatisfy { $0 > 0 && $0 & ($0 - 1) == 0 },
                      "device \(d.name): queue sizes \(d.shape.queueSizes)")
            if let s = d.serve { fuzzCheck(s.hasPrefix("/") && s.utf8.count < 108, "serve path \(s)") }
        }
    } catch {
        fuzzCheck(!error.message.isEmpty && error.line >= 0 && error.line <= lines, "bad config error \(error)")
        _ = error.description
    }
    return 0
}
