package main

import (
	"fmt"
	"math"
	"strings"
)

// plot draws aggregate throughput and round-trip p99 against N, on log
// scales, with the direct and socat single-client rates as reference lines.
func plot(curve []result, direct, socat result) []byte {
	const w, h, pad = 720, 360, 60
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`, w, h)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`)
	x := func(i int) float64 { return pad + float64(i)*(w-2*pad)/float64(len(curve)-1) }
	maxT := max(direct.perClient, 1.0)
	for _, r := range curve {
		maxT = max(maxT, r.aggregate)
	}
	yT := func(v float64) float64 { return h - pad - (h-2*pad)*math.Log10(max(v, 1))/math.Log10(maxT*1.5) }
	maxL := 1.0
	for _, r := range curve {
		maxL = max(maxL, float64(r.p99.Microseconds())/1000)
	}
	yL := func(v float64) float64 { return h - pad - (h-2*pad)*v/(maxL*1.2) }
	fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>`, pad, h-pad, w-pad, h-pad)
	for i, r := range curve {
		n := strings.TrimPrefix(r.name[strings.LastIndex(r.name, "N="):], "")
		fmt.Fprintf(&b, `<text x="%.0f" y="%d" text-anchor="middle">%s</text>`, x(i), h-pad+18, n)
	}
	line := func(color string, ys func(r result) float64) {
		var pts []string
		for i, r := range curve {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(i), ys(r)))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`, color, strings.Join(pts, " "))
		for i, r := range curve {
			fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>`, x(i), ys(r), color)
		}
	}
	line("#1f77b4", func(r result) float64 { return yT(r.aggregate) })
	line("#d62728", func(r result) float64 { return yL(float64(r.p99.Microseconds()) / 1000) })
	for _, ref := range []struct {
		r     result
		label string
	}{{direct, "direct to the VMM, 1 client"}, {socat, "socat relay, 1 client"}} {
		y := yT(ref.r.perClient)
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#999" stroke-dasharray="4 4"/>`, pad, y, w-pad, y)
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" fill="#666">%s: %.0f MiB/s</text>`, pad+4, y-4, ref.label, ref.r.perClient)
	}
	fmt.Fprintf(&b, `<text x="%d" y="20" fill="#1f77b4">aggregate MiB/s (log scale), 64 MiB ring, flood</text>`, pad)
	fmt.Fprintf(&b, `<text x="%d" y="36" fill="#d62728">round-trip p99 (linear, max %.1f ms)</text>`, pad, maxL*1.2)
	fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">clients (N)</text>`, w/2, h-12)
	b.WriteString(`</svg>`)
	return []byte(b.String())
}
