import Glibc
import CLinux
import Transport
import Registry

/// A control request the main thread runs (it may block: ADDDEV waits for the driver's probe).
struct ControlJob {
    enum Op { case add([UInt8]), remove(String), reload }
    let op: Op
    let json: Bool
    /// The connection to answer (it may be gone by then: the reply is dropped).
    let client: UInt32
}

/// The control socket (`[daemon] control`, `loopbackd ctl`): a unix stream socket, mode 0600, served on the event
/// loop without ever blocking it. One request per connection:
///
///     [--json] COMMAND [ARG]\n[BODY]
///
/// complete at the first newline (or at EOF) for every command but `add`, whose body (TOML) ends at EOF (the
/// client half-closes). The reply is `ok` or `error: MESSAGE` on the first line, then the content; with `--json`
/// one JSON object (`{"ok":true,...}` / `{"ok":false,"error":"..."}`); then the server closes the connection.
/// Bounds: 64 KiB per request, 16 clients, 5 s to send a request and 5 s to take the reply (a client that stops
/// reading loses its connection). status and stats are answered on the loop; add, remove and reload are
/// queued for the main thread, and their reply is sent when they are done.
final class ControlServer: EventHandler {
    let loop: EventLoop
    let path: String
    unowned let runner: Runner
    static let maxClients = 16
    static let maxRequest = 64 << 10
    static let timeoutNs: UInt64 = 5_000_000_000

    private final class Client {
        let fd: Int32
        var registration = -1
        var input: [UInt8] = []
        var output: [UInt8] = []
        var written = 0
        /// Waiting for the main thread's answer.
        var waiting = false
        var deadline: UInt64
        init(fd: Int32, deadline: UInt64) { self.fd = fd; self.deadline = deadline }
    }
    private var listener: FileRef?
    private var listenRegistration = -1
    private var clients: [UInt32: Client] = [:]
    private var nextID: UInt32 = 1
    private var sweep: LoopTimer?
    /// Requests answered and connections refused or dropped (tests).
    private(set) var answered = 0, refused = 0, dropped = 0
    private static let listenerToken: UInt32 = 0

    init(loop: EventLoop, path: String, runner: Runner) { self.loop = loop; self.path = path; self.runner = runner }

    /// Loop thread: listen (mode 0600; a stale socket file is replaced, a live one is EADDRINUSE).
    func start() throws(Errno) {
        let l = FileRef(adopting: try syscall(.other) { path.withCString { lb_unix_listen($0, 16, 0o600) } })
        listener = l
        do throws(Errno) {
            listenRegistration = try loop.register(fd: l.raw, handler: self, token: ControlServer.listenerToken)
            let t = try LoopTimer(loop: loop) { [unowned self] _ in self.expire() }
            t.arm(everyNs: 500_000_000)
            sweep = t
        } catch {
            stop()
            throw error
        }
        Log.info("control socket: \(path)")
    }

    /// Loop thread: close every connection, the listener and the socket file.
    func stop() {
        for id in Array(clients.keys) { close(id) }
        if let l = listener {
            if listenRegistration >= 0 { loop.unregister(fd: l.raw, registration: listenRegistration) }
            listenRegistration = -1
            listener = nil
            unlink(path)
        }
        sweep?.cancel()
        sweep = nil
    }

    func handleEvent(token: UInt32, events: UInt32) {
        if token == ControlServer.listenerToken { accept(); return }
        guard let c = clients[token] else { return }
        if !c.output.isEmpty { flush(token, c); return }
        if c.waiting { return }
        readable(token, c)
    }

    private func accept() {
        guard let l = listener else { return }
        for _ in 0..<ControlServer.maxClients {
            let fd = lb_unix_accept(l.raw)
            guard fd >= 0 else {
                if errno != EAGAIN && errno != EWOULDBLOCK { Log.warning("control socket: accept: \(Errno.current)") }
                return
            }
            guard clients.count < ControlServer.maxClients else {
                refused += 1
                let msg = "error: too many control clients (at most \(ControlServer.maxClients))\n"
                _ = msg.withCString { send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                FD.close(fd)
                continue
            }
            let id = nextID
            nextID = nextID == UInt32.max ? 1 : nextID + 1
            let c = Client(fd: fd, deadline: lb_now_ns() + ControlServer.timeoutNs)
            do { c.registration = try loop.register(fd: fd, handler: self, token: id) } catch {
                Log.warning("control socket: cannot watch a connection: \(error)")
                FD.close(fd)
                continue
            }
            clients[id] = c
        }
    }

    private func readable(_ id: UInt32, _ c: Client) {
        var buf = [UInt8](repeating: 0, count: 4096)
        var eof = false
        while true {
            let n = buf.withUnsafeMutableBytes { recv(c.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n > 0 {
                c.input += buf[0..<n]
                if c.input.count > ControlServer.maxRequest {
                    reply(id, c, ControlServer.error("request larger than \(ControlServer.maxRequest) bytes", json: false))
                    return
                }
                continue
            }
            if n == 0 { eof = true; break }
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EWOULDBLOCK { break }
            close(id)   // ECONNRESET and friends: nobody to answer
            return
        }
        // Complete: at EOF, or at the first newline for a command without a body.
        let newline = c.input.firstIndex(of: 0x0A)
        let header = c.input[..<(newline ?? c.input.count)]
        let words = ControlServer.words(header)
        let isAdd = words.first(where: { $0 != "--json" }) == "add"
        guard eof || (newline != nil && !isAdd) else { return }
        handle(id, c, words: words, body: newline.map { Array(c.input[($0 + 1)...]) } ?? [])
    }

    private func handle(_ id: UInt32, _ c: Client, words: [String], body: [UInt8]) {
        let json = words.contains("--json")
        let args = words.filter { $0 != "--json" }
        let usage = "commands: status, stats, add (TOML body), remove NAME, reload, device NAME WORD..."
        guard let cmd = args.first else { reply(id, c, ControlServer.error("empty request; \(usage)", json: json)); return }
        func arity(_ n: Int) -> Bool {
            guard args.count == n + 1 else {
                reply(id, c, ControlServer.error("\(cmd) takes \(n == 0 ? "no argument" : "\(n) argument(s)"), got \(args.count - 1)", json: json))
                return false
            }
            return true
        }
        switch cmd {
        case "status": if arity(0) { reply(id, c, status(json: json)) }
        case "stats": if arity(0) { reply(id, c, stats(json: json)) }
        case "remove": if arity(1) { queue(id, c, ControlJob(op: .remove(args[1]), json: json, client: id)) }
        case "reload": if arity(0) { queue(id, c, ControlJob(op: .reload, json: json, client: id)) }
        case "device":
            // A device body's own command, run here on the loop thread (the body's thread).
            guard args.count >= 3 else { reply(id, c, ControlServer.error("device takes NAME and a command (device NAME WORD...)", json: json)); return }
            guard let d = runner.devices.first(where: { $0.config.name == args[1] }) else {
                reply(id, c, ControlServer.error("no device \"\(ControlServer.printable(args[1]))\"", json: json)); return
            }
            guard let body = d.body as? CommandableDevice else {
                reply(id, c, ControlServer.error("device \(d.config.name) (type \(d.config.type)) takes no commands", json: json)); return
            }
            let r = body.command(Array(args[2...]))
            if json { reply(id, c, Array((#"{"ok":\#(r.ok),"text":\#(JSON.string(r.text))}"# + "\n").utf8)) }
            else { reply(id, c, Array(((r.ok ? "ok\n" : "error: ") + r.text + "\n").utf8)) }
        case "add":
            guard arity(0) else { return }
            guard !body.isEmpty else { reply(id, c, ControlServer.error("add needs a TOML snippet ([device.NAME] tables) after the first line", json: json)); return }
            queue(id, c, ControlJob(op: .add(body), json: json, client: id))
        default:
            reply(id, c, ControlServer.error("unknown command \"\(ControlServer.printable(cmd))\"; \(usage)", json: json))
        }
    }

    private func queue(_ id: UInt32, _ c: Client, _ job: ControlJob) {
        c.waiting = true
        c.deadline = UInt64.max   // a reload may take long (ADDDEV waits for drivers); the client waits
        // Not watched meanwhile (a half-closed socket is readable forever); the reply's write finds a gone peer.
        loop.unregister(fd: c.fd, registration: c.registration)
        c.registration = -1
        runner.submit(job)
    }

    /// The main thread's answer to a queued request.
    func finish(client id: UInt32, reply text: [UInt8]) {
        guard let c = clients[id], c.waiting else { return }
        c.waiting = false
        reply(id, c, text)
    }

    private func reply(_ id: UInt32, _ c: Client, _ text: [UInt8]) {
        answered += 1
        c.output = text
        c.written = 0
        c.deadline = lb_now_ns() + ControlServer.timeoutNs
        // Watch for writability only while output is pending.
        if c.registration >= 0 { loop.unregister(fd: c.fd, registration: c.registration) }
        c.registration = -1
        flush(id, c)
        guard clients[id] != nil else { return }
        do { c.registration = try loop.register(fd: c.fd, events: UInt32(LB_EPOLLOUT), handler: self, token: id) } catch { close(id) }
    }

    private func flush(_ id: UInt32, _ c: Client) {
        while c.written < c.output.count {
            let n = c.output.withUnsafeBytes { b in
                send(c.fd, b.baseAddress! + c.written, b.count - c.written, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
            }
            if n > 0 { c.written += n; continue }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return }
            break
        }
        close(id)
    }

    private func close(_ id: UInt32) {
        guard let c = clients.removeValue(forKey: id) else { return }
        if c.registration >= 0 { loop.unregister(fd: c.fd, registration: c.registration) }
        FD.close(c.fd)
    }

    /// Timer: a request not sent in time gets an error; a reply not taken in time costs the connection.
    private func expire() {
        let now = lb_now_ns()
        for (id, c) in clients where now >= c.deadline {
            if c.output.isEmpty && !c.waiting {
                reply(id, c, ControlServer.error("incomplete request after \(ControlServer.timeoutNs / 1_000_000_000) s (end it with a newline, or half-close for add)", json: false))
            } else {
                dropped += 1
                Log.warning("control socket: a client did not read its reply within \(ControlServer.timeoutNs / 1_000_000_000) s; connection closed")
                close(id)
            }
        }
    }

    // MARK: parsing and rendering

    /// Whitespace-separated words of the first line (bytes that are not UTF-8 become U+FFFD; bounded).
    static func words(_ header: ArraySlice<UInt8>) -> [String] {
        String(decoding: header.prefix(4096), as: UTF8.self).split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" }).prefix(16).map(String.init)
    }

    /// A peer-supplied word for an error message: printable ASCII only, at most 40 characters.
    static func printable(_ s: String) -> String {
        let t = s.unicodeScalars.prefix(40).map { $0.isASCII && $0.value >= 0x20 && $0.value < 0x7f ? Character($0) : "?" }
        return String(t) + (s.unicodeScalars.count > 40 ? "..." : "")
    }

    static func error(_ message: String, json: Bool) -> [UInt8] {
        Array((json ? #"{"ok":false,"error":"# + JSON.string(message) + "}\n" : "error: \(message)\n").utf8)
    }

    static func render(_ r: Runner.Outcome, json: Bool) -> [UInt8] {
        if json { return Array(#"{"ok":\#(r.ok),"#.utf8) + Array(r.json.utf8) + Array("}\n".utf8) }
        if r.ok { return Array(("ok\n" + (r.text.isEmpty ? "" : r.text + "\n")).utf8) }
        return Array(("error: " + r.text + "\n").utf8)
    }

    // MARK: status and stats (loop thread)

    private func driverSide(_ d: RunningDevice) -> String {
        if let s = d.config.serve { return "serve:" + s }
        return runner.link?.name ?? "none"
    }

    func status(json: Bool) -> [UInt8] {
        let host = runner.host!
        var text = "ok\n", objs: [String] = []
        for d in runner.devices {
            let i = d.index
            let st = host.status(i)
            let bound = host.isActive(i)
            let needsReset = st & DeviceStatus.needsReset != 0
            let features = host.features(i).rawValue
            var line = "\(d.config.name) type=\(d.config.type) driver=\(driverSide(d)) bound=\(bound ? "yes" : "no") status=0x\(String(st, radix: 16)) features=0x\(String(features, radix: 16)) needs-reset=\(needsReset ? "yes" : "no")"
            var obj = #"{"name":\#(JSON.string(d.config.name)),"type":\#(JSON.string(d.config.type)),"driver":\#(JSON.string(driverSide(d))),"bound":\#(bound),"status":\#(st),"features":"0x\#(String(features, radix: 16))","needs_reset":\#(needsReset)"#
            if let s = d.server {
                let connected = s.isConnected
                line += " front-end=\(connected ? "connected" : "listening")"
                obj += #","front_end":"\#(connected ? "connected" : "listening")""#
            }
            if let f = d.body as? VhostUserFrontendDevice {
                line += " backend=vhost-user:\(f.socketPath) backend-state=\(f.isConnected ? "connected" : "disconnected") reconnects=\(f.reconnects)"
                obj += #","backend":{"socket":\#(JSON.string(f.socketPath)),"connected":\#(f.isConnected),"reconnects":\#(f.reconnects)}"#
            }
            if let b = d.body as? BlockDevice {
                line += " io-uring=\(b.ioUringRestricted ? "restricted" : "unrestricted")"
                obj += #","io_uring_restricted":\#(b.ioUringRestricted)"#
            }
            text += line + "\n"
            var qs: [String] = []
            for (n, q) in host.queueStates(i).enumerated() {
                text += "\(d.config.name) queue=\(n) size=\(q.size) last-avail=\(q.lastAvail) avail=\(q.availIdx) used=\(q.used) in-flight=\(q.inFlight) state=\(q.fault.map { "broken:" + $0 } ?? "ok")\n"
                qs.append(#"{"index":\#(n),"size":\#(q.size),"last_avail":\#(q.lastAvail),"avail":\#(q.availIdx),"used":\#(q.used),"in_flight":\#(q.inFlight),"broken":\#(q.fault.map(JSON.string) ?? "null")}"#)
            }
            objs.append(obj + #","queues":[\#(qs.joined(separator: ","))]}"#)
        }
        if json { return Array((#"{"ok":true,"transport":"\#(runner.config.transport.rawValue)","devices":[\#(objs.joined(separator: ","))]}"# + "\n").utf8) }
        return Array(text.utf8)
    }

    func stats(json: Bool) -> [UInt8] {
        let host = runner.host!
        var text = "ok\n", objs: [String] = []
        for d in runner.devices {
            let s = host.stats(d.index)
            let h = host.latencyHistogram(d.index)
            var line = "\(d.config.name) requests=\(s.requests) bytes=\(s.bytesWritten) errors=\(s.errors) in-flight=\(s.inFlight) runs=\(h.total)"
            var obj = #"{"name":\#(JSON.string(d.config.name)),"requests":\#(s.requests),"bytes":\#(s.bytesWritten),"errors":\#(s.errors),"in_flight":\#(s.inFlight)"#
            var hist = "", buckets: [String] = []
            for (k, n) in h.counts.enumerated() where n > 0 {
                let le = h.upperNs(k)
                hist += " <=\(ControlServer.micros(le)):\(n)"
                buckets.append(#"{"le_ns":\#(UInt64(le.rounded(.up))),"count":\#(n)}"#)
            }
            obj += #","latency":{"what":"loop time per queue run","runs":\#(h.total),"buckets":[\#(buckets.joined(separator: ","))]}"#
            if let c = d.driverCounters {
                let r = c.requests.load(ordering: .relaxed), e = c.errors.load(ordering: .relaxed)
                let m = c.maxLatencyNs.load(ordering: .relaxed)
                line += " driver-requests=\(r) driver-errors=\(e) driver-max-us=\(ControlServer.micros(Double(m)))"
                obj += #","driver":{"requests":\#(r),"errors":\#(e),"max_ns":\#(m)}"#
            }
            if let snd = d.body as? SoundDevice {
                // The stream-level counters (SoundStats): xruns include the card's own (hw endpoints).
                let t = snd.stats
                line += " sound-xruns=\(t.xruns) sound-messages=\(t.messages) sound-bytes-played=\(t.bytesPlayed) sound-bytes-captured=\(t.bytesCaptured) sound-bad-io=\(t.badIO) sound-bad-control=\(t.badControl)"
                obj += #","sound":{"xruns":\#(t.xruns),"messages":\#(t.messages),"bytes_played":\#(t.bytesPlayed),"bytes_captured":\#(t.bytesCaptured),"bad_io":\#(t.badIO),"bad_control":\#(t.badControl)}"#
            }
            text += line + "\n"
            if !hist.isEmpty { text += "\(d.config.name) latency-us" + hist + "\n" }
            objs.append(obj + "}")
        }
        if json { return Array((#"{"ok":true,"devices":[\#(objs.joined(separator: ","))]}"# + "\n").utf8) }
        return Array(text.utf8)
    }

    /// ns as µs with up to 3 significant decimals ("0.512", "12.3", "4096").
    static func micros(_ ns: Double) -> String {
        let us = ns / 1000
        if us >= 100 { return String(Int(us.rounded())) }
        let scale: Double = us >= 10 ? 10 : (us >= 1 ? 100 : 1000)
        let v = (us * scale).rounded() / scale
        var s = String(v)
        if s.hasSuffix(".0") { s.removeLast(2) }
        return s
    }
}

/// Hand-written JSON (no Foundation).
enum JSON {
    static func string(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if u.value < 0x20 {
                    let h = String(u.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - h.count) + h
                } else { out.unicodeScalars.append(u) }
            }
        }
        return out + "\""
    }
}
