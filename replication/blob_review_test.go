package replication

import (
	"bytes"
	"errors"
	"io"
	"os"
	"sync"
	"testing"
	"time"
)

// TestReviewBlobReuploadAfterDropOnLaggingFollower: the leader drops an
// unreferenced blob (BlobDrop, as its sweep does) while a follower has not
// applied the drop yet. A publisher on that follower whose WithBlob was
// refused with ErrBlobMissing does what hooks.applyDurable does: PutBlob
// again, then the WithBlob again. PutBlob trusts the follower's own,
// stale, state (FSM.blobChunks), writes no chunk and reports success, so
// the second WithBlob is refused as well: the retry cannot succeed, the
// publish is refused although the cluster is healthy.
func TestReviewBlobReuploadAfterDropOnLaggingFollower(t *testing.T) {
	ids := []string{"n1", "n2", "n3"}
	entered := map[string]chan struct{}{}
	release := make(chan struct{})
	for _, id := range ids {
		entered[id] = make(chan struct{}, 1)
	}
	var once sync.Once
	c := newTestCluster(t, 3)
	t.Cleanup(func() { once.Do(func() { close(release) }) }) // registered after, so it runs before the cluster's closeAll
	c.mutate = func(cfg *Config) {
		cfg.HeartbeatTimeout, cfg.ElectionTimeout, cfg.LeaderLeaseTimeout = time.Second, time.Second, 500*time.Millisecond
		cfg.BlobGrace = time.Hour
		self := cfg.NodeID
		cfg.OnRetained = func(ch RetainedChange) {
			if ch.Topic == "stall/"+self {
				entered[self] <- struct{}{}
				<-release // the follower's FSM goroutine lags here
			}
		}
	}
	c.startNew(ids...)
	lead := c.leader()
	from := c.follower(lead)
	ctx := ctxT(t, 4*waitFor)
	payload := randomPayload(2*BlobChunkSize+11, 21)
	ref, err := from.node().PutBlob(ctx, payload)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, waitFor, func() error {
		if b := from.node().fsm.blobChunks(ref.ID, ref.Size); b == nil || !b.complete() {
			return errors.New("follower has not applied the blob yet")
		}
		return nil
	})
	// The follower's FSM stalls (a slow disk, a long observer, a GC
	// pause): it stops applying for a while.
	if _, err := lead.node().Apply(ctx, setRetained("stall/"+from.id, "x")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-entered[from.id]:
	case <-time.After(waitFor):
		t.Fatal("follower did not stall")
	}
	// The leader's sweep drops the blob (nothing refers to it).
	if r, err := lead.node().Apply(ctx, &BlobDrop{IDs: []BlobID{ref.ID}}); err != nil || !r.Changed {
		t.Fatalf("drop: %+v %v", r, err)
	}
	wb := &WithBlob{Ref: ref, Cmd: &RetainSet{Msg: RetainedMessage{Topic: "big", QoS: 1}}}
	if _, err := from.node().Apply(ctx, wb); !errors.Is(err, ErrBlobMissing) {
		t.Fatalf("first WithBlob: %v, want ErrBlobMissing", err)
	}
	// hooks.applyDurable: write the blob once more (RewriteBlob: PutBlob
	// trusted the follower's stale state, skipped every chunk and
	// reported success), then refer to it.
	before := lead.node().raft.LastIndex()
	if _, err := from.node().RewriteBlob(ctx, payload); err != nil {
		t.Fatal(err)
	}
	wrote := lead.node().raft.LastIndex() - before
	_, err = from.node().Apply(ctx, wb)
	if err != nil {
		t.Fatalf("WithBlob after the re-upload still refused (%v); the re-upload wrote %d entries: "+
			"PutBlob skipped every chunk because the lagging follower's state still held the dropped blob", err, wrote)
	}
}

// TestReviewBlobFileNameReusedWithinOneEntry: a blob's file is named by
// the index of the entry that created it, so one entry (a Batch) that
// creates a blob, drops it and creates it again gives both the same file.
// While a snapshot is being persisted the dropped file's removal is
// deferred, and when the snapshot is released it removes the file of the
// live blob: a referenced blob becomes unreadable on this node only.
func TestReviewBlobFileNameReusedWithinOneEntry(t *testing.T) {
	f := blobFSM(t)
	a := &applier{f: f}
	a.apply(open("c", "n1", false))
	payload := randomPayload(BlobChunkSize/2, 22)
	cs := chunks(payload)
	ref := BlobRef{ID: BlobIDOf(payload), Size: int64(len(payload))}
	snap, err := f.Snapshot() // a snapshot being persisted meanwhile
	if err != nil {
		t.Fatal(err)
	}
	enq := enqueue("", 0, DropNewest, "c")
	enq.Payload = nil
	r := a.apply(&Batch{Commands: []Command{cs[0], &BlobDrop{IDs: []BlobID{ref.ID}}, cs[0], &WithBlob{Ref: ref, Cmd: enq}}})
	if len(r.Results) != 4 || r.Results[3].Err != nil {
		t.Fatalf("batch: %+v", r)
	}
	if err := snap.Persist(&memSink{}); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	file, err := f.OpenBlob(ref)
	if err != nil {
		t.Fatalf("queued blob unreadable after the snapshot's release: %v", err)
	}
	defer file.Close()
	got, err := io.ReadAll(file)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("queued blob content lost (%d bytes, %v)", len(got), err)
	}
	if _, err := os.Stat(f.st.blobs[ref.ID].file); err != nil {
		t.Fatal(err)
	}
}
