import Glibc
import CLinux
import Transport
import Registry

/// `loopbackd ctl`: one request to a running daemon's control socket (see `ControlServer` for the protocol),
/// the reply printed as it comes (the `ok` line is dropped; an error goes to stderr with exit status 1).
enum ControlClient {
    static func run(_ o: Options) -> Int32 {
        let path: String
        if let s = o.socket { path = s }
        else if let c = o.configPath {
            do {
                let conf = try DaemonConfig.load(path: c)
                guard conf.control != "" else { printErr("loopbackd ctl: \(c) sets control = \"none\""); return 2 }
                path = conf.control ?? DaemonConfig.defaultControlSocket
            } catch { printErr("loopbackd ctl: \(error)"); return 2 }
        } else { path = DaemonConfig.defaultControlSocket }
        var header = (o.json ? "--json " : "") + o.ctlArgs[0]
        var body: [UInt8] = []
        switch o.ctlArgs[0] {
        case "remove": header += " " + o.ctlArgs[1]
        case "device": header += " " + o.ctlArgs.dropFirst().joined(separator: " ")
        case "add": body = o.ctlArgs.count > 1 ? Array(o.ctlArgs[1].utf8) : readAll(0)
        default: break
        }
        let reply: [UInt8]
        switch request(path: path, Array((header + "\n").utf8) + body) {
        case .failure(let e): printErr("loopbackd ctl: \(e)"); return 1
        case .success(let r): reply = r
        }
        let text = String(decoding: reply, as: UTF8.self)
        if o.json {
            print(text, terminator: text.hasSuffix("\n") ? "" : "\n")
            return text.hasPrefix(#"{"ok":true"#) ? 0 : 1
        }
        if text.hasPrefix("ok\n") || text == "ok" {
            print(String(text.dropFirst(3)), terminator: "")
            return 0
        }
        printErr("loopbackd ctl: " + (text.hasSuffix("\n") ? String(text.dropLast()) : (text.isEmpty ? "no reply from \(path)" : text)))
        return 1
    }

    struct Failure: Error, CustomStringConvertible { var description: String }

    /// Connects, sends `bytes`, half-closes, reads the reply until the daemon closes (a reload can take as long
    /// as the kernel's drivers take to probe: no timeout beyond `timeoutMs`).
    static func request(path: String, _ bytes: [UInt8], timeoutMs: Int32 = 120_000) -> Result<[UInt8], Failure> {
        let fd = path.withCString { lb_unix_connect($0, 0) }
        guard fd >= 0 else {
            let e = Errno.current
            return .failure(Failure(description: "cannot connect to \(path): \(e)" + (e.rawValue == ENOENT || e.rawValue == ECONNREFUSED ? " (is loopbackd running with a control socket?)" : "")))
        }
        defer { FD.close(fd) }
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + off, $0.count - off, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            // The daemon may answer (an error) and close before taking everything: read what it said.
            guard n > 0 else { break }
            off += n
        }
        shutdown(fd, Int32(SHUT_WR))
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, timeoutMs)
            if r < 0 && errno == EINTR { continue }
            guard r > 0 else { return .failure(Failure(description: "no reply from \(path) within \(timeoutMs / 1000) s")) }
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return .success(out)
    }

    static func readAll(_ fd: Int32) -> [UInt8] {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            out += buf[0..<n]
            if out.count > ControlServer.maxRequest { break }   // the daemon refuses it with a clear error
        }
        return out
    }
}
