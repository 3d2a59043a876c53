package node

import (
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestConnectOnLaggingNodeCatchesUpAndResumes: a persistent CONNECT on a
// node behind the log is refused by its open's fence (the session moved
// on before the CONNECT arrived, the node had not applied it yet). The
// CONNECT catches up and opens again on the current state: the client
// resumes its session (present 1), as on one broker, instead of being
// refused.
func TestConnectOnLaggingNodeCatchesUpAndResumes(t *testing.T) {
	g := newApplyGate(t)
	tc := newTunedCluster(t, g.tune, "n1", "n2", "n3")
	tc.waitReady()
	leader, lag := tc.leaderAndFollower(t)
	waitOpenFence(t, tc)
	laddr := tc.nodes[leader].Addr("mqtt")
	closedSessionOn(t, tc, laddr, lag, "cu-dev")
	holdBehind(t, tc, g, lag, leader, "cu-gate")
	defer g.open()
	// The session moves on where the lagging node cannot see it yet.
	c1, _ := rawConnect(t, laddr, "cu-dev", false, 300)
	_ = c1.conn.Close()
	testutil.Eventually(t, 10*time.Second, func() error {
		if s, ok := tc.nodes[leader].repl.Session("cu-dev"); !ok || s.Connected {
			return errMsg("the second connection's close is not in the leader's state")
		}
		return nil
	})
	// The node catches up while the CONNECT waits for its open.
	go func() {
		time.Sleep(time.Second)
		g.open()
	}()
	c2, ack := rawConnect(t, tc.nodes[lag].Addr("mqtt"), "cu-dev", false, 300)
	_ = c2
	if !ack.SessionPresent {
		t.Fatal("the resume on the node that caught up answered session present 0")
	}
	if s, ok := tc.nodes[leader].repl.Session("cu-dev"); !ok || s.Owner != lag || !s.Connected {
		t.Fatalf("session after the resume: %+v (present %v), want connected on %s", s, ok, lag)
	}
}

// waitOpenFence waits until every node proposes fenced opens (every
// server applies log format 3).
func waitOpenFence(t *testing.T, tc *testCluster) {
	t.Helper()
	testutil.Eventually(t, 15*time.Second, func() error {
		for _, n := range tc.nodes {
			if !n.repl.OpenFence() {
				return errMsg("log format 3 not agreed yet")
			}
		}
		return nil
	})
}

// waitOpenAsOf waits until every node knows that all apply opens fenced
// as of an index (log format 6).
func waitOpenAsOf(t *testing.T, tc *testCluster) {
	t.Helper()
	testutil.Eventually(t, 15*time.Second, func() error {
		for _, n := range tc.nodes {
			if !n.repl.OpenAsOfSupported() {
				return errMsg("log format 6 not agreed yet")
			}
		}
		return nil
	})
}

// holdBehind shuts g on node lag: it stops applying the log (raft goes
// on) once it reaches a retained write that a client (id) of node via
// publishes.
func holdBehind(t *testing.T, tc *testCluster, g *applyGate, lag, via, id string) {
	t.Helper()
	g.node.Store(&lag)
	gp := tc.client(via, id)
	_ = gp.TryPub(gateTopic, 0, true, []byte("g"))
	select {
	case <-g.reached:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s never reached the gate", lag)
	}
}

// closedSessionOn opens and closes a persistent session of id at addr and
// waits until node lag has applied it (closed).
func closedSessionOn(t *testing.T, tc *testCluster, addr, lag, id string) {
	t.Helper()
	c, _ := rawConnect(t, addr, id, false, 300)
	_ = c.conn.Close()
	testutil.Eventually(t, 10*time.Second, func() error {
		if s, ok := tc.nodes[lag].repl.Session(id); !ok || s.Connected {
			return errMsg("the lagging node has not seen the closed session")
		}
		return nil
	})
}
