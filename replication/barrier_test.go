package replication

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"testing"
)

// TestReadBarrierOnLaggingFollower: a follower that was down while writes
// were committed sees every one of them once ReadBarrier returns, before it
// has heard from the leader on its own (a restarted node starts with
// nothing applied; matching a publish there without the barrier is how an
// acknowledged message was lost).
func TestReadBarrierOnLaggingFollower(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	f := c.follower(lead)
	f.stop(true)
	ctx := ctxT(t, waitFor)
	const writes = 50
	for i := range writes {
		applyRetry(t, ctx, lead.node(), setRetained(fmt.Sprintf("lag/%d", i), "v"))
	}
	if err := f.start(); err != nil {
		t.Fatal(err)
	}
	if err := f.node().ReadBarrier(ctx); err != nil {
		t.Fatal(err)
	}
	for i := range writes {
		if _, ok := f.node().RetainedMessage(fmt.Sprintf("lag/%d", i)); !ok {
			t.Fatalf("write %d committed before ReadBarrier is not visible on the restarted follower after it", i)
		}
	}
}

// TestReadBarrierSeesEveryEarlierWrite: a write acknowledged on the leader
// is visible on a follower as soon as the follower's ReadBarrier returns
// (the follower applies asynchronously; without the barrier it often lags).
func TestReadBarrierSeesEveryEarlierWrite(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	f := c.follower(lead)
	ctx := ctxT(t, waitFor)
	for i := range 200 {
		topic := fmt.Sprintf("seen/%d", i)
		applyRetry(t, ctx, lead.node(), setRetained(topic, "v"))
		if err := f.node().ReadBarrier(ctx); err != nil {
			t.Fatal(err)
		}
		if _, ok := f.node().RetainedMessage(topic); !ok {
			t.Fatalf("write %d acknowledged before ReadBarrier is not visible on the follower after it", i)
		}
	}
	// On the leader too (its own state machine also applies asynchronously).
	for i := range 50 {
		topic := fmt.Sprintf("lead/%d", i)
		applyRetry(t, ctx, f.node(), setRetained(topic, "v"))
		if err := lead.node().ReadBarrier(ctx); err != nil {
			t.Fatal(err)
		}
		if _, ok := lead.node().RetainedMessage(topic); !ok {
			t.Fatalf("write %d not visible on the leader after ReadBarrier", i)
		}
	}
}

// TestSnapshotCarriesSyncedIndex: a node that catches up from a snapshot
// knows which entries its state holds (WaitSynced ends), although raft
// never hands it those entries one by one.
func TestSnapshotCarriesSyncedIndex(t *testing.T) {
	f := testFSM(observers{})
	f.Apply(entry(3, &RetainSet{Msg: msg("a", "p")}))
	f.Apply(entry(4, &ClaimOwner{ClientID: "c", Node: "n", At: 1}))
	g := testFSM(observers{})
	if err := g.Restore(io.NopCloser(bytes.NewReader(snapshotBytes(t, f)))); err != nil {
		t.Fatal(err)
	}
	if s, _ := g.syncedState(); s != 4 {
		t.Fatalf("synced after restore = %d, want 4", s)
	}
}

// TestSessionsBarrierOnLaggingFollower: subscriptions committed while
// a follower was down are in its state once SessionsBarrier returns.
func TestSessionsBarrierOnLaggingFollower(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	f := c.follower(lead)
	f.stop(true)
	ctx := ctxT(t, waitFor)
	const sessions = 20
	for i := range sessions {
		id := fmt.Sprintf("s%d", i)
		applyRetry(t, ctx, lead.node(), &Batch{Commands: []Command{
			&SessionOpen{ClientID: id, ProtocolVersion: 5, ExpiryInterval: 60, Owner: "n1", At: 1},
			&Subscribe{ClientID: id, Subscriptions: []Subscription{{Filter: "a/#", QoS: 1}}},
		}})
		// Writes that change no subscription come after.
		applyRetry(t, ctx, lead.node(), setRetained(fmt.Sprintf("other/%d", i), "v"))
	}
	if err := f.start(); err != nil {
		t.Fatal(err)
	}
	if err := f.node().SessionsBarrier(ctx); err != nil {
		t.Fatal(err)
	}
	for i := range sessions {
		s, ok := f.node().Session(fmt.Sprintf("s%d", i))
		if _, sub := s.Subscriptions["a/#"]; !ok || !sub {
			t.Fatalf("subscription of s%d committed before the barrier is not visible after it", i)
		}
	}
}

// applyRetry applies an idempotent cmd, retrying when a leader change
// (under load: 2 cores, -race, other packages' tests) left its outcome
// unknown or found no leader, as a client would.
func applyRetry(t *testing.T, ctx context.Context, n *Node, cmd Command) {
	t.Helper()
	for {
		_, err := n.Apply(ctx, cmd)
		if err == nil {
			return
		}
		if ctx.Err() != nil || !(errors.Is(err, ErrUnknownOutcome) || errors.Is(err, ErrNotLeader) || errors.Is(err, ErrNoLeader)) {
			t.Fatal(err)
		}
	}
}
