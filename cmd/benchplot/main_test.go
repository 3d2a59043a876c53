package main

import (
	"strings"
	"testing"
)

func TestPlotDrawsEveryCurve(t *testing.T) {
	in := `round 1: {"label":"mochi","percentiles":[[0,80],[50,120],[99,900],[100,4000]]}
not a result
{"label":"a <b>","percentiles":[[0,100],[50,200],[99.99,30000],[100,50000]]}
{"label":"no percentiles"}
`
	curves, err := read(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	if len(curves) != 2 || curves[0].Label != "mochi" || curves[1].Label != "a <b>" {
		t.Fatalf("curves %+v", curves)
	}
	var b strings.Builder
	if err := plot(&b, "t", curves); err != nil {
		t.Fatal(err)
	}
	svg := b.String()
	if n := strings.Count(svg, "<polyline"); n != 2 {
		t.Fatalf("%d curves drawn, want 2", n)
	}
	if !strings.Contains(svg, "a &lt;b&gt;") || strings.Contains(svg, "a <b>") {
		t.Fatal("label not escaped")
	}
	if !strings.Contains(svg, ">10 µs<") || !strings.Contains(svg, ">100 ms<") {
		t.Fatal("latency axis does not span the data (10 µs to 100 ms)")
	}
}

func TestNines(t *testing.T) {
	for p, want := range map[float64]float64{0: 0, 90: 1, 99: 2, 99.99: 4, 100: maxNines} {
		if got := nines(p); got < want-1e-9 || got > want+1e-9 {
			t.Errorf("nines(%g) = %g, want %g", p, got, want)
		}
	}
}
