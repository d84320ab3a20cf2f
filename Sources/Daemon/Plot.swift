import Glibc
import Transport

/// `--plot FILE.svg`: a self-contained SVG (no fonts, scripts or styles from elsewhere: `<svg>` with `<text>`,
/// `<polyline>`, `<line>` and `<rect>`), written by hand. Latency runs: one CDF per path/mode (x: latency in µs on a
/// log scale; y: percentile on a tail-stretched scale, 0 · 50 · 90 · 99 · 99.9 equally spaced, so the tail is
/// visible). Throughput runs: MB/s and IOPS bars per path/mode, labelled with their values, above the same CDFs.
/// Each series is a `<g class="series" data-label="…">` and each bar a `<rect class="bar" data-label="…"
/// data-metric="MB/s|IOPS" data-value="…">`, so tests (and scripts) can read the picture back.
enum Plot {
    struct Series {
        var label: String
        /// (latency µs, tail-scale y = -log10(1 - p)) points, y ascending.
        var points: [(x: Double, y: Double)]
    }
    struct Bar {
        var label: String
        var mbps: Double
        var iops: Double
    }

    static let colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]

    /// The CDF of a run from its quantile function (ns at fraction p, 0…1), `samples` values: 160 points evenly
    /// spaced on the tail scale up to the last decade the samples resolve (1 - 1/samples), plus the maximum.
    static func cdf(_ label: String, samples: Int, quantile: (Double) -> UInt64) -> Series {
        let top = tailTop(samples)
        var pts: [(x: Double, y: Double)] = []
        let n = 160
        for k in 0...n {
            let y = top * Double(k) / Double(n)
            let p = 1 - pow(10, -y)
            pts.append((Double(quantile(p)) / 1000, y))
        }
        pts.append((Double(quantile(1)) / 1000, top))
        return Series(label: label, points: pts)
    }
    /// Highest tail decade shown: 99.9 % (3) normally; fewer for short runs (a percentile needs the samples).
    static func tailTop(_ samples: Int) -> Double {
        samples >= 10_000 ? 4 : samples >= 1000 ? 3 : 2
    }
    /// Quantile of sorted samples (the same rule as LatencyStats).
    static func sortedQuantile(_ s: [UInt64]) -> (Double) -> UInt64 {
        { p in s.isEmpty ? 0 : s[min(s.count - 1, Int(Double(s.count) * p))] }
    }

    // MARK: documents

    static func latency(title: String, subtitle: String, series: [Series]) -> String {
        var out = header(width: 860, height: 520, title: title, subtitle: subtitle)
        cdfPanel(&out, series: series, x: 80, y: 80, w: 740, h: 380)
        out += "</svg>\n"
        return out
    }

    static func throughput(title: String, subtitle: String, bars: [Bar], series: [Series]) -> String {
        let barH = 240.0
        var out = header(width: 860, height: 90 + barH + 80 + 380 + 60, title: title, subtitle: subtitle)
        barPanel(&out, bars: bars, metric: "MB/s", value: \.mbps, x: 80, y: 90, w: 330, h: barH)
        barPanel(&out, bars: bars, metric: "IOPS", value: \.iops, x: 490, y: 90, w: 330, h: barH)
        cdfPanel(&out, series: series, x: 80, y: 90 + barH + 80, w: 740, h: 380, caption: "latency at this depth")
        out += "</svg>\n"
        return out
    }

    /// Writes `svg` to `path` (created or truncated, mode 0644).
    static func write(_ svg: String, to path: String) throws(DeviceError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw DeviceError("--plot \(path): \(Errno.current)") }
        defer { Glibc.close(fd) }
        var s = svg
        let ok = s.withUTF8 { b -> Bool in
            var off = 0
            while off < b.count {
                let n = Glibc.write(fd, b.baseAddress! + off, b.count - off)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return false }
                off += n
            }
            return true
        }
        guard ok else { throw DeviceError("--plot \(path): write: \(Errno.current)") }
    }

    // MARK: parts

    static func header(width: Double, height: Double, title: String, subtitle: String) -> String {
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            + "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(f1(width))\" height=\"\(f1(height))\" viewBox=\"0 0 \(f1(width)) \(f1(height))\""
            + " font-family=\"DejaVu Sans, Verdana, Arial, sans-serif\" font-size=\"12\">\n"
            + "<title>\(esc(title))</title>\n"
            + "<rect x=\"0\" y=\"0\" width=\"\(f1(width))\" height=\"\(f1(height))\" fill=\"#ffffff\"/>\n"
            + "<text x=\"20\" y=\"28\" font-size=\"17\" font-weight=\"bold\">\(esc(title))</text>\n"
            + "<text x=\"20\" y=\"50\" font-size=\"12\" fill=\"#444444\">\(esc(subtitle))</text>\n"
    }

    static func cdfPanel(_ out: inout String, series: [Series], x: Double, y: Double, w: Double, h: Double,
                         caption: String = "latency CDF") {
        let xs = series.flatMap { $0.points.map(\.x) }.filter { $0 > 0 }
        let lo = floor(log10(xs.min() ?? 1)), hi0 = ceil(log10(xs.max() ?? 10))
        let hi = hi0 > lo ? hi0 : lo + 1
        let top = series.flatMap { $0.points.map(\.y) }.max() ?? 3
        func px(_ v: Double) -> Double { x + (log10(max(v, pow(10, lo))) - lo) / (hi - lo) * w }
        func py(_ t: Double) -> Double { y + h - min(t, top) / top * h }
        out += "<g class=\"axes\">\n"
        out += "<text x=\"\(f1(x))\" y=\"\(f1(y - 10))\" font-size=\"13\" font-weight=\"bold\">\(esc(caption))</text>\n"
        // Vertical grid: 1-2-5 per decade.
        var d = lo
        while d <= hi {
            for m in [1.0, 2.0, 5.0] {
                let v = pow(10, d) * m
                guard log10(v) <= hi + 1e-9 else { continue }
                let gx = px(v)
                out += "<line x1=\"\(f1(gx))\" y1=\"\(f1(y))\" x2=\"\(f1(gx))\" y2=\"\(f1(y + h))\" stroke=\"\(m == 1 ? "#bbbbbb" : "#e4e4e4")\" stroke-width=\"1\"/>\n"
                out += "<text x=\"\(f1(gx))\" y=\"\(f1(y + h + 16))\" text-anchor=\"middle\" fill=\"#333333\">\(num(v))</text>\n"
            }
            d += 1
        }
        // Horizontal grid: percentiles.
        let ticks: [(Double, String)] = [(0, "0"), (log10(2), "50"), (1, "90"), (2, "99"), (3, "99.9"), (4, "99.99")]
        for (t, l) in ticks where t <= top + 1e-9 {
            let gy = py(t)
            out += "<line x1=\"\(f1(x))\" y1=\"\(f1(gy))\" x2=\"\(f1(x + w))\" y2=\"\(f1(gy))\" stroke=\"#cccccc\" stroke-width=\"1\"/>\n"
            out += "<text x=\"\(f1(x - 8))\" y=\"\(f1(gy + 4))\" text-anchor=\"end\" fill=\"#333333\">\(l)</text>\n"
        }
        out += "<rect x=\"\(f1(x))\" y=\"\(f1(y))\" width=\"\(f1(w))\" height=\"\(f1(h))\" fill=\"none\" stroke=\"#333333\" stroke-width=\"1\"/>\n"
        out += "<text x=\"\(f1(x + w / 2))\" y=\"\(f1(y + h + 36))\" text-anchor=\"middle\">latency (µs, log scale)</text>\n"
        out += "<text x=\"\(f1(x - 50))\" y=\"\(f1(y + h / 2))\" text-anchor=\"middle\" transform=\"rotate(-90 \(f1(x - 50)) \(f1(y + h / 2)))\">percentile</text>\n"
        out += "</g>\n"
        for (i, s) in series.enumerated() {
            let c = colors[i % colors.count]
            var pts = ""
            for p in s.points { pts += "\(f1(px(p.x))),\(f1(py(p.y))) " }
            out += "<g class=\"series\" data-label=\"\(esc(s.label))\">\n"
            out += "<polyline class=\"cdf\" points=\"\(pts.isEmpty ? pts : String(pts.dropLast()))\" fill=\"none\" stroke=\"\(c)\" stroke-width=\"2\"/>\n"
            // Legend entry, bottom right inside the panel (the fast, low region of a CDF).
            let ly = y + h - 14 - Double(series.count - 1 - i) * 18
            out += "<line x1=\"\(f1(x + w - 200))\" y1=\"\(f1(ly - 4))\" x2=\"\(f1(x + w - 176))\" y2=\"\(f1(ly - 4))\" stroke=\"\(c)\" stroke-width=\"3\"/>\n"
            out += "<text x=\"\(f1(x + w - 170))\" y=\"\(f1(ly))\">\(esc(s.label))</text>\n"
            out += "</g>\n"
        }
    }

    static func barPanel(_ out: inout String, bars: [Bar], metric: String, value: KeyPath<Bar, Double>,
                         x: Double, y: Double, w: Double, h: Double) {
        let vmax = max(bars.map { $0[keyPath: value] }.max() ?? 1, 1e-9)
        let step = niceStep(vmax / 4)
        let top = (vmax * 1.1 / step).rounded(.up) * step   // room for the value above the tallest bar
        out += "<g class=\"axes\">\n"
        out += "<text x=\"\(f1(x))\" y=\"\(f1(y - 10))\" font-size=\"13\" font-weight=\"bold\">\(metric)</text>\n"
        var t = 0.0
        while t <= top + step / 2 {
            let gy = y + h - t / top * h
            out += "<line x1=\"\(f1(x))\" y1=\"\(f1(gy))\" x2=\"\(f1(x + w))\" y2=\"\(f1(gy))\" stroke=\"#dddddd\" stroke-width=\"1\"/>\n"
            out += "<text x=\"\(f1(x - 6))\" y=\"\(f1(gy + 4))\" text-anchor=\"end\" fill=\"#333333\">\(num(t))</text>\n"
            t += step
        }
        out += "<line x1=\"\(f1(x))\" y1=\"\(f1(y + h))\" x2=\"\(f1(x + w))\" y2=\"\(f1(y + h))\" stroke=\"#333333\" stroke-width=\"1\"/>\n"
        out += "</g>\n"
        let slot = w / Double(max(bars.count, 1))
        let bw = min(slot * 0.7, 90)
        for (i, b) in bars.enumerated() {
            let v = b[keyPath: value]
            let bh = v / top * h
            let bx = x + slot * Double(i) + (slot - bw) / 2
            out += "<rect class=\"bar\" data-label=\"\(esc(b.label))\" data-metric=\"\(metric)\" data-value=\"\(f1(v))\" x=\"\(f1(bx))\" y=\"\(f1(y + h - bh))\" width=\"\(f1(bw))\" height=\"\(f1(bh))\" fill=\"\(colors[i % colors.count])\"/>\n"
            out += "<text x=\"\(f1(bx + bw / 2))\" y=\"\(f1(y + h - bh - 5))\" text-anchor=\"middle\" font-size=\"11\">\(metric == "IOPS" ? grouped(Int(v.rounded())) : f1(v))</text>\n"
            out += "<text x=\"\(f1(bx + bw / 2))\" y=\"\(f1(y + h + 16))\" text-anchor=\"middle\" font-size=\"11\">\(esc(b.label))</text>\n"
        }
    }

    // MARK: formatting (no Foundation)

    static func esc(_ s: String) -> String {
        var o = ""
        for c in s {
            switch c {
            case "&": o += "&amp;"
            case "<": o += "&lt;"
            case ">": o += "&gt;"
            case "\"": o += "&quot;"
            default: o.append(c)
            }
        }
        return o
    }
    /// One decimal.
    static func f1(_ v: Double) -> String {
        guard v.isFinite else { return "0" }
        let t = Int((abs(v) * 10).rounded())
        return (v < 0 && t != 0 ? "-" : "") + "\(t / 10).\(t % 10)"
    }
    /// A tick value: integers plain, fractions with up to three decimals.
    static func num(_ v: Double) -> String {
        if v >= 1, v == v.rounded() { return grouped(Int(v)) }
        let t = Int((v * 1000).rounded())
        var frac = String(t % 1000)
        while frac.count < 3 { frac = "0" + frac }
        while frac.hasSuffix("0") { frac.removeLast() }
        return "\(t / 1000)" + (frac.isEmpty ? "" : "." + frac)
    }
    static func grouped(_ n: Int) -> String {
        let s = String(n.magnitude)
        var o = ""
        for (i, c) in s.enumerated() {
            if i > 0 && (s.count - i) % 3 == 0 { o += "," }
            o.append(c)
        }
        return (n < 0 ? "-" : "") + o
    }
    /// 1, 2 or 5 × 10^k at or above `v`.
    static func niceStep(_ v: Double) -> Double {
        guard v > 0 else { return 1 }
        let p = pow(10, floor(log10(v)))
        for m in [1.0, 2.0, 5.0, 10.0] where m * p >= v { return m * p }
        return 10 * p
    }
}
