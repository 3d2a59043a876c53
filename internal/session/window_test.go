package session

import (
	"testing"

	"github.com/mqtt-ha/broker/replication"
)

// TestPidForWraps: queue positions map to packet ids 1..65535 (never 0,
// which MQTT forbids), the same position always to the same id (another
// node resending a message uses the id the client saw), and any 65,535
// consecutive positions to distinct ids, across the wrap too.
func TestPidForWraps(t *testing.T) {
	for _, c := range []struct {
		seq uint64
		pid uint16
	}{{1, 1}, {2, 2}, {65535, 65535}, {65536, 1}, {65537, 2}, {2 * 65535, 65535}, {2*65535 + 1, 1}} {
		if got := PidFor(c.seq); got != c.pid {
			t.Errorf("PidFor(%d) = %d, want %d", c.seq, got, c.pid)
		}
	}
	for _, start := range []uint64{1, 60000, 65535, 1 << 40} {
		seen := make(map[uint16]uint64, 65535)
		for seq := start; seq < start+65535; seq++ {
			pid := PidFor(seq)
			if pid == 0 {
				t.Fatalf("PidFor(%d) = 0", seq)
			}
			if prev, dup := seen[pid]; dup {
				t.Fatalf("positions %d and %d share packet id %d", prev, seq, pid)
			}
			seen[pid] = seq
		}
	}
}

func TestWindowSize(t *testing.T) {
	for _, c := range []struct {
		maxInflight    int
		receiveMaximum uint16
		want           int
	}{
		{0, 0, DefaultWindow},
		{20, 0, 20},
		{0, 10, 10},
		{20, 10, 10}, // the client's Receive Maximum is lower
		{10, 20, 10}, // max_inflight_messages is lower
		{-1, 0, DefaultWindow},
		{0, 65535, 65535},
	} {
		if got := WindowSize(c.maxInflight, c.receiveMaximum); got != c.want {
			t.Errorf("WindowSize(%d, %d) = %d, want %d", c.maxInflight, c.receiveMaximum, got, c.want)
		}
	}
}

func TestPacketIDAndExpiry(t *testing.T) {
	const now = 10_000
	for _, c := range []struct {
		name    string
		m       replication.QueuedMessage
		pid     uint16
		expired bool
	}{
		{"fresh", replication.QueuedMessage{Seq: 3}, 3, false},
		{"wrapped", replication.QueuedMessage{Seq: 65536 + 2}, 3, false},
		{"released keeps the client's id", replication.QueuedMessage{Seq: 3, Released: true, PacketID: 77}, 77, false},
		{"expires later", replication.QueuedMessage{Seq: 1, Expires: now + 1}, 1, false},
		{"expires now", replication.QueuedMessage{Seq: 1, Expires: now}, 1, true},
		{"expired", replication.QueuedMessage{Seq: 1, Expires: now - 5000}, 1, true},
		{"expired but released", replication.QueuedMessage{Seq: 1, Expires: now - 5000, Released: true, PacketID: 9}, 9, false},
	} {
		if got := PacketID(c.m); got != c.pid {
			t.Errorf("%s: PacketID = %d, want %d", c.name, got, c.pid)
		}
		if got := ExpiredInQueue(c.m, now); got != c.expired {
			t.Errorf("%s: ExpiredInQueue = %v, want %v", c.name, got, c.expired)
		}
	}
}

func TestRemainingExpiry(t *testing.T) {
	const now = 50_000
	for _, c := range []struct {
		expires int64
		want    uint32
	}{
		{now + 1, 1},
		{now + 1000, 1},
		{now + 1001, 2}, // rounded up
		{now + 60_000, 60},
		{now, 1}, // never 0 (0 would mean no expiry)
		{now - 3000, 1},
	} {
		if got := RemainingExpiry(c.expires, now); got != c.want {
			t.Errorf("RemainingExpiry(now%+d) = %d, want %d", c.expires-now, got, c.want)
		}
	}
}

func TestWindow(t *testing.T) {
	w := NewWindow(2)
	if room, from := w.Room(); room != 2 || from != 0 {
		t.Fatalf("empty: Room = %d from %d, want 2 from 0", room, from)
	}
	w.Skip(3) // Seqs 1-3 expired unsent
	if room, from := w.Room(); room != 2 || from != 4 {
		t.Fatalf("after Skip(3): Room = %d from %d, want 2 from 4", room, from)
	}
	w.Sent(PidFor(4), 4)
	w.Sent(PidFor(5), 5)
	if room, from := w.Room(); room != 0 || from != 6 {
		t.Fatalf("full: Room = %d from %d, want 0 from 6", room, from)
	}
	w.Skip(2) // an older Seq never moves the window back
	if _, from := w.Room(); from != 6 {
		t.Fatalf("Skip(2) moved the window back to %d", from)
	}
	if !w.Busy(4) || w.Busy(6) {
		t.Errorf("Busy(4), Busy(6) = %v, %v; want true, false", w.Busy(4), w.Busy(6))
	}
	// The id of Seq 4 comes round again 65,535 messages later: still busy.
	if !w.Busy(PidFor(4 + 65535)) {
		t.Error("a wrapped packet id in flight is not busy")
	}
	if seq, ok := w.SeqOf(5); !ok || seq != 5 {
		t.Errorf("SeqOf(5) = %d, %v; want 5, true", seq, ok)
	}
	if _, ok := w.Acked(9); ok {
		t.Error("Acked of a packet id never sent reports a delivery")
	}
	if seq, ok := w.Acked(4); !ok || seq != 4 {
		t.Errorf("Acked(4) = %d, %v; want 4, true", seq, ok)
	}
	if _, ok := w.Acked(4); ok {
		t.Error("a delivery acknowledged twice")
	}
	if _, ok := w.SeqOf(4); ok {
		t.Error("SeqOf finds an acknowledged delivery")
	}
	if room, from := w.Room(); room != 1 || from != 6 {
		t.Errorf("after one ack: Room = %d from %d, want 1 from 6", room, from)
	}
	// A released message is resent under the client's id (a PUBREL).
	w.Sent(77, 6)
	if seq, ok := w.SeqOf(77); !ok || seq != 6 {
		t.Errorf("SeqOf(77) = %d, %v; want 6, true", seq, ok)
	}
	if room, from := w.Room(); room != 0 || from != 7 {
		t.Errorf("Room = %d from %d, want 0 from 7", room, from)
	}
}
