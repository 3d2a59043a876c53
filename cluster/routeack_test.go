package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
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

// TestAwaitRoutesTimesOut: a connected protocol-2 peer that never
// acknowledges makes AwaitRoutes fail with ErrRoutesNotAcknowledged when
// its context ends. The peer is a stand-in with a connection that nobody
// reads (a real peer learns our version by push/pull too, and acks it).
func TestAwaitRoutesTimesOut(t *testing.T) {
	n := startNode(t, "n1", nil)
	mute := newPeer(n.Node, "mute", "127.0.0.1:1")
	mute.connected, mute.conn = true, &PeerConn{peer: "mute", version: protoRouteAcks}
	n.mu.Lock()
	n.peers["mute"] = mute
	n.mu.Unlock()
	defer func() {
		n.mu.Lock()
		delete(n.peers, "mute")
		n.mu.Unlock()
	}()
	if err := n.AddRoute("mute/#"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := n.AwaitRoutes(ctx); !errors.Is(err, ErrRoutesNotAcknowledged) {
		t.Fatalf("AwaitRoutes = %v, want ErrRoutesNotAcknowledged", err)
	}
	if got := n.counter(n.metrics.routeAckTimeouts); got != 1 {
		t.Fatalf("route_ack_timeouts_total = %v, want 1", got)
	}
	// Late now: the next wait does not wait for it (a cut-off peer costs
	// one bound, not one per subscription).
	if err := n.AddRoute("mute2/#"); err != nil {
		t.Fatal(err)
	}
	if err := n.AwaitRoutes(context.Background()); err != nil {
		t.Fatalf("waited again for a peer that let a wait time out: %v", err)
	}
	// The stand-in acks: the wait ends.
	inc, ver := n.routes.head()
	mute.mu.Lock()
	mute.ackInc, mute.ackVer = inc, ver
	mute.mu.Unlock()
	n.routeAcks.changed()
	if err := n.AwaitRoutes(context.Background()); err != nil {
		t.Fatalf("after the ack: %v", err)
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

// TestReplacedInboundConnectionIsDrained: when a peer replaces its
// forwarding connection, what it had already written on the old one is
// still delivered, before anything from the new one. Before, the new
// connection closed the old one at once and the frames left unread in its
// socket were lost, uncounted.
func TestReplacedInboundConnectionIsDrained(t *testing.T) {
	recv := startNode(t, "recv", nil)
	send := startNode(t, "send", nil) // not a member of recv's cluster: we drive its connections by hand
	block := make(chan struct{})
	var once sync.Once
	entered := make(chan struct{})
	recv.rec.mu.Lock()
	recv.rec.onDeliver = func(string, *Message) {
		once.Do(func() {
			close(entered)
			<-block
		})
	}
	recv.rec.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	old, err := send.mux.Dial(ctx, recv.clusterAddr(), ProtoForward)
	if err != nil {
		t.Fatal(err)
	}
	// More than the receiver's 64 KiB read buffer, so most of it is still
	// in the socket when the new connection arrives.
	const n = 500
	pad := strings.Repeat("x", 1024)
	var b []byte
	for i := range n {
		b = appendPublishFrame(b, msg("drain/old", strconv.Itoa(i)+pad), nil)
	}
	if _, err := old.Write(b); err != nil {
		t.Fatal(err)
	}
	<-entered // the receiver holds the first message; the rest wait in the socket
	repl, err := send.mux.Dial(ctx, recv.clusterAddr(), ProtoForward)
	if err != nil {
		t.Fatal(err)
	}
	defer repl.Close()
	// The sender gives up on the old connection, as after a write error,
	// the way the production sender does (it reads the acks meanwhile).
	oldRead := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, old)
		close(oldRead)
	}()
	go old.retire(oldRead, 5*time.Second)
	if _, err := repl.Write(appendPublishFrame(nil, msg("drain/new", "last"), nil)); err != nil {
		t.Fatal(err)
	}
	close(block)
	eventually(t, 10*time.Second, func() bool { return recv.rec.count() == n+1 },
		"delivered %d of %d messages", recv.rec.count(), n+1)
	got := recv.rec.all()
	for i := range n {
		if got[i].m.Topic != "drain/old" || string(got[i].m.Payload) != strconv.Itoa(i)+pad {
			t.Fatalf("message %d: %s %q, want drain/old %d in order", i, got[i].m.Topic, got[i].m.Payload, i)
		}
	}
	if got[n].m.Topic != "drain/new" {
		t.Fatalf("last message: %s, want the new connection's", got[n].m.Topic)
	}
}
