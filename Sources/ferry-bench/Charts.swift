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

    /// Bytes/s sent over time, one panel per engine, with bands for precopy, postcopy,
    /// paused and recover.
    static func timeline(title: String, panels: [(label: String, samples: [TimelineSample])]) -> String {
        let w = 900.0, ph = 200.0, left = 60.0, top = 40.0, gap = 50.0
        let h = top + Double(panels.count) * (ph + gap) + 30
        let tMax = max(1, panels.flatMap { $0.samples.map(\.t) }.max() ?? 1)
        func rates(_ s: [TimelineSample]) -> [(Double, Double)] {
            var out: [(Double, Double)] = []
            var i = 0
            for j in 1..<max(1, s.count) where s[j].t - s[i].t >= 100 {
                out.append(((s[i].t + s[j].t) / 2, Double(s[j].bytes &- s[i].bytes) / (s[j].t - s[i].t) / 1000)) // MB/s
                i = j
            }
            return out
        }
        let all = panels.map { rates($0.samples) }
        let rMax = max(1, all.flatMap { $0.map(\.1) }.max() ?? 1)
        var svg = "<svg xmlns='http://www.w3.org/2000/svg' width='\(Int(w))' height='\(Int(h))' font-family='sans-serif' font-size='12'>\n"
        svg += "<text x='\(left)' y='20' font-size='15'>\(title)</text>\n"
        for (k, panel) in panels.enumerated() {
            let y0 = top + Double(k) * (ph + gap)
            func x(_ t: Double) -> Double { left + t / tMax * (w - left - 20) }
            func y(_ r: Double) -> Double { y0 + ph - r / rMax * ph }
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
            let pts = all[k].map { "\(String(format: "%.1f", x($0.0))),\(String(format: "%.1f", y($0.1)))" }.joined(separator: " ")
            svg += "<polyline fill='none' stroke='#1f4e9c' stroke-width='1.5' points='\(pts)'/>\n"
            // The dirty rate the source measured (precopy), dashed.
            let dirty = s.filter { ($0.dirtyBytesPerSecond ?? 0) > 0 && ($0.status == "active") }
            if !dirty.isEmpty {
                let dp = dirty.map { "\(String(format: "%.1f", x($0.t))),\(String(format: "%.1f", y(min(rMax, Double($0.dirtyBytesPerSecond!) / 1e6))))" }.joined(separator: " ")
                svg += "<polyline fill='none' stroke='#c0504d' stroke-width='1.5' stroke-dasharray='5,3' points='\(dp)'/>\n"
            }
            svg += "<rect x='\(left)' y='\(y0)' width='\(w - left - 20)' height='\(ph)' fill='none' stroke='#888'/>\n"
            svg += "<text x='\(left)' y='\(y0 - 6)' font-weight='bold'>\(panel.label)</text>\n"
            svg += "<text x='5' y='\(y0 + 12)'>\(Int(rMax)) MB/s</text><text x='5' y='\(y0 + ph)'>0</text>\n"
            var t = 0.0
            while t <= tMax {
                svg += "<text x='\(x(t) - 4)' y='\(y0 + ph + 14)'>\(Int(t / 1000))s</text>\n"
                t += tMax > 20_000 ? 5000 : 1000
            }
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

    /// Fault-latency histogram (QEMU's 24 log2-µs buckets), engines side by side.
    static func histogram(title: String, series: [(label: String, buckets: [UInt64]?)]) -> String {
        let w = 900.0, h = 320.0, left = 60.0, top = 40.0, ph = 220.0
        let colors = ["#1f4e9c", "#c0504d"]
        let maxCount = max(1, series.compactMap { $0.buckets?.max() }.max() ?? 1)
        let slot = (w - left - 20) / 24
        var svg = "<svg xmlns='http://www.w3.org/2000/svg' width='\(Int(w))' height='\(Int(h))' font-family='sans-serif' font-size='11'>\n"
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
        svg += "<text x='5' y='\(top + 10)'>\(maxCount)</text><text x='\(left)' y='\(h - 20)'>faults per bucket [2^N, 2^(N+1)) µs, fault → page installed</text>\n"
        return svg + "</svg>\n"
    }
}
