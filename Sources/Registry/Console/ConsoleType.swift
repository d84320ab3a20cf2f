import Glibc
import Transport

/// `type = "console"` (virtio-console, id 3). In-process: `console` (port 0, the driver's /dev/hvc0) and/or
/// `ports` (named ports 1…N, the driver's /dev/virtio-ports/NAME), each with an endpoint:
/// `"pty"`, `"pty:/link/path"`, `"unix:/socket/path"`, `"stdio"`, `"file:/log/path"`, `"echo"` (output comes back
/// as input: tests and bench). Forwarded (`backend = "vhost-user:…"`): the back-end owns the endpoints; `queues`
/// (default 4: one port plus control) must match what it serves.
extension DeviceType {
    public static var console: DeviceType {
        var t = DeviceType(name: "console", keys: ["console", "ports", "queues", "queue-size"], factory: ConsoleConfig.make,
                           workload: { d, verify in ConsoleWorkload(d, verify: verify) })
        t.kernel = ConsoleExposure()
        return t
    }
}

/// A port's host endpoint as written in the config.
public enum ConsoleEndpointSpec: Equatable, Sendable {
    case pty(link: String?)
    case unix(path: String)
    case stdio
    case file(path: String)
    case echo

    /// Parses `pty`, `pty:/link`, `unix:/path`, `stdio`, `file:/path`, `echo`; nil and a reason on anything else.
    public static func parse(_ s: String) -> Result<ConsoleEndpointSpec, ConsoleConfig.Problem> {
        func absolute(_ p: Substring, _ what: String) -> Result<String, ConsoleConfig.Problem> {
            guard p.hasPrefix("/"), p.utf8.count < 108 else {
                return .failure(.init("\(what) must be an absolute path shorter than 108 bytes"))
            }
            return .success(String(p))
        }
        switch s {
        case "pty": return .success(.pty(link: nil))
        case "stdio": return .success(.stdio)
        case "echo": return .success(.echo)
        default: break
        }
        guard let colon = s.firstIndex(of: ":") else {
            return .failure(.init("unknown endpoint \"\(s)\"; use \"pty\", \"pty:/link\", \"unix:/path\", \"stdio\", \"file:/path\" or \"echo\""))
        }
        let rest = s[s.index(after: colon)...]
        switch s[..<colon] {
        case "pty": return absolute(rest, "the pty link").map { .pty(link: $0) }
        case "unix": return absolute(rest, "the socket").map { .unix(path: $0) }
        case "file": return absolute(rest, "the log file").map { .file(path: $0) }
        default:
            return .failure(.init("unknown endpoint kind \"\(s[..<colon])\"; use pty, unix, stdio, file or echo"))
        }
    }

    func open() throws(DeviceError) -> ConsoleEndpoint {
        switch self {
        case .pty(let link): return try PtyEndpoint(link: link)
        case .unix(let path): return try UnixEndpoint(path: path)
        case .stdio: return StdioEndpoint()
        case .file(let path): return try FileEndpoint(path: path)
        case .echo: return FakeConsoleEndpoint(echo: true, capacity: 1 << 20)
        }
    }
}

public enum ConsoleConfig {
    public struct Problem: Error, Equatable { public var message: String; init(_ m: String) { message = m } }

    /// A `ports` element: `NAME=ENDPOINT`; NAME 1–127 of A-Z a-z 0-9 . _ -.
    public static func parsePort(_ s: String) -> Result<(name: String, endpoint: ConsoleEndpointSpec), Problem> {
        guard let eq = s.firstIndex(of: "=") else {
            return .failure(Problem("port \"\(s)\" must be NAME=ENDPOINT (e.g. \"org.agl.log=unix:/run/log.sock\")"))
        }
        let name = String(s[..<eq])
        guard (1...ConsoleDevice.maxNameBytes).contains(name.utf8.count),
              name.utf8.allSatisfy({ c in (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a)
                                       || c == 0x2e || c == 0x5f || c == 0x2d }) else {
            return .failure(Problem("port name \"\(name)\" must be 1-\(ConsoleDevice.maxNameBytes) of A-Z a-z 0-9 . _ -"))
        }
        return ConsoleEndpointSpec.parse(String(s[s.index(after: eq)...])).map { (name, $0) }
    }

    static func make(_ name: String, _ r: inout OptionReader, _ backend: DeviceBackend) throws(ConfigError) -> (DeviceShape, () throws(DeviceError) -> VirtioDevice) {
        let console = try r.string("console")
        let list = try r.strings("ports")
        let queues = try r.int("queues", range: 1...64)
        let qs = try r.int("queue-size", range: 1...32768) ?? 256
        if qs & (qs - 1) != 0 { throw r.error("queue-size", "must be a power of two, found \(qs)") }
        guard backend == .inproc else {
            // The back-end owns the ports; loopbackd only needs the queue count it serves.
            if console != nil { throw r.error("console", "endpoints are set on the back-end; only with backend = \"inproc\"") }
            if list != nil { throw r.error("ports", "endpoints are set on the back-end; only with backend = \"inproc\"") }
            let shape = DeviceShape(deviceID: VirtioID.console, queueSizes: Array(repeating: UInt16(qs), count: Int(queues ?? 4)),
                                    configSize: VirtioConsole.configSize)
            return (shape, { () throws(DeviceError) -> VirtioDevice in throw DeviceError("\(name): forwarded console has no in-process body") })
        }
        if queues != nil { throw r.error("queues", "only for a forwarded console; in-process the queues follow the ports (2 per port + 2 control)") }
        var specs: [(id: Int, name: String, console: Bool, spec: ConsoleEndpointSpec)] = []
        if let console {
            switch ConsoleEndpointSpec.parse(console) {
            case .success(let s): specs.append((0, "", true, s))
            case .failure(let p): throw r.error("console", p.message)
            }
        }
        for (k, item) in (list ?? []).enumerated() {
            switch parsePort(item) {
            case .success(let (n, s)):
                if specs.contains(where: { $0.name == n }) { throw r.error("ports", "port name \"\(n)\" used twice") }
                specs.append((k + 1, n, false, s))
            case .failure(let p): throw r.error("ports", p.message)
            }
        }
        guard !specs.isEmpty else {
            throw r.error("console", "a console needs a port: console = \"pty\" and/or ports = [\"NAME=ENDPOINT\", ...]")
        }
        guard specs.count <= VirtioConsole.maxPorts else { throw r.error("ports", "at most \(VirtioConsole.maxPorts - 1) named ports") }
        if specs.filter({ $0.spec == .stdio }).count > 1 { throw r.error("ports", "only one port can use stdio") }
        var paths = Set<String>()
        for s in specs {
            let p: String?
            switch s.spec { case .unix(let x), .file(let x): p = x; case .pty(let l): p = l; default: p = nil }
            if let p, !paths.insert(p).inserted { throw r.error(s.id == 0 ? "console" : "ports", "path \(p) used by two ports") }
        }
        let maxPorts = (specs.map(\.id).max() ?? 0) + 1
        let shape = DeviceShape(deviceID: VirtioID.console,
                                queueSizes: Array(repeating: UInt16(qs), count: VirtioConsole.queueCount(ports: maxPorts)),
                                configSize: VirtioConsole.configSize)
        return (shape, { () throws(DeviceError) -> VirtioDevice in
            var ports: [ConsolePortConfig] = []
            for s in specs {
                let e: ConsoleEndpoint
                do throws(DeviceError) { e = try s.spec.open() } catch { throw DeviceError("\(name): port \(s.id): \(error)") }
                ports.append(ConsolePortConfig(id: s.id, name: s.name, isConsole: s.console, endpoint: e))
            }
            return ConsoleDevice(ports: ports, queueSize: UInt16(qs))
        })
    }
}
