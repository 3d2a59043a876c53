package hooks

import (
	"testing"
	"time"

	"github.com/mqtt-ha/broker/replication"
)

// TestLoadBudget: a load waits while the budget is taken and goes on
// once it is released; a stopped pump stops waiting; a payload larger
// than the whole budget takes all of it rather than waiting for ever.
func TestLoadBudget(t *testing.T) {
	b := newLoadBudget(100)
	if !b.acquire(60, nil) {
		t.Fatal("first acquire")
	}
	got := make(chan bool, 1)
	go func() { got <- b.acquire(50, nil) }()
	select {
	case <-got:
		t.Fatal("acquired 50 with 40 free")
	case <-time.After(50 * time.Millisecond):
	}
	b.release(60)
	select {
	case ok := <-got:
		if !ok {
			t.Fatal("acquire after release failed")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("acquire did not wake up after release")
	}
	done := make(chan struct{})
	close(done)
	if b.acquire(80, done) {
		t.Fatal("acquired 80 with 50 free")
	}
	b.release(50)
	if !b.acquire(1000, nil) { // larger than the budget: takes all 100
		t.Fatal("oversized acquire")
	}
	b.release(1000)
	if b.free != 100 {
		t.Fatalf("free %d after releasing everything", b.free)
	}
}

func TestBlobOrigin(t *testing.T) {
	ref := replication.BlobRef{ID: replication.BlobIDOf([]byte("x")), Size: 300 << 10}
	if got, ok := blobOfOrigin(blobOrigin(ref)); !ok || got != ref {
		t.Fatalf("round trip: %+v %v", got, ok)
	}
	for _, o := range []string{"", "client-1", blobOriginPrefix, blobOriginPrefix + "zz:1", blobOriginPrefix + ref.ID.String() + ":0",
		blobOriginPrefix + ref.ID.String()[2:] + ":5"} {
		if _, ok := blobOfOrigin(o); ok {
			t.Fatalf("%q parsed as a blob", o)
		}
	}
}
