package chaos

import (
	"fmt"
	"slices"
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

// Persistent sessions and wills.

func sessConnect(h *History, sub string, clean, present bool, ms int) {
	h.Add(Op{Kind: KindSessConnect, Client: sub, Node: "node1", Start: at(ms), End: at(ms + 5), Outcome: OK,
		CleanStart: clean, Expiry: sessExpiry, SessionPresent: present})
}

func sessSubscribe(h *History, sub string, ms int) {
	for _, f := range sessFilters {
		h.Add(Op{Kind: KindSessSub, Client: sub, Node: "node1", Topic: f.Topic, QoS: f.QoS, Start: at(ms), End: at(ms + 5), Outcome: OK})
	}
}

// sessPub records pub:seq, at QoS 1 to sessTopicQ1 or at QoS 2 to sessTopicQ2.
func sessPub(h *History, pub string, seq int, qos byte, start, end int, out Outcome) {
	h.Add(Op{Kind: KindSessPub, Client: pub, Node: "node2", Topic: sessTopic(qos), QoS: qos, Publisher: pub, Seq: seq,
		Value: fmt.Sprintf("%s:%d", pub, seq), Start: at(start), End: at(end), Outcome: out})
}

func sessRecv(h *History, sub, pub string, seq int, qos byte, dup bool, ms int) {
	sessRecvOn(h, sub, "node3", 1, pub, seq, qos, dup, ms)
}

// sessRecvOn is sessRecv on the subscriber's connection epoch through node.
func sessRecvOn(h *History, sub, node string, epoch int, pub string, seq int, qos byte, dup bool, ms int) {
	h.Add(Op{Kind: KindSessRecv, Client: sub, Node: node, Topic: sessTopic(qos), QoS: qos, Dup: dup, Publisher: pub, Seq: seq,
		Value: fmt.Sprintf("%s:%d", pub, seq), Start: at(ms), End: at(ms), Outcome: OK, SubConn: epoch})
}

func sessTopic(qos byte) string {
	if qos == 2 {
		return sessTopicQ2
	}
	return sessTopicQ1
}

// validSessionHistory: s1 subscribes at 10 ms; p publishes 1..6 while s1
// moves once and resumes its session. Every acknowledged message after
// SUBACK arrives (a QoS 1 one twice), first receipts in publish order; an
// unknown one arrives late, a refused one never.
func validSessionHistory() *History {
	h := &History{}
	sessConnect(h, "s1", true, false, 0)
	sessSubscribe(h, "s1", 10)
	sessPub(h, "early", 1, 1, 0, 5, OK) // acknowledged before SUBACK: not owed to s1
	sessPub(h, "p", 1, 1, 100, 110, OK)
	sessPub(h, "p", 2, 2, 120, 130, OK)
	sessPub(h, "p", 3, 1, 140, 5140, Unknown) // may be committed at any later time
	sessPub(h, "p", 4, 2, 5200, 5210, OK)
	sessPub(h, "p", 5, 1, 5220, 5230, Failed) // refused
	sessPub(h, "p", 6, 1, 5240, 5250, OK)
	sessRecv(h, "s1", "p", 1, 1, false, 115)
	sessRecv(h, "s1", "p", 2, 2, false, 135)
	sessConnect(h, "s1", false, true, 200)  // resumed on another node
	sessRecv(h, "s1", "p", 1, 1, true, 210) // resent QoS 1: a duplicate, allowed
	sessRecv(h, "s1", "p", 4, 2, false, 5215)
	sessRecv(h, "s1", "p", 3, 1, false, 5216) // the unknown one, committed after 4
	sessRecv(h, "s1", "p", 6, 1, false, 5255)
	return h
}

func TestCheckerAcceptsSessionHistory(t *testing.T) {
	r := Check(validSessionHistory().Ops(), nil, nil)
	if len(r.Violations) != 0 {
		t.Fatalf("violations on a valid session history: %v", r.Violations)
	}
	s := r.Sessions
	if s.Expected != 4 || s.Delivered != 5 || s.Received != 6 || s.Lost != 0 || s.DuplicatedQoS1 != 1 || s.DuplicatedQoS2 != 0 ||
		s.Redelivered != 1 || s.Reconnects != 1 || s.NotPresent != 0 || s.PublishedQoS1[OK] != 3 || s.PublishedQoS2[OK] != 2 {
		t.Errorf("counts %+v", s)
	}
	// Away longer than its session expiry: a new session is allowed.
	h := validSessionHistory()
	sessConnect(h, "s1", false, false, 5255+sessExpiry*1000+1000)
	if r := Check(h.Ops(), nil, nil); len(r.Violations) != 0 || r.Sessions.Reconnects != 2 {
		t.Errorf("resume after the session expired: %d resumes, violations %v", r.Sessions.Reconnects, r.Violations)
	}
}

func TestCheckerFindsSessionViolations(t *testing.T) {
	// node3, which delivered everything so far, is killed at 5.3 s.
	kill := []faultEvent{{Kind: FaultKill, Node: "node3", Start: at(5300), End: at(6000)}}
	for _, tc := range []struct {
		name, check string
		known       string // the known bug's signature it must have ("": none, it fails the run)
		faults      []faultEvent
		add         func(h *History)
	}{
		{"acknowledged message never received", "session-acked-lost", "", nil, func(h *History) {
			sessPub(h, "p", 7, 2, 6000, 6010, OK)
		}},
		{"QoS 2 message received twice", "qos2-duplicate", "", nil, func(h *History) {
			sessRecv(h, "s1", "p", 4, 2, true, 6000) // resent and not recognised by the client
		}},
		{"QoS 2 message received twice on one connection", "qos2-duplicate", "", kill, func(h *History) {
			sessRecv(h, "s1", "p", 4, 2, true, 5250)
		}},
		// The client completed the exchange, forgot the packet id, and the
		// node that resumed the session resent the message (the bug found
		// at 5f95c64: PUBREL before QueueRelease was committed).
		{"QoS 2 message resent after its node was killed", "qos2-duplicate", "", kill, func(h *History) {
			sessConnect(h, "s1", false, true, 5400)
			sessRecvOn(h, "s1", "node1", 2, "p", 4, 2, true, 5410)
		}},
		{"QoS 2 message resent without DUP", "qos2-duplicate", "", kill, func(h *History) {
			sessConnect(h, "s1", false, true, 5400)
			sessRecvOn(h, "s1", "node1", 2, "p", 4, 2, false, 5410)
		}},
		{"acknowledged message overtaken", "session-order", "", nil, func(h *History) {
			sessPub(h, "q", 1, 1, 6000, 6010, OK)
			sessPub(h, "q", 2, 1, 6020, 6030, OK)
			sessRecv(h, "s1", "q", 2, 1, false, 6040)
			sessRecv(h, "s1", "q", 1, 1, false, 6041)
		}},
		{"session gone on resume", "session-not-present", "", nil, func(h *History) {
			sessConnect(h, "s1", false, false, 6000)
		}},
		{"session served without replication", "session-not-present", "", nil, func(h *History) {
			sessConnect(h, "s1", false, false, 6000)
			h.Add(Op{Kind: KindNodeNote, Client: "s1", Node: "node1", Value: noteServedLocally, Start: at(6003), End: at(6003), Outcome: OK})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := validSessionHistory()
			tc.add(h)
			r := Check(h.Ops(), nil, tc.faults)
			if len(r.Violations) != 1 || r.Violations[0].Check != tc.check || r.Violations[0].Known != tc.known {
				t.Fatalf("violations %v, want one %s (known issue %q)", r.Violations, tc.check, tc.known)
			}
			if failing := len(r.Failing()); (tc.known == "") != (failing == 1) || r.KnownIssues[tc.known] != 1-failing {
				t.Errorf("%d failing, known issues %v", failing, r.KnownIssues)
			}
			t.Logf("reported: %s", r.Violations[0])
		})
	}
}

// willConnect records a will client's connection to node (a persistent
// session); armed < 0: the will was never seen in the log; end < 0: still
// connected at the end.
func willConnect(h *History, client, node, payload string, connected, armed, end int) {
	topic := willPrefix + client
	h.Add(Op{Kind: KindWillConnect, Client: client, Node: node, Topic: topic, Value: payload, Expiry: sessExpiry,
		Start: at(connected - 5), End: at(connected), Outcome: OK})
	if armed >= 0 {
		h.Add(Op{Kind: KindWillArmed, Client: client, Node: node, Topic: topic, Value: payload, Start: at(armed), End: at(armed), Outcome: OK})
	}
	if end >= 0 {
		h.Add(Op{Kind: KindWillEnd, Client: client, Node: node, Topic: topic, Value: payload, Start: at(end), End: at(end), Outcome: OK, Err: "connection lost"})
	}
}

func willRecv(h *History, payload string, ms int) {
	client, _, _ := strings.Cut(payload, ":")
	h.Add(Op{Kind: KindWillRecv, Client: willWatcher, Node: "node3", Topic: willPrefix + client, QoS: 2, Value: payload, Start: at(ms), End: at(ms), Outcome: OK})
}

// willFaults: node1 killed at 1 s, node2 paused at 2 s, a rolling restart
// at 3 s.
var willFaults = []faultEvent{
	{Kind: FaultKill, Node: "node1", Start: at(1000), End: at(1500)},
	{Kind: FaultPause, Node: "node2", Start: at(2000), End: at(2500)},
	{Kind: FaultRolling, Node: "all", Start: at(3000), End: at(3500)},
}

// validWillHistory: w1 killed with node1 (will delivered once), w2 paused
// with node2 (will delivered), w3 paused (not delivered: may), w4 on node1
// but its will not yet in the log at the kill (not delivered: may), w5
// moved by the rolling restart (to a connection after it), w6 connected
// after the rolling restart, untouched.
func validWillHistory() *History {
	h := &History{}
	willConnect(h, "w1", "node1", "w1:1", 100, 150, 1010)
	willConnect(h, "w2", "node2", "w2:1", 100, 150, 2010)
	willConnect(h, "w3", "node2", "w3:1", 100, 150, -1)
	willConnect(h, "w4", "node1", "w4:1", 990, -1, 1010)
	willConnect(h, "w5", "node3", "w5:1", 100, 150, 3100)
	willConnect(h, "w5", "node1", "w5:2", 3600, 3650, -1)
	willConnect(h, "w6", "node3", "w6:1", 3600, 3650, -1)
	willRecv(h, "w1:1", 4000)
	willRecv(h, "w2:1", 5000)
	return h
}

func TestCheckerAcceptsWillHistory(t *testing.T) {
	r := Check(validWillHistory().Ops(), nil, willFaults)
	if len(r.Violations) != 0 {
		t.Fatalf("violations on a valid will history: %v", r.Violations)
	}
	w := r.Wills
	if w.Connections != 7 || w.Armed != 6 || w.Expected != 1 || w.MayFire != 3 || w.Rolling != 1 || w.Received != 2 ||
		w.Delivered != 2 || w.Duplicated != 0 || w.Missing != 0 || w.Unexpected != 0 {
		t.Errorf("counts %+v", w)
	}
	// A will of a client no fault touched is counted.
	h := validWillHistory()
	willRecv(h, "w6:1", 6000)
	if r := Check(h.Ops(), nil, willFaults); r.Wills.Unexpected != 1 || len(r.Violations) != 0 {
		t.Errorf("unexpected will: counted %d, violations %v", r.Wills.Unexpected, r.Violations)
	}
}

func TestCheckerFindsWillViolations(t *testing.T) {
	for _, tc := range []struct {
		name, check string
		known       string
		want        int // violations
		faults      []faultEvent
		add         func(h *History)
	}{
		{"will of a killed client delivered twice", "will-duplicate", "", 1, willFaults, func(h *History) { willRecv(h, "w1:1", 4100) }},
		{"will of a paused client delivered twice", "will-duplicate", "", 1, willFaults, func(h *History) { willRecv(h, "w2:1", 5100) }},
		// A clean session's will, published by the leader while node2 was
		// paused, then by mochi when the connection closed at 2.5 s.
		{"clean session's will twice after a pause", "will-duplicate", "", 1, willFaults, func(h *History) {
			h.Add(Op{Kind: KindWillConnect, Client: "w7", Node: "node2", Topic: willPrefix + "w7", Value: "w7:1", Start: at(100), End: at(105), Outcome: OK})
			h.Add(Op{Kind: KindWillEnd, Client: "w7", Node: "node2", Topic: willPrefix + "w7", Value: "w7:1", Start: at(2500), End: at(2500), Outcome: OK, Err: "connection lost"})
			willRecv(h, "w7:1", 2200)
			willRecv(h, "w7:1", 2600)
		}},
		// A QoS 1 will received twice without DUP: published twice.
		{"QoS 1 will twice without DUP", "will-duplicate", "", 1, willFaults, func(h *History) {
			h.Add(Op{Kind: KindWillRecv, Client: willWatcher, Node: "node3", Topic: willPrefix + "w1", QoS: 1, Value: "w1:1", Start: at(4100), End: at(4100), Outcome: OK})
		}},
		// The same with DUP set: the watcher's resumed session got it again
		// (at least once), which is not a second publication.
		{"QoS 1 will redelivered with DUP", "", "", 0, willFaults, func(h *History) {
			h.Add(Op{Kind: KindWillRecv, Client: willWatcher, Node: "node1", Topic: willPrefix + "w1", QoS: 1, Dup: true, Value: "w1:1", Start: at(4100), End: at(4100), Outcome: OK})
		}},
		{"will of a killed client missing", "will-missing", "", 1, willFaults, func(h *History) {
			willConnect(h, "w7", "node1", "w7:1", 500, 600, 1020)
		}},
		// w3 was paused with node2 without its will firing, then killed
		// with it: its will is owed, as is w7's.
		{"will missing after a kill that follows a pause", "will-missing", "", 2, append(willFaults[:2:2],
			faultEvent{Kind: FaultKill, Node: "node2", Start: at(4000), End: at(4500)}), func(h *History) {
			willConnect(h, "w7", "node2", "w7:1", 500, 600, 4020)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := validWillHistory()
			tc.add(h)
			r := Check(h.Ops(), nil, tc.faults)
			if len(r.Violations) != tc.want {
				t.Fatalf("violations %v, want %d %s", r.Violations, tc.want, tc.check)
			}
			for _, v := range r.Violations {
				if v.Check != tc.check || v.Known != tc.known {
					t.Fatalf("violation %s, want %s (known issue %q)", v, tc.check, tc.known)
				}
				t.Logf("reported: %s", v)
			}
		})
	}
	// Without the kill nothing is owed.
	h := validWillHistory()
	willConnect(h, "w7", "node1", "w7:1", 500, 600, -1)
	if r := Check(h.Ops(), nil, willFaults[1:]); len(r.Violations) != 0 {
		t.Errorf("violations without the kill: %v", r.Violations)
	}
}

// The workload added against the review: persistent QoS 2 publishers,
// publishes right after a restart, MQTT 3.1.1 sessions, availability
// topics, graceful stops and clients that switch to a clean session.

// ppubHistory: the persistent publisher "sess-ppub5" (MQTT 5 session)
// publishes 1 on node2; its connection is lost while 2 is in flight, it
// resumes on node1 and 2 completes there (resent by the client); s1
// received both once. fresh-pub1 published 1 right after node3 restarted.
func ppubHistory() *History {
	h := validSessionHistory()
	h.Add(Op{Kind: KindSessConnect, Client: ppubV5, Node: "node2", Start: at(6000), End: at(6005), Outcome: OK, CleanStart: true, Expiry: sessExpiry})
	h.Add(Op{Kind: KindSessPub, Client: ppubV5, Node: "node2", Topic: sessTopicQ2, QoS: 2, Publisher: ppubV5, Seq: 1, Value: ppubV5 + ":1",
		Start: at(6010), End: at(6020), Outcome: OK})
	h.Add(Op{Kind: KindSessConnect, Client: ppubV5, Node: "node1", Start: at(6100), End: at(6105), Outcome: OK, Expiry: sessExpiry, SessionPresent: true})
	h.Add(Op{Kind: KindSessPub, Client: ppubV5, Node: "node2", Topic: sessTopicQ2, QoS: 2, Publisher: ppubV5, Seq: 2, Value: ppubV5 + ":2",
		Start: at(6030), End: at(6110), Outcome: OK, Err: "completed after resuming the session on node1"})
	h.Add(Op{Kind: KindSessPub, Client: freshPub + "1", Node: "node3", Topic: sessTopicQ1, QoS: 1, Publisher: freshPub + "1", Seq: 1,
		Value: freshPub + "1:1", Start: at(6200), End: at(6210), Outcome: OK, Err: "published right after a restart after SIGKILL"})
	sessRecv(h, "s1", ppubV5, 1, 2, false, 6025)
	sessRecv(h, "s1", ppubV5, 2, 2, false, 6115)
	sessRecv(h, "s1", freshPub+"1", 1, 1, false, 6220)
	return h
}

func TestCheckerAcceptsPersistentPublisherHistory(t *testing.T) {
	r := Check(ppubHistory().Ops(), nil, nil)
	if len(r.Violations) != 0 {
		t.Fatalf("violations: %v", r.Violations)
	}
	s := r.Sessions
	if s.PersistentQoS2[OK] != 2 || s.CompletedAfterResume != 1 || s.PublisherResumes != 1 || s.Fresh[OK] != 1 || s.FreshExpected != 1 {
		t.Errorf("counts %+v", s)
	}
}

func TestCheckerFindsNewWorkloadViolations(t *testing.T) {
	for _, tc := range []struct {
		name, check string
		add         func(h *History)
	}{
		// Guarantee 1, exactly once: the resent QoS 2 message (DUP, on the
		// node the publisher resumed on) reached the application again.
		{"persistent publisher's resent QoS 2 message delivered twice", "qos2-duplicate", func(h *History) {
			sessRecvOn(h, "s1", "node1", 2, ppubV5, 2, 2, true, 6300)
		}},
		{"message completed after the publisher resumed never delivered", "session-acked-lost", func(h *History) {
			h.Add(Op{Kind: KindSessPub, Client: ppubV5, Node: "node1", Topic: sessTopicQ2, QoS: 2, Publisher: ppubV5, Seq: 3, Value: ppubV5 + ":3",
				Start: at(6120), End: at(6400), Outcome: OK, Err: "completed after resuming the session on node3"})
		}},
		{"persistent publisher's session gone on resume", "session-not-present", func(h *History) {
			h.Add(Op{Kind: KindSessConnect, Client: ppubV5, Node: "node3", Start: at(6500), End: at(6505), Outcome: OK, Expiry: sessExpiry})
		}},
		{"MQTT 3.1.1 publisher's session gone on resume", "session-not-present", func(h *History) {
			h.Add(Op{Kind: KindSessConnect, Client: ppubV311, Node: "node1", Start: at(6000), End: at(6005), Outcome: OK, Proto: 4})
			h.Add(Op{Kind: KindSessConnect, Client: ppubV311, Node: "node2", Start: at(6500), End: at(6505), Outcome: OK, Proto: 4})
		}},
		// Guarantee 1 right after a restart: the restarted node
		// acknowledged a message for a subscription it had not applied.
		{"publish right after a restart acknowledged and lost", "session-acked-lost", func(h *History) {
			h.Add(Op{Kind: KindSessPub, Client: freshPub + "2", Node: "node3", Topic: sessTopicQ2, QoS: 2, Publisher: freshPub + "2", Seq: 1,
				Value: freshPub + "2:1", Start: at(6600), End: at(6610), Outcome: OK, Err: "published right after SIGCONT"})
		}},
		// MQTT 3.1.1 persistent subscriber: an acknowledged message lost.
		{"MQTT 3.1.1 subscriber misses a message", "session-acked-lost", func(h *History) {
			h.Add(Op{Kind: KindSessConnect, Client: sessSubV311, Node: "node1", Start: at(20), End: at(25), Outcome: OK, Proto: 4})
			for _, f := range sessFilters {
				h.Add(Op{Kind: KindSessSub, Client: sessSubV311, Node: "node1", Topic: f.Topic, QoS: f.QoS, Start: at(30), End: at(35), Outcome: OK})
			}
			h.Add(Op{Kind: KindSessConnect, Client: sessSubV311, Node: "node2", Start: at(40), End: at(45), Outcome: OK, Proto: 4, SessionPresent: true})
			// p:6 (acknowledged) never arrives.
			sessRecvOn(h, sessSubV311, "node2", 2, "p", 1, 1, false, 5300)
			sessRecvOn(h, sessSubV311, "node2", 2, "p", 2, 2, false, 5301)
			sessRecvOn(h, sessSubV311, "node2", 2, "p", 4, 2, false, 5302)
			sessRecvOn(h, sessSubV311, "node2", 2, ppubV5, 1, 2, false, 6030)
			sessRecvOn(h, sessSubV311, "node2", 2, ppubV5, 2, 2, false, 6120)
			sessRecvOn(h, sessSubV311, "node2", 2, freshPub+"1", 1, 1, false, 6230)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := ppubHistory()
			tc.add(h)
			r := Check(h.Ops(), nil, nil)
			n := 0
			for _, v := range r.Violations {
				if v.Check != tc.check || v.Known != "" {
					t.Fatalf("violation %s, want only %s", v, tc.check)
				}
				n++
				t.Logf("reported: %s", v)
			}
			if n != 1 {
				t.Fatalf("violations %v, want one %s", r.Violations, tc.check)
			}
		})
	}
}

// availHistory: avail1 (node1) is killed with node1 at 1 s, its will
// armed; avail2 (node3) drops its own connection at 1.2 s; avail3
// (node3) gets DISCONNECT 0x8B in the rolling restart at 3.2 s and is back
// on node2 at 3.4 s. Readings at 4 s on every node.
func availHistory(serve1, serve2 string) *History {
	h := &History{}
	add := func(client, node, payload string, connected, end int, why string) {
		topic := availPrefix + client
		h.Add(Op{Kind: KindWillConnect, Client: client, Node: node, Topic: topic, Value: payload, Start: at(connected - 5), End: at(connected), Outcome: OK})
		h.Add(Op{Kind: KindAvailOnline, Client: client, Node: node, Topic: topic, Value: "online" + strings.TrimPrefix(payload, "offline"),
			Start: at(connected + 1), End: at(connected + 10), Outcome: OK})
		h.Add(Op{Kind: KindWillArmed, Client: client, Node: node, Topic: topic, Value: payload, Start: at(connected + 20), End: at(connected + 20), Outcome: OK})
		if end >= 0 {
			h.Add(Op{Kind: KindWillEnd, Client: client, Node: node, Topic: topic, Value: payload, Start: at(end), End: at(end), Outcome: OK, Err: why})
		}
	}
	add("avail1", "node1", "offline avail1:1", 100, 1010, "connection lost")
	add("avail2", "node3", "offline avail2:1", 100, 1200, dropByClient)
	add("avail3", "node3", "offline avail3:1", 100, 3200, serverDisconnect+" 0x8b")
	add("avail3", "node2", "offline avail3:2", 3400, -1, "")
	willRecv(h, "offline avail1:1", 1500)
	willRecv(h, "offline avail2:1", 1300)
	for _, n := range []string{"node1", "node2", "node3"} {
		h.Add(Op{Kind: KindAvailRead, Client: "avail-reader", Node: n, Topic: availPrefix + "#", Value: "after the heal", Start: at(4000), End: at(4100), Outcome: OK,
			Values: map[string]string{availPrefix + "avail1": serve1, availPrefix + "avail2": serve2, availPrefix + "avail3": "online avail3:2"}})
	}
	return h
}

func TestCheckerAvailability(t *testing.T) {
	r := Check(availHistory("offline avail1:1", "offline avail2:1").Ops(), nil, willFaults)
	if len(r.Violations) != 0 {
		t.Fatalf("violations on a valid history: %v", r.Violations)
	}
	if a := r.Avail; a.Reads != 3 || a.Judged != 6 || a.Dropped != 1 || a.Online[OK] != 4 || r.Wills.Expected != 2 || r.Wills.GracefulJudged != 1 {
		t.Errorf("counts %+v, wills %+v", a, r.Wills)
	}
	for _, tc := range []struct {
		name, check string
		want        int
		h           *History
	}{
		{"killed client's retained will not served", "retained-will-missing", 3, availHistory("online avail1:1", "offline avail2:1")},
		{"dropped client's retained will not served", "retained-will-missing", 3, availHistory("offline avail1:1", "online avail2:1")},
		{"dropped client's will never published", "will-missing", 1, func() *History {
			h := &History{}
			for _, o := range availHistory("offline avail1:1", "offline avail2:1").Ops() {
				if o.Kind != KindWillRecv || o.Value != "offline avail2:1" {
					h.Add(o)
				}
			}
			return h
		}()},
		{"retained will published twice", "will-duplicate", 1, func() *History {
			h := availHistory("offline avail1:1", "offline avail2:1")
			willRecv(h, "offline avail2:1", 2000)
			return h
		}()},
		{"will of a client back after a graceful stop", "will-on-graceful-stop", 1, func() *History {
			h := availHistory("offline avail1:1", "offline avail2:1")
			willRecv(h, "offline avail3:1", 3500)
			return h
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := Check(tc.h.Ops(), nil, willFaults)
			if len(r.Violations) != tc.want {
				t.Fatalf("violations %v, want %d %s", r.Violations, tc.want, tc.check)
			}
			for _, v := range r.Violations {
				if v.Check != tc.check {
					t.Fatalf("violation %s, want %s", v, tc.check)
				}
			}
			t.Logf("reported: %s", r.Violations[0])
		})
	}
	// The will of an MQTT 5 will client back after a graceful stop.
	h := validWillHistory()
	h.Add(Op{Kind: KindWillEnd, Client: "w6", Node: "node3", Topic: willPrefix + "w6", Value: "w6:1", Start: at(3700), End: at(3700), Outcome: OK,
		Err: serverDisconnect + " 0x8b"})
	willConnect(h, "w6", "node1", "w6:2", 3900, 3950, -1)
	willRecv(h, "w6:1", 4500)
	r = Check(h.Ops(), nil, willFaults)
	if len(r.Violations) != 1 || r.Violations[0].Check != "will-on-graceful-stop" {
		t.Fatalf("violations %v, want one will-on-graceful-stop", r.Violations)
	}
	t.Logf("reported: %s", r.Violations[0])
	// Delivered while the connection was still up (its node was cut off
	// before, seed 56249839): not the stop's doing, not judged here.
	h = validWillHistory()
	willRecv(h, "w6:1", 3600)
	h.Add(Op{Kind: KindWillEnd, Client: "w6", Node: "node3", Topic: willPrefix + "w6", Value: "w6:1", Start: at(3700), End: at(3700), Outcome: OK,
		Err: serverDisconnect + " 0x8b"})
	willConnect(h, "w6", "node1", "w6:2", 3900, 3950, -1)
	r = Check(h.Ops(), nil, willFaults)
	for _, v := range r.Violations {
		if v.Check == "will-on-graceful-stop" {
			t.Fatalf("a will delivered before the stop counted as fired by it: %v", v)
		}
	}
}

// switchHistory: switch5 subscribes (persistent), goes offline, gets m1
// and m2 acknowledged (m3 unknown), connects with a clean session, then
// resumes with session present 0 and receives only its marker.
func switchHistory() *History {
	h := &History{}
	topic := switchPrefix + switchV5
	h.Add(Op{Kind: KindSwitchConnect, Client: switchV5, Node: "node1", Start: at(0), End: at(5), Outcome: OK, CleanStart: true, Expiry: sessExpiry})
	for i, out := range []Outcome{OK, OK, Unknown} {
		h.Add(Op{Kind: KindSwitchPub, Client: switchPub, Topic: topic, QoS: 1, Seq: i + 1, Value: fmt.Sprintf("%s:%d", switchV5, i+1),
			Start: at(100 + 10*i), End: at(105 + 10*i), Outcome: out})
	}
	h.Add(Op{Kind: KindSwitchConnect, Client: switchV5, Node: "node2", Start: at(200), End: at(205), Outcome: OK, CleanStart: true})
	h.Add(Op{Kind: KindSwitchConnect, Client: switchV5, Node: "node3", Start: at(300), End: at(305), Outcome: OK, Expiry: sessExpiry})
	return h
}

func TestCheckerSwitchingClients(t *testing.T) {
	if r := Check(switchHistory().Ops(), nil, nil); len(r.Violations) != 0 || r.Switch.Judged != 1 || r.Switch.StaleJudged != 2 {
		t.Fatalf("valid history: violations %v, counts %+v", r.Violations, r.Switch)
	}
	for _, tc := range []struct {
		name, check string
		add         func(h *History)
	}{
		{"resume after a clean session finds the old session", "clean-start-session-present", func(h *History) {
			ops := h.Ops()
			*h = History{}
			for _, o := range ops {
				if o.Kind == KindSwitchConnect && o.Start.Equal(at(300)) {
					o.SessionPresent = true
				}
				h.Add(o)
			}
		}},
		{"queued message delivered after a clean session", "clean-start-kept-queue", func(h *History) {
			h.Add(Op{Kind: KindSwitchRecv, Client: switchV5, Topic: switchPrefix + switchV5, Value: switchV5 + ":2", QoS: 1, Start: at(310), End: at(310), Outcome: OK})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := switchHistory()
			tc.add(h)
			r := Check(h.Ops(), nil, nil)
			if len(r.Violations) != 1 || r.Violations[0].Check != tc.check {
				t.Fatalf("violations %v, want one %s", r.Violations, tc.check)
			}
			if v := r.Violations[0]; v.Known != "" || len(r.Failing()) != 1 {
				t.Errorf("known %q, failing %d", v.Known, len(r.Failing()))
			}
			t.Logf("reported: %s", r.Violations[0])
		})
	}
	// A fault between the clean connection and the resume excuses nothing:
	// a retried open answers what its first try answered.
	hf := switchHistory()
	ops := hf.Ops()
	*hf = History{}
	for _, o := range ops {
		if o.Kind == KindSwitchConnect && o.Start.Equal(at(300)) {
			o.SessionPresent = true
		}
		hf.Add(o)
	}
	kill := []faultEvent{{Kind: FaultKill, Node: "node2", Start: at(250), End: at(400)}}
	if r := Check(hf.Ops(), nil, kill); len(r.Violations) != 1 || r.Violations[0].Check != "clean-start-session-present" || len(r.Failing()) != 1 {
		t.Errorf("session present across a fault: violations %v, failing %d", r.Violations, len(r.Failing()))
	}
	// A failed persistent attempt between the clean connection and the
	// resume may have opened the session (refused after an unknown write,
	// CONNACK lost): the resume is not judged.
	hu := &History{}
	for _, o := range switchHistory().Ops() {
		if o.Kind == KindSwitchConnect && o.Start.Equal(at(300)) {
			hu.Add(Op{Kind: KindSwitchConnect, Client: switchV5, Node: "node1", Start: at(250), End: at(260), Outcome: Unknown, Expiry: sessExpiry})
			o.SessionPresent = true
		}
		hu.Add(o)
	}
	if r := Check(hu.Ops(), nil, nil); len(r.Violations) != 0 || r.Switch.Judged != 0 {
		t.Errorf("resume after an unknown attempt: violations %v, judged %d", r.Violations, r.Switch.Judged)
	}
	// The message whose outcome was unknown may be delivered.
	h := switchHistory()
	h.Add(Op{Kind: KindSwitchRecv, Client: switchV5, Topic: switchPrefix + switchV5, Value: switchV5 + ":3", QoS: 1, Start: at(310), End: at(310), Outcome: OK})
	if r := Check(h.Ops(), nil, nil); len(r.Violations) != 0 {
		t.Errorf("violations for an unknown message: %v", r.Violations)
	}
}

// TestCheckerDropRightAfterCut: a client that drops its connection just
// after its node's cut healed (the node has no raft leader yet) and
// connects again elsewhere: its old will is not judged as due (seeds
// 20261127, 20261209); without the cut it is.
func TestCheckerDropRightAfterCut(t *testing.T) {
	hist := func() *History {
		h := &History{}
		for _, o := range availHistory("offline avail1:1", "offline avail2:1").Ops() {
			if o.Kind != KindWillRecv || o.Value != "offline avail2:1" {
				h.Add(o)
			}
		}
		h.Add(Op{Kind: KindWillConnect, Client: "avail2", Node: "node1", Topic: availPrefix + "avail2", Value: "offline avail2:2",
			Start: at(1400), End: at(1450), Outcome: OK})
		return h
	}
	cut := append(slices.Clone(willFaults), faultEvent{Kind: FaultPartition, Node: "node3", Start: at(-3000), End: at(800)})
	for _, v := range Check(hist().Ops(), nil, cut).Violations {
		if v.Check == "will-missing" {
			t.Fatalf("will judged as due although the node was just back from a cut: %v", v)
		}
	}
	missing := 0
	for _, v := range Check(hist().Ops(), nil, willFaults).Violations {
		if v.Check == "will-missing" {
			missing++
		}
	}
	if missing != 1 {
		t.Fatalf("without the cut the dropped client's will is due: %d will-missing", missing)
	}
}

// rrRoundAt adds one request/response round to h: the requester on x
// subscribes at start ms, the responder on y publishes at QoS 1 right
// after SUBACK, and the reply arrives (received) or the wait ends at
// start+4100 ms without it.
func rrRoundAt(h *History, round, start int, x, y string, received bool) {
	topic := fmt.Sprintf("%s%s/%d", rrPrefix, rrClean, round)
	h.Add(Op{Kind: KindRRSub, Client: rrClean, Node: x, Topic: topic, Seq: round, QoS: 1, CleanStart: true,
		Start: at(start), End: at(start + 20), Outcome: OK})
	h.Add(Op{Kind: KindRRPub, Client: rrClean + rrResponder, Node: y, Topic: topic, Seq: round, QoS: 1, Publisher: rrClean,
		Value: fmt.Sprintf("reply %s:%d", rrClean, round), Start: at(start + 21), End: at(start + 30), Outcome: OK})
	recv := Op{Kind: KindRRRecv, Client: rrClean, Node: x, Topic: topic, Seq: round, QoS: 1, Start: at(start + 30), End: at(start + 4030),
		Outcome: Unknown, Err: rrNoReply}
	if received {
		recv.End, recv.Outcome, recv.Err = at(start+32), OK, ""
	}
	h.Add(recv)
}

// TestCheckerRequestResponse: a reply published on another node right
// after SUBACK that never arrives is rr-lost; the same round is not judged
// when a fault on either node overlaps it (or ended less than rejoinGrace
// before it), nor when SUBACK or the publish failed or the requester lost
// its connection; a received round is fine.
func TestCheckerRequestResponse(t *testing.T) {
	var ok History
	rrRoundAt(&ok, 1, 0, "node1", "node2", true)
	if r := Check(ok.Ops(), nil, nil); len(r.Violations) != 0 || r.RR.Judged != 1 || r.RR.Received != 1 || r.RR.Rounds != 1 {
		t.Fatalf("received round: violations %v, counts %+v", r.Violations, r.RR)
	}

	var lost History
	rrRoundAt(&lost, 1, 0, "node1", "node2", true)
	rrRoundAt(&lost, 2, 100, "node1", "node3", false)
	r := Check(lost.Ops(), nil, nil)
	if len(r.Violations) != 1 || r.Violations[0].Check != "rr-lost" || len(r.Failing()) != 1 {
		t.Fatalf("lost reply: violations %v, want one rr-lost", r.Violations)
	}
	if v := r.Violations[0]; !strings.Contains(v.Detail, "round 2 of rr-clean") || !strings.Contains(v.Detail, "node1") ||
		!strings.Contains(v.Detail, "node3") || len(v.Excerpt) != 3 {
		t.Errorf("violation does not name the round and nodes: %s", v)
	}
	if r.RR.Judged != 2 || r.RR.Received != 1 || r.RR.Lost != 1 {
		t.Errorf("counts %+v, want 2 judged, 1 received, 1 lost", r.RR)
	}
	t.Logf("reported: %s", r.Violations[0])
	// The requester's node logged that SUBACK went out without every
	// peer's ack: the excerpt shows it.
	noted := History{}
	for _, o := range lost.Ops() {
		noted.Add(o)
	}
	noted.Add(Op{Kind: KindNodeNote, Client: rrClean, Node: "node1", Value: noteRouteAckTimeout, Start: at(119), End: at(119), Outcome: OK,
		Err: "routes not acknowledged by every peer: [node3] at version 7: context deadline exceeded"})
	if r := Check(noted.Ops(), nil, nil); len(r.Violations) != 1 || len(r.Violations[0].Excerpt) != 4 ||
		!strings.Contains(r.Violations[0].Excerpt[3], "node log") {
		t.Errorf("lost reply with a node note: violations %v, want the note in the excerpt", r.Violations)
	}

	for _, tc := range []struct {
		name string
		f    faultEvent
	}{
		{"pause of the requester's node during the wait", faultEvent{Kind: FaultPause, Node: "node1", Start: at(2000), End: at(3000)}},
		{"cut of the responder's node before the SUBSCRIBE, within rejoinGrace", faultEvent{Kind: FaultPartition, Node: "node3", Start: at(-6000), End: at(-1000)}},
		{"rolling restart", faultEvent{Kind: FaultRolling, Node: "all", Start: at(4000), End: at(20000)}},
		// After a partition of the third node heals, the death verdicts
		// its side gossiped reach the others, which may drop a live
		// node's routes until it refutes (chaos seed 20261212).
		{"cut of the third node healed just before", faultEvent{Kind: FaultPartition, Node: "node2", Start: at(-4000), End: at(-800)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := Check(lost.Ops(), nil, []faultEvent{tc.f})
			// Round 2 (lost) is not judged; round 1 may not be either.
			if len(r.Violations) != 0 || r.RR.Lost != 0 || r.RR.NotJudged["fault"] < 1 {
				t.Fatalf("violations %v, counts %+v; want the lost round not judged", r.Violations, r.RR)
			}
		})
	}
	// A fault that ended more than rejoinGrace before the round excuses
	// nothing.
	old := []faultEvent{{Kind: FaultKill, Node: "node3", Start: at(-9000), End: at(-100 - int(rejoinGrace/time.Millisecond))}}
	if r := Check(lost.Ops(), nil, old); len(r.Violations) != 1 {
		t.Errorf("a fault long before the round: violations %v, want rr-lost", r.Violations)
	}

	// Rounds that are not clean are counted, not judged.
	for _, tc := range []struct {
		name, why string
		edit      func(o *Op)
	}{
		{"SUBACK refused", "suback", func(o *Op) {
			if o.Kind == KindRRSub {
				o.Outcome, o.Err = Failed, "reason code 0x87"
			}
		}},
		{"QoS 1 reply not acknowledged", "publish", func(o *Op) {
			if o.Kind == KindRRPub {
				o.Outcome, o.Err = Unknown, "context deadline exceeded"
			}
		}},
		{"requester's connection lost", "connection", func(o *Op) {
			if o.Kind == KindRRRecv {
				o.Err = rrConnLost
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h History
			for _, o := range lost.Ops() {
				if o.Seq == 2 {
					tc.edit(&o)
				}
				h.Add(o)
			}
			r := Check(h.Ops(), nil, nil)
			if len(r.Violations) != 0 || r.RR.Judged != 1 || r.RR.NotJudged[tc.why] != 1 {
				t.Fatalf("violations %v, counts %+v; want round 2 not judged (%s)", r.Violations, r.RR, tc.why)
			}
		})
	}
}

// tkoRoundAt adds one takeover round of tko1 on node1 to h, starting at
// start ms: the old connection's burst (backlog, then "online-<round>"),
// the takeover's "new-<round>" acknowledged, and one reading per node of
// served (node -> value; a node absent from it serves "new-<round>").
func tkoRoundAt(h *History, round, start int, served map[string]string) {
	dev := tkoDevice(1)
	status := tkoStatus(dev)
	h.Add(Op{Kind: KindTkoOld, Client: dev, Node: "node1", Topic: status, Seq: round, Value: tkoOnline(round), QoS: byte(round % 2), Backlog: 40,
		Start: at(start), End: at(start + 5), Outcome: OK})
	h.Add(Op{Kind: KindTkoNew, Client: dev, Node: "node1", Topic: status, Seq: round, Value: tkoNew(round), QoS: 1,
		Start: at(start + 6), End: at(start + 300), Outcome: OK})
	for _, n := range []string{"node1", "node2", "node3"} {
		v, end := tkoNew(round), start+320
		if s, ok := served[n]; ok {
			v, end = s, start+300+int(tkoReadWait/time.Millisecond)
		}
		h.Add(Op{Kind: KindTkoRead, Client: "tko-reader", Node: n, Topic: status, Seq: round, Value: v,
			Start: at(start + 301), End: at(end), Outcome: OK})
	}
}

// TestCheckerTakeoverOrder: after a same-node takeover whose "new" was
// acknowledged, a node serving the round's "online" (the old connection's
// write, queued behind its backlog, landed after the takeover's: the bug
// fixed in hooks/pipeline_takeover.go) or an older value is
// takeover-order; a round near a fault on the device's node, or whose
// "new" or reads did not succeed (or "new" only slowly), is not judged; a
// reading of a node near a fault is not judged.
func TestCheckerTakeoverOrder(t *testing.T) {
	var ok History
	tkoRoundAt(&ok, 1, 0, nil)
	tkoRoundAt(&ok, 2, 1000, nil)
	if r := Check(ok.Ops(), nil, nil); len(r.Violations) != 0 || r.Takeover.Judged != 2 || r.Takeover.NodeReads != 6 || r.Takeover.Rounds != 2 {
		t.Fatalf("valid rounds: violations %v, counts %+v", r.Violations, r.Takeover)
	}

	for _, tc := range []struct {
		name, served, want string
	}{
		{"reordered: the round's online landed last", tkoOnline(2), "landed after it"},
		{"the previous round's value kept", tkoNew(1), "an older value"},
		{"no value", "", "no value"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h History
			tkoRoundAt(&h, 1, 0, nil)
			tkoRoundAt(&h, 2, 1000, map[string]string{"node2": tc.served})
			r := Check(h.Ops(), nil, nil)
			if len(r.Violations) != 1 || r.Violations[0].Check != "takeover-order" || len(r.Failing()) != 1 {
				t.Fatalf("violations %v, want one takeover-order", r.Violations)
			}
			v := r.Violations[0]
			if !strings.Contains(v.Detail, "round 2 of tko1") || !strings.Contains(v.Detail, "node2") ||
				!strings.Contains(v.Detail, tc.want) || len(v.Excerpt) != 3 {
				t.Errorf("violation does not name the round, the node and what it served: %s", v)
			}
			if r.Takeover.Judged != 2 || r.Takeover.OldValue != 1 {
				t.Errorf("counts %+v, want 2 judged, 1 old value", r.Takeover)
			}
			if tc.served == tkoOnline(2) {
				t.Logf("reported: %s", v)
			}
		})
	}

	var reordered History
	tkoRoundAt(&reordered, 1, 0, nil)
	tkoRoundAt(&reordered, 2, 1000, map[string]string{"node1": tkoOnline(2), "node2": tkoOnline(2), "node3": tkoOnline(2)})
	for _, tc := range []struct {
		name string
		f    faultEvent
	}{
		{"pause of the device's node during the takeover", faultEvent{Kind: FaultPause, Node: "node1", Start: at(1100), End: at(2000)}},
		// A write of a round touched by a fault may land late: the
		// previous round's window counts too.
		{"cut of the device's node healed within rejoinGrace before the previous round", faultEvent{Kind: FaultPartition, Node: "node1", Start: at(-9000), End: at(-4000)}},
		{"rolling restart", faultEvent{Kind: FaultRolling, Node: "all", Start: at(500), End: at(20000)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := Check(reordered.Ops(), nil, []faultEvent{tc.f})
			if len(r.Violations) != 0 || r.Takeover.OldValue != 0 || r.Takeover.NotJudged["fault"] < 1 {
				t.Fatalf("violations %v, counts %+v; want the reordered round not judged", r.Violations, r.Takeover)
			}
		})
	}
	// A fault on another node leaves the round judged (the bug showed
	// mostly then); only that node's reading is not.
	for _, tc := range []struct {
		name string
		f    faultEvent
	}{
		{"pause of another node during the takeover", faultEvent{Kind: FaultPause, Node: "node3", Start: at(1100), End: at(2000)}},
		{"kill of another node during the reads", faultEvent{Kind: FaultKill, Node: "node3", Start: at(3000), End: at(4000)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := Check(reordered.Ops(), nil, []faultEvent{tc.f})
			if len(r.Violations) != 2 || r.Takeover.Judged != 2 || r.Takeover.ReadsNotJudged != 1 {
				t.Fatalf("violations %v, counts %+v; want takeover-order on node1 and node2", r.Violations, r.Takeover)
			}
			for _, v := range r.Violations {
				if strings.Contains(v.Detail, "node3 served") || !strings.Contains(v.Excerpt[len(v.Excerpt)-1], "beside: fault") {
					t.Errorf("violation judged the faulted node's reading or does not show the fault: %s", v)
				}
			}
		})
	}
	// A fault that ended more than rejoinGrace before the previous round
	// excuses nothing.
	old := []faultEvent{{Kind: FaultKill, Node: "node1", Start: at(-9000), End: at(-100 - int(rejoinGrace/time.Millisecond))}}
	if r := Check(reordered.Ops(), nil, old); len(r.Violations) != 3 || r.Takeover.Judged != 2 {
		t.Errorf("a fault long before the rounds: violations %v, want takeover-order on each node", r.Violations)
	}

	// Rounds that are not clean are counted, not judged.
	for _, tc := range []struct {
		name, why string
		edit      func(o *Op)
	}{
		{"the old connection's burst not written", "old", func(o *Op) {
			if o.Kind == KindTkoOld {
				o.Outcome, o.Err = Unknown, "write: broken pipe"
			}
		}},
		{"new not acknowledged", "new", func(o *Op) {
			if o.Kind == KindTkoNew {
				o.Outcome, o.Err = Unknown, "no acknowledgement in time"
			}
		}},
		// The takeover's wait for the old connection may have run into
		// its bound (the write timeout).
		{"new acknowledged slowly", "slow", func(o *Op) {
			if o.Kind == KindTkoNew {
				o.End = o.Start.Add(tkoFastAck + time.Millisecond)
			}
		}},
		{"no node read", "read", func(o *Op) {
			if o.Kind == KindTkoRead {
				o.Outcome, o.Value, o.Err = Unknown, "", tkoNodeDown
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h History
			for _, o := range reordered.Ops() {
				if o.Seq == 2 {
					tc.edit(&o)
				}
				h.Add(o)
			}
			r := Check(h.Ops(), nil, nil)
			if len(r.Violations) != 0 || r.Takeover.Judged != 1 || r.Takeover.NotJudged[tc.why] != 1 {
				t.Fatalf("violations %v, counts %+v; want round 2 not judged (%s)", r.Violations, r.Takeover, tc.why)
			}
		})
	}
	// A node that could not be read is not judged; the others are.
	var partial History
	for _, o := range reordered.Ops() {
		if o.Seq == 2 && o.Kind == KindTkoRead && o.Node != "node3" {
			o.Outcome, o.Value, o.Err = Unknown, "", "node1: the end marker did not arrive"
		}
		partial.Add(o)
	}
	if r := Check(partial.Ops(), nil, nil); len(r.Violations) != 1 || r.Takeover.NodeReads != 4 || !strings.Contains(r.Violations[0].Detail, "node3") {
		t.Errorf("one node read: violations %v, counts %+v; want takeover-order on node3 only", r.Violations, r.Takeover)
	}
}
