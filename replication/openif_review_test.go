package replication

import (
	"errors"
	"testing"
	"time"
)

// TestRefusedOpenIfReportsItsIndexWhenForwarded: a CONNECT whose fenced
// open is refused (ErrReopened) catches up to the refusing entry's index
// (hooks applyOpen: WaitAppliedLocal(res.Index)) before it opens again.
// The leader's own Apply answers that index; a follower's forwarded Apply
// must too, or the follower re-proposes on the same stale state.
func TestRefusedOpenIfReportsItsIndexWhenForwarded(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	fol := c.follower(lead)
	ctx := ctxT(t, 10*time.Second)
	if _, err := lead.node().Apply(ctx, &SessionOpen{ClientID: "c", ProtocolVersion: 5, ExpiryInterval: 60,
		Owner: lead.id, At: 1, Fenced: true}); err != nil {
		t.Fatal(err)
	}
	stale := func(owner string, at int64) *SessionOpen {
		return &SessionOpen{ClientID: "c", ProtocolVersion: 5, ExpiryInterval: 60, Owner: owner, At: at, Fenced: true}
	}
	lres, lerr := lead.node().Apply(ctx, stale(lead.id, 2))
	fres, ferr := fol.node().Apply(ctx, stale(fol.id, 3))
	t.Logf("leader: index %d, err %v", lres.Index, lerr)
	t.Logf("follower: index %d, err %v", fres.Index, ferr)
	if !errors.Is(lerr, ErrReopened) || lres.Index == 0 {
		t.Fatalf("leader: %+v, %v", lres, lerr)
	}
	if !errors.Is(ferr, ErrReopened) || fres.Index == 0 {
		t.Fatalf("forwarded refused open: index %d, err %v; want ErrReopened with the refusing entry's index", fres.Index, ferr)
	}
	if errors.Is(ferr, ErrUnknownOutcome) {
		t.Fatalf("a refused open certainly committed (and changed nothing), not an unknown outcome: %v", ferr)
	}
}
