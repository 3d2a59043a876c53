package replication

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// ackByScan is the straightforward rule ackedSeqs and removeAcked
// implement with searches: every queued message with Seq <= UpTo or
// listed in Seqs is acknowledged; the rest stay in order.
func ackByScan(q []QueuedMessage, c *Ack) (acked []uint64, kept []QueuedMessage) {
	for _, m := range q {
		if m.Seq <= c.UpTo || slices.Contains(c.Seqs, m.Seq) {
			acked = append(acked, m.Seq)
		} else {
			kept = append(kept, m)
		}
	}
	return acked, kept
}

func TestAckMatchesScan(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 20000 {
		var q []QueuedMessage
		seq := uint64(r.IntN(3))
		for range r.IntN(12) {
			seq += 1 + uint64(r.IntN(3)) // gaps, as acknowledgements leave them
			q = append(q, QueuedMessage{Seq: seq, Payload: []byte{byte(seq)}})
		}
		c := &Ack{ClientID: "c"}
		if r.IntN(3) == 0 {
			c.UpTo = uint64(r.IntN(int(seq) + 3))
		}
		for range r.IntN(5) {
			c.Seqs = append(c.Seqs, uint64(r.IntN(int(seq)+3))) // duplicates, absent, <= UpTo
		}
		wantAcked, wantKept := ackByScan(q, c)
		orig := slices.Clone(q)
		acked := ackedSeqs(q, c)
		if !slices.Equal(acked, wantAcked) {
			t.Fatalf("case %d: queue %v, ack %+v: acked %v, want %v", i, seqsOf(orig), c, acked, wantAcked)
		}
		if len(acked) == 0 {
			continue
		}
		kept := removeAcked(q, acked)
		if !slices.Equal(seqsOf(kept), seqsOf(wantKept)) {
			t.Fatalf("case %d: queue %v, ack %+v: kept %v, want %v", i, seqsOf(orig), c, seqsOf(kept), seqsOf(wantKept))
		}
		for _, m := range kept {
			if len(m.Payload) != 1 || m.Payload[0] != byte(m.Seq) {
				t.Fatalf("case %d: message %d kept with payload %v", i, m.Seq, m.Payload)
			}
		}
	}
}

func seqsOf(q []QueuedMessage) []uint64 {
	out := make([]uint64, len(q))
	for i, m := range q {
		out[i] = m.Seq
	}
	return out
}
