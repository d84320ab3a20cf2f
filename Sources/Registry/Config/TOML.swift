// A strict parser for the subset of TOML that loopbackd's configuration uses.
//
// Supported: comments, blank lines, table headers (`[a]`, `[a.b]`, `[a."b c"]`),
// `key = value` lines with bare or quoted keys, and values that are basic or
// literal strings, 64-bit integers (decimal, 0x, 0o, 0b), booleans, and
// single-line arrays of those (one element type per array).
//
// Everything else that is valid TOML (inline tables, multi-line strings and
// arrays, floats, dates, arrays of tables, dotted keys) is rejected with an
// "unsupported TOML: ..." error instead of a generic syntax error, so that a
// user who writes valid TOML learns why it is refused. No Foundation.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A configuration error that names the file, the line and (when known) the key.
public struct ConfigError: Error, CustomStringConvertible, Equatable {
    public var file: String
    /// 1-based; 0 when the error is not tied to a line.
    public var line: Int
    /// Full dotted path of the key (`device.rng0.path`), or nil.
    public var key: String?
    public var message: String

    public init(file: String, line: Int, key: String? = nil, message: String) {
        self.file = file
        self.line = line
        self.key = key
        self.message = message
    }

    /// `FILE:LINE: key 'KEY': MESSAGE`; the line is omitted when it is 0, the key when nil.
    public var description: String {
        var s = line > 0 ? "\(file):\(line): " : "\(file): "
        if let key { s += "key '\(key)': " }
        return s + message
    }
}

public enum TOMLValue: Equatable {
    case string(String), integer(Int64), bool(Bool), array([TOMLValue])

    /// "a string", "an integer", ... for error messages.
    public var typeDescription: String {
        switch self {
        case .string: return "a string"
        case .integer: return "an integer"
        case .bool: return "a boolean"
        case .array: return "an array"
        }
    }
}

public struct TOMLEntry: Equatable {
    public var key: String
    public var value: TOMLValue
    public var line: Int
    public init(key: String, value: TOMLValue, line: Int) {
        self.key = key
        self.value = value
        self.line = line
    }
}

public struct TOMLTable: Equatable {
    /// `[]` for the root table, `["device", "rng0"]` for `[device.rng0]`.
    public var name: [String]
    /// Line of the header; 0 for the root table.
    public var line: Int
    public var entries: [TOMLEntry]
    public init(name: [String], line: Int, entries: [TOMLEntry]) {
        self.name = name
        self.line = line
        self.entries = entries
    }
}

public struct TOMLDocument: Equatable {
    public var file: String
    /// The root table first (always present), then the tables in file order.
    public var tables: [TOMLTable]
    public init(file: String, tables: [TOMLTable]) {
        self.file = file
        self.tables = tables
    }
}

public enum TOML {
    public static let maxFileSize = 1 << 20

    public static func parse(_ text: String, file: String) throws(ConfigError) -> TOMLDocument {
        try parse(bytes: Array(text.utf8), file: file)
    }

    public static func parse(bytes: [UInt8], file: String) throws(ConfigError) -> TOMLDocument {
        guard bytes.count <= maxFileSize else {
            throw ConfigError(file: file, line: 0, message: "file is larger than the 1 MiB limit")
        }
        var builder = Builder(file: file)
        var start = bytes.starts(with: [0xEF, 0xBB, 0xBF]) ? 3 : 0  // skip a UTF-8 BOM
        var lineNumber = 1
        while start <= bytes.count {
            let end = bytes[start...].firstIndex(of: 0x0A) ?? bytes.count
            var line = Array(bytes[start..<end])
            if line.last == 0x0D { line.removeLast() }  // CRLF; a lone CR elsewhere is a control character
            try builder.parseLine(line, number: lineNumber)
            start = end + 1
            lineNumber += 1
        }
        return TOMLDocument(file: file, tables: builder.tables)
    }

    /// Reads `path` with open/read/close and parses it; read errors have line 0.
    public static func load(path: String) throws(ConfigError) -> TOMLDocument {
        func failure(_ code: Int32) -> ConfigError {
            let reason = strerror(code).map { String(cString: $0) } ?? "unknown error"
            return ConfigError(file: path, line: 0, message: "cannot read \(path): \(reason) (errno \(code))")
        }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw failure(errno) }
        defer { _ = Glibc.close(fd) }   // self-contained file (no Transport import): fuzzed alone
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw failure(errno)
            }
            if n == 0 { break }
            bytes.append(contentsOf: buffer[0..<n])
            // Stop early on huge files (or endless ones such as /dev/zero).
            if bytes.count > maxFileSize {
                throw ConfigError(file: path, line: 0, message: "file is larger than the 1 MiB limit")
            }
        }
        return try parse(bytes: bytes, file: path)
    }

    // MARK: Display helpers (shared with OptionReader)

    /// `device.rng0`, quoting segments that are not bare keys: `device."my disk"`.
    static func dottedName(_ path: [String]) -> String {
        path.map { isBareKey($0) ? $0 : quoted($0) }.joined(separator: ".")
    }

    static func isBareKey(_ s: String) -> Bool {
        !s.isEmpty && s.utf8.allSatisfy(isBareKeyByte)
    }

    static func isBareKeyByte(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
             UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "_"), UInt8(ascii: "-"):
            return true
        default:
            return false
        }
    }

    /// A string in double quotes with `"`, `\` and control characters escaped.
    static func quoted(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 || scalar.value == 0x7F {
                    out += "\\u" + hex4(scalar.value)
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }

    static func hex4(_ v: UInt32) -> String {
        let digits = String(v, radix: 16, uppercase: true)
        return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
    }
}

// MARK: - Document assembly

/// Collects tables and entries and enforces the cross-line rules
/// (duplicate keys and tables, keys that are also tables).
private struct Builder {
    let file: String
    var tables = [TOMLTable(name: [], line: 0, entries: [])]

    mutating func parseLine(_ bytes: [UInt8], number: Int) throws(ConfigError) {
        var p = LineParser(bytes: bytes, line: number, file: file)
        if bytes.contains(0) { throw p.error("NUL byte in file") }
        // A newline byte can never be part of a multi-byte sequence, so
        // validating line by line is exact and gives the line number for free.
        if String(validating: bytes, as: UTF8.self) == nil { throw p.error("invalid UTF-8") }

        if try p.atEndOfLine() { return }
        if p.peek == UInt8(ascii: "[") {
            try addTable(try p.tableHeader(), p)
            return
        }
        let key = try p.parseKey()
        let path = (tables.last?.name ?? []) + [key]
        p.keyPath = TOML.dottedName(path)
        let value = try p.keyValueRest(key: key)
        try addEntry(TOMLEntry(key: key, value: value, line: number), path: path, p)
    }

    mutating func addTable(_ name: [String], _ p: LineParser) throws(ConfigError) {
        let display = TOML.dottedName(name)
        // Only explicit headers count: `[a.b]` then `[a]` is fine, `[a]` twice is not.
        if let first = tables.first(where: { $0.name == name }) {
            throw p.error("duplicate table [\(display)] (first defined on line \(first.line))")
        }
        // `device = 1` followed by `[device.rng0]` would make `device` both a value and a table.
        for table in tables {
            for entry in table.entries where name.starts(with: table.name + [entry.key]) {
                let key = TOML.dottedName(table.name + [entry.key])
                throw p.error("table [\(display)] conflicts with key '\(key)' defined on line \(entry.line)")
            }
        }
        tables.append(TOMLTable(name: name, line: p.line, entries: []))
    }

    mutating func addEntry(_ entry: TOMLEntry, path: [String], _ p: LineParser) throws(ConfigError) {
        let current = tables.count - 1
        if let first = tables[current].entries.first(where: { $0.key == entry.key }) {
            throw p.error("duplicate key (first defined on line \(first.line))")
        }
        if let table = tables.first(where: { $0.name.starts(with: path) }) {
            throw p.error("key conflicts with table [\(TOML.dottedName(table.name))] defined on line \(table.line)")
        }
        tables[current].entries.append(entry)
    }
}

// MARK: - Line parser

private extension UInt8 {
    static let quote = UInt8(ascii: "\""), apostrophe = UInt8(ascii: "'"), backslash = UInt8(ascii: "\\")
    static let hash = UInt8(ascii: "#"), equals = UInt8(ascii: "="), dot = UInt8(ascii: "."), comma = UInt8(ascii: ",")
    static let open = UInt8(ascii: "["), close = UInt8(ascii: "]"), brace = UInt8(ascii: "{")

    /// Control characters that TOML forbids raw in strings and comments (tab is allowed).
    var isForbiddenControl: Bool { (self < 0x20 && self != 0x09) || self == 0x7F }
}

/// Parses one line (without its newline). Every error carries the line number
/// and, once the key is known, the key's dotted path.
private struct LineParser {
    let bytes: [UInt8]
    let line: Int
    let file: String
    var keyPath: String? = nil
    var i = 0

    init(bytes: [UInt8], line: Int, file: String) {
        self.bytes = bytes
        self.line = line
        self.file = file
    }

    var peek: UInt8? { i < bytes.count ? bytes[i] : nil }

    func peek(_ offset: Int) -> UInt8? { i + offset < bytes.count ? bytes[i + offset] : nil }

    func error(_ message: String) -> ConfigError {
        ConfigError(file: file, line: line, key: keyPath, message: message)
    }

    /// Describes the character at `index` for messages: `'x'`, `U+0001` or "end of line".
    func describe(_ index: Int) -> String {
        guard index < bytes.count,
              let scalar = String(decoding: bytes[index..<min(index + 4, bytes.count)], as: UTF8.self)
                  .unicodeScalars.first
        else { return "end of line" }
        if scalar.value < 0x20 || scalar.value == 0x7F { return "control character U+\(TOML.hex4(scalar.value))" }
        return "'\(Character(scalar))'"
    }

    mutating func skipSpace() {
        while let c = peek, c == 0x20 || c == 0x09 { i += 1 }
    }

    /// Skips whitespace; true at the end of the line or at a (validated) comment.
    mutating func atEndOfLine() throws(ConfigError) -> Bool {
        skipSpace()
        guard let c = peek else { return true }
        guard c == .hash else { return false }
        if let bad = bytes[i...].firstIndex(where: { $0.isForbiddenControl }) {
            throw error("\(describe(bad)) in comment")
        }
        i = bytes.count
        return true
    }

    mutating func expectEndOfLine(after what: String) throws(ConfigError) {
        if try atEndOfLine() { return }
        if let c = peek, c.isForbiddenControl { throw error("unexpected \(describe(i)) after \(what)") }
        var rest = String(decoding: bytes[i...], as: UTF8.self)
        if rest.count > 20 { rest = String(rest.prefix(20)) + "..." }
        throw error("unexpected text after \(what): \(TOML.quoted(rest))")
    }

    /// `[a.b."c d"]` -> ["a", "b", "c d"]
    mutating func tableHeader() throws(ConfigError) -> [String] {
        i += 1
        if peek == .open { throw error("unsupported TOML: arrays of tables ([[...]])") }
        skipSpace()
        if peek == .close { throw error("empty table name") }
        var name: [String] = []
        while true {
            skipSpace()
            name.append(try parseKey())
            skipSpace()
            guard let c = peek else { throw error("unterminated table header: expected ']'") }
            if c == .close { break }
            guard c == .dot else { throw error("unexpected \(describe(i)) in table header") }
            i += 1
        }
        i += 1
        try expectEndOfLine(after: "table header")
        return name
    }

    /// A bare key (A-Za-z0-9_-) or a quoted key ("..." or '...').
    mutating func parseKey() throws(ConfigError) -> String {
        let key: String
        switch peek {
        case .quote?: key = try basicString()
        case .apostrophe?: key = try literalString()
        default:
            let start = i
            while let c = peek, TOML.isBareKeyByte(c) { i += 1 }
            guard i > start else {
                throw error("expected a key, found \(describe(i)) (bare keys may contain only A-Z a-z 0-9 _ -)")
            }
            return String(decoding: bytes[start..<i], as: UTF8.self)
        }
        if key.isEmpty { throw error("unsupported TOML: empty keys") }
        return key
    }

    /// Everything after the key: ` = value  # comment`.
    mutating func keyValueRest(key: String) throws(ConfigError) -> TOMLValue {
        skipSpace()
        switch peek {
        case .equals?:
            i += 1
        case .dot?:
            throw error("unsupported TOML: dotted keys ('a.b = 1'); use a [table] header")
        case nil, .hash?:
            throw error("key without value: expected '=' and a value")
        default:
            throw error("expected '=' after key, found \(describe(i))")
        }
        if try atEndOfLine() { throw error("missing value after '='") }
        let value = try value()
        try expectEndOfLine(after: "value")
        return value
    }

    mutating func value() throws(ConfigError) -> TOMLValue {
        switch peek {
        case .quote?: return .string(try basicString())
        case .apostrophe?: return .string(try literalString())
        case .open?: return try array()
        case .brace?: throw error("unsupported TOML: inline tables ({...}); use a [table] header")
        default: return try scalar()
        }
    }

    /// `[v, v, ...]` on one line; a trailing comma is allowed. Elements must be
    /// non-array values of a single type, which also bounds recursion.
    mutating func array() throws(ConfigError) -> TOMLValue {
        i += 1
        var items: [TOMLValue] = []
        let unterminated = "unsupported TOML: multi-line arrays (expected ']' before the end of the line)"
        while true {
            skipSpace()
            guard let c = peek, c != .hash else { throw error(unterminated) }
            if c == .close { break }
            if c == .open { throw error("unsupported TOML: nested arrays") }
            let item = try value()
            if let first = items.first, first.typeDescription != item.typeDescription {
                throw error("unsupported TOML: mixed-type arrays (\(first.typeDescription) and \(item.typeDescription))")
            }
            items.append(item)
            skipSpace()
            guard let d = peek, d != .hash else { throw error(unterminated) }
            if d == .close { break }
            guard d == .comma else { throw error("expected ',' or ']' in array, found \(describe(i))") }
            i += 1
        }
        i += 1
        return .array(items)
    }

    /// `"..."` with the TOML escapes \b \t \n \f \r \" \\ \uXXXX \UXXXXXXXX.
    mutating func basicString() throws(ConfigError) -> String {
        if peek(1) == .quote && peek(2) == .quote { throw error("unsupported TOML: multi-line strings (\"\"\")") }
        i += 1
        var out: [UInt8] = []
        while let c = peek {
            i += 1
            switch c {
            case .quote:
                return String(decoding: out, as: UTF8.self)
            case .backslash:
                try escape(into: &out)
            default:
                if c.isForbiddenControl { throw error("\(describe(i - 1)) in string (use an escape sequence)") }
                out.append(c)
            }
        }
        throw error("unterminated string")
    }

    mutating func escape(into out: inout [UInt8]) throws(ConfigError) {
        guard let e = peek else { throw error("unterminated string") }
        switch e {
        case UInt8(ascii: "b"): out.append(0x08)
        case UInt8(ascii: "t"): out.append(0x09)
        case UInt8(ascii: "n"): out.append(0x0A)
        case UInt8(ascii: "f"): out.append(0x0C)
        case UInt8(ascii: "r"): out.append(0x0D)
        case .quote, .backslash: out.append(e)
        case UInt8(ascii: "u"), UInt8(ascii: "U"):
            let count = e == UInt8(ascii: "u") ? 4 : 8
            let notation = "\\\(Character(Unicode.Scalar(e)))"
            guard i + 1 + count <= bytes.count else { throw error("invalid escape sequence: \(notation) needs \(count) hex digits") }
            var v: UInt32 = 0  // at most 8 hex digits: cannot overflow
            for d in bytes[(i + 1)..<(i + 1 + count)] {
                guard let n = hexValue(d) else { throw error("invalid escape sequence: \(notation) needs \(count) hex digits") }
                v = v << 4 | UInt32(n)
            }
            // Surrogates and values above U+10FFFF are not Unicode scalar values.
            guard let scalar = Unicode.Scalar(v) else {
                throw error("invalid escape sequence: U+\(TOML.hex4(v)) is not a Unicode scalar value")
            }
            UTF8.encode(scalar) { out.append($0) }
            i += count
        default:
            let what = describe(i)  // "'x'" or "control character U+0001"
            throw error(what.hasPrefix("'") ? "invalid escape sequence '\\\(what.dropFirst())" : "invalid escape sequence: '\\' followed by \(what)")
        }
        i += 1
    }

    /// `'...'`: no escapes, no control characters except tab.
    mutating func literalString() throws(ConfigError) -> String {
        if peek(1) == .apostrophe && peek(2) == .apostrophe { throw error("unsupported TOML: multi-line strings (''')") }
        i += 1
        let start = i
        while let c = peek {
            if c == .apostrophe {
                i += 1
                return String(decoding: bytes[start..<(i - 1)], as: UTF8.self)
            }
            if c.isForbiddenControl { throw error("\(describe(i)) in string") }
            i += 1
        }
        throw error("unterminated string")
    }

    /// Booleans and integers; recognizes floats and dates only to reject them clearly.
    mutating func scalar() throws(ConfigError) -> TOMLValue {
        let start = i
        // Token characters are wide enough to swallow floats, dates and times whole.
        while let c = peek, TOML.isBareKeyByte(c) || c == UInt8(ascii: "+") || c == .dot || c == UInt8(ascii: ":") {
            i += 1
        }
        let token = Array(bytes[start..<i])
        guard !token.isEmpty else { throw error("expected a value, found \(describe(i))") }
        let text = String(decoding: token, as: UTF8.self)
        if text == "true" { return .bool(true) }
        if text == "false" { return .bool(false) }

        let unsigned = token.first == UInt8(ascii: "+") || token.first == UInt8(ascii: "-") ? Array(token.dropFirst()) : token
        let isDigit = { (c: UInt8) in c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9") }
        if unsigned == Array("inf".utf8) || unsigned == Array("nan".utf8) {
            throw error("unsupported TOML: floats (\(text))")
        }
        // 1979-05-27, 1979-05-27T07:32:00Z, 07:32:00
        if (unsigned.count >= 5 && unsigned.prefix(4).allSatisfy(isDigit) && unsigned[4] == UInt8(ascii: "-"))
            || (unsigned.count >= 3 && unsigned.prefix(2).allSatisfy(isDigit) && unsigned[2] == UInt8(ascii: ":")) {
            throw error("unsupported TOML: dates and times (\(text))")
        }
        guard let first = unsigned.first, isDigit(first) else {
            throw error("invalid value \(TOML.quoted(text)): expected a quoted string, an integer, true, false or an array")
        }
        let prefixed = unsigned.count >= 2 && first == UInt8(ascii: "0") && "xob".utf8.contains(unsigned[1])
        if !prefixed && unsigned.contains(where: { $0 == .dot || $0 == UInt8(ascii: "e") || $0 == UInt8(ascii: "E") }) {
            throw error("unsupported TOML: floats (\(text))")
        }
        return .integer(try integer(token, text: text))
    }

    /// TOML integers: optional sign (decimal only), no leading zeros, `_` only
    /// between digits, 0x/0o/0b prefixes, and the value must fit in Int64.
    func integer(_ token: [UInt8], text: String) throws(ConfigError) -> Int64 {
        func invalid(_ why: String) -> ConfigError { error("invalid integer \(text): \(why)") }
        var digits = token[...]
        var negative = false, signed = false
        if let s = digits.first, s == UInt8(ascii: "+") || s == UInt8(ascii: "-") {
            negative = s == UInt8(ascii: "-")
            signed = true
            digits = digits.dropFirst()
        }
        var radix: Int64 = 10
        let prefix = digits.count >= 2 && digits.first == UInt8(ascii: "0") ? digits[digits.startIndex + 1] : 0
        switch prefix {
        case UInt8(ascii: "x"): radix = 16
        case UInt8(ascii: "o"): radix = 8
        case UInt8(ascii: "b"): radix = 2
        default: break
        }
        if radix != 10 {
            if signed { throw invalid("a sign is not allowed with a 0x, 0o or 0b prefix") }
            digits = digits.dropFirst(2)
        } else if digits.count >= 2, digits.first == UInt8(ascii: "0") {
            throw invalid("leading zeros are not allowed")
        }
        var value: Int64 = 0
        var afterDigit = false
        for c in digits {
            if c == UInt8(ascii: "_") {
                guard afterDigit else { throw invalid("'_' must be between digits") }
                afterDigit = false
                continue
            }
            guard let d = hexValue(c), Int64(d) < radix else { throw invalid("unexpected '\(Character(Unicode.Scalar(c)))'") }
            // Accumulate towards the sign so that Int64.min is representable.
            let (shifted, o1) = value.multipliedReportingOverflow(by: radix)
            let (next, o2) = negative ? shifted.subtractingReportingOverflow(Int64(d)) : shifted.addingReportingOverflow(Int64(d))
            if o1 || o2 { throw error("integer \(text) is out of range (\(Int64.min)...\(Int64.max))") }
            value = next
            afterDigit = true
        }
        guard afterDigit else { throw invalid(digits.isEmpty ? "no digits" : "'_' must be between digits") }
        return value
    }

    func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}
