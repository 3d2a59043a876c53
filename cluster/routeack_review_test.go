package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
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

	// The delta's gossip retransmissions are over (only route frames and
	// push/pull would carry the route from now on).
	eventually(t, 10*time.Second, func() bool { return n1.bcast.NumQueued() == 0 }, "n1 still gossips")

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
	// Its join push/pull (TCP) does not get through yet (a seed not
	// resolving, a slow join); UDP gossip and probes do, so n1 keeps
	// seeing n2 alive and keeps its *peer.
	n2b := startNode(t, "n2", nil, slowPP, withConfig(func(c *Config) {
		c.GossipAddr = "127.0.0.1:" + strconv.Itoa(gport)
		c.ClusterAddr = "127.0.0.1:" + strconv.Itoa(cport)
	}), func(_ *Config, n *Node) {
		if n != nil {
			n.wrapTransport = func(t memberlist.NodeAwareTransport) memberlist.NodeAwareTransport {
				return noDialTransport{t}
			}
		}
	})
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

// TestReviewRouteFramesEatTheMessageQueue: enqueueRoute says route frames
// are "not subject to the queue's limits", but they are appended to the
// same queue and counted by enqueue's limits (len(p.queue) >= QueueSize,
// qbytes) and by stop()'s drop accounting. While the writer is busy (a
// slow peer: it is blocked in Write for up to WriteTimeout) a burst of
// route changes (a reconnect storm of clients with per-device filters)
// makes forwarded MESSAGES be tail-dropped as queue_full although no
// message is queued, and stop() reports the route frames as dropped
// messages (broker_cluster_dropped_messages_total{reason="peer_gone"}).
func TestReviewRouteFramesEatTheMessageQueue(t *testing.T) {
	cfg := testConfig(t, "q")
	cfg.QueueSize = 3
	n, err := New(cfg, &recorder{})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	tn := &testNode{Node: n, t: t}
	// A peer whose connection is up and whose writer is busy (not
	// draining): the state enqueueRoute queues in.
	p := newPeer(n, "peer", "127.0.0.1:1")
	p.connected = true
	close(p.done) // no writer goroutine in this test
	for i := range 3 {
		d := routeDelta{Node: "q", Incarnation: 1, Version: uint64(i + 1), Op: opAdd, Filter: fmt.Sprintf("dev/%d/cmd", i)}
		p.enqueueRoute(outMsg{route: &d, size: 20})
	}
	var failures []string
	if ok, reason := p.enqueue(outMsg{m: msg("t", "x"), size: 100}); !ok {
		failures = append(failures, fmt.Sprintf("a message was refused (%s) by a queue holding 0 messages "+
			"and 3 route frames (QueueSize 3)", reason))
	}
	p.mu.Lock()
	routes := 0
	for _, om := range p.queue {
		if om.route != nil {
			routes++
		}
	}
	queued := len(p.queue) - routes
	p.mu.Unlock()
	p.stop(dropPeerGone)
	if got := tn.dropped(dropPeerGone); got != float64(queued) {
		failures = append(failures, fmt.Sprintf("dropped{peer_gone} = %v after stop, but only %d message(s) were queued "+
			"(the rest are route frames)", got, queued))
	}
	if len(failures) > 0 {
		t.Fatal(failures)
	}
}

// noDialTransport lets memberlist's UDP through but fails its TCP dials
// (push/pull, join).
type noDialTransport struct{ memberlist.NodeAwareTransport }

func (noDialTransport) DialTimeout(addr string, _ time.Duration) (net.Conn, error) {
	return nil, fmt.Errorf("no route to %s (test)", addr)
}

func (noDialTransport) DialAddressTimeout(a memberlist.Address, _ time.Duration) (net.Conn, error) {
	return nil, fmt.Errorf("no route to %s (test)", a.Addr)
}
