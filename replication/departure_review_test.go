package replication

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"
)

// stopLikeShutdown is what internal/node's Shutdown does for replication:
// record the leave (best effort, one second), then close raft.
func stopLikeShutdown(t *testing.T, tn *testNode) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	err := tn.node().RecordDeparture(ctx)
	cancel()
	t.Logf("%s: RecordDeparture: %v", tn.id, err)
	tn.stop(false)
}

// watchVoters fails if, during d, the leader's configuration (as seen by
// from) stops listing every id in want as a voter.
func watchVoters(t *testing.T, from *testNode, want []string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		v := ids(from.node().Status().Voters)
		for _, id := range want {
			if !slices.Contains(v, id) {
				t.Fatalf("%s is no longer a voter (voters %v) although it is only restarting", id, v)
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestFullRestartKeepsSlowVotersReview: every node of a five-voter cluster
// stops gracefully (a maintenance window, a node pool upgrade, a helm
// upgrade that recreates all pods); the ones that stop while a quorum is
// left record their leave. The cluster is down longer than
// RemoveLeftAfter. Three come back first and elect a leader; the other two
// are still starting (image pull, volume attach, OrderedReady). Their
// leave records are old, so the new leader removes them at once, although
// they are restarting, not scaled down. Before the departure commit the
// new leader's membership showed no leave and nothing was removed.
func TestFullRestartKeepsSlowVotersReview(t *testing.T) {
	c := newTestCluster(t, 5)
	newDepartures(c, 3*time.Second) // a fresh memberlist shows no leave
	all := []string{"n1", "n2", "n3", "n4", "n5"}
	c.startNew(all...)
	waitConfig(t, c.leader(), all, nil)
	for _, id := range []string{"n5", "n4", "n3", "n2", "n1"} {
		stopLikeShutdown(t, c.node(id))
	}
	time.Sleep(4 * time.Second) // down longer than RemoveLeftAfter
	for _, id := range []string{"n1", "n2", "n3"} {
		if err := c.node(id).start(); err != nil {
			t.Fatal(err)
		}
	}
	lead := c.leader()
	t.Logf("departures after the restart: %v", lead.node().Departures())
	// The new leader counts their absence from its own election, not from
	// the records: within RemoveLeftAfter of it they are still voters.
	watchVoters(t, lead, all, 2*time.Second)
	for _, id := range []string{"n4", "n5"} {
		if err := c.node(id).start(); err != nil {
			t.Fatal(err)
		}
	}
	// Back: each clears its own record, and stays a voter.
	eventually(t, waitFor, func() error {
		if d := c.leader().node().Departures(); len(d) != 0 {
			return fmt.Errorf("records %v, want none once every node is back", d)
		}
		return nil
	})
	watchVoters(t, c.leader(), all, 4*time.Second)
}

// TestSkewedClockLeaveRemovesRestartingVoterReview: At is the leaving
// node's wall clock, compared with the leader's. A node whose clock is an
// hour behind writes exactly this record when it stops for a rolling
// restart (or a leader with such a clock writes it from its membership
// view); the leader then removes it at once instead of after
// RemoveLeftAfter (a minute here), although it is back 700 ms later.
func TestSkewedClockLeaveRemovesRestartingVoterReview(t *testing.T) {
	c := newTestCluster(t, 5)
	newDepartures(c, time.Minute)
	all := []string{"n1", "n2", "n3", "n4", "n5"}
	c.startNew(all...)
	lead := c.leader()
	waitConfig(t, lead, all, nil)
	x := c.follower(lead)
	ctx := ctxT(t, waitFor)
	x.stop(false)
	// The record of this leave, with At an hour in the past: written by x
	// (RecordDeparture) with its clock an hour behind, or by a leader with
	// such a clock from its membership view. Written after the stop here
	// so that the leader's "visible again" clear cannot race it away.
	if _, err := lead.node().Apply(ctx, &Departure{Server: x.id, At: time.Now().Add(-time.Hour).UnixMilli()}); err != nil {
		t.Fatal(err)
	}
	watchVoters(t, lead, all, 700*time.Millisecond)
	if err := x.start(); err != nil {
		t.Fatal(err)
	}
}

// TestOwnLeaveRecordOutlivesTheLeaveReview: Node.Shutdown writes the
// record while the node is still a member (memberlist leaves only after
// raft closed), so the leader's next reconcile sees it visible and clears
// it as "back again". The node then stays away; a leader that did not see
// the leave in membership (the case the record is for) never removes it.
// 300 ms stands for raft's close, the stopped marker and the leave's
// gossip, during which the leader reconciles (every 40 ms here, every
// second by default).
func TestOwnLeaveRecordOutlivesTheLeaveReview(t *testing.T) {
	c := newTestCluster(t, 5)
	newDepartures(c, 1500*time.Millisecond) // membership never reports a leave
	all := []string{"n1", "n2", "n3", "n4", "n5"}
	c.startNew(all...)
	lead := c.leader()
	waitConfig(t, lead, all, nil)
	x := c.follower(lead)
	ctx := ctxT(t, waitFor)
	if err := x.node().RecordDeparture(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	_, recorded := lead.node().Departures()[x.id]
	x.stop(false)
	// x is removed (and one of the four left demoted: voters stay odd).
	eventually(t, waitFor, func() error {
		st := c.leader().node().Status()
		v, nv := ids(st.Voters), ids(st.NonVoters)
		if slices.Contains(v, x.id) || slices.Contains(nv, x.id) || len(v) != 3 {
			return fmt.Errorf("voters %v non-voters %v, want %s gone and 3 voters (record still present when the node stopped: %v)", v, nv, x.id, recorded)
		}
		return nil
	})
}
