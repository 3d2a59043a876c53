package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"testing"
	"time"
)

// Review tests for the route acknowledgements (routeack.go). Each one
// fails while the bug it names is present.

// TestReviewStaleAckSurvivesPeerRestart: peer.ackInc/ackVer are never reset
// when the forwarding connection is replaced, so an ack that the peer's
// PREVIOUS life (or previous connection) sent keeps satisfying
// AwaitRoutes after the peer lost our routes.
//
// n2 restarts in place (same gossip and cluster ports, as a container
// restart inside the same pod does) faster than n1's failure detector
// notices: n1 keeps its *peer for n2, reconnects the forwarding connection
// to the new process, and the new process's acker answers at once with
// what it holds of n1: nothing (0, 0). AwaitRoutes nevertheless returns nil
// at once, on the strength of the old process's ack, and a message
// published on n2 right after is not forwarded to n1.
//
// The hooks call AwaitRoutes whenever a client takes a filter it did not
// hold, including a filter another local client already routes (no new
// route version): exactly this case.
func TestReviewStaleAckSurvivesPeerRestart(t *testing.T) {
	// No push/pull from n1 during the test: n2's new life learns n1's
	// routes only when it joins (it has no seeds here, like a pod whose
	// seed DNS does not resolve yet).
	slowPP := withConfig(func(c *Config) { c.PushPullInterval = time.Hour })
	n1 := startNode(t, "n1", nil, slowPP)
	n2 := startNode(t, "n2", []string{n1.selfGossip}, slowPP)
	waitMembers(t, []*testNode{n1, n2}, 2)
	waitConnected(t, n1, "n2")

	if err := n1.AddRoute("shared/#"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	err := n1.AwaitRoutes(ctx)
	cancel()
	if err != nil {
		t.Fatalf("first AwaitRoutes: %v", err)
	}

	// Restart n2 in place.
	gport := n2.gossipPort
	_, cps, _ := net.SplitHostPort(n2.clusterAddr())
	cport, _ := strconv.Atoi(cps)
	n1peer := func() *peer {
		n1.mu.RLock()
		defer n1.mu.RUnlock()
		return n1.peers["n2"]
	}
	before := n1peer()
	n2.kill()
	n2b := startNode(t, "n2", nil, slowPP, withConfig(func(c *Config) {
		c.GossipAddr = "127.0.0.1:" + strconv.Itoa(gport)
		c.ClusterAddr = "127.0.0.1:" + strconv.Itoa(cport)
	}))
	// n1 reconnects its forwarding connection to the new process, and the
	// new process's acker has started (it acks at once: (0, 0)).
	eventually(t, 10*time.Second, func() bool {
		p := n1peer()
		if p == nil {
			return false
		}
		p.mu.Lock()
		up := p.connected
		p.mu.Unlock()
		n2b.ackMu.Lock()
		a := n2b.ackers["n1"]
		n2b.ackMu.Unlock()
		return up && a != nil
	}, "n1 did not reconnect to n2's new process")
	if p := n1peer(); p != before {
		t.Skip("n1 noticed the restart (new *peer): the race this test needs did not happen")
	}
	if inc, ver := n2b.routes.remoteHead("n1"); inc != 0 || ver != 0 {
		t.Skipf("n2's new life already holds n1's routes (%d, %d)", inc, ver)
	}

	// A second local client takes "shared/#": no new route version, and
	// the hook waits for the acks before SUBACK.
	if err := n1.AddRoute("shared/#"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 300*time.Millisecond)
	err = n1.AwaitRoutes(ctx)
	cancel()
	got := n2b.Forward(msg("shared/x", "published on n2 right after SUBACK"))
	if err == nil && got == 0 {
		p := n1peer()
		p.mu.Lock()
		ai, av := p.ackInc, p.ackVer
		p.mu.Unlock()
		t.Fatalf("AwaitRoutes returned nil (routes acknowledged) but n2 does not hold n1's routes: "+
			"a publish on n2 is forwarded to %d nodes. n1 still trusts the ack (%d, %d) from n2's previous "+
			"process; n2's current connection acked (0, 0)", got, ai, av)
	}
	if err != nil && !errors.Is(err, ErrRoutesNotAcknowledged) {
		t.Fatal(err)
	}
}

// silence unused imports if a test above is edited away
var _ = fmt.Sprintf
