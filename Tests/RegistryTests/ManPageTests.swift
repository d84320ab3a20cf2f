import XCTest
import Glibc
@testable import Registry

/// The man pages against the code: every key a table accepts (the declared lists the option reader enforces:
/// `DaemonConfig.daemonKeys`, `DeviceRegistry.commonDeviceKeys`, each registered `DeviceType.keys`) is an item of
/// its table's section in loopbackd.conf(5), and no section documents a key nothing accepts; every option and
/// command of Sources/Daemon/Options.swift is in loopbackd(8). A new device type in its own folder is picked up
/// from the registry: its keys must be documented in an `.SS` section naming the type.
final class ManPageTests: XCTestCase {
    static let repo: String = {
        var p = #filePath
        for _ in 0..<3 { p = String(p[..<p.lastIndex(of: "/")!]) }
        return p
    }()

    static func read(_ rel: String) -> String? {
        let fd = open(repo + "/" + rel, O_RDONLY)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true { let n = Glibc.read(fd, &buf, buf.count); if n <= 0 { break }; out += buf[0..<n] }
        return String(decoding: out, as: UTF8.self)
    }

    /// roff to plain words: `\-` → `-`, font escapes and doubled quotes dropped.
    static func plain(_ s: String) -> String {
        var t = s.replacingOccurrences("\\-", "-")
        for f in ["\\fB", "\\fI", "\\fR", "\\fP"] { t = t.replacingOccurrences(f, "") }
        return t
    }

    /// One `.SH`/`.SS` section: its header and its `.TP` items (the first word of the line after `.TP`).
    struct Section { var header: String; var level: String; var items: [String] = []; var text = "" }

    static func sections(_ roff: String) -> [Section] {
        var out: [Section] = []
        let lines = plain(roff).split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        var i = 0
        while i < lines.count {
            let l = lines[i]
            if l.hasPrefix(".SH ") || l.hasPrefix(".SS ") {
                out.append(Section(header: String(l.dropFirst(4)).replacingOccurrences("\"", ""), level: String(l.prefix(3))))
            } else if l == ".TP", i + 1 < lines.count, !out.isEmpty {
                let words = lines[i + 1].split(separator: " ")
                if words.count >= 2, words[0].hasPrefix(".B") { out[out.count - 1].items.append(String(words[1])) }
            }
            if !out.isEmpty { out[out.count - 1].text += l + "\n" }
            i += 1
        }
        return out
    }

    /// The type names an `.SS` header documents: the words before any parenthesis.
    static func typeNames(_ header: String) -> [String] {
        let head = header.split(separator: "(").first.map(String.init) ?? header
        return head.split(whereSeparator: { $0 == "," || $0 == " " }).map(String.init)
    }

    func testConfPageDocumentsEveryAcceptedKey() throws {
        let page = try XCTUnwrap(ManPageTests.read("man/loopbackd.conf.5"), "man/loopbackd.conf.5 missing")
        let secs = ManPageTests.sections(page)

        let daemon = try XCTUnwrap(secs.first { $0.header.contains("[daemon]") }, "no [daemon] section")
        XCTAssertEqual(Set(daemon.items), Set(DaemonConfig.daemonKeys), "[daemon] keys: documented vs accepted")

        let common = try XCTUnwrap(secs.first { $0.header.contains("[device.NAME]") }, "no [device.NAME] section")
        XCTAssertEqual(Set(common.items), Set(DeviceRegistry.commonDeviceKeys), "common device keys: documented vs accepted")

        let registry = DeviceRegistry.standard
        XCTAssertFalse(registry.types.isEmpty)
        let typeSections = secs.filter { $0.level == ".SS" }
        for (name, type) in registry.types.sorted(by: { $0.key < $1.key }) {
            let matching = typeSections.filter { ManPageTests.typeNames($0.header).contains(name) }
            guard matching.count == 1 else {
                XCTFail("loopbackd.conf(5): type \(name) needs exactly one .SS section naming it, found \(matching.count)")
                continue
            }
            for key in type.keys where !matching[0].items.contains(key) {
                XCTFail("loopbackd.conf(5): key \(key) of type \(name) is not documented in section \"\(matching[0].header)\"")
            }
            for item in matching[0].items where !type.keys.contains(item) {
                XCTFail("loopbackd.conf(5): section \"\(matching[0].header)\" documents \(item), which type \(name) does not accept")
            }
            // The `type` item lists every type.
            let typeItem = common.text.components(separatedBy: ".TP\n").first { $0.hasPrefix(".B type\n") } ?? ""
            XCTAssertTrue(typeItem.contains(".BR \(name) ") || typeItem.contains(".BR \(name) ,") || typeItem.contains(" \(name),"),
                          "the type key's description does not list \(name)")
        }
        // No section documents a type that does not exist.
        let deviceTypes = secs.firstIndex { $0.header == "DEVICE TYPES" }.map { i in
            secs[(i + 1)...].prefix { $0.level == ".SS" }
        } ?? []
        XCTAssertFalse(deviceTypes.isEmpty, "no DEVICE TYPES section")
        for s in deviceTypes {
            for n in ManPageTests.typeNames(s.header) where registry.types[n] == nil {
                XCTFail("loopbackd.conf(5): section \"\(s.header)\" documents type \(n), which the registry does not know")
            }
        }
    }

    /// Every flag and command the command-line parser accepts (its `case "..."` labels; `ab-serve` is internal)
    /// appears in loopbackd(8).
    func testDaemonPageDocumentsEveryOption() throws {
        let page = ManPageTests.plain(try XCTUnwrap(ManPageTests.read("man/loopbackd.8"), "man/loopbackd.8 missing"))
        let source = try XCTUnwrap(ManPageTests.read("Sources/Daemon/Options.swift"))
        var flags: [String] = [], commands: [String] = []
        for line in source.split(separator: "\n") {
            let t = line.trimmingPrefix(while: { $0 == " " })
            guard t.hasPrefix("case \"") else { continue }
            let labels = t.dropFirst(5).prefix { $0 != ":" }
            for part in labels.split(separator: ",") {
                let w = part.trimmingPrefix(while: { $0 == " " }).filter { $0 != "\"" }
                if w.hasPrefix("-") { flags.append(String(w)) } else if !w.isEmpty && w != "ab-serve" { commands.append(String(w)) }
            }
        }
        XCTAssertGreaterThan(flags.count, 10, "found the parser's flags")
        XCTAssertGreaterThanOrEqual(commands.count, 3, "found the parser's commands")
        let words = Set(page.split(whereSeparator: { " \n\t,[]|()\"".contains($0) }).map(String.init))
        for f in flags where !words.contains(f) { XCTFail("loopbackd(8) does not document option \(f)") }
        for c in commands where !words.contains(c) { XCTFail("loopbackd(8) does not document command \(c)") }
    }
}

fileprivate extension String {
    /// Foundation-free replacement of every occurrence.
    func replacingOccurrences(_ target: String, _ with: String) -> String {
        guard !target.isEmpty else { return self }
        var out = ""
        var rest = self[...]
        while let r = rest.firstRange(of: target) {
            out += rest[..<r.lowerBound]
            out += with
            rest = rest[r.upperBound...]
        }
        return out + rest
    }
    func components(separatedBy sep: String) -> [String] {
        var out: [String] = []
        var rest = self[...]
        while let r = rest.firstRange(of: sep) { out.append(String(rest[..<r.lowerBound])); rest = rest[r.upperBound...] }
        out.append(String(rest))
        return out
    }
}
