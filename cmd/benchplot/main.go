// Command benchplot draws latency distributions as an SVG: it reads
// mqttload --json results (one per line, each with "label" and
// "percentiles") on standard input and writes one curve per result,
// latency against percentile, the percentile axis spaced in "nines" as
// HdrHistogram plots are, so the tail is as wide as the median.
//
//	grep '"rate":5000' results.jsonl | benchplot --title "QoS 0 at 5,000 msg/s" > latency.svg
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"html"
	"io"
	"math"
	"os"
	"strings"
)

type curve struct {
	Label       string       `json:"label"`
	Percentiles [][2]float64 `json:"percentiles"`
}

const (
	width, height            = 900, 440
	left, right, top, bottom = 70, 220, 40, 50 // margins
	maxNines                 = 4.0             // 99.99 %
)

var colors = []string{"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"}

func main() {
	title := flag.String("title", "latency", "title of the plot")
	flag.Parse()
	curves, err := read(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchplot:", err)
		os.Exit(1)
	}
	if len(curves) == 0 {
		fmt.Fprintln(os.Stderr, "benchplot: no result with percentiles on standard input")
		os.Exit(1)
	}
	if err := plot(os.Stdout, *title, curves); err != nil {
		fmt.Fprintln(os.Stderr, "benchplot:", err)
		os.Exit(1)
	}
}

func read(r io.Reader) ([]curve, error) {
	var out []curve
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if i := strings.IndexByte(text, '{'); i >= 0 {
			text = text[i:] // bench scripts prefix lines with their own fields
		} else {
			continue
		}
		var c curve
		if err := json.Unmarshal([]byte(text), &c); err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		if len(c.Percentiles) > 0 {
			out = append(out, c)
		}
	}
	return out, sc.Err()
}

// nines maps a percentile to the x axis: 0 at 0 %, 1 at 90 %, 2 at 99 %...
func nines(p float64) float64 {
	if p >= 100 {
		return maxNines
	}
	return min(-math.Log10(1-p/100), maxNines)
}

func plot(w io.Writer, title string, curves []curve) error {
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, c := range curves {
		for _, pt := range c.Percentiles {
			v := max(pt[1], 1) // µs, log scale
			lo, hi = min(lo, v), max(hi, v)
		}
	}
	lo = math.Pow(10, math.Floor(math.Log10(lo)))
	hi = math.Pow(10, math.Ceil(math.Log10(hi)))
	if hi <= lo {
		hi = lo * 10
	}
	pw, ph := float64(width-left-right), float64(height-top-bottom)
	x := func(p float64) float64 { return left + nines(p)/maxNines*pw }
	y := func(us float64) float64 {
		return top + ph - (math.Log10(max(us, 1))-math.Log10(lo))/(math.Log10(hi)-math.Log10(lo))*ph
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", width, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="15">%s</text>`+"\n", left, html.EscapeString(title))
	for _, p := range []float64{0, 90, 99, 99.9, 99.99} {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", x(p), top, x(p), top+ph)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%g%%</text>`+"\n", x(p), top+ph+18, p)
	}
	for v := lo; v <= hi*1.0001; v *= 10 {
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", left, y(v), left+pw, y(v))
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", left-6, y(v)+4, duration(v))
	}
	fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">percentile</text>`+"\n", left+pw/2, height-8)
	for i, c := range curves {
		color := colors[i%len(colors)]
		var pts []string
		for _, pt := range c.Percentiles {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(pt[0]), y(pt[1])))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`+"\n", color, strings.Join(pts, " "))
		ly := top + 10 + i*20
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="2"/>`+"\n", left+pw+15, ly, left+pw+35, ly, color)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d">%s</text>`+"\n", left+pw+40, ly+4, html.EscapeString(c.Label))
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

func duration(us float64) string {
	switch {
	case us >= 1e6:
		return fmt.Sprintf("%g s", us/1e6)
	case us >= 1e3:
		return fmt.Sprintf("%g ms", us/1e3)
	}
	return fmt.Sprintf("%g µs", us)
}
