package chaos

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"io"
	"math"
	"strings"
	"time"
)

// The timeline plot: per-second acknowledged operations and errors (failed
// plus unknown) of the client PUBLISHes that wait for an acknowledgement
// (retained writes, stream publishes and publishes to the persistent
// subscribers), bucketed by the second the
// outcome was known, with every fault drawn as a shaded band. Pure SVG from
// the standard library; written next to the JSON report.

// Plot geometry (pixels).
const (
	svgWidth   = 1200
	svgHeight  = 460
	plotLeft   = 70
	plotRight  = svgWidth - 70
	plotTop    = 110 // room for the legend and three rows of fault labels
	plotBottom = svgHeight - 50
)

// faultColors shades each fault kind's band.
var faultColors = map[string]string{
	FaultKill:       "#d62728",
	FaultPause:      "#ff7f0e",
	FaultRolling:    "#9467bd",
	FaultRestartAll: "#7f7f7f",
	FaultPartition:  "#17becf",
}

// timelineSeries is the per-second data the plot draws.
type timelineSeries struct {
	OK     []int // acknowledged operations per second
	Errors []int // failed + unknown per second
}

// timelineBuckets counts, per second since origin, the acknowledged and the
// failed or unknown operations (by their end), over a span that also
// covers every fault. There is always at least one bucket.
func timelineBuckets(ops []Op, faults []faultEvent, origin time.Time) timelineSeries {
	span := 0.0
	for _, o := range ops {
		span = math.Max(span, o.End.Sub(origin).Seconds())
	}
	for _, f := range faults {
		span = math.Max(span, f.End.Sub(origin).Seconds())
	}
	n := max(1, int(math.Ceil(span)))
	s := timelineSeries{OK: make([]int, n), Errors: make([]int, n)}
	for _, o := range ops {
		if o.Kind != KindRetain && o.Kind != KindStreamPub && o.Kind != KindSessPub {
			continue
		}
		i := int(o.End.Sub(origin).Seconds())
		if i < 0 || i >= n {
			continue
		}
		if o.Outcome == OK {
			s.OK[i]++
		} else {
			s.Errors[i]++
		}
	}
	return s
}

// niceStep returns a tick step (1, 2 or 5 times a power of ten) giving
// about want ticks over [0, max].
func niceStep(maxV float64, want int) float64 {
	if maxV <= 0 {
		return 1
	}
	raw := maxV / float64(want)
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= raw {
			return math.Max(m*p, 1) // whole seconds and whole counts
		}
	}
	return 10 * p
}

// axisMax rounds maxV up to a whole number of steps (at least one).
func axisMax(maxV float64, step float64) float64 {
	return math.Max(step, math.Ceil(maxV/step)*step)
}

func esc(s string) string {
	var b bytes.Buffer
	_ = xml.EscapeText(&b, []byte(s))
	return b.String()
}

func maxInt(xs []int) int {
	m := 0
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}

// renderTimeline writes the SVG. title is printed above the plot (the seed,
// for example).
func renderTimeline(w io.Writer, title string, ops []Op, faults []faultEvent, origin time.Time) error {
	s := timelineBuckets(ops, faults, origin)
	n := len(s.OK)
	xStep := niceStep(float64(n), 12)
	xMax := axisMax(float64(n), xStep)
	okStep := niceStep(float64(maxInt(s.OK)), 5)
	okMax := axisMax(float64(maxInt(s.OK)), okStep)
	errStep := niceStep(float64(maxInt(s.Errors)), 5)
	errMax := axisMax(float64(maxInt(s.Errors)), errStep)

	x := func(sec float64) float64 {
		sec = math.Min(math.Max(sec, 0), xMax)
		return plotLeft + sec/xMax*(plotRight-plotLeft)
	}
	yOK := func(v float64) float64 { return plotBottom - v/okMax*(plotBottom-plotTop) }
	yErr := func(v float64) float64 { return plotBottom - v/errMax*(plotBottom-plotTop) }

	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p(`<?xml version="1.0" encoding="UTF-8"?>` + "\n")
	p(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", svgWidth, svgHeight, svgWidth, svgHeight)
	p(`<rect x="0" y="0" width="%d" height="%d" fill="white"/>`+"\n", svgWidth, svgHeight)
	p(`<text x="%d" y="18" font-size="14" font-weight="bold">%s</text>`+"\n", plotLeft, esc(title))

	// Legend: the two series, then a swatch per fault kind present.
	lx := float64(plotLeft)
	p(`<g class="legend">`)
	p(`<line x1="%.1f" y1="36" x2="%.1f" y2="36" stroke="#1f77b4" stroke-width="2"/>`, lx, lx+24)
	p(`<text x="%.1f" y="40">acknowledged ops/s (left axis)</text>`, lx+30)
	lx += 230
	p(`<line x1="%.1f" y1="36" x2="%.1f" y2="36" stroke="#d62728" stroke-width="2" stroke-dasharray="5,3"/>`, lx, lx+24)
	p(`<text x="%.1f" y="40">failed + unknown ops/s (right axis)</text>`, lx+30)
	lx += 260
	seen := map[string]bool{}
	for _, f := range faults {
		if seen[f.Kind] {
			continue
		}
		seen[f.Kind] = true
		p(`<rect x="%.1f" y="29" width="14" height="14" fill="%s" fill-opacity="0.3" stroke="%s"/>`, lx, faultColor(f.Kind), faultColor(f.Kind))
		p(`<text x="%.1f" y="40">%s</text>`, lx+18, esc(f.Kind))
		lx += 30 + 7*float64(len(f.Kind))
	}
	p("</g>\n")

	// Fault bands, each labelled with kind and node on one of three rows
	// above the plot so that neighbouring labels do not overlap.
	for i, f := range faults {
		x1, x2 := x(f.Start.Sub(origin).Seconds()), x(f.End.Sub(origin).Seconds())
		if x2-x1 < 2 {
			x2 = x1 + 2
		}
		c := faultColor(f.Kind)
		label := faultLabel(f)
		p(`<rect class="fault" data-kind="%s" data-node="%s" x="%.1f" y="%d" width="%.1f" height="%d" fill="%s" fill-opacity="0.22">`,
			esc(f.Kind), esc(f.Node), x1, plotTop, x2-x1, plotBottom-plotTop, c)
		p(`<title>%s: %.1fs..%.1fs%s</title></rect>`+"\n", esc(label), f.Start.Sub(origin).Seconds(), f.End.Sub(origin).Seconds(), esc(errSuffix(f.Err)))
		ly := 62 + 15*(i%3)
		p(`<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="1"/>`, x1, ly+3, x1, plotTop, c)
		p(`<text class="fault-label" x="%.1f" y="%d" fill="%s" font-size="11">%s</text>`+"\n", x1+2, ly, c, esc(label))
	}

	// Axes, grid and ticks.
	p(`<g class="axes" stroke="#333" stroke-width="1">`)
	p(`<line x1="%d" y1="%d" x2="%d" y2="%d"/>`, plotLeft, plotBottom, plotRight, plotBottom)
	p(`<line x1="%d" y1="%d" x2="%d" y2="%d"/>`, plotLeft, plotTop, plotLeft, plotBottom)
	p(`<line x1="%d" y1="%d" x2="%d" y2="%d"/>`, plotRight, plotTop, plotRight, plotBottom)
	p("</g>\n")
	for v := 0.0; v <= xMax+1e-9; v += xStep {
		px := x(v)
		p(`<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>`, px, plotTop, px, plotBottom)
		p(`<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#333"/>`, px, plotBottom, px, plotBottom+5)
		p(`<text x="%.1f" y="%d" text-anchor="middle">%g</text>`+"\n", px, plotBottom+18, v)
	}
	for v := 0.0; v <= okMax+1e-9; v += okStep {
		py := yOK(v)
		p(`<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#eee"/>`, plotLeft, py, plotRight, py)
		p(`<text x="%d" y="%.1f" text-anchor="end" fill="#1f77b4">%g</text>`+"\n", plotLeft-6, py+4, v)
	}
	for v := 0.0; v <= errMax+1e-9; v += errStep {
		py := yErr(v)
		p(`<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#333"/>`, plotRight, py, plotRight+5, py)
		p(`<text x="%d" y="%.1f" fill="#d62728">%g</text>`+"\n", plotRight+8, py+4, v)
	}
	p(`<text x="%d" y="%d" text-anchor="middle">seconds since the workload started</text>`+"\n", (plotLeft+plotRight)/2, svgHeight-12)
	p(`<text transform="translate(18,%d) rotate(-90)" text-anchor="middle" fill="#1f77b4">acknowledged operations per second</text>`+"\n", (plotTop+plotBottom)/2)
	p(`<text transform="translate(%d,%d) rotate(90)" text-anchor="middle" fill="#d62728">failed + unknown per second</text>`+"\n", svgWidth-14, (plotTop+plotBottom)/2)

	// The two series, one point per second (at the middle of the second).
	series := func(class, color, dash string, vals []int, y func(float64) float64) {
		pts := make([]string, len(vals))
		for i, v := range vals {
			pts[i] = fmt.Sprintf("%.1f,%.1f", x(float64(i)+0.5), y(float64(v)))
		}
		p(`<polyline class="%s" fill="none" stroke="%s" stroke-width="1.5"%s points="%s"/>`+"\n", class, color, dash, strings.Join(pts, " "))
	}
	series("ok", "#1f77b4", "", s.OK, yOK)
	series("errors", "#d62728", ` stroke-dasharray="5,3"`, s.Errors, yErr)
	p("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// faultLabel names the fault's kind and node ("kill node2", "rolling (all
// nodes)").
func faultLabel(f faultEvent) string {
	if f.Node == "all" {
		return f.Kind + " (all nodes)"
	}
	return f.Kind + " " + f.Node
}

func faultColor(kind string) string {
	if c, ok := faultColors[kind]; ok {
		return c
	}
	return "#bcbd22"
}

func errSuffix(e string) string {
	if e == "" {
		return ""
	}
	return " ERROR: " + e
}
