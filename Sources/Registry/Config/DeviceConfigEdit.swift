/// Changing one option of a parsed device and building it again through its type's factory (every check runs
/// again). `loopbackd ab` uses it: its child serves the same vsock body on a uds-path of its own, since two live
/// listeners cannot share one path.
extension DeviceConfig {
    public func replacing(_ key: String, with value: TOMLValue, file: String,
                          registry: DeviceRegistry = .standard) throws(ConfigError) -> DeviceConfig {
        var entries = definition.filter { $0.key != key }
        entries.append(TOMLEntry(key: key, value: value, line: line))
        return try DaemonConfig.parseDevice(TOMLTable(name: ["device", name], line: line, entries: entries), file: file,
                                            registry: registry)
    }

    /// The string value of option `key` in the device's table, if it is set to a string.
    public func string(_ key: String) -> String? {
        guard let e = definition.first(where: { $0.key == key }), case .string(let s) = e.value else { return nil }
        return s
    }

    /// The integer value of option `key` in the device's table, if it is set to an integer.
    public func integer(_ key: String) -> Int64? {
        guard let e = definition.first(where: { $0.key == key }), case .integer(let v) = e.value else { return nil }
        return v
    }
}
