package node

import (
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqttpackets "github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/internal/testutil"
	"github.com/mqtt-ha/broker/replication"
)

// newCutCluster starts n1, n2 and n3, where n3 dials nothing while cut is
// set (its replication traffic to the others fails; theirs to it works)
// and never leads.
func newCutCluster(t *testing.T, cut *cutDialer) *testCluster {
	t.Helper()
	tc := newTunedCluster(t, func(c *Config) {
		if c.NodeID != "n3" {
			return
		}
		prev := c.ReplicationTuning
		c.ReplicationTuning = func(r *replication.Config) {
			prev(r)
			r.Dial = cut.wrap(r.Dial)
			r.HeartbeatTimeout, r.ElectionTimeout = 5*time.Second, 5*time.Second
		}
	}, "n1", "n2", "n3")
	tc.waitReady()
	if tc.nodes["n3"].repl.IsLeader() {
		t.Fatal("n3 leads; want it a follower")
	}
	tc.waitOwedWills()
	return tc
}

// waitOwedWills waits until every node knows that every node keeps owed
// wills (the log format is asked for every two seconds).
func (tc *testCluster) waitOwedWills() {
	tc.t.Helper()
	testutil.Eventually(tc.t, wait, func() error {
		for id, n := range tc.nodes {
			if !n.repl.OwedWillsSupported() {
				return fmt.Errorf("%s does not know yet that every node keeps owed wills", id)
			}
		}
		return nil
	})
}

// TestWillOfConnectionReplacedElsewhereIsPublished: a client whose
// connection on n3 drops while n3 cannot reach the leader, and that
// connects again at once with clean start on n1, still gets its will
// published once n3 writes the close: n1's open moved the will aside,
// owed by the n3 connection (replication/owed_will.go), instead of
// deleting it with the old session (chaos, will-missing: the README's
// known gap of a clean reconnect elsewhere before the old node's close).
func TestWillOfConnectionReplacedElsewhereIsPublished(t *testing.T) {
	var cut cutDialer
	tc := newCutCluster(t, &cut)
	dev := owedDev(t, tc)
	cut.set(true)
	_ = dev.Conn.Close() // dropped without DISCONNECT: its will is due
	back := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "ow-dev", CleanStart: true})
	defer back.Close()
	cut.set(false)
	tc.waitSession(t, "ow-ha", func(s sessionView) error {
		if s.Queue != 2 {
			return fmt.Errorf("ha's queue %d, want the will queued after online", s.Queue)
		}
		return nil
	})
	tc.waitRetained(t, "ow/dev", "offline")
	if cl, ok := tc.nodes["n1"].mqtt.Clients.Get("ow-dev"); !ok || cl.Closed() {
		t.Fatal("the old connection's close ended the new one")
	}
}

// owedDev connects ow-dev to n3 with a retained will and waits until the
// log holds it; ha (persistent, on n2) has the retained "online" queued.
func owedDev(t *testing.T, tc *testCluster) *testutil.Client {
	t.Helper()
	tc.persistentSub(t, "n2", "ow-ha", "ow/#")
	pub := tc.client("n1", "ow-pub")
	pub.Pub(t, "ow/dev", 1, true, []byte("online"))
	tc.waitRetained(t, "ow/dev", "online")
	dev := testutil.Connect(t, tc.nodes["n3"].Addr("mqtt"), testutil.ClientOptions{ID: "ow-dev", CleanStart: true,
		Will: &paho.WillMessage{Topic: "ow/dev", QoS: 1, Retain: true, Payload: []byte("offline")}})
	testutil.Eventually(t, wait, func() error {
		if s, ok := tc.nodes["n1"].repl.Session("ow-dev"); !ok || s.Will == nil || s.Owner != "n3" {
			return fmt.Errorf("dev's will not in n1's log yet: %+v", s)
		}
		// And n3's claim of the client id, written after CONNACK: one
		// still on its way when the test cuts n3 off lands after the new
		// connection's and ends it (the README's known gap of a late
		// claim; seen once in CI), which is not what these tests are about.
		if o, ok := tc.nodes["n1"].repl.Owner("ow-dev"); !ok || o.Node != "n3" {
			return fmt.Errorf("n3's claim of dev not in n1's log yet: %+v", o)
		}
		return nil
	})
	tc.waitSession(t, "ow-ha", func(s sessionView) error {
		if s.Queue != 1 {
			return fmt.Errorf("ha's queue %d, want the retained online", s.Queue)
		}
		return nil
	})
	return dev
}

// noWill checks that ow-dev's will was not published: ha's queue holds
// only "online", which is also still the retained value.
func (tc *testCluster) noWill(t *testing.T) {
	t.Helper()
	for id, n := range tc.nodes {
		if s, ok := n.repl.Session("ow-ha"); !ok || len(s.Queue) != 1 {
			t.Fatalf("%s: ha's queue %+v, want online only", id, s.Queue)
		}
	}
	tc.waitRetained(t, "ow/dev", "online")
}

// TestOwedWillDiscardedByDisconnect: the old connection sent DISCONNECT
// (its will is discarded, MQTT-3.1.2-10) while its node could not write
// it; the clean CONNECT elsewhere left the will owed; the DISCONNECT's
// close, written once the node is back, discards it.
func TestOwedWillDiscardedByDisconnect(t *testing.T) {
	var cut cutDialer
	tc := newCutCluster(t, &cut)
	dev := owedDev(t, tc)
	cut.set(true)
	dev.Close() // DISCONNECT
	back := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "ow-dev", CleanStart: true})
	defer back.Close()
	tc.waitOwedCount(t, wait, 1, "n1")
	cut.set(false)
	tc.waitOwedCount(t, wait, 0)
	tc.noWill(t)
}

// TestOwedWillDiscardedByGracefulStop: a node that stops gracefully tells
// its clients to go; one that reconnects elsewhere at once with clean
// start finds its session still connected there (the stop leaves it for
// the leave grace), so its will is owed; the stop discards it (guarantee
// 4: no will after a graceful stop).
func TestOwedWillDiscardedByGracefulStop(t *testing.T) {
	var cut cutDialer
	tc := newCutCluster(t, &cut)
	owedDev(t, tc)
	n3 := tc.nodes["n3"]
	n3.sessionsHook.PrepareStop()
	cl, ok := n3.mqtt.Clients.Get("ow-dev")
	if !ok {
		t.Fatal("ow-dev not connected to n3")
	}
	n3.sessionsHook.TellStop(cl)
	_ = n3.mqtt.DisconnectClient(cl, mqttpackets.ErrServerShuttingDown)
	back := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "ow-dev", CleanStart: true})
	defer back.Close()
	tc.waitOwedCount(t, wait, 1, "n1")
	tc.stop("n3")
	tc.waitOwedCount(t, wait, 0)
	tc.noWill(t)
}

// TestOwedWillOfLiveConnectionTakenOver: a clean CONNECT on n1 takes over
// the client's live connection on n3. As a takeover on one node (and
// Mosquitto): the clean start ends the old session, so the old
// connection's will is published, once.
func TestOwedWillOfLiveConnectionTakenOver(t *testing.T) {
	var cut cutDialer
	tc := newCutCluster(t, &cut)
	dev := owedDev(t, tc)
	defer dev.Close()
	back := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "ow-dev", CleanStart: true})
	defer back.Close()
	tc.waitSession(t, "ow-ha", func(s sessionView) error {
		if s.Queue != 2 {
			return fmt.Errorf("ha's queue %d, want the will queued after online", s.Queue)
		}
		return nil
	})
	tc.waitRetained(t, "ow/dev", "offline")
	tc.waitOwedCount(t, wait, 0)
	for id, n := range tc.nodes {
		if s, _ := n.repl.Session("ow-ha"); len(s.Queue) != 2 {
			t.Fatalf("%s: ha's queue %d, want online and one will", id, len(s.Queue))
		}
	}
}

// waitOwedCount waits up to d until every node named (all without names)
// holds n owed wills.
func (tc *testCluster) waitOwedCount(t *testing.T, d time.Duration, n int, nodes ...string) {
	t.Helper()
	if len(nodes) == 0 {
		for id := range tc.nodes {
			nodes = append(nodes, id)
		}
	}
	testutil.Eventually(t, d, func() error {
		for _, id := range nodes {
			if w := tc.nodes[id].repl.OwedWills(); len(w) != n {
				return fmt.Errorf("%s holds %d owed wills, want %d: %+v", id, len(w), n, w)
			}
		}
		return nil
	})
}

// TestLateOwedWillLeavesNewerRetainedValue: the chaos failure of seed
// 20261209 (retained-will-missing). A client's connection on n3 drops while
// n3 cannot reach the leader; the client connects again on n1, publishes
// "online2", and drops too, so its new will "offline2" is published. Then
// n3 writes the first connection's close and its owed will "offline" is
// published, late: its copy is queued for the persistent subscriber, but
// the retained value stays "offline2", the newer connection's, as on one
// Mosquitto, where the old will was stored before the new connection
// came (replication/owed_will.go, "Late owed wills").
func TestLateOwedWillLeavesNewerRetainedValue(t *testing.T) {
	var cut cutDialer
	tc := newCutCluster(t, &cut)
	testutil.Eventually(t, wait, func() error {
		for id, n := range tc.nodes {
			if v := n.repl.LogFormat(); v < 7 {
				return fmt.Errorf("%s: log format %d recorded, want 7", id, v)
			}
		}
		return nil
	})
	dev := owedDev(t, tc)
	cut.set(true)
	_ = dev.Conn.Close() // dropped without DISCONNECT: its will is due
	back := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "ow-dev", CleanStart: true,
		Will: &paho.WillMessage{Topic: "ow/dev", QoS: 1, Retain: true, Payload: []byte("offline2")}})
	tc.waitOwedCount(t, wait, 1, "n1")
	back.Pub(t, "ow/dev", 1, true, []byte("online2"))
	_ = back.Conn.Close()
	tc.waitRetained(t, "ow/dev", "offline2")
	cut.set(false)
	// online, online2, offline2, then the late offline.
	tc.waitSession(t, "ow-ha", func(s sessionView) error {
		if s.Queue != 4 {
			return fmt.Errorf("ha's queue %d, want 4 with the late will last", s.Queue)
		}
		return nil
	})
	tc.waitOwedCount(t, wait, 0)
	for id, n := range tc.nodes {
		if m, ok := n.repl.RetainedMessage("ow/dev"); !ok || string(m.Payload) != "offline2" {
			t.Fatalf("%s: retained %q (%v) after the late will, want offline2", id, m.Payload, ok)
		}
	}
	tc.waitRetained(t, "ow/dev", "offline2")
}
