package node

import (
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestReopenedConnectOnLaggingFollowerDoesNotFloodTheLog: a CONNECT on a
// follower that has not applied the session's latest open is refused by
// the fence (SessionOpenIf) and must catch up to the refusing entry before
// it opens again (hooks applyOpen). Here the follower cannot catch up (its
// state machine is held), so the CONNECT should write one refused open (a
// few at most) and give up at its deadline, not propose refused opens in a
// loop for the whole deadline.
func TestReopenedConnectOnLaggingFollowerDoesNotFloodTheLog(t *testing.T) {
	g := newApplyGate(t)
	tc := newTunedCluster(t, g.tune, "n1", "n2", "n3")
	tc.waitReady()
	leader, follower := tc.leaderAndFollower(t)
	waitOpenFence(t, tc)
	// The follower falls behind applying.
	holdBehind(t, tc, g, follower, leader, "ro-gate")
	defer g.open()
	// The client's session is opened on the leader; the follower cannot see it.
	first := testutil.Connect(t, tc.nodes[leader].Addr("mqtt"), testutil.ClientOptions{ID: "ro-dev", SessionExpiry: 60})
	_ = first
	before := tc.nodes[leader].repl.Status().LastLogIndex
	start := time.Now()
	c, err := testutil.TryConnect(tc.nodes[follower].Addr("mqtt"), testutil.ClientOptions{ID: "ro-dev", SessionExpiry: 60})
	if err == nil {
		c.Close()
	}
	after := tc.nodes[leader].repl.Status().LastLogIndex
	t.Logf("CONNECT on the lagging follower: %v after %v; the log grew by %d entries", err, time.Since(start).Round(time.Millisecond), after-before)
	if after-before > 10 {
		t.Fatalf("one CONNECT on a lagging follower wrote %d log entries (refused opens proposed in a loop)", after-before)
	}
}
