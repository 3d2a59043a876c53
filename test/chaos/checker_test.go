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
		r := Check(h.Ops(), allNodes(map[string]string{"a": final, "b": "w2-2"}))
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
	r := Check(h.Ops(), allNodes(map[string]string{"a": "w1-1"}))
	if r.Lost != 1 || !hasViolation(r, "acked-retained-lost") {
		t.Fatalf("lost acknowledged write not reported: lost=%d %v", r.Lost, r.Violations)
	}
	if ex := r.Violations[0].String(); !strings.Contains(ex, "w1-2") || !strings.Contains(ex, "w1-1") {
		t.Fatalf("excerpt does not show the final and the lost write:\n%s", ex)
	}

	// The retained value vanished entirely.
	r = Check(h.Ops(), allNodes(map[string]string{}))
	if r.Lost != 1 || !hasViolation(r, "acked-retained-lost") {
		t.Fatalf("vanished retained value not reported: %v", r.Violations)
	}
}

func TestCheckerFindsDivergentNodes(t *testing.T) {
	var h History
	write(&h, "w1", "a", "w1-1", 0, 10, OK)
	write(&h, "w2", "a", "w2-1", 5, 15, OK)
	finals := []FinalRead{{"node1", map[string]string{"a": "w1-1"}}, {"node2", map[string]string{"a": "w2-1"}}, {"node3", map[string]string{"a": "w1-1"}}}
	r := Check(h.Ops(), finals)
	if r.Divergent != 1 || !hasViolation(r, "retained-identical") {
		t.Fatalf("divergent retained values not reported: %v", r.Violations)
	}
	// A value nobody wrote.
	r = Check(h.Ops(), allNodes(map[string]string{"a": "ghost"}))
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
	r := Check(h.Ops(), nil)
	if r.Reordered != 1 || !hasViolation(r, "stream-order") {
		t.Fatalf("reordering not reported: reordered=%d %v", r.Reordered, r.Violations)
	}
	ex := r.Violations[0].Excerpt
	if len(ex) != 2 || !strings.Contains(ex[0], "seq=3") || !strings.Contains(ex[1], "seq=2") {
		t.Fatalf("excerpt is not the two out-of-order receipts: %q", ex)
	}
}
