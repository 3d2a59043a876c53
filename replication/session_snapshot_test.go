package replication

import (
	"bytes"
	"fmt"
	"io"
	"reflect"
	"sync"
	"testing"
	"time"
)

func TestSessionSnapshotRoundTrip(t *testing.T) {
	f := testFSM(observers{})
	fill(f, 100)
	fillSessions(f, 101, 600)
	if len(exportAll(f)) == 0 {
		t.Fatal("workload left no sessions")
	}
	data := snapshotBytes(t, f)
	g := testFSM(observers{})
	fillSessions(g, 1, 50) // discarded by the restore
	if err := g.Restore(io.NopCloser(bytes.NewReader(data))); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(exportAll(f), exportAll(g)) || !reflect.DeepEqual(f.Retained(), g.Retained()) {
		t.Fatal("restored sessions differ")
	}
	if !bytes.Equal(data, snapshotBytes(t, g)) {
		t.Fatal("snapshot of the restored state differs")
	}
	// Both go on identically (NextSeq, OpenedIndex survive).
	fillSessions(f, 601, 700)
	fillSessions(g, 601, 700)
	if !reflect.DeepEqual(exportAll(f), exportAll(g)) {
		t.Fatal("replicas diverge after restore")
	}
}

func TestSessionSnapshotCorruption(t *testing.T) {
	f := testFSM(observers{})
	fillSessions(f, 1, 100)
	data := snapshotBytes(t, f)
	g := testFSM(observers{})
	// Every truncation fails and leaves the state alone.
	for i := 0; i < len(data); i += 7 {
		if err := g.Restore(io.NopCloser(bytes.NewReader(data[:i]))); err == nil {
			t.Fatalf("truncated at %d restored", i)
		}
	}
	if len(g.Sessions()) != 0 {
		t.Fatal("failed restore changed the state")
	}
	// A queued record without its session.
	var b bytes.Buffer
	b.WriteString(snapMagic)
	b.WriteByte(snapVersion)
	body := appendString(nil, "c")
	body = appendQueued(body, &QueuedMessage{Seq: 1, Topic: "t"})
	b.WriteByte(recQueued)
	b.Write(appendUvarint(nil, uint64(len(body))))
	b.Write(body)
	if err := g.Restore(io.NopCloser(&b)); err == nil {
		t.Fatal("orphan queued record accepted")
	}
}

// TestSessionSnapshotRefusesWrappingSeq: a snapshot (or a backup, read the
// same way) whose session would hand out a Seq that wraps around is
// refused: the queue must stay sorted by Seq (acknowledgements search it).
func TestSessionSnapshotRefusesWrappingSeq(t *testing.T) {
	// withNext is a valid snapshot of one session whose NextSeq is next.
	withNext := func(next uint64) []byte {
		f := testFSM(observers{})
		f.Apply(entry(1, open("c", "n", false)))
		f.st.sessions["c"].NextSeq = next
		return snapshotBytes(t, f)
	}
	for _, next := range []uint64{maxNextSeq + 1, ^uint64(0)} {
		g := testFSM(observers{})
		if err := g.Restore(io.NopCloser(bytes.NewReader(withNext(next)))); err == nil {
			t.Errorf("next seq %d restored", next)
		}
	}
	// The largest allowed restores, and its session goes on.
	g := testFSM(observers{})
	if err := g.Restore(io.NopCloser(bytes.NewReader(withNext(maxNextSeq)))); err != nil {
		t.Fatalf("next seq %d: %v", uint64(maxNextSeq), err)
	}
	g.Apply(entry(2, enqueue("m", 0, DropNewest, "c")))
	if s, _ := g.Session("c"); len(s.Queue) != 1 || s.Queue[0].Seq != maxNextSeq {
		t.Fatalf("after restore: queue %+v", s.Queue)
	}
}

// TestSessionSnapshotUnderConcurrentApply: snapshots taken while sessions
// are mutated (copy-on-write under -race) are consistent prefixes: message
// k is queued for both sessions exactly when k applies have happened.
func TestSessionSnapshotUnderConcurrentApply(t *testing.T) {
	f := testFSM(observers{})
	f.Apply(entry(1, open("a", "n", false)))
	f.Apply(entry(2, open("b", "n", false)))
	const n = 2000
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 1; i <= n; i++ {
			cmds := []Command{enqueue(fmt.Sprint(i), 0, DropNewest, "a", "b")}
			if i%10 == 0 {
				// Acks and releases mutate existing elements: a shared
				// queue must never see them.
				cmds = append(cmds, &Ack{ClientID: "a", Seqs: []uint64{uint64(i - 5)}},
					&QueueRelease{ClientID: "b", Seq: uint64(i - 1), PacketID: 1},
					&QoS2Received{ClientID: "b", PacketID: uint16(i)})
			}
			f.Apply(entry(uint64(i+2), &Batch{Commands: cmds}))
		}
	})
	checks := 0
	for {
		snap, err := f.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		sink := &memSink{}
		if err := snap.Persist(sink); err != nil {
			t.Fatal(err)
		}
		snap.Release()
		g := testFSM(observers{})
		if err := g.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
			t.Fatal(err)
		}
		a, _ := g.Session("a")
		b, _ := g.Session("b")
		k := int(b.NextSeq - 1)
		if len(b.Queue) != k || a.NextSeq != b.NextSeq || len(a.Queue) != k-k/10 || len(b.AwaitingRelease) != k/10 {
			t.Fatalf("inconsistent snapshot at %d: a %d queued, b %d queued, %d awaiting", k, len(a.Queue), len(b.Queue), len(b.AwaitingRelease))
		}
		for i, m := range b.Queue {
			released := (i+2)%10 == 0 && i+2 <= k
			if m.Seq != uint64(i+1) || string(m.Payload) != fmt.Sprint(i+1) || m.Released != released {
				t.Fatalf("snapshot of %d: message %d is %+v", k, i+1, m)
			}
		}
		checks++
		if k == n {
			break
		}
	}
	wg.Wait()
	t.Logf("%d consistent snapshots during %d applies", checks, n)
}

func TestSessionObserver(t *testing.T) {
	var got []string
	f := testFSM(observers{onSession: func(c SessionChange) {
		got = append(got, fmt.Sprintf("%v %s %d %v", c.Kind, c.ClientID, c.Index, c.Seqs))
	}})
	f.ApplyBatch(nil)
	f.Apply(entry(1, open("c", "n", false)))
	f.Apply(entry(2, &Batch{Commands: []Command{enqueue("x", 0, DropNewest, "c"), enqueue("y", 0, DropNewest, "c")}}))
	f.Apply(entry(3, &Ack{ClientID: "c", UpTo: 1}))
	f.Apply(entry(4, &SessionClose{ClientID: "c", Owner: "n", At: 1}))
	f.Apply(entry(5, &SessionDelete{ClientID: "c"}))
	want := []string{"session_opened c 1 []", "queue_appended c 2 [1]", "queue_appended c 2 [2]",
		"queue_acked c 3 [1]", "session_closed c 4 []", "session_deleted c 5 []"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("observer\n got %q\nwant %q", got, want)
	}
}

func TestSessionExpiredSelection(t *testing.T) {
	f := testFSM(observers{})
	f.Apply(entry(1, &SessionOpen{ClientID: "old", ProtocolVersion: 4, ExpiryInterval: 10, Owner: "n"}))
	f.Apply(entry(2, &SessionOpen{ClientID: "young", ProtocolVersion: 4, ExpiryInterval: 100, Owner: "n"}))
	f.Apply(entry(3, &SessionOpen{ClientID: "never", ProtocolVersion: 5, ExpiryInterval: NeverExpires, Owner: "n"}))
	f.Apply(entry(4, &SessionOpen{ClientID: "live", ProtocolVersion: 5, ExpiryInterval: 0, Owner: "n"}))
	for i, id := range []string{"old", "young", "never"} {
		f.Apply(entry(uint64(5+i), &SessionClose{ClientID: id, Owner: "n", At: 1_000_000}))
	}
	got := f.expiredSessions(time.UnixMilli(1_000_000+50_000), 10)
	if len(got) != 1 || got[0] != (expiredSession{ClientID: "old", OpenedIndex: 1}) {
		t.Fatalf("expired %+v", got)
	}
	if got := f.expiredSessions(time.UnixMilli(1_000_000+9_999), 10); len(got) != 0 {
		t.Fatalf("expired early %+v", got)
	}
	// An expired session still holding its will waits for the will to be
	// claimed (published), then goes.
	f.Apply(entry(8, &SessionOpen{ClientID: "willing", ProtocolVersion: 5, ExpiryInterval: 1, Owner: "n"}))
	f.Apply(entry(9, &SetWill{ClientID: "willing", Will: Will{Topic: "w"}}))
	f.Apply(entry(10, &SessionClose{ClientID: "willing", Owner: "n", At: 1_000_000}))
	for _, e := range f.expiredSessions(time.UnixMilli(1_000_000+50_000), 10) {
		if e.ClientID == "willing" {
			t.Fatal("session with an unclaimed will selected for deletion")
		}
	}
	f.Apply(entry(11, &ClaimWill{ClientID: "willing", IfOpened: 8}))
	found := false
	for _, e := range f.expiredSessions(time.UnixMilli(1_000_000+50_000), 10) {
		found = found || e.ClientID == "willing"
	}
	if !found {
		t.Fatal("session not selected after its will was claimed")
	}
}

// TestSessionExpirySweep: the leader deletes sessions disconnected longer
// than their expiry, on every node; connected and young ones stay.
func TestSessionExpirySweep(t *testing.T) {
	c := newTestCluster(t, 3)
	c.mutate = func(cfg *Config) { cfg.ExpirySweepInterval = 50 * time.Millisecond }
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	f := c.follower(lead).node()
	ctx := ctxT(t, waitFor)
	now := time.Now().UnixMilli()
	_, err := f.Apply(ctx, &Batch{Commands: []Command{
		&SessionOpen{ClientID: "expired", ProtocolVersion: 4, ExpiryInterval: 1, Owner: "n2", At: now},
		&SessionClose{ClientID: "expired", Owner: "n2", At: now - 5000},
		&SessionOpen{ClientID: "young", ProtocolVersion: 5, ExpiryInterval: 3600, Owner: "n2", At: now},
		&SessionClose{ClientID: "young", Owner: "n2", At: now},
		&SessionOpen{ClientID: "connected", ProtocolVersion: 5, ExpiryInterval: 1, Owner: "n2", At: now},
	}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, waitFor, func() error {
		for _, tn := range c.up() {
			got := tn.node().Sessions()
			if len(got) != 2 || got[0].ClientID != "connected" || got[1].ClientID != "young" {
				return fmt.Errorf("%s sessions %+v", tn.id, got)
			}
		}
		return nil
	})
	if s, ok := f.Session("young"); !ok || s.Connected {
		t.Fatalf("young %+v", s)
	}
	// A forwarded Enqueue returns its seqs and drops (RPC result fields).
	for i := range 3 {
		res, err := f.Apply(ctx, enqueue(fmt.Sprint(i), 2, DropNewest, "young", "gone"))
		if err != nil {
			t.Fatal(err)
		}
		want := Result{Index: res.Index, Changed: i < 2, Seqs: []uint64{uint64(i + 1), 0}, Dropped: uint64(i / 2)}
		if i == 2 {
			want.Seqs[0] = 0
		}
		if !reflect.DeepEqual(res, want) {
			t.Fatalf("forwarded enqueue %d: %+v, want %+v", i, res, want)
		}
	}
}
