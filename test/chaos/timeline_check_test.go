package chaos

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

// svgElement is what the test reads of each element of the plot.
type svgElement struct {
	Name  string
	Attrs map[string]string
	Text  string
}

// parseSVG decodes the whole document (it must be well-formed XML with an
// svg root) and returns its elements in document order.
func parseSVG(t *testing.T, data []byte) []svgElement {
	t.Helper()
	dec := xml.NewDecoder(bytes.NewReader(data))
	var els []svgElement
	var stack []int
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed XML: %v\n%s", err, data)
		}
		switch tok := tok.(type) {
		case xml.StartElement:
			e := svgElement{Name: tok.Name.Local, Attrs: map[string]string{}}
			for _, a := range tok.Attr {
				e.Attrs[a.Name.Local] = a.Value
			}
			if len(els) == 0 && (e.Name != "svg" || tok.Name.Space != "http://www.w3.org/2000/svg") {
				t.Fatalf("root element is %v, want svg in the SVG namespace", tok.Name)
			}
			els = append(els, e)
			stack = append(stack, len(els)-1)
		case xml.EndElement:
			stack = stack[:len(stack)-1]
		case xml.CharData:
			if len(stack) > 0 {
				els[stack[len(stack)-1]].Text += string(tok)
			}
		}
	}
	if len(els) == 0 {
		t.Fatal("empty SVG")
	}
	return els
}

func TestTimelineSVG(t *testing.T) {
	origin := t0
	var h History
	// 12 s of history: 5 acknowledged operations per second, errors only
	// in seconds 3 and 4 (during the partition); stream receipts are not
	// operations the plot counts.
	for sec := 0; sec < 12; sec++ {
		for i := 0; i < 5; i++ {
			ms := sec*1000 + i*150
			h.Add(Op{Kind: KindRetain, Client: "w1", Node: "node1", Topic: "chaos/ret/0", Value: "v", Start: at(ms), End: at(ms + 20), Outcome: OK})
		}
		h.Add(Op{Kind: KindStreamRecv, Client: "sub", Node: "node2", Start: at(sec * 1000), End: at(sec * 1000), Outcome: OK})
	}
	h.Add(Op{Kind: KindRetain, Client: "w2", Node: "node2", Start: at(3000), End: at(3900), Outcome: Failed})
	h.Add(Op{Kind: KindStreamPub, Client: "p", Node: "node2", Start: at(3000), End: at(4500), Outcome: Unknown})
	h.Add(Op{Kind: KindRetain, Client: "w3", Node: "node2", Start: at(4000), End: at(4600), Outcome: Unknown})
	faults := []faultEvent{
		{Kind: FaultKill, Node: "node1", Start: at(1000), End: at(2500)},
		{Kind: FaultPartition, Node: "node2", Start: at(3000), End: at(5000)},
		{Kind: FaultPause, Node: "node3", Start: at(6000), End: at(6100)}, // narrower than a pixel
		{Kind: FaultRolling, Node: "all", Start: at(7000), End: at(9000)},
		{Kind: FaultRestartAll, Node: "all", Start: at(12500), End: at(13600), Err: "a <bad> & error"},
	}
	var buf bytes.Buffer
	if err := renderTimeline(&buf, "chaos seed 42 <&>", h.Ops(), faults, origin); err != nil {
		t.Fatal(err)
	}
	els := parseSVG(t, buf.Bytes())

	// One band per fault, with its kind and node, and a label naming both.
	var bands []svgElement
	labels := map[string]bool{}
	series := map[string]svgElement{}
	for _, e := range els {
		switch {
		case e.Name == "rect" && e.Attrs["class"] == "fault":
			bands = append(bands, e)
		case e.Name == "text" && e.Attrs["class"] == "fault-label":
			labels[e.Text] = true
		case e.Name == "polyline":
			series[e.Attrs["class"]] = e
		}
	}
	if len(bands) != len(faults) {
		t.Fatalf("%d fault bands, want %d", len(bands), len(faults))
	}
	for i, f := range faults {
		if bands[i].Attrs["data-kind"] != f.Kind || bands[i].Attrs["data-node"] != f.Node {
			t.Errorf("band %d is %s/%s, want %s/%s", i, bands[i].Attrs["data-kind"], bands[i].Attrs["data-node"], f.Kind, f.Node)
		}
		if w := bands[i].Attrs["width"]; w == "" || strings.HasPrefix(w, "0") || strings.HasPrefix(w, "-") {
			t.Errorf("band %d (%s) has width %q; every band must be visible", i, f.Kind, w)
		}
		if want := faultLabel(f); !labels[want] || !strings.Contains(want, f.Kind) || !strings.Contains(want, f.Node) {
			t.Errorf("no label %q among %v", want, labels)
		}
	}

	// The span covers the last fault (ends at 13.6 s): 14 one-second
	// points per series.
	const wantPoints = 14
	for _, class := range []string{"ok", "errors"} {
		pl, ok := series[class]
		if !ok {
			t.Fatalf("no %q series", class)
		}
		if pts := strings.Fields(pl.Attrs["points"]); len(pts) != wantPoints {
			t.Errorf("series %s has %d points, want %d", class, len(pts), wantPoints)
		}
	}

	// The counts behind the points.
	s := timelineBuckets(h.Ops(), faults, origin)
	if s.OK[0] != 5 || s.OK[11] != 5 || s.OK[12] != 0 {
		t.Errorf("acknowledged per second = %v, want 5 in seconds 0..11 and 0 after", s.OK)
	}
	if s.Errors[3] != 1 || s.Errors[4] != 2 || maxInt(s.Errors[5:]) != 0 || maxInt(s.Errors[:3]) != 0 {
		t.Errorf("errors per second = %v, want 1 in second 3 and 2 in second 4", s.Errors)
	}
	if !strings.Contains(buf.String(), "seed 42 &lt;&amp;&gt;") {
		t.Errorf("title not escaped")
	}
}

func TestTimelineSVGEmpty(t *testing.T) {
	// No operations and no faults still give a well-formed plot with one
	// point per series.
	var buf bytes.Buffer
	if err := renderTimeline(&buf, "empty", nil, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range parseSVG(t, buf.Bytes()) {
		if e.Name == "polyline" {
			n++
			if pts := strings.Fields(e.Attrs["points"]); len(pts) != 1 {
				t.Errorf("%d points, want 1", len(pts))
			}
		}
	}
	if n != 2 {
		t.Errorf("%d series, want 2", n)
	}
}
