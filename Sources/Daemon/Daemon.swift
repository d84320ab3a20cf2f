import Glibc
import CLinux
import Transport
import Registry

public let loopbackdVersion = "0.1.0"

/// The daemon's entry point: command line, config, wiring, signals. No device or ring logic lives here.
public enum Daemon {
    /// Exit statuses: 0 success, 1 runtime failure, 2 usage or configuration error.
    public static func main() -> Int32 {
        // argv from a C constructor: CommandLine.arguments is empty in a static binary started without /proc.
        var args: [String] = []
        if let argv = lb_argv() {
            for i in 1..<max(Int(lb_argc()), 1) { if let a = argv[i] { args.append(String(cString: a)) } }
        }
        return main(arguments: args)
    }

    public static func main(arguments: [String]) -> Int32 {
        let o: Options
        do { o = try Options.parse(arguments) } catch {
            printErr("loopbackd: \(error)\n\(Options.usage)")
            return 2
        }
        switch o.command {
        case .version: print("loopbackd \(loopbackdVersion)"); return 0
        case .help: print(Options.usage); return 0
        case .ctl: return ControlClient.run(o)
        default: break
        }
        let config: DaemonConfig
        do { config = try loadConfig(o.configPath) } catch {
            printErr("loopbackd: error: \(error)")
            return 2
        }
        Log.level = o.logLevel ?? config.logLevel
        Log.detectJournal()   // systemd: stderr is the journal -> <N> priority prefixes (Log.swift)
        switch o.command {
        case .check:
            print("\(config.file): OK: \(config.devices.count) device(s), transport \(config.transport.rawValue)")
            return 0
        case .bench: return Bench.run(config, o)
        case .ab: return AB.run(config, o)
        case .abServe: return AB.serve(config, o)
        default: return Runner(config: config, options: o).run()
        }
    }

    /// `-c FILE`, else /etc/loopbackd.conf if present, else the embedded default.
    static func loadConfig(_ path: String?) throws(ConfigError) -> DaemonConfig {
        if let path { return try DaemonConfig.load(path: path) }
        if access("/etc/loopbackd.conf", F_OK) == 0 { return try DaemonConfig.load(path: "/etc/loopbackd.conf") }
        return try DaemonConfig.parse(TOML.parse(embeddedDefaultConfig, file: "(embedded default)"))
    }
}

func printErr(_ s: String) {
    var line = s + "\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

struct UncheckedSendable<T>: @unchecked Sendable { let value: T; init(_ v: T) { value = v } }
