package chaos

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"
)

// Outcome of one client operation.
type Outcome string

const (
	OK      Outcome = "ok"      // acknowledged with a success reason code
	Failed  Outcome = "failed"  // acknowledged with a failure reason code (may still have committed)
	Unknown Outcome = "unknown" // no acknowledgement: timeout or lost connection
)

// Op kinds.
const (
	KindRetain     = "retain"      // QoS 1 retained PUBLISH of a unique value
	KindStreamPub  = "stream-pub"  // QoS 1 PUBLISH on the ordered stream
	KindStreamRecv = "stream-recv" // a stream message received by the subscriber
)

// Op is one entry of the history.
type Op struct {
	Index   int       `json:"index"`
	Start   time.Time `json:"start"`
	End     time.Time `json:"end"`
	Kind    string    `json:"kind"`
	Client  string    `json:"client"`
	Node    string    `json:"node"`
	Topic   string    `json:"topic"`
	Value   string    `json:"value,omitempty"`
	Outcome Outcome   `json:"outcome"`
	Err     string    `json:"err,omitempty"`
	// Stream fields: the publisher's sequence number and connection epoch,
	// and (for receipts) the subscriber's connection epoch.
	Publisher string `json:"publisher,omitempty"`
	Seq       int    `json:"seq,omitempty"`
	PubConn   int    `json:"pub_conn,omitempty"`
	SubConn   int    `json:"sub_conn,omitempty"`
}

func (o Op) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "#%d %s..%s %s %s@%s %s", o.Index, o.Start.Format("15:04:05.000"), o.End.Format("15:04:05.000"), o.Kind, o.Client, o.Node, o.Topic)
	if o.Value != "" {
		fmt.Fprintf(&b, " value=%s", o.Value)
	}
	if o.Kind != KindRetain {
		fmt.Fprintf(&b, " publisher=%s seq=%d pub_conn=%d sub_conn=%d", o.Publisher, o.Seq, o.PubConn, o.SubConn)
	}
	fmt.Fprintf(&b, " -> %s", o.Outcome)
	if o.Err != "" {
		fmt.Fprintf(&b, " (%s)", o.Err)
	}
	return b.String()
}

// History is the append-only, concurrency-safe record of a campaign.
type History struct {
	mu  sync.Mutex
	ops []Op
}

// Add appends op, numbering it, and returns its index.
func (h *History) Add(op Op) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	op.Index = len(h.ops)
	h.ops = append(h.ops, op)
	return op.Index
}

// Ops is a copy of the history.
func (h *History) Ops() []Op {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]Op(nil), h.ops...)
}

// FinalRead is what a fresh subscriber on one node received as retained
// messages after the run settled: topic -> value (absent: no retained value).
type FinalRead struct {
	Node   string            `json:"node"`
	Values map[string]string `json:"values"`
}

// Violation is one broken guarantee with the smallest excerpt of the
// history that shows it.
type Violation struct {
	Check   string   `json:"check"`
	Topic   string   `json:"topic,omitempty"`
	Detail  string   `json:"detail"`
	Excerpt []string `json:"excerpt"`
}

func (v Violation) String() string {
	s := fmt.Sprintf("[%s] %s", v.Check, v.Detail)
	for _, e := range v.Excerpt {
		s += "\n    " + e
	}
	return s
}

// CheckResult counts what the checker found.
type CheckResult struct {
	RetainOps     map[Outcome]int `json:"retain_ops"`
	StreamPubs    map[Outcome]int `json:"stream_pubs"`
	StreamRecv    int             `json:"stream_received"`
	Lost          int             `json:"lost"`
	Reordered     int             `json:"reordered"`
	Duplicated    int             `json:"duplicated"`
	Divergent     int             `json:"divergent_topics"`
	CrossConnBack int             `json:"cross_connection_regressions"` // informational: order across publisher reconnects
	Partition     PartitionResult `json:"partition"`
	Violations    []Violation     `json:"violations"`
}

// PartitionResult counts the retained writes that began during partitions
// (guarantee 5).
type PartitionResult struct {
	// Minority: writes through the cut-off node. MinorityJudged: those
	// that began at least failFastBound before the heal, so that they had
	// to fail within the cut. MinorityMaxFail: the slowest failure (s).
	Minority        map[Outcome]int `json:"minority"`
	MinorityJudged  int             `json:"minority_judged"`
	MinorityMaxFail float64         `json:"minority_max_fail_seconds"`
	// Majority: writes through the other nodes that began once those
	// agreed on a leader and ended before the heal. MajorityTakenOver: of
	// those, the ones lost because the broker took the connection over
	// (DISCONNECT 0x8E) for another connection of the same client id;
	// counted, not judged here (see the README: a claim retried late).
	Majority          map[Outcome]int `json:"majority"`
	MajorityTakenOver int             `json:"majority_taken_over"`
}

// failFastBound is how long a retained write on a side without a quorum may
// take to fail: the broker's replicated-write timeout (5 s, internal/node)
// plus slack for a loaded machine. A write still unanswered after that
// hangs, which guarantee 5 forbids.
const failFastBound = 7 * time.Second

// Check runs every check over the history, the final reads and the fault
// log. Checks for guarantees not built yet (persistent sessions, wills)
// slot in here as more functions over the same history.
func Check(ops []Op, finals []FinalRead, faults []faultEvent) CheckResult {
	r := CheckResult{RetainOps: map[Outcome]int{}, StreamPubs: map[Outcome]int{},
		Partition: PartitionResult{Minority: map[Outcome]int{}, Majority: map[Outcome]int{}}}
	for _, o := range ops {
		switch o.Kind {
		case KindRetain:
			r.RetainOps[o.Outcome]++
		case KindStreamPub:
			r.StreamPubs[o.Outcome]++
		case KindStreamRecv:
			r.StreamRecv++
		}
	}
	checkRetained(ops, finals, &r)
	checkStreamOrder(ops, &r)
	checkPartitions(ops, faults, &r)
	return r
}

// checkPartitions checks guarantee 5 for the retained writes that began
// while a node was cut off (between a partition's Start and End):
//
//   - the cut-off node acknowledges none of them before the heal: it has no
//     quorum, so an acknowledgement would be a write that is not committed
//     (minority-acked);
//   - one that began at least failFastBound before the heal fails (PUBACK
//     with a failure reason code) within failFastBound (minority-hang). A
//     write whose client gave up or lost the connection earlier is counted,
//     not judged: only the probe waits longer than the bound;
//   - on the other nodes, once they agreed on a leader, every write that
//     ended before the heal is acknowledged (majority-unavailable).
func checkPartitions(ops []Op, faults []faultEvent, r *CheckResult) {
	p := &r.Partition
	for _, f := range faults {
		if f.Kind != FaultPartition || f.Start.IsZero() || !f.End.After(f.Start) {
			continue
		}
		for _, o := range ops {
			if o.Kind != KindRetain || o.Start.Before(f.Start) || !o.Start.Before(f.End) {
				continue
			}
			if o.Node != f.Node {
				if f.MajorityLeader.IsZero() || o.Start.Before(f.MajorityLeader) || !o.End.Before(f.End) {
					continue
				}
				p.Majority[o.Outcome]++
				if o.Outcome == Unknown && strings.Contains(o.Err, serverDisconnect+" 0x8e") {
					p.MajorityTakenOver++
					continue
				}
				if o.Outcome != OK {
					r.Violations = append(r.Violations, Violation{Check: "majority-unavailable", Topic: o.Topic,
						Detail: fmt.Sprintf("%s was cut off; %s, on the majority side, did not acknowledge a retained write begun %s after its side had a leader and ended before the heal",
							f.Node, o.Node, o.Start.Sub(f.MajorityLeader).Round(time.Millisecond)),
						Excerpt: []string{partitionLine(f), o.String()}})
				}
				continue
			}
			p.Minority[o.Outcome]++
			took := o.End.Sub(o.Start)
			if o.Outcome == Failed {
				p.MinorityMaxFail = max(p.MinorityMaxFail, took.Seconds())
			}
			if o.Outcome == OK && o.End.Before(f.End) {
				r.Violations = append(r.Violations, Violation{Check: "minority-acked", Topic: o.Topic,
					Detail:  fmt.Sprintf("%s acknowledged a retained write while it was cut off from the majority", f.Node),
					Excerpt: []string{partitionLine(f), o.String()}})
				continue
			}
			if f.End.Sub(o.Start) < failFastBound {
				continue // the heal came before the write had to fail
			}
			if o.Outcome == Unknown && took < failFastBound {
				continue // the client gave up or lost the connection first: not judged
			}
			p.MinorityJudged++
			if o.Outcome != Failed || took > failFastBound {
				r.Violations = append(r.Violations, Violation{Check: "minority-hang", Topic: o.Topic,
					Detail: fmt.Sprintf("%s was cut off; a retained write through it was not refused within %s (%s after %s)",
						f.Node, failFastBound, o.Outcome, took.Round(time.Millisecond)),
					Excerpt: []string{partitionLine(f), o.String()}})
			}
		}
	}
}

func partitionLine(f faultEvent) string {
	s := fmt.Sprintf("partition of %s %s..%s", f.Node, f.Start.Format("15:04:05.000"), f.End.Format("15:04:05.000"))
	if !f.MajorityLeader.IsZero() {
		s += ", majority leader seen at " + f.MajorityLeader.Format("15:04:05.000")
	}
	return s
}

// checkRetained: per topic, every node serves the same value, and that value
// is not superseded by an acknowledged write that began after it was
// acknowledged (which would make that acknowledged write lost). A write whose
// outcome is failed or unknown may commit at any later moment, so it is
// never considered superseded.
func checkRetained(ops []Op, finals []FinalRead, r *CheckResult) {
	byTopic := map[string][]Op{}
	byValue := map[string]Op{}
	for _, o := range ops {
		if o.Kind == KindRetain {
			byTopic[o.Topic] = append(byTopic[o.Topic], o)
			byValue[o.Value] = o
		}
	}
	topics := make([]string, 0, len(byTopic))
	for t := range byTopic {
		topics = append(topics, t)
	}
	for _, f := range finals {
		for t := range f.Values {
			if _, ok := byTopic[t]; !ok {
				byTopic[t] = nil
				topics = append(topics, t)
			}
		}
	}
	sort.Strings(topics)
	for _, topic := range topics {
		writes := byTopic[topic]
		// Agreement across nodes.
		values := map[string][]string{} // value -> nodes
		for _, f := range finals {
			values[f.Values[topic]] = append(values[f.Values[topic]], f.Node)
		}
		if len(values) > 1 {
			r.Divergent++
			v := Violation{Check: "retained-identical", Topic: topic, Detail: fmt.Sprintf("topic %s: nodes serve different retained values", topic)}
			for _, val := range sortedKeys(values) {
				line := fmt.Sprintf("%v serve %q", values[val], val)
				if o, ok := byValue[val]; ok {
					line += " written by " + o.String()
				}
				v.Excerpt = append(v.Excerpt, line)
			}
			r.Violations = append(r.Violations, v)
		}
		// Each distinct final value must be allowed.
		for _, val := range sortedKeys(values) {
			nodes := values[val]
			lastOK, hasOK := lastAcked(writes)
			if val == "" {
				if hasOK {
					r.Lost++
					r.Violations = append(r.Violations, Violation{Check: "acked-retained-lost", Topic: topic,
						Detail:  fmt.Sprintf("topic %s: %v serve no retained value, but a write was acknowledged", topic, nodes),
						Excerpt: []string{lastOK.String()}})
				}
				continue
			}
			final, known := byValue[val]
			if !known || final.Topic != topic {
				r.Violations = append(r.Violations, Violation{Check: "retained-phantom", Topic: topic,
					Detail: fmt.Sprintf("topic %s: %v serve %q, which no client wrote to it", topic, nodes, val)})
				continue
			}
			if final.Outcome != OK {
				continue
			}
			// Acknowledged writes that began after the final value was
			// acknowledged: each of them is lost.
			var later []Op
			for _, w := range writes {
				if w.Outcome == OK && w.Start.After(final.End) {
					later = append(later, w)
				}
			}
			if len(later) > 0 {
				r.Lost += len(later)
				r.Violations = append(r.Violations, Violation{Check: "acked-retained-lost", Topic: topic,
					Detail: fmt.Sprintf("topic %s: %v serve %q, but %d acknowledged write(s) began after it was acknowledged", topic, nodes, val, len(later)),
					Excerpt: []string{"final:      " + final.String(),
						"first lost: " + later[0].String(),
						"last lost:  " + later[len(later)-1].String()}})
			}
		}
	}
}

func lastAcked(writes []Op) (Op, bool) {
	var last Op
	found := false
	for _, w := range writes {
		if w.Outcome == OK && (!found || w.End.After(last.End)) {
			last, found = w, true
		}
	}
	return last, found
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// checkStreamOrder: within one publisher connection and one subscriber
// connection, sequence numbers arrive strictly increasing (a repeat is a
// QoS 1 duplicate, counted but allowed). Across a publisher's reconnects a
// message from the abandoned connection may still be forwarded late by a
// node that was paused; that is counted, not a violation.
func checkStreamOrder(ops []Op, r *CheckResult) {
	type key struct {
		pub              string
		pubConn, subConn int
	}
	last := map[key]Op{}
	lastAny := map[string]Op{} // publisher -> last receipt
	for _, o := range ops {
		if o.Kind != KindStreamRecv {
			continue
		}
		k := key{o.Publisher, o.PubConn, o.SubConn}
		if p, ok := last[k]; ok {
			switch {
			case o.Seq == p.Seq:
				r.Duplicated++
			case o.Seq < p.Seq:
				r.Reordered++
				r.Violations = append(r.Violations, Violation{Check: "stream-order",
					Detail:  fmt.Sprintf("publisher %s: seq %d received after seq %d on the same connections", o.Publisher, o.Seq, p.Seq),
					Excerpt: []string{p.String(), o.String()}})
			}
		}
		if p, ok := lastAny[o.Publisher]; ok && p.PubConn != o.PubConn && o.Seq < p.Seq {
			r.CrossConnBack++
		}
		last[k] = o
		lastAny[o.Publisher] = o
	}
}
