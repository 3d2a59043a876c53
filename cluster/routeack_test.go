package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestSubscribeThenPublishElsewhere: a route added on one node and
// awaited (what the hooks do before SUBACK) is known by every other node
// when AwaitRoutes returns, so a message published there right after is
// forwarded. Before, the route travelled by gossip only and a publish on
// another node right after SUBACK was forwarded in 0 of 15 tries (the
// window lasted 3-203 ms): request/response across nodes lost the reply.
func TestSubscribeThenPublishElsewhere(t *testing.T) {
	nodes := startCluster(t, 3)
	// Every forwarding connection up before the first subscription (a peer
	// that is not connected is not waited for: it learns by gossip).
	for _, tn := range nodes {
		if err := tn.AddRoute("warmup/#"); err != nil {
			t.Fatal(err)
		}
	}
	for _, tn := range nodes {
		waitRoutes(t, nodes, tn.ID(), "warmup/#")
	}
	barrier(t, nodes, "warmup")
	const rounds = 1000
	for i := range rounds {
		sub, pub := nodes[1+i%2], nodes[(i/2)%3]
		if sub == pub {
			pub = nodes[0]
		}
		filter := fmt.Sprintf("reply/%d/+", i)
		if err := sub.AddRoute(filter); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := sub.AwaitRoutes(ctx)
		cancel()
		if err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		if got := pub.Forward(msg(fmt.Sprintf("reply/%d/x", i), "r")); got != 1 {
			t.Fatalf("round %d: %s published right after %s's route was acknowledged: queued for %d nodes, want 1",
				i, pub.ID(), sub.ID(), got)
		}
		sub.RemoveRoute(filter)
	}
	eventually(t, 10*time.Second, func() bool {
		n := 0
		for _, tn := range nodes {
			n += tn.rec.countPrefix("reply/")
		}
		return n == rounds
	}, "not every reply delivered")
}

// TestAwaitRoutesSkipsUnconnectedPeers: a peer we have no forwarding
// connection to is not waited for (it learns by gossip), so a node whose
// peers are all down answers at once.
func TestAwaitRoutesSkipsUnconnectedPeers(t *testing.T) {
	nodes := startCluster(t, 2)
	nodes[1].kill()
	if err := nodes[0].AddRoute("alone/#"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		return nodes[0].AwaitRoutes(ctx) == nil
	}, "AwaitRoutes kept waiting for a dead peer")
}

// TestAwaitRoutesTimesOut: a connected peer that never acknowledges makes
// AwaitRoutes fail with ErrRoutesNotAcknowledged when its context ends.
func TestAwaitRoutesTimesOut(t *testing.T) {
	nodes := startCluster(t, 2)
	waitConnected(t, nodes[0], nodes[1].ID())
	// Pretend the peer's acks say it lags: a route version far ahead.
	nodes[0].routes.mu.Lock()
	nodes[0].routes.version += 1000
	nodes[0].routes.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := nodes[0].AwaitRoutes(ctx); !errors.Is(err, ErrRoutesNotAcknowledged) {
		t.Fatalf("AwaitRoutes = %v, want ErrRoutesNotAcknowledged", err)
	}
}

// TestRouteAndAckFramesGolden pins the two protocol-2 frames.
func TestRouteAndAckFramesGolden(t *testing.T) {
	d := routeDelta{Op: opAdd, Incarnation: 300, Version: 7, Filter: "a/+"}
	got := appendRouteFrame(nil, d)
	want := []byte{0, 0, 0, 9, frameRoute, 1, 0xac, 0x02, 7, 3, 'a', '/', '+'}
	if !bytes.Equal(got, want) {
		t.Fatalf("route frame % x, want % x", got, want)
	}
	back, err := decodeRouteFrame(got[frameLenSize:], "n2")
	if err != nil || back != (routeDelta{Node: "n2", Op: opAdd, Incarnation: 300, Version: 7, Filter: "a/+"}) {
		t.Fatalf("decoded %+v, %v", back, err)
	}
	ack := appendAckFrame(nil, 300, 7)
	if want := []byte{0, 0, 0, 4, frameRouteAck, 0xac, 0x02, 7}; !bytes.Equal(ack, want) {
		t.Fatalf("ack frame % x, want % x", ack, want)
	}
	if inc, ver, err := decodeAckFrame(ack[frameLenSize:]); err != nil || inc != 300 || ver != 7 {
		t.Fatalf("decoded ack %d %d %v", inc, ver, err)
	}
	for i := 1; i < len(got)-frameLenSize; i++ {
		if _, err := decodeRouteFrame(got[frameLenSize:frameLenSize+i], "n2"); err == nil {
			t.Fatalf("truncated route frame (%d bytes) decoded", i)
		}
	}
	if _, _, err := decodeAckFrame(append(ack[frameLenSize:], 0)); err == nil {
		t.Fatal("ack frame with a trailing byte decoded")
	}
}

func waitConnected(t testing.TB, from *testNode, to string) {
	t.Helper()
	eventually(t, 10*time.Second, func() bool {
		from.mu.RLock()
		p := from.peers[to]
		from.mu.RUnlock()
		if p == nil {
			return false
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.connected
	}, "%s not connected to %s", from.ID(), to)
}

func (r *recorder) countPrefix(prefix string) int {
	n := 0
	for _, d := range r.all() {
		if strings.HasPrefix(d.m.Topic, prefix) {
			n++
		}
	}
	return n
}

// TestExpiryCountsTimeQueued: a message that waited in a peer's queue is
// forwarded with the time it waited taken off its expiry, and one whose
// expiry ran out there is dropped (MQTT-3.3.2-5, -6); before, it left with
// the expiry it had when it was published.
func TestExpiryCountsTimeQueued(t *testing.T) {
	m := &Message{Topic: "t", MessageExpiry: 10}
	now := time.Now()
	om := outMsg{m: m, queued: now.Add(-3500 * time.Millisecond)}
	got := om.expiring(now)
	if got == nil || got.MessageExpiry != 7 || got == m || m.MessageExpiry != 10 {
		t.Fatalf("after 3.5 s queued: %+v (the queued message itself must not change)", got)
	}
	om.queued = now.Add(-10 * time.Second)
	if got := om.expiring(now); got != nil {
		t.Fatalf("expired in the queue but forwarded with %d s", got.MessageExpiry)
	}
	om.queued = now.Add(-500 * time.Millisecond)
	if got := om.expiring(now); got != m {
		t.Fatal("less than a second queued: the message itself is sent")
	}
	if got := (&outMsg{m: &Message{Topic: "t"}}).expiring(now); got == nil || got.MessageExpiry != 0 {
		t.Fatal("a message without expiry must be sent as is")
	}
}
