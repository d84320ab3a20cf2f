// Typed, validating access to one TOML table.
//
// Usage: create a reader per table, ask for every key the table accepts, then
// call `finish()`, which rejects any key that was never asked for and lists the
// accepted ones. Errors point at the key's line, or at the table header when
// the key is absent (line 0 for the root table).

/// Typed, validating access to one table; every key must be consumed, `finish()` rejects the rest.
public struct OptionReader {
    public let table: TOMLTable
    public let file: String
    /// Dotted table name, e.g. `device.rng0`; empty for the root table.
    public var tableName: String

    /// Keys asked for, in order: the keys this table accepts.
    private var accepted: [String] = []
    /// The keys the table's owner declared (`DaemonConfig.daemonKeys`, `DeviceRegistry.commonDeviceKeys` plus
    /// `DeviceType.keys`); nil = undeclared (any key may be asked). Asking for an undeclared key is a program
    /// bug (trap): the declared lists are what loopbackd.conf(5) is checked against, so they cannot drift.
    public private(set) var declared: [String]?

    public init(table: TOMLTable, file: String, keys: [String]? = nil) {
        self.table = table
        self.file = file
        self.tableName = TOML.dottedName(table.name)
        self.declared = keys
    }

    /// Adds keys to the declared list (a device table: its type's keys, once `type` is read).
    public mutating func declare(_ keys: [String]) { declared = (declared ?? []) + keys }

    /// The line of `key`, or the header line if the table has no such key.
    public func line(of key: String) -> Int {
        table.entries.first { $0.key == key }?.line ?? table.line
    }

    /// An error about `key` at its line, for checks done by the caller
    /// (e.g. "must be an absolute path").
    public func error(_ key: String, _ message: String) -> ConfigError {
        ConfigError(file: file, line: line(of: key), key: TOML.dottedName(table.name + [key]), message: message)
    }

    /// Marks `key` as accepted and returns its value, if present.
    private mutating func value(_ key: String) -> TOMLValue? {
        if let declared { precondition(declared.contains(key), "key \(key) of [\(tableName)] is read but not declared") }
        if !accepted.contains(key) { accepted.append(key) }
        return table.entries.first { $0.key == key }?.value
    }

    private func mismatch(_ key: String, expected: String, found: TOMLValue) -> ConfigError {
        error(key, "expected \(expected), found \(found.typeDescription)")
    }

    /// nil if absent. Strings containing NUL are rejected: they would be
    /// silently truncated when handed to C APIs.
    public mutating func string(_ key: String) throws(ConfigError) -> String? {
        guard let v = value(key) else { return nil }
        guard case .string(let s) = v else { throw mismatch(key, expected: "a string", found: v) }
        if s.utf8.contains(0) { throw error(key, "must not contain NUL characters") }
        return s
    }

    public mutating func requiredString(_ key: String) throws(ConfigError) -> String {
        guard let s = try string(key) else { throw error(key, "missing required key") }
        return s
    }

    public mutating func int(_ key: String, range: ClosedRange<Int64>) throws(ConfigError) -> Int64? {
        guard let v = value(key) else { return nil }
        guard case .integer(let n) = v else { throw mismatch(key, expected: "an integer", found: v) }
        guard range.contains(n) else {
            throw error(key, "must be between \(range.lowerBound) and \(range.upperBound), found \(n)")
        }
        return n
    }

    public mutating func bool(_ key: String) throws(ConfigError) -> Bool? {
        guard let v = value(key) else { return nil }
        guard case .bool(let b) = v else { throw mismatch(key, expected: "a boolean", found: v) }
        return b
    }

    public mutating func oneOf(_ key: String, _ allowed: [String]) throws(ConfigError) -> String? {
        guard let s = try string(key) else { return nil }
        guard allowed.contains(s) else {
            let list = allowed.map(TOML.quoted).joined(separator: ", ")
            throw error(key, "must be one of \(list); found \(TOML.quoted(s))")
        }
        return s
    }

    /// An array of strings (`[]` is allowed); nil if absent.
    public mutating func strings(_ key: String) throws(ConfigError) -> [String]? {
        guard let v = value(key) else { return nil }
        guard case .array(let items) = v else { throw mismatch(key, expected: "an array of strings", found: v) }
        var result: [String] = []
        for item in items {
            guard case .string(let s) = item else {
                // The parser guarantees arrays of a single type, so one element names them all.
                let kind = item.typeDescription.split(separator: " ").last ?? ""  // "an integer" -> "integer"
                throw error(key, "expected an array of strings, found an array of \(kind)s")
            }
            if s.utf8.contains(0) { throw error(key, "must not contain NUL characters") }
            result.append(s)
        }
        return result
    }

    /// Rejects the first key (in file order) that was never asked for.
    public mutating func finish() throws(ConfigError) {
        // Every declared key is read (else the file could set a key that nothing uses, silently).
        assert(declared.map { $0.allSatisfy(accepted.contains) } ?? true,
               "declared keys of [\(tableName)] never read: \((declared ?? []).filter { !accepted.contains($0) })")
        guard let unknown = table.entries.first(where: { !accepted.contains($0.key) }) else { return }
        let scope = tableName.isEmpty ? "at the top level" : "in [\(tableName)]"
        let list = accepted.isEmpty ? "no keys are accepted \(scope)" : "accepted keys \(scope): " + accepted.joined(separator: ", ")
        throw error(unknown.key, "unknown key; \(list)")
    }
}
