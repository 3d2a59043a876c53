package replication

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

func TestReadLeaseHolds(t *testing.T) {
	now := time.Now()
	voters := []raft.ServerID{"a", "b", "c"}
	l := newReadLease(100 * time.Millisecond)
	if l.holds("a", 5, voters, now) {
		t.Fatal("held with no follower's acknowledgement (1 of 3)")
	}
	l.acked("b", 4, now.Add(-10*time.Millisecond))
	if l.holds("a", 5, voters, now) {
		t.Fatal("held on an acknowledgement of an earlier term")
	}
	l.acked("b", 5, now.Add(-150*time.Millisecond))
	if l.holds("a", 5, voters, now) {
		t.Fatal("held on an acknowledgement older than the lease")
	}
	l.acked("b", 5, now.Add(-10*time.Millisecond))
	if !l.holds("a", 5, voters, now) {
		t.Fatal("not held with a fresh acknowledgement of the term (2 of 3)")
	}
	l.acked("b", 5, now.Add(-50*time.Millisecond)) // a late answer to an older request
	if !l.holds("a", 5, voters, now.Add(60*time.Millisecond)) {
		t.Fatal("an older request's answer moved the lease back")
	}
	if l.holds("a", 5, voters, now.Add(95*time.Millisecond)) {
		t.Fatal("held after the lease's length")
	}
	if l.holds("a", 6, voters, now) {
		t.Fatal("held in a later term on the earlier term's acknowledgements")
	}
	l.block(5)
	if l.holds("a", 5, voters, now) {
		t.Fatal("held in the term of a leadership transfer")
	}
	// A leader that is not a voter itself (it removed itself) needs a
	// majority of the voters without it.
	l.acked("c", 6, now)
	l.acked("d", 6, now)
	if !l.holds("a", 6, []raft.ServerID{"c", "d", "e"}, now) {
		t.Fatal("not held with 2 of 3 voters")
	}
	if l.holds("a", 6, []raft.ServerID{"c", "e", "f"}, now) {
		t.Fatal("held with 1 of 3 voters")
	}
	if newReadLease(0).holds("a", 5, []raft.ServerID{"a"}, now) {
		t.Fatal("a disabled lease held")
	}
}

// TestVoteGateRefusesVotesRightAfterStart: a node that restarts forgets
// the leader it acknowledged, so it must not vote while that leader's
// lease may still run.
func TestVoteGateRefusesVotesRightAfterStart(t *testing.T) {
	var held, strict atomic.Bool
	l := newReadLease(300 * time.Millisecond)
	stop := make(chan struct{})
	defer close(stop)
	in := make(chan raft.RPC)
	out := newVoteGate(&held, &strict, l, stop).filter(in)
	vote := func() error {
		resp := make(chan raft.RPCResponse, 1)
		in <- raft.RPC{Command: &raft.RequestVoteRequest{LastLogIndex: 10}, RespChan: resp}
		select {
		case r := <-resp:
			return r.Error
		case rpc := <-out:
			rpc.Respond(nil, nil)
			return nil
		case <-time.After(5 * time.Second):
			t.Fatal("vote request neither answered nor passed on")
			return nil
		}
	}
	if err := vote(); !errors.Is(err, errJustStarted) {
		t.Fatalf("vote right after start: %v, want refused", err)
	}
	time.Sleep(time.Until(l.started.Add(l.dur))) // the gate's own bound, not a synchronisation
	if err := vote(); err != nil {
		t.Fatalf("vote after the lease's length refused: %v", err)
	}
}

// TestLeaderReadIndexUsesLease: on a healthy cluster the leader confirms
// read indexes by its lease (no heartbeat round) for reads on every node;
// with the lease disabled every round is a heartbeat round.
func TestLeaderReadIndexUsesLease(t *testing.T) {
	for _, disabled := range []bool{false, true} {
		c := newTestCluster(t, 3)
		c.mutate = func(cfg *Config) { cfg.DisableReadLease = disabled }
		c.startNew("a", "b", "c")
		lead := c.leader()
		// Reads on a follower ask the leader; on the leader they are its own.
		for _, tn := range []*testNode{c.follower(lead), lead} {
			for range 20 {
				if err := tn.node().ReadBarrier(ctxT(t, 5*time.Second)); err != nil {
					t.Fatal(err)
				}
			}
		}
		m := lead.node().m.readIndexes
		leased, rounds := counterValue(t, m.WithLabelValues("lease")), counterValue(t, m.WithLabelValues("heartbeat_round"))
		t.Logf("lease disabled %t: %v by lease, %v by heartbeat round", disabled, leased, rounds)
		if disabled && leased > 0 || !disabled && leased == 0 || leased+rounds < 40 {
			t.Fatalf("lease disabled %t: %v read indexes by lease, %v by a heartbeat round", disabled, leased, rounds)
		}
	}
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
