package hooks

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/replication"
)

// TestRefencedMirrorOpenIsAsOfNow (found by review, and by chaos: wills
// of clean sessions published at a graceful stop): refenced (wills.go),
// used by mirrorLeftovers before a graceful stop, re-read IfOpened but
// kept the AsOf of the mirror open that failed at CONNECT. The
// connection's own claim (retried as a ReclaimOwner once the quorum is
// back) touched the id after that AsOf, so the refenced open was refused
// again and mochi published the will at the stop (what mirrorLeftovers
// exists to prevent).
func TestRefencedMirrorOpenIsAsOfNow(t *testing.T) {
	n := startSingleNode(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	open := func(id string, at int64, asOf uint64) *replication.SessionOpen {
		return &replication.SessionOpen{ClientID: id, ProtocolVersion: 5, Owner: "n1", At: at, CleanStart: true,
			Fenced: true, OweWill: true, AsOf: asOf, HasAsOf: true,
			Will: &replication.Will{Topic: "will", Payload: []byte("w")}}
	}
	// The first open fenced as of an index starts the recording of
	// touches (refused: it read before).
	for {
		_, err := n.Apply(ctx, open("warm", 1, n.SyncedIndex()))
		if err == nil || errors.Is(err, replication.ErrReopened) {
			break
		}
		if ctx.Err() != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond) // no leader yet
	}
	// The mirror written at CONNECT, whose write failed (no leader then).
	unmirrored := open("c", 2, n.SyncedIndex())
	// The quorum is back: the connection's own claim retry commits.
	if _, err := n.Apply(ctx, &replication.ReclaimOwner{ClientID: "c", Node: "n1", At: 2}); err != nil {
		t.Fatal(err)
	}
	// mirrorLeftovers
	res, err := n.Apply(ctx, unmirrored)
	if !errors.Is(err, replication.ErrReopened) || res.Index == 0 {
		t.Fatalf("first write: %v (index %d)", err, res.Index)
	}
	h := &Sessions{repl: n}
	again := h.refenced(ctx, unmirrored, "c", res.Index)
	if again == nil {
		t.Fatal("refenced gave nothing")
	}
	if _, err := n.Apply(ctx, again); err != nil {
		t.Fatalf("the refenced mirror open (fenced to today's state) was refused: %v; its AsOf %d is the CONNECT's",
			err, again.(*replication.SessionOpen).AsOf)
	}
}
