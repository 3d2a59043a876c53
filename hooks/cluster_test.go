package hooks

import (
	"io"
	"log/slog"
	"net"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mqtt-ha/broker/cluster"
)

// newClusterHook returns the hook on a mochi server and a cluster node of
// its own (not started: routes are only counted locally).
func newClusterHook(t *testing.T) (*Cluster, *mqtt.Server) {
	t.Helper()
	s := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
	h := NewCluster(s, slog.New(slog.DiscardHandler))
	n, err := cluster.New(cluster.Config{
		NodeID: "n1", AdvertiseHost: "127.0.0.1", GossipAddr: "127.0.0.1:0", ClusterAddr: "127.0.0.1:0",
		MQTTPort: 1883, Logger: slog.New(slog.DiscardHandler), Registerer: prometheus.NewRegistry(),
	}, h)
	if err != nil {
		t.Fatal(err)
	}
	h.SetNode(n)
	return h, s
}

// TestTakenOverConnectionKeepsSharedSubscription: mochi closes the old
// connection of a same-node takeover (Client.Stop closes the socket
// before it records the cause, and marks it taken over only later), so
// the old connection's OnDisconnect can run before it can tell it was
// taken over. It must not end the shared subscriptions the new connection
// is about to inherit (CI: the route was withdrawn and the subscription
// lost, TestSharedSubscriptionSurvivesSameNodeTakeover).
func TestTakenOverConnectionKeepsSharedSubscription(t *testing.T) {
	h, s := newClusterHook(t)
	const filter = "$share/g/tk/+"
	conn := func() net.Conn {
		a, b := net.Pipe()
		t.Cleanup(func() { _ = a.Close(); _ = b.Close() })
		return a
	}
	old := s.NewClient(conn(), "tcp", "tk", false)
	sub := packets.Subscription{Filter: filter, Qos: 1}
	old.State.Subscriptions.Add(filter, sub)
	s.Topics.Subscribe(old.ID, sub)
	h.OnSessionEstablish(old, packets.Packet{})
	h.addRoute(old.ID, filter)

	next := s.NewClient(conn(), "tcp", "tk", false)
	h.OnSessionEstablish(next, packets.Packet{})
	// The old connection's read loop ended: neither taken over nor
	// stopped with a cause yet, and the new one is not in Clients.
	h.OnDisconnect(old, io.EOF, false)

	if _, ok := old.State.Subscriptions.Get(filter); !ok {
		t.Fatal("the old connection's shared subscription was removed before the new one inherited it")
	}
	if !h.node.HasLocalRoute(filter) {
		t.Fatal("the shared subscription's route was withdrawn")
	}

	// Without a newer connection, a disconnect ends it as before.
	h.OnDisconnect(next, io.EOF, false) // next holds nothing yet
	h.OnDisconnect(old, io.EOF, false)
	if h.node.HasLocalRoute(filter) {
		t.Fatal("an ordinary disconnect kept the shared subscription's route")
	}
}
