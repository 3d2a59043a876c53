package node

import (
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestUpperCaseSharePrefixForPersistentSession: mochi takes "$SHARE/..."
// (any case) as a shared subscription, so a persistent session subscribed
// that way must receive the group's messages like one subscribed with
// "$share/..." (the session code once compared the prefix case-sensitively
// and the session got nothing, even from its own node).
func TestUpperCaseSharePrefixForPersistentSession(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	member := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "upper-member", CleanStart: true, SessionExpiry: 600})
	member.Sub(t, 1, "$SHARE/g/upper/+")
	tc.waitRoutes(t, "n2", "n1", 1)
	tc.client("n1", "upper-pub1").Pub(t, "upper/a", 1, false, []byte("local"))
	tc.client("n2", "upper-pub2").Pub(t, "upper/b", 1, false, []byte("remote"))
	got := map[string]bool{}
	for range 2 {
		got[string(member.MustNext(t, wait).Payload)] = true
	}
	if !got["local"] || !got["remote"] {
		t.Fatalf("got %v, want both the local and the remote message", got)
	}
}

// TestDelayedWillOfCleanSessionReachesEveryNode: an MQTT 5 clean session
// with a will delay and no session expiry drops; its will (after the
// delay) reaches subscribers on every node, not only on the node that
// held the connection.
func TestDelayedWillOfCleanSessionReachesEveryNode(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	local := tc.client("n1", "dw-local")
	local.Sub(t, 1, "dw/status")
	remote := tc.client("n2", "dw-remote")
	remote.Sub(t, 1, "dw/status")
	tc.waitRoutes(t, "n1", "n2", 1)
	dev := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "dw-dev", CleanStart: true,
		Will: &paho.WillMessage{Topic: "dw/status", QoS: 1, Payload: []byte("offline")}, WillDelay: 1})
	_ = dev.Conn.Close() // no DISCONNECT: the will is due after its delay
	for _, c := range []*testutil.Client{local, remote} {
		p := c.MustNext(t, 10*time.Second)
		if string(p.Payload) != "offline" {
			t.Fatalf("%s got %s %q, want the will", c.ID, p.Topic, p.Payload)
		}
	}
}

// TestSharedGroupSkipsAbsentPersistentMember: a persistent session's
// shared subscription stays with its node when the client disconnects;
// the group's messages must go to the live member on another node, not to
// the absent one (before, mochi chose the absent member and dropped the
// message, and the node kept the group's route so other nodes chose it
// too: the live member received 0 of 20).
func TestSharedGroupSkipsAbsentPersistentMember(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	ghost := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "ghost", CleanStart: true, SessionExpiry: 600})
	ghost.Sub(t, 1, "$share/g/gh/+")
	live := tc.client("n2", "live")
	live.Sub(t, 1, "$share/g/gh/+")
	tc.waitRoutes(t, "n1", "n2", 1)
	tc.waitRoutes(t, "n2", "n1", 1)
	ghost.Close()
	tc.awaitClosed(t, "ghost")
	pub1, pub2 := tc.client("n1", "gh-pub1"), tc.client("n2", "gh-pub2")
	const n = 20
	for i := range n {
		pub := pub1
		if i%2 == 1 {
			pub = pub2
		}
		pub.Pub(t, "gh/x", 1, false, []byte{byte(i)})
	}
	for i := range n {
		if _, err := live.Next(5 * time.Second); err != nil {
			t.Fatalf("the live member got %d of %d messages: the absent member was chosen", i, n)
		}
	}
}

// TestSharedMemberBackAfterReconnect: a persistent session's shared
// subscription ends with its connection (it is not part of the replicated
// session); the client that reconnects and subscribes again is a member
// again, for messages published on either node.
func TestSharedMemberBackAfterReconnect(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	o := testutil.ClientOptions{ID: "back", CleanStart: true, SessionExpiry: 600}
	m := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), o)
	m.Sub(t, 1, "$share/g/back/+")
	tc.waitRoutes(t, "n2", "n1", 1)
	m.Close()
	tc.awaitClosed(t, "back")
	tc.waitRoutes(t, "n2", "n1", 0)
	o.CleanStart = false
	again := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), o)
	again.Sub(t, 1, "$share/g/back/+")
	tc.client("n2", "back-pub2").Pub(t, "back/x", 1, false, []byte("remote"))
	tc.client("n1", "back-pub1").Pub(t, "back/y", 1, false, []byte("local"))
	got := map[string]bool{}
	for range 2 {
		got[string(again.MustNext(t, wait).Payload)] = true
	}
	if !got["local"] || !got["remote"] {
		t.Fatalf("got %v, want the local and the remote message", got)
	}
	if p, err := again.Next(time.Second); err == nil {
		t.Fatalf("a message twice: %s %q", p.Topic, p.Payload)
	}
}

// TestSharedSubscriptionSurvivesSameNodeTakeover: a persistent client
// that connects again on the same node while its old connection is still
// open (a takeover) keeps its shared subscription (mochi hands it over)
// and its route: messages published on the other node still reach it.
// The old connection's teardown dropped the client's route references,
// which are keyed by client id.
func TestSharedSubscriptionSurvivesSameNodeTakeover(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	o := testutil.ClientOptions{ID: "tk", CleanStart: true, SessionExpiry: 600}
	old := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), o)
	old.Sub(t, 1, "$share/g/tk/+")
	tc.waitRoutes(t, "n2", "n1", 1)
	o.CleanStart = false
	again := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), o)
	select {
	case <-old.Done():
	case <-time.After(wait):
		t.Fatal("the old connection was not taken over")
	}
	tc.waitRoutes(t, "n2", "n1", 1)
	tc.client("n2", "tk-pub").Pub(t, "tk/x", 1, false, []byte("after takeover"))
	if p := again.MustNext(t, wait); string(p.Payload) != "after takeover" {
		t.Fatalf("got %q", p.Payload)
	}
}
