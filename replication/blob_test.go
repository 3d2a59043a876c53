package replication

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// blobFSM is an FSM whose blob files live in a test directory.
func blobFSM(t *testing.T) *FSM {
	f := testFSM(observers{})
	f.st.store = newBlobStore(t.TempDir())
	return f
}

func randomPayload(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// chunks returns the BlobChunk commands of payload.
func chunks(payload []byte) []*BlobChunk {
	id := BlobIDOf(payload)
	var out []*BlobChunk
	for off := 0; off < len(payload); off += BlobChunkSize {
		out = append(out, &BlobChunk{ID: id, Size: int64(len(payload)), Offset: int64(off),
			Data: payload[off:min(off+BlobChunkSize, len(payload))]})
	}
	return out
}

type applier struct {
	f   *FSM
	idx uint64
}

func (a *applier) apply(c Command) Result {
	a.idx++
	return a.f.Apply(entry(a.idx, c)).(Result)
}

func readBlob(t *testing.T, f *FSM, ref BlobRef) []byte {
	t.Helper()
	file, err := f.OpenBlob(ref)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	b, err := io.ReadAll(file)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestBlobQueuedAndDropped: a WithBlob enqueue is refused until every
// chunk is applied, then queues a reference whose content reads back
// whole; a BlobDrop leaves a referenced blob alone and removes it (and its
// file) once nothing refers to it.
func TestBlobQueuedAndDropped(t *testing.T) {
	f := blobFSM(t)
	a := &applier{f: f}
	a.apply(open("c", "n1", false))
	payload := randomPayload(3*BlobChunkSize+1234, 1)
	ref := BlobRef{ID: BlobIDOf(payload), Size: int64(len(payload))}
	cs := chunks(payload)
	enq := enqueue("", 0, DropNewest, "c")
	enq.Payload = nil
	wb := &WithBlob{Ref: ref, Cmd: enq}
	for _, c := range cs[:len(cs)-1] {
		if r := a.apply(c); r.Err != nil || !r.Changed {
			t.Fatalf("chunk at %d: %+v", c.Offset, r)
		}
	}
	if r := a.apply(wb); !errors.Is(r.Err, ErrBlobMissing) {
		t.Fatalf("enqueue of an incomplete blob: %v", r.Err)
	}
	if r := a.apply(cs[0]); r.Err != nil || r.Changed {
		t.Fatalf("retried chunk: %+v", r)
	}
	a.apply(cs[len(cs)-1])
	r := a.apply(wb)
	if r.Err != nil || len(r.Seqs) != 1 || r.Seqs[0] == 0 {
		t.Fatalf("enqueue: %+v", r)
	}
	s, _ := f.Session("c")
	if len(s.Queue) != 1 || s.Queue[0].Blob == nil || *s.Queue[0].Blob != ref || s.Queue[0].Payload != nil {
		t.Fatalf("queue: %+v", s.Queue)
	}
	if got := readBlob(t, f, ref); !bytes.Equal(got, payload) {
		t.Fatal("blob content differs")
	}
	file := f.st.blobs[ref.ID].file
	if r := a.apply(&BlobDrop{IDs: []BlobID{ref.ID}}); r.Changed {
		t.Fatal("a referenced blob was dropped")
	}
	a.apply(&Ack{ClientID: "c", UpTo: r.Seqs[0]})
	if r := a.apply(&BlobDrop{IDs: []BlobID{ref.ID}}); !r.Changed {
		t.Fatal("an unreferenced blob was kept")
	}
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Fatalf("blob file after drop: %v", err)
	}
	if _, err := f.OpenBlob(ref); !errors.Is(err, ErrBlobMissing) {
		t.Fatalf("open after drop: %v", err)
	}
	// A chunk of another size under the same id is refused.
	a.apply(cs[0])
	bad := *cs[1]
	bad.Size++
	bad.Data = append(bytes.Clone(bad.Data), 0)[:BlobChunkSize]
	if r := a.apply(&bad); !errors.Is(r.Err, ErrInvalidCommand) {
		t.Fatalf("size mismatch: %v", r.Err)
	}
}

// TestBlobRetainedAndSnapshot: a retained blob and a queued one survive a
// snapshot round trip, byte for byte, and so does a blob still being
// written; the restored state's files are its own.
func TestBlobRetainedAndSnapshot(t *testing.T) {
	f := blobFSM(t)
	a := &applier{f: f}
	a.apply(open("c", "n1", false))
	retained := randomPayload(BlobChunkSize+7, 2)
	queued := randomPayload(BlobChunkSize/2+3, 3)
	partial := randomPayload(2*BlobChunkSize+5, 4)
	for _, c := range append(chunks(retained), chunks(queued)...) {
		a.apply(c)
	}
	a.apply(chunks(partial)[1])
	rref := BlobRef{ID: BlobIDOf(retained), Size: int64(len(retained))}
	qref := BlobRef{ID: BlobIDOf(queued), Size: int64(len(queued))}
	if r := a.apply(&WithBlob{Ref: rref, Cmd: &RetainSet{Msg: RetainedMessage{Topic: "img", QoS: 1, ContentType: "image/png"}}}); r.Err != nil {
		t.Fatal(r.Err)
	}
	enq := enqueue("", 0, DropNewest, "c")
	enq.Payload = nil
	if r := a.apply(&WithBlob{Ref: qref, Cmd: enq}); r.Err != nil {
		t.Fatal(r.Err)
	}
	m, _ := f.RetainedMessage("img")
	if m.Blob == nil || *m.Blob != rref {
		t.Fatalf("retained: %+v", m)
	}
	data := snapshotBytes(t, f)
	if data[len(snapMagic)] != snapVersionV3 {
		t.Fatalf("snapshot version %d with blobs", data[len(snapMagic)])
	}
	g := blobFSM(t)
	if err := g.Restore(io.NopCloser(bytes.NewReader(data))); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(exportAll(f), exportAll(g)) || !reflect.DeepEqual(f.Retained(), g.Retained()) {
		t.Fatal("restored state differs")
	}
	for _, want := range [][]byte{retained, queued} {
		ref := BlobRef{ID: BlobIDOf(want), Size: int64(len(want))}
		if got := readBlob(t, g, ref); !bytes.Equal(got, want) {
			t.Fatalf("restored blob %s differs", ref.ID)
		}
		if filepath.Dir(g.st.blobs[ref.ID].file) == filepath.Dir(f.st.blobs[ref.ID].file) {
			t.Fatal("restored blob shares the original's directory")
		}
	}
	if !bytes.Equal(data, snapshotBytes(t, g)) {
		t.Fatal("snapshot of the restored state differs")
	}
	// The partial upload goes on after the restore.
	ga := &applier{f: g, idx: a.idx}
	for _, c := range chunks(partial) {
		ga.apply(c)
	}
	pref := BlobRef{ID: BlobIDOf(partial), Size: int64(len(partial))}
	if got := readBlob(t, g, pref); !bytes.Equal(got, partial) {
		t.Fatal("blob completed after a restore differs")
	}
	// Every truncation fails and leaves the state alone.
	h := blobFSM(t)
	for i := 0; i < len(data); i += 4099 {
		if err := h.Restore(io.NopCloser(bytes.NewReader(data[:i]))); err == nil {
			t.Fatalf("truncated at %d restored", i)
		}
	}
	if n, _ := h.Blobs(); n != 0 {
		t.Fatal("failed restore changed the state")
	}
}

// TestBlobFileOutlivesDropDuringSnapshot: a blob dropped while a snapshot
// that holds it is being persisted stays readable for that snapshot; a
// blob written again under the same id meanwhile gets a file of its own.
func TestBlobFileOutlivesDropDuringSnapshot(t *testing.T) {
	f := blobFSM(t)
	a := &applier{f: f}
	payload := randomPayload(BlobChunkSize+1, 5)
	for _, c := range chunks(payload) {
		a.apply(c)
	}
	id := BlobIDOf(payload)
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	old := f.st.blobs[id].file
	if r := a.apply(&BlobDrop{IDs: []BlobID{id}}); !r.Changed {
		t.Fatal("not dropped")
	}
	for _, c := range chunks(payload) { // written again
		a.apply(c)
	}
	if f.st.blobs[id].file == old {
		t.Fatal("the new blob reuses the dropped one's file")
	}
	sink := &memSink{}
	if err := snap.Persist(sink); err != nil {
		t.Fatalf("persist after the drop: %v", err)
	}
	snap.Release()
	if _, err := os.Stat(old); !os.IsNotExist(err) {
		t.Fatalf("dropped file after release: %v", err)
	}
	g := blobFSM(t)
	if err := g.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	if got := readBlob(t, g, BlobRef{ID: id, Size: int64(len(payload))}); !bytes.Equal(got, payload) {
		t.Fatal("snapshot taken before the drop lost the blob")
	}
	if got := readBlob(t, f, BlobRef{ID: id, Size: int64(len(payload))}); !bytes.Equal(got, payload) {
		t.Fatal("blob written again differs")
	}
}

func TestBlobCommandsRoundTrip(t *testing.T) {
	p := randomPayload(100, 6)
	enq := enqueue("", 3, DropOldest, "a", "b")
	enq.Payload = nil
	for _, c := range []Command{
		&BlobChunk{ID: BlobIDOf(p), Size: 100, Offset: 0, Data: p},
		&WithBlob{Ref: BlobRef{ID: BlobIDOf(p), Size: 100}, Cmd: enq},
		&WithBlob{Ref: BlobRef{ID: BlobIDOf(p), Size: 100}, Cmd: &QoS2Publish{ClientID: "a", PacketID: 7, Enqueue: enq, IfOpened: 9}},
		&WithBlob{Ref: BlobRef{ID: BlobIDOf(p), Size: 100}, Cmd: &RetainSet{Msg: RetainedMessage{Topic: "t"}}},
		&BlobDrop{IDs: []BlobID{BlobIDOf(p), BlobIDOf(p[1:])}},
	} {
		if err := c.validate(); err != nil {
			t.Fatalf("%v: %v", c.Type(), err)
		}
		enc := EncodeCommand(c)
		got, err := DecodeCommand(enc)
		if err != nil || !reflect.DeepEqual(got, c) {
			t.Fatalf("%v: decoded %+v, %v", c.Type(), got, err)
		}
	}
	for _, c := range []Command{
		&BlobChunk{ID: BlobIDOf(p), Size: 100, Offset: 0, Data: p[:99]},
		&BlobChunk{ID: BlobIDOf(p), Size: 2 * BlobChunkSize, Offset: 1, Data: p},
		&WithBlob{Ref: BlobRef{ID: BlobIDOf(p), Size: 100}, Cmd: enqueue("own payload", 0, DropNewest, "a")},
		&WithBlob{Ref: BlobRef{ID: BlobIDOf(p), Size: 100}, Cmd: &ClaimOwner{ClientID: "a", Node: "n"}},
		&BlobDrop{},
	} {
		if err := c.validate(); !errors.Is(err, ErrInvalidCommand) {
			t.Fatalf("%v %+v: %v", c.Type(), c, err)
		}
	}
	// A WithBlob around a batch does not decode.
	bad := append([]byte{byte(CmdWithBlob)}, make([]byte, 32)...)
	bad = appendUvarint(bad, 100)
	bad = appendBytes(bad, EncodeCommand(&Batch{Commands: []Command{setRetained("t", "v")}}))
	if _, err := DecodeCommand(bad); err == nil {
		t.Fatal("with_blob around a batch decoded")
	}
}

// TestBlobAcrossNodes: a blob written from a follower is readable on every
// node, also on one that was down and caught up through a snapshot, and
// after a restart (blob files are rebuilt from the snapshot and the log);
// an unreferenced blob is swept by the leader, a referenced one kept.
func TestBlobAcrossNodes(t *testing.T) {
	c := newTestCluster(t, 3)
	c.mutate = func(cfg *Config) {
		cfg.TrailingLogs = 2
		// Megabytes through three nodes in one process under -race on
		// two cores: the tests' 150 ms lease is too tight for that.
		cfg.HeartbeatTimeout, cfg.ElectionTimeout, cfg.LeaderLeaseTimeout = time.Second, time.Second, 500*time.Millisecond
		cfg.ExpirySweepInterval = 50 * time.Millisecond
		// Long enough for no pause of the upload to reach it (a pause
		// that does fails the WithBlob, which is safe, and the test).
		cfg.BlobGrace = 2 * time.Second
	}
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	from := c.follower(lead)
	var lag *testNode
	for _, tn := range c.up() {
		if tn != lead && tn != from {
			lag = tn
		}
	}
	lag.stop(true)
	ctx := ctxT(t, 4*waitFor)
	payload := randomPayload(3<<20+17, 7)
	ref, err := from.node().PutBlob(ctx, payload)
	if err != nil {
		t.Fatal(err)
	}
	res, err := from.node().Apply(ctx, &WithBlob{Ref: ref, Cmd: &RetainSet{Msg: RetainedMessage{Topic: "big", QoS: 1}}})
	if err != nil {
		t.Fatal(err)
	}
	// A second upload of the same content writes nothing, once the
	// uploading node holds the blob: it skips the chunks its own state
	// has, and a follower applies the commit after the leader answered
	// (CI and a local run: "re-upload wrote a chunk").
	eventually(t, waitFor, func() error {
		if got := from.node().SyncedIndex(); got < res.Index {
			return fmt.Errorf("%s applied up to %d, want %d", from.id, got, res.Index)
		}
		return nil
	})
	before := lead.node().raft.LastIndex()
	if _, err := from.node().PutBlob(ctx, payload); err != nil {
		t.Fatal(err)
	}
	// Other entries may land meanwhile (the leader's own bookkeeping: CI
	// saw 2), so look for chunks rather than count entries.
	for i := before + 1; i <= lead.node().raft.LastIndex(); i++ {
		var l raft.Log
		if err := lead.node().logs.GetLog(i, &l); err != nil || l.Type != raft.LogCommand {
			continue
		}
		if hasChunk(decodeEntry(&l)) {
			t.Fatalf("re-upload wrote a chunk at index %d", i)
		}
	}
	if err := lead.node().raft.Snapshot().Error(); err != nil {
		t.Fatal(err)
	}
	if err := lag.start(); err != nil {
		t.Fatal(err)
	}
	readsBack := func(tn *testNode) func() error {
		return func() error {
			got, err := tn.node().ReadBlob(ref)
			if err != nil {
				return err
			}
			if !bytes.Equal(got, payload) {
				return errors.New("content differs")
			}
			return nil
		}
	}
	for _, tn := range c.up() {
		eventually(t, waitFor, readsBack(tn))
	}
	if lag.node().fsm.Restores() == 0 {
		t.Fatal("the lagging node caught up without a snapshot")
	}
	// An upload nobody refers to is swept; the retained one stays.
	orphan, err := from.node().PutBlob(ctx, randomPayload(BlobChunkSize+1, 8))
	if err != nil {
		t.Fatal(err)
	}
	for _, tn := range c.up() {
		eventually(t, waitFor, func() error {
			if _, err := tn.node().ReadBlob(orphan); !errors.Is(err, ErrBlobMissing) {
				return fmt.Errorf("%s: orphan blob still there (%v)", tn.id, err)
			}
			return nil
		})
	}
	lead.stop(true)
	lead.restart(t)
	c.leader()
	for _, tn := range c.up() {
		eventually(t, waitFor, readsBack(tn))
	}
}

// TestBatchOfChunksRefused: a caller's Batch with two chunks would make
// an entry of two chunks (and two blobs created under one index); Apply
// refuses it before proposing.
func TestBatchOfChunksRefused(t *testing.T) {
	cfg := Config{}
	cfg.Sanitize()
	n := &Node{cfg: cfg}
	p := randomPayload(2*BlobChunkSize, 9)
	cs := chunks(p)
	if _, err := n.newReq(&Batch{Commands: []Command{cs[0], cs[1]}}); !errors.Is(err, ErrInvalidCommand) {
		t.Fatalf("batch of two chunks: %v", err)
	}
	if _, err := n.newReq(&Batch{Commands: []Command{cs[0], setRetained("t", "v")}}); err != nil {
		t.Fatalf("batch of one chunk and a retained write: %v", err)
	}
}

// hasChunk reports whether cmd is, or a Batch holds, a BlobChunk.
func hasChunk(cmd Command) bool {
	switch c := cmd.(type) {
	case *BlobChunk:
		return true
	case *Batch:
		return slices.ContainsFunc(c.Commands, hasChunk)
	}
	return false
}
