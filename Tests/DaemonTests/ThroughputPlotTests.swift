import XCTest
import Glibc
import CMallocCounter
@testable import Daemon
@testable import Registry
@testable import Transport

/// Issue 12 item 5: throughput mode (`--depth`, `--size`, `--seconds`) and `--plot FILE.svg` for `bench` and `ab`,
/// run in-process on the simulated driver. The socket path is loopbackd's backend server on its own loop here (ab's
/// default child process would be this test executable). The SVG is read back with a small parser (one root
/// `<svg>`, balanced tags, attributes) and its series and bars checked. Timing is reported, never asserted.
final class ThroughputPlotTests: XCTestCase {
    // MARK: fixtures

    private var cleanup: [String] = []
    override func tearDown() { for p in cleanup { unlink(p) }; cleanup = [] }

    private func path(_ tag: String, _ ext: String) -> String {
        let p = "/tmp/lb-tp-\(tag)-\(getpid()).\(ext)"
        unlink(p)
        cleanup.append(p)
        return p
    }
    private func write(_ path: String, _ text: String) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        var t = text
        t.withUTF8 { _ = Glibc.write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }
    /// The picture's text; when xmllint is installed (Debian's libxml2-utils) it must also accept the file.
    private func read(_ path: String) throws -> String {
        if access("/usr/bin/xmllint", X_OK) == 0 {
            var pid: pid_t = 0
            let argv: [String] = ["xmllint", "--noout", path]
            var args: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) }
            args.append(nil)
            defer { for a in args { free(a) } }
            XCTAssertEqual(posix_spawn(&pid, "/usr/bin/xmllint", nil, nil, &args, environ), 0)
            var st: Int32 = 0
            waitpid(pid, &st, 0)
            XCTAssertEqual(st, 0, "xmllint --noout \(path)")
        }
        return try XCTUnwrap(try? FD.readText(path, limit: 4 << 20), "cannot read \(path)")
    }

    /// An rng device served as a vhost-user backend on its own loop (what `ab-serve` runs in its child).
    private func serve(_ sock: String) throws -> () -> Void {
        let d = try DaemonConfig.parse(TOML.parse("[daemon]\ntransport = \"none\"\n[device.rng0]\ntype = \"rng\"\nserve = \"\(sock)\"\n",
                                                  file: "serve.conf")).devices[0]
        let loop = try EventLoop()
        let host = DeviceHost(loop: loop)
        loop.startThread()
        let dev = try d.make()
        let r = loop.executeAndWait { () -> Result<VhostUserBackendServer, DeviceError> in
            do throws(DeviceError) { return .success(try startServer(host: host, name: d.name, device: dev, path: sock)) }
            catch { return .failure(error) }
        }
        switch r {
        case .success(let server): return { loop.executeAndWait { server.stop(); host.shutdown() }; loop.stopAndJoin() }
        case .failure(let e): loop.stopAndJoin(); throw e
        }
    }

    // MARK: a small SVG reader

    struct Element { var name: String; var attrs: [String: String] }
    struct SVGDoc { var elements: [Element] }

    /// Parses `text` as XML well enough for our pictures: exactly one root element, `<svg>`; every tag closed in
    /// order; attributes quoted; text and attribute values free of `<` and of bare `&`.
    static func parseSVG(_ text: String) throws -> SVGDoc {
        struct Bad: Error, CustomStringConvertible { var description: String }
        let b = Array(text.utf8)
        var i = 0, stack: [String] = [], roots = 0, out: [Element] = []
        func isNameChar(_ c: UInt8) -> Bool { c == 45 || c == 46 || c == 58 || c == 95 || (c >= 48 && c <= 57) || (c | 32 >= 97 && c | 32 <= 122) }
        func skipSpace() { while i < b.count, b[i] == 32 || b[i] == 10 || b[i] == 9 || b[i] == 13 { i += 1 } }
        func name() throws -> String {
            let s = i
            while i < b.count, isNameChar(b[i]) { i += 1 }
            guard i > s else { throw Bad(description: "expected a name at byte \(s)") }
            return String(decoding: b[s..<i], as: UTF8.self)
        }
        func checkEntities(_ s: ArraySlice<UInt8>, at: Int) throws {
            var k = s.startIndex
            while k < s.endIndex {
                if s[k] == 60 { throw Bad(description: "'<' in text or attribute at byte \(at)") }
                if s[k] == 38 {
                    guard let semi = s[k...].firstIndex(of: 59), semi - k <= 8 else { throw Bad(description: "bare '&' at byte \(at)") }
                    let ent = String(decoding: s[(k + 1)..<semi], as: UTF8.self)
                    guard ["amp", "lt", "gt", "quot", "apos"].contains(ent) || ent.hasPrefix("#") else {
                        throw Bad(description: "unknown entity &\(ent); at byte \(at)")
                    }
                    k = semi
                }
                k += 1
            }
        }
        while i < b.count {
            guard b[i] == 60 else {
                let s = i
                while i < b.count, b[i] != 60 { i += 1 }
                if stack.isEmpty, b[s..<i].contains(where: { $0 != 32 && $0 != 10 && $0 != 9 && $0 != 13 }) {
                    throw Bad(description: "text outside the root element at byte \(s)")
                }
                try checkEntities(b[s..<i], at: s)
                continue
            }
            i += 1
            guard i < b.count else { throw Bad(description: "truncated") }
            if b[i] == 63 || b[i] == 33 {   // <?…?> or <!…>
                let end: [UInt8] = b[i] == 63 ? [63, 62] : (i + 2 < b.count && b[i + 1] == 45 && b[i + 2] == 45 ? [45, 45, 62] : [62])
                while i < b.count, !b[i...].starts(with: end) { i += 1 }
                guard i < b.count else { throw Bad(description: "unterminated <? or <!") }
                i += end.count
                continue
            }
            if b[i] == 47 {   // </name>
                i += 1
                let n = try name()
                skipSpace()
                guard i < b.count, b[i] == 62 else { throw Bad(description: "bad closing tag </\(n)") }
                i += 1
                guard stack.last == n else { throw Bad(description: "</\(n)> closes <\(stack.last ?? "nothing")>") }
                stack.removeLast()
                continue
            }
            let n = try name()
            if stack.isEmpty { roots += 1; guard roots == 1, n == "svg" else { throw Bad(description: "root element #\(roots) is <\(n)>") } }
            var attrs: [String: String] = [:]
            while true {
                skipSpace()
                guard i < b.count else { throw Bad(description: "unterminated <\(n)") }
                if b[i] == 62 { i += 1; stack.append(n); break }
                if b[i] == 47 { guard i + 1 < b.count, b[i + 1] == 62 else { throw Bad(description: "bad '/' in <\(n)") }; i += 2; break }
                let a = try name()
                skipSpace()
                guard i < b.count, b[i] == 61 else { throw Bad(description: "attribute \(a) of <\(n)> without a value") }
                i += 1
                skipSpace()
                guard i < b.count, b[i] == 34 || b[i] == 39 else { throw Bad(description: "unquoted attribute \(a) of <\(n)>") }
                let q = b[i]
                i += 1
                let s = i
                while i < b.count, b[i] != q { i += 1 }
                guard i < b.count else { throw Bad(description: "unterminated attribute \(a)") }
                try checkEntities(b[s..<i], at: s)
                guard attrs[a] == nil else { throw Bad(description: "duplicate attribute \(a) in <\(n)>") }
                attrs[a] = String(decoding: b[s..<i], as: UTF8.self).replacingOccurrences("&quot;", "\"").replacingOccurrences("&amp;", "&")
                i += 1
            }
            out.append(Element(name: n, attrs: attrs))
        }
        guard stack.isEmpty else { throw Bad(description: "unclosed <\(stack.joined(separator: "> <"))>") }
        guard roots == 1 else { throw Bad(description: "no root element") }
        return SVGDoc(elements: out)
    }

    /// Series label → number of CDF points, in document order.
    static func series(_ doc: SVGDoc) -> [(label: String, points: Int)] {
        var out: [(String, Int)] = []
        var current: String?
        for e in doc.elements {
            if e.name == "g", e.attrs["class"] == "series" { current = e.attrs["data-label"] }
            if e.name == "polyline", e.attrs["class"] == "cdf", let l = current {
                let pts = (e.attrs["points"] ?? "").split(separator: " ")
                for p in pts {
                    let xy = p.split(separator: ",")
                    XCTAssertEqual(xy.count, 2, "point \(p)")
                    XCTAssertNotNil(Double(String(xy[0]))); XCTAssertNotNil(Double(String(xy.last!)))
                }
                out.append((l, pts.count))
                current = nil
            }
        }
        return out
    }

    /// (label, metric) → value of the bars.
    static func bars(_ doc: SVGDoc) -> [String: Double] {
        var out: [String: Double] = [:]
        for e in doc.elements where e.name == "rect" && e.attrs["class"] == "bar" {
            out["\(e.attrs["data-label"] ?? "?") \(e.attrs["data-metric"] ?? "?")"] = Double(e.attrs["data-value"] ?? "")
        }
        return out
    }

    // MARK: tests

    func testParserRefusesBrokenDocuments() {
        XCTAssertNoThrow(try Self.parseSVG("<?xml version=\"1.0\"?>\n<svg a=\"1\"><g><text>x &amp; y</text></g><rect/></svg>\n"))
        for bad in ["<svg><g></svg>", "<svg></svg><svg></svg>", "<g></g>", "<svg a=1></svg>", "<svg><text>a < b</text></svg>",
                    "<svg><text>a & b</text></svg>", "<svg>", "<svg></g></svg>"] {
            XCTAssertThrowsError(try Self.parseSVG(bad), bad)
        }
    }

    func testOptions() throws {
        let o = try Options.parse(["bench", "--depth", "8", "--size", "8192", "--seconds", "2", "--plot", "/tmp/x.svg"])
        XCTAssertEqual(o.depth, 8); XCTAssertEqual(o.size, 8192); XCTAssertEqual(o.seconds, 2); XCTAssertEqual(o.plot, "/tmp/x.svg")
        XCTAssertTrue(o.throughput)
        XCTAssertFalse(try Options.parse(["ab", "--plot", "/tmp/x.svg"]).throughput)
        for bad in [["bench", "--depth", "0"], ["bench", "--size", "0"], ["bench", "--seconds", "0"], ["bench", "--plot", "x.png"],
                    ["bench", "--depth", "1024", "--size", "16777216"]] {
            XCTAssertThrowsError(try Options.parse(bad), "\(bad)")
        }
    }

    /// The kernel-driver path of ab is queue depth 1 only: throughput flags are a usage error, before any device.
    func testABKernelDriverRefusesThroughputMode() {
        let conf = path("kernel", "conf")
        write(conf, "[device.rng0]\ntype = \"rng\"\n")
        XCTAssertEqual(Daemon.main(arguments: ["ab", "-c", conf, "--device", "rng0", "--driver", "virtio-lo", "--depth", "4"]), 2)
    }

    /// bench, latency (QD1) mode, with an in-process rng and one forwarded to a vhost-user backend: one CDF per
    /// device and mode, labelled with the body.
    func testBenchLatencyPlot() throws {
        let sock = path("bench", "sock"), conf = path("bench", "conf"), svg = path("bench-lat", "svg")
        let stop = try serve(sock)
        defer { stop() }
        write(conf, "[device.rng0]\ntype = \"rng\"\n[device.rng1]\ntype = \"rng\"\nbackend = \"vhost-user:\(sock)\"\n")
        XCTAssertEqual(Daemon.main(arguments: ["bench", "-c", conf, "--requests", "300", "--json", "--plot", svg]), 0)
        let doc = try Self.parseSVG(try read(svg))
        let s = Self.series(doc)
        XCTAssertEqual(s.map(\.label), ["rng0 inproc notify", "rng0 inproc poll-50us", "rng1 vhost-user notify", "rng1 vhost-user poll-50us"])
        for (l, n) in s { XCTAssertTrue((50...1000).contains(n), "\(l): \(n) points") }
        XCTAssertTrue(Self.bars(doc).isEmpty, "a latency run has no bars")
    }

    /// ab, latency (QD1) mode: the two paths are the CDF's two series.
    func testABLatencyPlot() throws {
        let sock = path("ab", "sock"), conf = path("ab", "conf"), svg = path("ab-lat", "svg")
        let stop = try serve(sock)
        defer { stop() }
        write(conf, "[device.rng0]\ntype = \"rng\"\n")
        XCTAssertEqual(Daemon.main(arguments: ["ab", "-c", conf, "--device", "rng0", "--driver", "sim", "--socket", sock,
                                               "--requests", "400", "--rounds", "2", "--json", "--plot", svg]), 0)
        let doc = try Self.parseSVG(try read(svg))
        XCTAssertEqual(doc.elements.first?.name, "svg")
        let s = Self.series(doc)
        XCTAssertEqual(s.map(\.label), ["inproc", "socket"])
        for (l, n) in s { XCTAssertTrue((50...1000).contains(n), "\(l): \(n) points") }
    }

    /// ab, throughput mode at depth 8: MB/s and IOPS bars for both paths, non-zero, and both CDFs.
    func testABThroughputPlot() throws {
        let sock = path("abt", "sock"), conf = path("abt", "conf"), svg = path("ab-tp", "svg")
        let stop = try serve(sock)
        defer { stop() }
        write(conf, "[device.rng0]\ntype = \"rng\"\n")
        XCTAssertEqual(Daemon.main(arguments: ["ab", "-c", conf, "--device", "rng0", "--driver", "sim", "--socket", sock,
                                               "--depth", "8", "--size", "256", "--requests", "4000", "--rounds", "2", "--json", "--plot", svg]), 0)
        let doc = try Self.parseSVG(try read(svg))
        let bars = Self.bars(doc)
        XCTAssertEqual(Set(bars.keys), ["inproc MB/s", "inproc IOPS", "socket MB/s", "socket IOPS"])
        for (k, v) in bars { XCTAssertGreaterThan(v, 0, k) }
        XCTAssertEqual(Self.series(doc).map(\.label), ["inproc", "socket"])
        print("ab rng depth 8, 256-byte reads: inproc \(bars["inproc MB/s"]!) MB/s \(bars["inproc IOPS"]!) IOPS; socket \(bars["socket MB/s"]!) MB/s \(bars["socket IOPS"]!) IOPS")
    }

    /// bench throughput mode on rng and blk at depth 1 and depth 8. Asserted: structure and non-zero MB/s; the
    /// depth-8/depth-1 IOPS ratio is printed, not asserted (this machine is shared: a timed assertion would flake).
    func testBenchThroughputDepthScaling() throws {
        let conf = path("bt", "conf"), img = path("bt", "img"), svg1 = path("bt-d1", "svg"), svg8 = path("bt-d8", "svg")
        write(conf, "[device.rng0]\ntype = \"rng\"\n[device.disk0]\ntype = \"blk\"\npath = \"\(img)\"\ncreate-mib = 8\n")
        XCTAssertEqual(Daemon.main(arguments: ["bench", "-c", conf, "--depth", "1", "--requests", "3000", "--json", "--plot", svg1]), 0)
        XCTAssertEqual(Daemon.main(arguments: ["bench", "-c", conf, "--depth", "8", "--requests", "3000", "--json", "--plot", svg8]), 0)
        var iops: [Int: [String: Double]] = [:]
        for (depth, file) in [(1, svg1), (8, svg8)] {
            let doc = try Self.parseSVG(try read(file))
            let bars = Self.bars(doc)
            let labels = ["rng0 notify", "rng0 poll-50us", "disk0 notify", "disk0 poll-50us"]
            XCTAssertEqual(Set(bars.keys), Set(labels.flatMap { ["\($0) MB/s", "\($0) IOPS"] }))
            for (k, v) in bars { XCTAssertGreaterThan(v, 0, "depth \(depth): \(k)") }
            XCTAssertEqual(Self.series(doc).map(\.label), labels.map { $0.replacingOccurrences(" ", " inproc ") })
            iops[depth] = bars
        }
        for l in ["rng0 notify", "rng0 poll-50us"] {
            let a = iops[1]!["\(l) IOPS"]!, b = iops[8]!["\(l) IOPS"]!
            let ratio = b / a
            print("rng \(l): depth 1 \(Int(a)) IOPS, depth 8 \(Int(b)) IOPS, ratio \(Int(ratio * 100)) %"
                  + (ratio >= 0.9 ? "" : " (below depth 1 in this run: a debug build timed on a shared 2-vCPU machine, where the"
                                        + " driver and loop threads compete with other jobs; README has release numbers)"))
        }
        // A blk request size other than the default (a multiple of 512) moves that many bytes per request.
        let svgS = path("bt-size", "svg")
        XCTAssertEqual(Daemon.main(arguments: ["bench", "-c", conf, "--device", "disk0", "--depth", "4", "--size", "16384",
                                               "--requests", "500", "--json", "--plot", svgS]), 0)
        let bars = Self.bars(try Self.parseSVG(try read(svgS)))
        let mbps = try XCTUnwrap(bars["disk0 notify MB/s"]), io = try XCTUnwrap(bars["disk0 notify IOPS"])
        XCTAssertGreaterThan(mbps, 0)
        XCTAssertEqual(mbps, io * 16384 / 1e6, accuracy: mbps * 0.01 + 0.2, "MB/s = IOPS x 16 KiB")
        // Not a multiple of 512: the blk workload refuses it (exit 1, with the reason).
        XCTAssertEqual(Daemon.main(arguments: ["bench", "-c", conf, "--device", "disk0", "--depth", "2", "--size", "1000",
                                               "--requests", "200", "--json"]), 1)
    }

    /// The depth-N path does not allocate per request (driver and loop threads together), like the QD1 path.
    func testDepthPathDoesNotAllocate() throws {
        for type in ["rng", "blk"] {
            let img = path("alloc-\(type)", "img")
            let fd = open(img, O_CREAT | O_RDWR, 0o600); ftruncate(fd, 8 << 20); close(fd)
            let loop = try EventLoop()
            let host = DeviceHost(loop: loop)
            let dev: VirtioDevice = type == "rng" ? RngDevice() : try BlockDevice(path: img, readOnly: false, queues: 1, queueSize: 64)
            let i = host.add(name: type, device: dev)
            loop.startThread()
            defer { loop.executeAndWait { host.shutdown() }; loop.stopAndJoin() }
            let drv = try SimDriver(host: host, index: i, ramSize: 8 << 20)
            try drv.start(queueCount: 1)
            let w = try XCTUnwrap(makeWorkload(type: type, driver: drv, verify: false))
            let r = DepthRunner(q: w.q, requests: try XCTUnwrap(try w.depthRequests(depth: 8, size: nil)))
            _ = r.run(count: 1000, spinNs: 0)
            lb_malloc_count_start()
            _ = r.run(count: 10_000, spinNs: 0)
            let n = lb_malloc_count_stop()
            drv.reset()
            XCTAssertEqual(r.errors, 0); XCTAssertFalse(r.broken); XCTAssertEqual(r.completed, 11_000)
            print("allocations during 10,000 \(type) requests at depth 8: \(n)")
            XCTAssertLessThan(n, 100)
        }
    }
}
