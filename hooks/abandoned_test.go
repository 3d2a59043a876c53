package hooks

import (
	"log/slog"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/replication"
)

// TestAbandonedOpenAppliedBeforeRefusalIsUndone (found by review): a
// CONNECT's first try commits and this node applies it (the observer
// sees the open while the CONNECT still waits for the forwarded reply,
// lost with the leader), then the CONNECT's ctx ends and it is refused:
// abandonOpen came after the observer, so undoAbandoned never deleted the
// session the refused CONNECT created.
func TestAbandonedOpenAppliedBeforeRefusalIsUndone(t *testing.T) {
	h := &Sessions{cfg: SessionsConfig{Self: "n1"}, log: slog.Default(),
		live: map[string]*sessConn{}, opening: map[string]int64{}, openSeen: map[string]uint64{},
		abandoned: map[willlessKey]time.Time{}, ops: make(chan sessOp, 4)}
	const at = 1234
	done := h.markOpening("c", at)
	// The first try commits and is applied here.
	h.Apply(replication.SessionChange{Kind: replication.SessionOpened, ClientID: "c", Owner: "n1", At: at, Index: 7})
	// Retries fail until ctx ends: OnSessionEstablish refuses.
	h.abandonOpen("c", at)
	done()
	if len(h.ops) == 0 {
		t.Fatal("the session created by the refused CONNECT's open (applied before abandonOpen) is never deleted")
	}
}
