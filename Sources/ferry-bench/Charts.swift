import FerryHarness
import Foundation

/// Small hand-written SVG charts for the side-by-side report (no dependencies).
enum Chart {
    static func color(_ status: String) -> String? {
        switch status {
        case "setup", "active": "#dbe9f6"            // precopy
        case "device", "postcopy-device": "#e6e6e6"  // switchover
        case "postcopy-active": "#dff2df"
        case "postcopy-paused": "#f8d7da"
        case "postcopy-recover-setup", "postcopy-recover": "#fde9c8"
        default: nil
        }
    }

    /// A round step (1, 2 or 5 × 10^k) for about `count` ticks up to `maximum`.
    static func tickStep(_ maximum: Double, count: Double = 4) -> Double {
        let raw = max(maximum / count, 1e-9)
        let p = pow(10, floor(log10(raw)))
        for m in [1.0, 2, 5, 10] where m * p >= raw { return m * p }
        return 10 * p
    }

    /// 0, step, 2 × step, ... up to `maximum` (a hair of rounding allowed).
    static func ticks(upTo maximum: Double, step: Double) -> [Double] {
        stride(from: 0.0, through: maximum + step * 1e-9, by: step).map { $0 }
    }

    /// The window the rates are measured over.
    static let rateWindowMs = 250.0

    /// MB/s over fixed windows from a cumulative byte counter sampled at uneven times:
    /// the counter is read at each window's edges (linear between samples), and a counter
    /// that goes back (a new channel after a recovery) adds nothing rather than wrapping.
    static func windowedRates(_ s: [TimelineSample]) -> [(t: Double, mbps: Double)] {
        guard s.count > 1 else { return [] }
        var cumulative: [Double] = [0]
        for k in 1..<s.count { cumulative.append(cumulative[k - 1] + (s[k].bytes >= s[k - 1].bytes ? Double(s[k].bytes - s[k - 1].bytes) : 0)) }
        func at(_ t: Double) -> Double {
            guard let j = s.firstIndex(where: { $0.t >= t }) else { return cumulative.last! }
            guard j > 0, s[j].t > s[j - 1].t else { return cumulative[j] }
            let f = (t - s[j - 1].t) / (s[j].t - s[j - 1].t)
            return cumulative[j - 1] + f * (cumulative[j] - cumulative[j - 1])
        }
        var out: [(t: Double, mbps: Double)] = []
        var t = s[0].t
        while t + rateWindowMs <= s.last!.t {
            out.append((t + rateWindowMs / 2, (at(t + rateWindowMs) - at(t)) / (rateWindowMs / 1000) / 1e6))
            t += rateWindowMs
        }
        return out
    }

    /// Bytes/s sent over time, one panel per engine, with bands for precopy, postcopy,
    /// paused and recover; axes with ticks and units, and what was measured.
    static func timeline(title: String, panels: [(label: String, samples: [TimelineSample])]) -> String {
        let w = 900.0, ph = 200.0, left = 70.0, top = 58.0, gap = 62.0
        let h = top + Double(panels.count) * (ph + gap) + 34
        let tMax = max(1, panels.flatMap { $0.samples.map(\.t) }.max() ?? 1)
        let all = panels.map { windowedRates($0.samples) }
        let dirtyMax = panels.flatMap { $0.samples.compactMap { $0.status == "active" ? $0.dirtyBytesPerSecond.map { Double($0) / 1e6 } : nil } }.max() ?? 0
        let yStep = tickStep(max(1, all.flatMap { $0.map(\.mbps) }.max() ?? 1, dirtyMax))
        let rMax = yStep * ceil(max(1, all.flatMap { $0.map(\.mbps) }.max() ?? 1, dirtyMax) / yStep)
        var svg = "<svg xmlns='http://www.w3.org/2000/svg' width='\(Int(w))' height='\(Int(h))' font-family='sans-serif' font-size='12'>\n"
        svg += "<rect width='100%' height='100%' fill='white'/>\n"
        svg += "<text x='\(left)' y='20' font-size='15'>\(title)</text>\n"
        svg += "<text x='\(left)' y='38' font-size='11' fill='#444'>sent: the source's query-migrate ram.transferred (polled every 50 ms) over fixed \(Int(rateWindowMs)) ms windows; dirty: its dirty-pages-rate × 4 KiB; bands: its status</text>\n"
        for (k, panel) in panels.enumerated() {
            let y0 = top + Double(k) * (ph + gap)
            func x(_ t: Double) -> Double { left + t / tMax * (w - left - 20) }
            func y(_ r: Double) -> Double { y0 + ph - min(r, rMax) / rMax * ph }
            let s = panel.samples
            if s.count > 1 {
                var i = 0
                while i < s.count - 1 {
                    var j = i
                    while j + 1 < s.count && s[j + 1].status == s[i].status { j += 1 }
                    let end = j + 1 < s.count ? s[j + 1].t : s[j].t
                    if let c = color(s[i].status) {
                        svg += "<rect x='\(x(s[i].t))' y='\(y0)' width='\(max(0.5, x(end) - x(s[i].t)))' height='\(ph)' fill='\(c)'/>\n"
                    }
                    i = j + 1
                }
            }
            // y axis: gridlines and labels in MB/s.
            for r in ticks(upTo: rMax, step: yStep) {
                svg += "<line x1='\(left)' y1='\(y(r))' x2='\(w - 20)' y2='\(y(r))' stroke='#ccc' stroke-width='0.5'/>"
                svg += "<text x='\(left - 6)' y='\(y(r) + 4)' text-anchor='end'>\(r >= 10 || r == 0 ? String(Int(r)) : String(format: "%g", r))</text>\n"
            }
            svg += "<text x='14' y='\(y0 + ph / 2)' transform='rotate(-90 14 \(y0 + ph / 2))' text-anchor='middle'>MB/s</text>\n"
            let pts = all[k].map { "\(String(format: "%.1f", x($0.t))),\(String(format: "%.1f", y($0.mbps)))" }.joined(separator: " ")
            svg += "<polyline fill='none' stroke='#1f4e9c' stroke-width='1.5' points='\(pts)'/>\n"
            // The dirty rate the source measured (precopy), dashed.
            let dirty = s.filter { ($0.dirtyBytesPerSecond ?? 0) > 0 && ($0.status == "active") }
            if !dirty.isEmpty {
                let dp = dirty.map { "\(String(format: "%.1f", x($0.t))),\(String(format: "%.1f", y(Double($0.dirtyBytesPerSecond!) / 1e6)))" }.joined(separator: " ")
                svg += "<polyline fill='none' stroke='#c0504d' stroke-width='1.5' stroke-dasharray='5,3' points='\(dp)'/>\n"
            }
            svg += "<rect x='\(left)' y='\(y0)' width='\(w - left - 20)' height='\(ph)' fill='none' stroke='#888'/>\n"
            svg += "<text x='\(left)' y='\(y0 - 6)' font-weight='bold'>\(panel.label)</text>\n"
            // x axis: seconds since migrate.
            let xStep = tickStep(tMax / 1000, count: 8) * 1000
            for t in ticks(upTo: tMax, step: xStep) {
                svg += "<line x1='\(x(t))' y1='\(y0 + ph)' x2='\(x(t))' y2='\(y0 + ph + 4)' stroke='#888'/>"
                svg += "<text x='\(x(t))' y='\(y0 + ph + 16)' text-anchor='middle'>\(String(format: "%g", t / 1000))</text>\n"
            }
            svg += "<text x='\(w - 20)' y='\(y0 + ph + 30)' text-anchor='end'>seconds since migrate</text>\n"
        }
        let legend = [("precopy", "#dbe9f6"), ("switchover", "#e6e6e6"), ("postcopy", "#dff2df"), ("paused", "#f8d7da"), ("recover", "#fde9c8")]
        svg += "<line x1='\(left + 600)' y1='\(h - 15)' x2='\(left + 625)' y2='\(h - 15)' stroke='#1f4e9c' stroke-width='2'/><text x='\(left + 630)' y='\(h - 10)'>sent MB/s</text>\n"
        svg += "<line x1='\(left + 700)' y1='\(h - 15)' x2='\(left + 725)' y2='\(h - 15)' stroke='#c0504d' stroke-width='2' stroke-dasharray='5,3'/><text x='\(left + 730)' y='\(h - 10)'>dirty MB/s</text>\n"
        for (i, (name, c)) in legend.enumerated() {
            let lx = left + Double(i) * 120
            svg += "<rect x='\(lx)' y='\(h - 22)' width='14' height='14' fill='\(c)' stroke='#888'/><text x='\(lx + 20)' y='\(h - 10)'>\(name)</text>\n"
        }
        return svg + "</svg>\n"
    }

    /// The soak's per-process fds, threads and RSS against the migration number: the source
    /// (the guest's process before each migration) and the destination (after a completed
    /// one); flat lines mean nothing leaks from one migration to the next.
    static func soakUsage(title: String, samples: [(migration: Int, role: String, fds: Int, threads: Int, rssMiB: Double)]) -> String {
        let w = 900.0, ph = 150.0, left = 70.0, top = 58.0, gap = 52.0
        let metrics: [(String, (Int, Int, Double) -> Double)] = [("open fds", { f, _, _ in Double(f) }), ("threads", { _, t, _ in Double(t) }), ("RSS MiB", { _, _, r in r })]
        let h = top + Double(metrics.count) * (ph + gap) + 30
        let n = max(1, (samples.map(\.migration).max() ?? 0) + 1)
        func x(_ i: Int) -> Double { left + (Double(i) + 0.5) / Double(n) * (w - left - 20) }
        var svg = "<svg xmlns='http://www.w3.org/2000/svg' width='\(Int(w))' height='\(Int(h))' font-family='sans-serif' font-size='12'>\n"
        svg += "<rect width='100%' height='100%' fill='white'/>\n<text x='\(left)' y='20' font-size='15'>\(title)</text>\n"
        svg += "<text x='\(left)' y='38' font-size='11' fill='#444'>from /proc/PID (fd directory, status Threads and VmRSS); source: the guest's process before each migration; destination: after a completed one</text>\n"
        let colors = ["source": "#1f4e9c", "destination": "#2e8b57"]
        for (k, (name, value)) in metrics.enumerated() {
            let y0 = top + Double(k) * (ph + gap)
            let vMax = max(1, samples.map { value($0.fds, $0.threads, $0.rssMiB) }.max() ?? 1)
            let step = tickStep(vMax)
            let top = step * ceil(vMax / step)
            func y(_ v: Double) -> Double { y0 + ph - v / top * ph }
            for v in ticks(upTo: top, step: step) {
                svg += "<line x1='\(left)' y1='\(y(v))' x2='\(w - 20)' y2='\(y(v))' stroke='#ccc' stroke-width='0.5'/><text x='\(left - 6)' y='\(y(v) + 4)' text-anchor='end'>\(String(format: "%g", v))</text>\n"
            }
            for role in ["source", "destination"] {
                let pts = samples.filter { $0.role == role }.map { "\(String(format: "%.1f", x($0.migration))),\(String(format: "%.1f", y(value($0.fds, $0.threads, $0.rssMiB))))" }
                svg += "<polyline fill='none' stroke='\(colors[role]!)' stroke-width='1.2' points='\(pts.joined(separator: " "))'/>\n"
            }
            svg += "<rect x='\(left)' y='\(y0)' width='\(w - left - 20)' height='\(ph)' fill='none' stroke='#888'/><text x='\(left)' y='\(y0 - 6)' font-weight='bold'>\(name)</text>\n"
            for i in ticks(upTo: Double(n), step: tickStep(Double(n), count: 8)) {
                svg += "<text x='\(x(Int(i)))' y='\(y0 + ph + 16)' text-anchor='middle'>\(Int(i))</text>\n"
            }
        }
        svg += "<text x='\(w - 20)' y='\(h - 24)' text-anchor='end'>migration</text>\n"
        svg += "<line x1='\(left)' y1='\(h - 15)' x2='\(left + 25)' y2='\(h - 15)' stroke='#1f4e9c' stroke-width='2'/><text x='\(left + 30)' y='\(h - 10)'>source</text>\n"
        svg += "<line x1='\(left + 110)' y1='\(h - 15)' x2='\(left + 135)' y2='\(h - 15)' stroke='#2e8b57' stroke-width='2'/><text x='\(left + 140)' y='\(h - 10)'>destination</text>\n"
        return svg + "</svg>\n"
    }

    /// Fault-latency histogram (QEMU's 24 log2-µs buckets), engines side by side.
    static func histogram(title: String, series: [(label: String, buckets: [UInt64]?)]) -> String {
        let w = 900.0, h = 320.0, left = 60.0, top = 40.0, ph = 220.0
        let colors = ["#1f4e9c", "#c0504d"]
        let maxCount = max(1, series.compactMap { $0.buckets?.max() }.max() ?? 1)
        let slot = (w - left - 20) / 24
        var svg = "<svg xmlns='http://www.w3.org/2000/svg' width='\(Int(w))' height='\(Int(h))' font-family='sans-serif' font-size='11'>\n"
        svg += "<rect width='100%' height='100%' fill='white'/>\n"
        svg += "<text x='\(left)' y='20' font-size='15'>\(title)</text>\n"
        for (k, s) in series.enumerated() {
            guard let b = s.buckets else {
                svg += "<text x='\(left + 10)' y='\(top + 20 + Double(k) * 16)' fill='\(colors[k % 2])'>\(s.label): not reported</text>\n"
                continue
            }
            for (i, n) in b.enumerated() where n > 0 {
                let bh = Double(n) / Double(maxCount) * ph
                let bx = left + Double(i) * slot + Double(k) * slot / Double(series.count)
                svg += "<rect x='\(bx)' y='\(top + ph - bh)' width='\(slot / Double(series.count) - 1)' height='\(bh)' fill='\(colors[k % 2])'><title>\(s.label): \(n) faults in [\(1 << i), \(1 << (i + 1))) µs</title></rect>\n"
            }
            svg += "<rect x='\(w - 200)' y='\(top + Double(k) * 18)' width='12' height='12' fill='\(colors[k % 2])'/><text x='\(w - 182)' y='\(top + 10 + Double(k) * 18)'>\(s.label)</text>\n"
        }
        svg += "<rect x='\(left)' y='\(top)' width='\(w - left - 20)' height='\(ph)' fill='none' stroke='#888'/>\n"
        for i in stride(from: 0, to: 24, by: 2) {
            let label = i < 10 ? "\(1 << i)µs" : i < 20 ? "\((1 << i) / 1000)ms" : "\((1 << i) / 1_000_000)s"
            svg += "<text x='\(left + Double(i) * slot)' y='\(top + ph + 14)'>\(label)</text>\n"
        }
        let step = max(1, tickStep(Double(maxCount)))
        for c in ticks(upTo: Double(maxCount), step: step) {
            let cy = top + ph - c / Double(maxCount) * ph
            svg += "<line x1='\(left - 4)' y1='\(cy)' x2='\(left)' y2='\(cy)' stroke='#888'/><text x='\(left - 6)' y='\(cy + 4)' text-anchor='end'>\(Int(c))</text>\n"
        }
        svg += "<text x='14' y='\(top + ph / 2)' transform='rotate(-90 14 \(top + ph / 2))' text-anchor='middle'>faults</text>\n"
        svg += "<text x='\(left)' y='\(h - 20)'>latency bucket [2^N, 2^(N+1)) µs, from the vCPU's fault to the page installed (the destination's postcopy-latency-dist)</text>\n"
        return svg + "</svg>\n"
    }
}
