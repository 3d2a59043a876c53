package replication

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/raft"

	"github.com/mqtt-ha/broker/internal/fuzzutil"
)

// memSink is a raft.SnapshotSink in memory; failAfter > 0 makes writes fail
// once that many bytes were written.
type memSink struct {
	bytes.Buffer
	failAfter int
	canceled  bool
	closed    bool
}

func (s *memSink) ID() string { return "mem" }
func (s *memSink) Cancel() error {
	s.canceled = true
	return nil
}
func (s *memSink) Close() error {
	s.closed = true
	return nil
}
func (s *memSink) Write(p []byte) (int, error) {
	if s.failAfter > 0 && s.Len()+len(p) > s.failAfter {
		return 0, errors.New("disk full")
	}
	return s.Buffer.Write(p)
}

var _ raft.SnapshotSink = (*memSink)(nil)

func testFSM(obs observers) *FSM {
	return newFSM(obs, newMetrics(), slog.New(slog.DiscardHandler))
}

func entry(idx uint64, c Command) *raft.Log {
	return &raft.Log{Index: idx, Term: 1, Type: raft.LogCommand, Data: EncodeCommand(c)}
}

// fill applies a mixed workload of n entries starting at index 1.
func fill(f *FSM, n int) {
	for i := 1; i <= n; i++ {
		var c Command
		switch i % 4 {
		case 0:
			c = &RetainSet{Msg: RetainedMessage{Topic: fmt.Sprintf("t/%d", i), Payload: []byte{byte(i)}, QoS: 1,
				ContentType: "c", UserProperties: []UserProperty{{"k", fmt.Sprint(i)}}, Expires: int64(i), Created: -int64(i)}}
		case 1:
			c = &ClaimOwner{ClientID: fmt.Sprintf("c%d", i%7), Node: fmt.Sprintf("n%d", i%3), At: int64(i)}
		case 2:
			c = &RetainClear{Topic: fmt.Sprintf("t/%d", i-6)}
		case 3:
			c = &Batch{Commands: []Command{
				&RetainSet{Msg: RetainedMessage{Topic: fmt.Sprintf("b/%d", i), Payload: []byte("p"), CorrelationData: []byte{1}}},
				&ReleaseOwner{ClientID: fmt.Sprintf("c%d", (i-2)%7), Node: fmt.Sprintf("n%d", (i-2)%3), Epoch: uint64(i / 4)},
			}}
		}
		f.Apply(entry(uint64(i), c))
	}
}

func snapshotBytes(t testing.TB, f *FSM) []byte {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Release()
	sink := &memSink{}
	if err := snap.Persist(sink); err != nil {
		t.Fatal(err)
	}
	if !sink.closed || sink.canceled {
		t.Fatalf("sink closed=%v canceled=%v", sink.closed, sink.canceled)
	}
	return sink.Bytes()
}

func stateOf(f *FSM) *state {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.st.clone()
}

func TestFSMApplyAndObservers(t *testing.T) {
	var got []string
	f := testFSM(observers{
		onRetained: func(c RetainedChange) { got = append(got, fmt.Sprintf("r %s %v %d", c.Topic, c.Cleared, c.Index)) },
		onOwner: func(c OwnerChange) {
			got = append(got, fmt.Sprintf("o %s %s %d", c.ClientID, c.Owner.Node, c.Owner.Epoch))
		},
	})
	res := f.Apply(entry(1, &RetainSet{Msg: msg("a", "1")})).(Result)
	if res.Index != 1 || !res.Changed {
		t.Fatalf("apply result %+v", res)
	}
	out := f.ApplyBatch([]*raft.Log{
		entry(2, &ClaimOwner{ClientID: "c", Node: "A"}),
		{Index: 3, Type: raft.LogConfiguration, Data: []byte("not a command")},
		{Index: 4, Type: raft.LogCommand, Data: []byte{0x90, 1}}, // unknown, skippable
		entry(5, &Batch{Commands: []Command{&RetainClear{Topic: "a"}, &ClaimOwner{ClientID: "c", Node: "B"}}}),
	})
	if len(out) != 4 || out[1] != nil || out[2].(Result).Index != 4 {
		t.Fatalf("ApplyBatch responses %#v", out)
	}
	if r := out[3].(Result); len(r.Results) != 2 || r.Results[1].Prev.Node != "A" || r.Results[1].Epoch != 2 {
		t.Fatalf("batch result %+v", r)
	}
	want := []string{"r a false 1", "o c A 1", "r a true 5", "o c B 2"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("observer calls\n got %q\nwant %q", got, want)
	}
	if len(f.Retained()) != 0 {
		t.Fatal("retained after clear")
	}
	if o, ok := f.Owner("c"); !ok || o.Node != "B" {
		t.Fatalf("owner %+v", o)
	}
}

func TestFSMPanicsOnUndecodableEntry(t *testing.T) {
	f := testFSM(observers{})
	defer func() {
		r := recover()
		if r == nil {
			t.Fatal("undecodable entry did not panic")
		}
		if !strings.Contains(fmt.Sprint(r), "index 2") {
			t.Fatalf("panic does not name the index: %v", r)
		}
		// Nothing of the batch was applied: decoding happens first.
		if len(f.Retained()) != 0 {
			t.Fatal("half a batch applied before the panic")
		}
	}()
	f.ApplyBatch([]*raft.Log{
		entry(1, &RetainSet{Msg: msg("a", "1")}),
		{Index: 2, Type: raft.LogCommand, Data: []byte{0x07, 1, 2}},
	})
}

func TestFSMSnapshotRoundTrip(t *testing.T) {
	f := testFSM(observers{})
	fill(f, 200)
	f.Apply(entry(201, &SessionOpen{ClientID: "s0", ProtocolVersion: 5, Owner: "n1", At: 77}))
	data := snapshotBytes(t, f)

	restored := 0
	g := testFSM(observers{onRestore: func() { restored++ }})
	g.Apply(entry(1, &RetainSet{Msg: msg("stale", "x")})) // must be discarded
	if err := g.Restore(io.NopCloser(bytes.NewReader(data))); err != nil {
		t.Fatal(err)
	}
	if restored != 1 || g.Restores() != 1 {
		t.Fatalf("OnRestore called %d times", restored)
	}
	if !reflect.DeepEqual(stateOf(f), stateOf(g)) {
		t.Fatal("restored state differs")
	}
	if s, ok := g.Session("s0"); !ok || s.OpenedAt == 0 || s.OpenedPresent {
		t.Fatalf("session-opened record not restored: %+v", s)
	}
	// Equal states give byte-identical snapshots.
	if !bytes.Equal(data, snapshotBytes(t, g)) {
		t.Fatal("snapshot of the restored state differs")
	}
	// The epoch counter survives: the next claim continues the sequence.
	next := func(f *FSM) uint64 {
		return f.Apply(entry(1000, &ClaimOwner{ClientID: "new", Node: "n"})).(Result).Epoch
	}
	if a, b := next(f), next(g); a != b || a == 1 {
		t.Fatalf("epoch after restore %d vs %d", b, a)
	}
}

// TestSnapshotGolden pins the snapshot format like the command goldens.
// Version 2 added session records and two end-record counts; the version 1
// bytes this test pinned before are kept in TestSnapshotRestoresV1.
func TestSnapshotGolden(t *testing.T) {
	f := testFSM(observers{})
	f.Apply(entry(3, &RetainSet{Msg: msg("a", "p")}))
	f.Apply(entry(4, &ClaimOwner{ClientID: "c", Node: "n", At: 1}))
	got := hex.EncodeToString(snapshotBytes(t, f))
	want := "4d515253" + "02" + // "MQRS" v2
		"01" + "0d" + "03" + "0161" + "0170" + "0000000000000000" + // retained a@3 (13-byte body)
		"02" + "06" + "0163" + "016e" + "01" + "02" + // owner c -> n epoch 1 since 1
		"81" + "01" + "04" + // synced: entry 4 (skippable)
		"00" + "05" + "01" + "01" + "01" + "00" + "00" // end: epoch 1, 1 retained, 1 owner, 0 sessions, 0 queued
	if got != want {
		t.Fatalf("snapshot format changed\n got %s\nwant %s", got, want)
	}
}

// snapshotV1 is the same state in the version 1 format (before sessions),
// byte for byte what the previous release wrote.
const snapshotV1 = "4d515253" + "01" +
	"01" + "0d" + "03" + "0161" + "0170" + "0000000000000000" +
	"02" + "06" + "0163" + "016e" + "01" + "02" +
	"00" + "03" + "01" + "01" + "01"

// TestSnapshotRestoresV1: a node upgraded to the session-aware version
// still restores a snapshot written before sessions existed.
func TestSnapshotRestoresV1(t *testing.T) {
	raw, _ := hex.DecodeString(snapshotV1)
	g := testFSM(observers{})
	if err := g.Restore(io.NopCloser(bytes.NewReader(raw))); err != nil {
		t.Fatal(err)
	}
	if m, ok := g.RetainedMessage("a"); !ok || string(m.Payload) != "p" || m.Index != 3 {
		t.Fatalf("retained %+v %v", m, ok)
	}
	if o, ok := g.Owner("c"); !ok || o != (Owner{Node: "n", Epoch: 1, Since: 1}) {
		t.Fatalf("owner %+v %v", o, ok)
	}
	if len(g.Sessions()) != 0 {
		t.Fatal("sessions from a v1 snapshot")
	}
	// Written back, it is the v2 golden.
	f := testFSM(observers{})
	f.Apply(entry(3, &RetainSet{Msg: msg("a", "p")}))
	f.Apply(entry(4, &ClaimOwner{ClientID: "c", Node: "n", At: 1}))
	f.synced.Store(0) // a v1 snapshot does not say which entry it holds
	if !bytes.Equal(snapshotBytes(t, f), snapshotBytes(t, g)) {
		t.Fatal("v1 restore differs from the same state applied")
	}
	// A v1 snapshot cannot carry session records.
	bad, _ := hex.DecodeString("4d515253" + "01" + "03" + "00" + snapshotV1[10:])
	if err := g.Restore(io.NopCloser(bytes.NewReader(bad))); err == nil {
		t.Fatal("session record accepted in a v1 snapshot")
	}
}

func TestPersistCancelsSinkOnError(t *testing.T) {
	f := testFSM(observers{})
	fill(f, 5000) // larger than the 64 KiB write buffer
	snap, _ := f.Snapshot()
	defer snap.Release()
	sink := &memSink{failAfter: 100}
	if err := snap.Persist(sink); err == nil {
		t.Fatal("Persist succeeded on a failing sink")
	}
	if !sink.canceled || sink.closed {
		t.Fatalf("sink canceled=%v closed=%v, want canceled only", sink.canceled, sink.closed)
	}
}

func TestRestoreCorruptKeepsState(t *testing.T) {
	f := testFSM(observers{})
	fill(f, 50)
	data := snapshotBytes(t, f)
	g := testFSM(observers{onRestore: func() { t.Fatal("OnRestore after a failed restore") }})
	g.Apply(entry(1, &RetainSet{Msg: msg("keep", "me")}))
	before := stateOf(g)
	for name, bad := range map[string][]byte{
		"empty":     {},
		"magic":     append([]byte("XXXX"), data[4:]...),
		"version":   append(append([]byte(nil), data[:4]...), append([]byte{9}, data[5:]...)...),
		"truncated": data[:len(data)-3],
		"no end":    data[:len(data)-6],
		"trailing":  append(append([]byte(nil), data...), 0),
	} {
		if err := g.Restore(io.NopCloser(bytes.NewReader(bad))); err == nil {
			t.Errorf("%s: restore succeeded", name)
		}
		if !reflect.DeepEqual(before, stateOf(g)) {
			t.Fatalf("%s: failed restore changed the state", name)
		}
	}
}

// TestLengthsAreNotTrusted: a snapshot record or an RPC frame declaring a
// huge length costs memory only for the bytes that really arrive (both
// allocated the declared length up front; found by FuzzRestore and
// FuzzRPCFrame), and long bodies are still read exactly.
func TestLengthsAreNotTrusted(t *testing.T) {
	fuzzutil.AllocBound(t, fuzzutil.Slack, func() {
		if _, err := readSnapshot(strings.NewReader("MQRS\x02\x03\xff\xff\xff\xff\x03")); !errors.Is(err, errCorrupt) {
			t.Errorf("1 GiB record in 11 bytes: %v", err)
		}
		if _, _, _, err := readFrame(bufio.NewReader(strings.NewReader("\x00\x80\x00\x00\x01")), 16<<20); err == nil {
			t.Error("8 MiB frame in 5 bytes read")
		}
	})
	long := bytes.Repeat([]byte("0123456789abcdef"), 3*readChunk/16+1)
	if got, err := readN(bytes.NewReader(long), make([]byte, 10), len(long)); err != nil || !bytes.Equal(got, long) {
		t.Fatalf("readN of %d bytes: %d bytes, %v", len(long), len(got), err)
	}
	if _, err := readN(bytes.NewReader(long[:readChunk+1]), nil, len(long)); err != io.ErrUnexpectedEOF {
		t.Fatalf("short body: %v", err)
	}
	if _, err := readN(bytes.NewReader(nil), nil, 1); err != io.EOF {
		t.Fatalf("no body: %v", err)
	}
}

// TestSnapshotUnderConcurrentApply takes snapshots while another goroutine
// applies (run with -race). Each snapshot must be a consistent prefix of the
// log: topics 1..k with no gaps, and the epoch counter equal to k.
func TestSnapshotUnderConcurrentApply(t *testing.T) {
	f := testFSM(observers{})
	const n = 3000
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 1; i <= n; i++ {
			f.Apply(entry(uint64(i), &Batch{Commands: []Command{
				&RetainSet{Msg: msg(fmt.Sprintf("t/%05d", i), "x")},
				&ClaimOwner{ClientID: fmt.Sprintf("c%d", i), Node: "n"},
			}}))
		}
	}()
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
		st := stateOf(g)
		k := len(st.retained)
		if uint64(k) != st.epoch || len(st.owners) != k {
			t.Fatalf("inconsistent snapshot: %d retained, %d owners, epoch %d", k, len(st.owners), st.epoch)
		}
		for i := 1; i <= k; i++ {
			if m, ok := st.retained[fmt.Sprintf("t/%05d", i)]; !ok || m.Index != uint64(i) {
				t.Fatalf("snapshot of %d entries lacks entry %d", k, i)
			}
		}
		checks++
		if k == n {
			break
		}
	}
	wg.Wait()
	t.Logf("%d consistent snapshots taken during %d applies", checks, n)
}

// TestSnapshotIsolatedFromLaterApplies: a snapshot is a copy; applying
// after Snapshot() must not leak into what Persist writes.
func TestSnapshotIsolatedFromLaterApplies(t *testing.T) {
	f := testFSM(observers{})
	f.Apply(entry(1, &RetainSet{Msg: msg("a", "1")}))
	snap, _ := f.Snapshot()
	defer snap.Release()
	f.Apply(entry(2, &RetainSet{Msg: msg("b", "2")}))
	f.Apply(entry(3, &RetainClear{Topic: "a"}))
	sink := &memSink{}
	if err := snap.Persist(sink); err != nil {
		t.Fatal(err)
	}
	g := testFSM(observers{})
	if err := g.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	if r := g.Retained(); len(r) != 1 || r[0].Topic != "a" {
		t.Fatalf("snapshot saw later applies: %+v", r)
	}
}

func TestFSMReadsAreCopies(t *testing.T) {
	f := testFSM(observers{})
	f.Apply(entry(1, &ClaimOwner{ClientID: "c", Node: "A"}))
	o := f.Owners()
	o["c"] = Owner{Node: "evil"}
	delete(o, "c")
	if got, _ := f.Owner("c"); got.Node != "A" {
		t.Fatal("Owners() handed out the live map")
	}
}

// TestOpenedPresentWithoutAtSurvivesSnapshot: an open without an At (valid,
// never sent by the hooks) records no retry answer, so a replica restored
// from a snapshot holds the same session as one that applied the log.
func TestOpenedPresentWithoutAtSurvivesSnapshot(t *testing.T) {
	f := testFSM(observers{})
	f.Apply(entry(1, &SessionOpen{ClientID: "s", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "n1"}))
	f.Apply(entry(2, &SessionOpen{ClientID: "s", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "n2"}))
	g := testFSM(observers{})
	if err := g.Restore(io.NopCloser(bytes.NewReader(snapshotBytes(t, f)))); err != nil {
		t.Fatal(err)
	}
	a, _ := f.Session("s")
	b, _ := g.Session("s")
	if !reflect.DeepEqual(a, b) {
		t.Fatalf("replicas differ after a restore: applied %+v, restored %+v", a, b)
	}
}
