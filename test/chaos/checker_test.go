package chaos

import (
	"strings"
	"testing"
	"time"
)

// These tests feed the checker synthetic histories: they show it can fail.

var t0 = time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)

func at(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }

func write(h *History, client, topic, value string, start, end int, out Outcome) {
	h.Add(Op{Kind: KindRetain, Client: client, Node: "node1", Topic: topic, Value: value, Start: at(start), End: at(end), Outcome: out})
}

func recv(h *History, seq, pubConn, subConn int) {
	h.Add(Op{Kind: KindStreamRecv, Client: "sub", Node: "node2", Topic: "chaos/stream", Publisher: "pub", Seq: seq, PubConn: pubConn, SubConn: subConn, Start: at(seq), End: at(seq), Outcome: OK})
}

func allNodes(values map[string]string) []FinalRead {
	return []FinalRead{{"node1", values}, {"node2", values}, {"node3", values}}
}

func hasViolation(r CheckResult, check string) bool {
	for _, v := range r.Violations {
		if v.Check == check {
			return true
		}
	}
	return false
}

func TestCheckerAcceptsValidHistory(t *testing.T) {
	var h History
	write(&h, "w1", "a", "w1-1", 0, 10, OK)
	write(&h, "w2", "a", "w2-1", 5, 15, OK)         // concurrent with w1-1: either may win
	write(&h, "w1", "b", "w1-2", 20, 30, OK)        // superseded by a later unknown write
	write(&h, "w2", "b", "w2-2", 40, 5000, Unknown) // outcome unknown: may be the final value
	write(&h, "w3", "c", "w3-1", 50, 60, Failed)    // failed and never applied: no value is fine
	for i := 1; i <= 5; i++ {
		recv(&h, i, 1, 1)
	}
	recv(&h, 5, 1, 1) // a QoS 1 duplicate
	recv(&h, 3, 1, 2) // a new subscriber connection starts its own order
	recv(&h, 7, 1, 2)
	for _, final := range []string{"w1-1", "w2-1"} {
		r := Check(h.Ops(), allNodes(map[string]string{"a": final, "b": "w2-2"}), nil)
		if len(r.Violations) != 0 || r.Lost != 0 || r.Reordered != 0 {
			t.Fatalf("final a=%s: violations on a valid history: %v", final, r.Violations)
		}
		if r.Duplicated != 1 {
			t.Fatalf("duplicated = %d, want 1", r.Duplicated)
		}
	}
}

func TestCheckerFindsLostAcknowledgedWrite(t *testing.T) {
	var h History
	write(&h, "w1", "a", "w1-1", 0, 10, OK)
	write(&h, "w1", "a", "w1-2", 20, 30, OK) // acknowledged, then lost: nodes still serve w1-1
	r := Check(h.Ops(), allNodes(map[string]string{"a": "w1-1"}), nil)
	if r.Lost != 1 || !hasViolation(r, "acked-retained-lost") {
		t.Fatalf("lost acknowledged write not reported: lost=%d %v", r.Lost, r.Violations)
	}
	if ex := r.Violations[0].String(); !strings.Contains(ex, "w1-2") || !strings.Contains(ex, "w1-1") {
		t.Fatalf("excerpt does not show the final and the lost write:\n%s", ex)
	}

	// The retained value vanished entirely.
	r = Check(h.Ops(), allNodes(map[string]string{}), nil)
	if r.Lost != 1 || !hasViolation(r, "acked-retained-lost") {
		t.Fatalf("vanished retained value not reported: %v", r.Violations)
	}
}

func TestCheckerFindsDivergentNodes(t *testing.T) {
	var h History
	write(&h, "w1", "a", "w1-1", 0, 10, OK)
	write(&h, "w2", "a", "w2-1", 5, 15, OK)
	finals := []FinalRead{{"node1", map[string]string{"a": "w1-1"}}, {"node2", map[string]string{"a": "w2-1"}}, {"node3", map[string]string{"a": "w1-1"}}}
	r := Check(h.Ops(), finals, nil)
	if r.Divergent != 1 || !hasViolation(r, "retained-identical") {
		t.Fatalf("divergent retained values not reported: %v", r.Violations)
	}
	// A value nobody wrote.
	r = Check(h.Ops(), allNodes(map[string]string{"a": "ghost"}), nil)
	if !hasViolation(r, "retained-phantom") {
		t.Fatalf("phantom value not reported: %v", r.Violations)
	}
}

func TestCheckerFindsReorderedStream(t *testing.T) {
	var h History
	recv(&h, 1, 1, 1)
	recv(&h, 3, 1, 1)
	recv(&h, 2, 1, 1) // overtaken by 3 on the same connections
	recv(&h, 4, 1, 1)
	r := Check(h.Ops(), nil, nil)
	if r.Reordered != 1 || !hasViolation(r, "stream-order") {
		t.Fatalf("reordering not reported: reordered=%d %v", r.Reordered, r.Violations)
	}
	ex := r.Violations[0].Excerpt
	if len(ex) != 2 || !strings.Contains(ex[0], "seq=3") || !strings.Contains(ex[1], "seq=2") {
		t.Fatalf("excerpt is not the two out-of-order receipts: %q", ex)
	}
}

// retainOn records a retained write through node.
func retainOn(h *History, client, node, value string, start, end int, out Outcome) {
	h.Add(Op{Kind: KindRetain, Client: client, Node: node, Topic: "chaos/ret/probe", Value: value, Start: at(start), End: at(end), Outcome: out})
}

// node2 is cut off from 0 to 10 s; node1 and node3 agree on a leader at 2 s.
var partitionFaults = []faultEvent{{Kind: FaultPartition, Node: "node2", Start: at(0), End: at(10000), MajorityLeader: at(2000)}}

func TestCheckerAcceptsPartitionHistory(t *testing.T) {
	var h History
	retainOn(&h, "w1", "node2", "a", -500, 5000, Unknown)   // began before the cut: not counted
	retainOn(&h, "probe", "node2", "b", 100, 5100, Failed)  // refused within the bound: judged, fine
	retainOn(&h, "w2", "node2", "c", 200, 5200, Unknown)    // the writer gave up at 5 s: counted, not judged
	retainOn(&h, "probe", "node2", "d", 5300, 5310, Failed) // heal within the bound: not judged
	retainOn(&h, "probe", "node2", "e", 9000, 10500, OK)    // acknowledged after the heal: allowed
	retainOn(&h, "w3", "node1", "f", 1000, 6000, Unknown)   // majority, before its leader: not judged
	retainOn(&h, "w3", "node1", "g", 2500, 2600, OK)
	retainOn(&h, "w1", "node3", "h", 9900, 10200, Failed) // majority, ends after the heal: not judged
	h.Add(Op{Kind: KindRetain, Client: "w2", Node: "node3", Topic: "chaos/ret/probe", Value: "i", Start: at(3000), End: at(3000), Outcome: Unknown,
		Err: "no connection available (" + serverDisconnect + " 0x8e)"}) // taken over: counted, not judged
	r := Check(h.Ops(), nil, partitionFaults)
	for _, v := range r.Violations {
		if strings.HasPrefix(v.Check, "minority") || strings.HasPrefix(v.Check, "majority") {
			t.Errorf("violation on a valid partition history: %s", v)
		}
	}
	p := r.Partition
	if p.Minority[Failed] != 2 || p.Minority[Unknown] != 1 || p.Minority[OK] != 1 || p.MinorityJudged != 1 {
		t.Errorf("minority = %v, judged %d; want failed 2, unknown 1, ok 1, judged 1", p.Minority, p.MinorityJudged)
	}
	if p.Majority[OK] != 1 || p.Majority[Unknown] != 1 || p.Majority[Failed] != 0 || p.MajorityTakenOver != 1 {
		t.Errorf("majority = %v, taken over %d; want one ok, one unknown taken over", p.Majority, p.MajorityTakenOver)
	}
	if p.MinorityMaxFail != 5 {
		t.Errorf("slowest minority failure %.3f s, want 5", p.MinorityMaxFail)
	}
}

func TestCheckerFindsPartitionViolations(t *testing.T) {
	for _, tc := range []struct {
		name, check string
		add         func(h *History)
	}{
		{"minority acknowledges", "minority-acked", func(h *History) { retainOn(h, "probe", "node2", "x", 500, 600, OK) }},
		{"minority hangs", "minority-hang", func(h *History) { retainOn(h, "probe", "node2", "x", 500, 9500, Unknown) }},
		{"minority fails slowly", "minority-hang", func(h *History) { retainOn(h, "probe", "node2", "x", 500, 8000, Failed) }},
		{"majority refuses", "majority-unavailable", func(h *History) { retainOn(h, "w1", "node3", "x", 3000, 3500, Failed) }},
		{"majority hangs", "majority-unavailable", func(h *History) { retainOn(h, "w1", "node1", "x", 3000, 8000, Unknown) }},
		{"majority loses its connection", "majority-unavailable", func(h *History) {
			h.Add(Op{Kind: KindRetain, Client: "w1", Node: "node1", Topic: "t", Value: "x", Start: at(3000), End: at(3000), Outcome: Unknown,
				Err: "no connection available (" + serverDisconnect + " 0x8b)"})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h History
			tc.add(&h)
			r := Check(h.Ops(), nil, partitionFaults)
			if len(r.Violations) != 1 || r.Violations[0].Check != tc.check {
				t.Fatalf("violations %v, want one %s", r.Violations, tc.check)
			}
			if ex := r.Violations[0].Excerpt; len(ex) != 2 || !strings.Contains(ex[0], "partition of node2") || !strings.Contains(ex[1], "value=x") {
				t.Errorf("excerpt is not the partition and the write: %q", ex)
			}
			// Without the fault log nothing is judged.
			if r := Check(h.Ops(), nil, nil); len(r.Violations) != 0 {
				t.Errorf("violations without a partition: %v", r.Violations)
			}
		})
	}
}
