package node

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/hooks"
	"github.com/mqtt-ha/broker/internal/testutil"
)

// Wills and the retained store, graceful stops (DESIGN.md guarantee 4).

// retainedOn reads the retained value of topic as a new subscriber on node
// sees it ("" when there is none).
func (tc *testCluster) retainedOn(t *testing.T, node, topic string, n int) (string, error) {
	t.Helper()
	c, err := testutil.TryConnect(tc.nodes[node].Addr("mqtt"), testutil.ClientOptions{ID: fmt.Sprintf("reader-%s-%d", node, n), CleanStart: true})
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.Sub(t, 1, topic)
	p, err := c.Next(200 * time.Millisecond)
	if err != nil {
		return "", nil
	}
	if !p.Retain {
		return "", fmt.Errorf("%s: got a live message %q, not the retained value", node, p.Payload)
	}
	return string(p.Payload), nil
}

// waitRetained waits until a new subscriber on every running node gets
// want as the retained value of topic.
func (tc *testCluster) waitRetained(t *testing.T, topic, want string) {
	t.Helper()
	n := 0
	testutil.Eventually(t, wait, func() error {
		for id := range tc.nodes {
			n++
			got, err := tc.retainedOn(t, id, topic, n)
			if err != nil {
				return err
			}
			if got != want {
				return fmt.Errorf("a new subscriber on %s reads %q, want %q", id, got, want)
			}
		}
		return nil
	})
}

// TestRetainedWillOfCleanSessionReplicated: a clean session's retained will
// (published by mochi on the node that held the connection) replaces the
// retained value on every node, as Home Assistant availability topics need.
func TestRetainedWillOfCleanSessionReplicated(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	tc.client("n1", "avail-pub").Pub(t, "avail/plug", 1, true, []byte("online"))
	tc.waitRetained(t, "avail/plug", "online")
	dev := testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "plug", CleanStart: true,
		Will: &paho.WillMessage{Topic: "avail/plug", QoS: 1, Retain: true, Payload: []byte("offline")}})
	_ = dev.Conn.Close() // no DISCONNECT: the will is published
	tc.waitRetained(t, "avail/plug", "offline")
}

// newSessionsTunedCluster is newTestCluster with every node's session hook
// configuration adjusted by tune.
func newSessionsTunedCluster(t *testing.T, tune func(*hooks.SessionsConfig), ids ...string) *testCluster {
	return newTunedCluster(t, func(c *Config) { c.SessionsTuning = tune }, ids...)
}

// TestClaimedWillReachesQueuesAndRetainedWithoutLivePublication: the
// claim of a dead node's will carries its publication into the log. The
// claiming leader here never publishes it live (as if it died right after
// the commit), and still the offline persistent subscriber finds the will
// in its queue and a new subscriber on any node reads it as retained.
func TestClaimedWillReachesQueuesAndRetainedWithoutLivePublication(t *testing.T) {
	tc := newSessionsTunedCluster(t, func(c *hooks.SessionsConfig) {
		c.AfterWillClaim = func(string) bool { return false }
	}, "n1", "n2", "n3")
	tc.waitReady()
	tc.client("n1", "st-pub").Pub(t, "st/dev", 1, true, []byte("online"))
	ha := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "ha", CleanStart: true, SessionExpiry: 600})
	ha.Sub(t, 1, "st/#")
	if p := ha.MustNext(t, wait); string(p.Payload) != "online" {
		t.Fatalf("retained on subscribe: %q", p.Payload)
	}
	ha.Close() // the session stays, offline
	testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "dev", CleanStart: true,
		SessionExpiry: 600, Will: &paho.WillMessage{Topic: "st/dev", QoS: 1, Retain: true, Payload: []byte("offline")}})
	tc.waitWillInLog(t, "n1", "dev")
	tc.nodes["n2"].Kill()
	delete(tc.nodes, "n2")
	testutil.Eventually(t, 15*time.Second, func() error {
		if s, ok := tc.nodes["n1"].repl.Session("dev"); !ok || s.Will != nil {
			return fmt.Errorf("will not claimed yet")
		}
		return nil
	})
	tc.waitRetained(t, "st/dev", "offline")
	again := testutil.Connect(t, tc.nodes["n3"].Addr("mqtt"), testutil.ClientOptions{ID: "ha", SessionExpiry: 600})
	if !again.Connack.SessionPresent {
		t.Fatal("session of ha not present")
	}
	// The retained copy ha got at SUBSCRIBE may come again first (QoS 1:
	// its PUBACK may not have been written before ha went offline).
	p := again.MustNext(t, wait)
	if string(p.Payload) == "online" && p.Topic == "st/dev" {
		p = again.MustNext(t, wait)
	}
	if p.Topic != "st/dev" || string(p.Payload) != "offline" {
		t.Fatalf("queued for ha: %s %q, want the will", p.Topic, p.Payload)
	}
}

// TestGracefulStopFiresNoWillOfReturningClients: a graceful stop (SIGTERM:
// rolling restart, scale-down) is not a death. Clients of the stopped node
// that reconnect elsewhere within the leave grace keep their wills unfired,
// persistent and clean sessions alike; those that do not come back get
// their wills published once the grace is over (a retained one as the
// retained value).
func TestGracefulStopFiresNoWillOfReturningClients(t *testing.T) {
	const grace = 8 * time.Second
	tc := newSessionsTunedCluster(t, func(c *hooks.SessionsConfig) { c.LeaveGrace = grace }, "n1", "n2", "n3")
	tc.waitReady()
	watcher := tc.client("n1", "gs-watcher")
	watcher.Sub(t, 1, "gs/#")
	will := func(id string, retain bool) *paho.WillMessage {
		return &paho.WillMessage{Topic: "gs/" + id, QoS: 1, Retain: retain, Payload: []byte(id + " offline")}
	}
	n2 := tc.nodes["n2"].Addr("mqtt")
	for _, o := range []testutil.ClientOptions{
		{ID: "pa", CleanStart: true, SessionExpiry: 600, Will: will("pa", false)}, // persistent, comes back
		{ID: "pb", CleanStart: true, SessionExpiry: 600, Will: will("pb", false)}, // persistent, does not
		{ID: "ca", CleanStart: true, Will: will("ca", false)},                     // clean, comes back
		{ID: "cb", CleanStart: true, Will: will("cb", true)},                      // clean, does not
	} {
		c, err := testutil.TryConnect(n2, o)
		if err != nil {
			t.Fatalf("connect %s: %v", o.ID, err)
		}
		t.Cleanup(func() { _ = c.Conn.Close() })
	}
	testutil.Eventually(t, wait, func() error {
		for _, id := range []string{"pa", "pb", "ca", "cb"} {
			if s, ok := tc.nodes["n1"].repl.Session(id); !ok || s.Will == nil {
				return fmt.Errorf("will of %s not in the log yet", id)
			}
		}
		return nil
	})
	tc.stop("n2")
	// Longer than a dead node's wills take (DeadAfter, 3 s, and a
	// maintenance tick), shorter than the grace: nothing may fire.
	window := time.After(4500 * time.Millisecond)
	for quiet := false; !quiet; {
		select {
		case p := <-watcher.Msgs:
			t.Fatalf("%s %q published after a graceful stop", p.Topic, p.Payload)
		case <-window:
			quiet = true
		}
	}
	testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "pa", SessionExpiry: 600})
	testutil.Connect(t, tc.nodes["n3"].Addr("mqtt"), testutil.ClientOptions{ID: "ca", CleanStart: true})
	got := map[string]bool{}
	for range 2 {
		p := watcher.MustNext(t, 2*grace)
		got[p.Topic] = true
	}
	if !got["gs/pb"] || !got["gs/cb"] {
		t.Fatalf("wills published: %v, want those of pb and cb", got)
	}
	tc.client("n3", "gs-marker").Pub(t, "gs/marker", 1, false, []byte("end"))
	if p := watcher.MustNext(t, wait); p.Topic != "gs/marker" {
		t.Fatalf("after the wills: %s %q (the will of a client that came back?)", p.Topic, p.Payload)
	}
	tc.waitRetained(t, "gs/cb", "cb offline")
}

// TestRollingRestartFiresNoWill: a node stopped gracefully and started
// again (a rolling restart) finds the sessions of its previous run open in
// the log with no connection; a client that comes back within the grace,
// to any node, keeps its will unfired.
func TestRollingRestartFiresNoWill(t *testing.T) {
	const grace = 8 * time.Second
	tc := newSessionsTunedCluster(t, func(c *hooks.SessionsConfig) { c.LeaveGrace = grace }, "n1", "n2", "n3")
	tc.waitReady()
	watcher := tc.client("n1", "rr-watcher")
	watcher.Sub(t, 1, "rr/#")
	dev, err := testutil.TryConnect(tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "rr-dev", CleanStart: true,
		SessionExpiry: 600, Will: &paho.WillMessage{Topic: "rr/dev", QoS: 1, Payload: []byte("offline")}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dev.Conn.Close() })
	tc.waitWillInLog(t, "n1", "rr-dev")
	tc.stop("n2")
	tc.restart("n2")
	tc.waitMembers(3)
	tc.waitReady()
	// Longer than a restarted node takes to close what it owns with no
	// connection (two maintenance ticks) and than DeadAfter.
	window := time.After(4 * time.Second)
	for quiet := false; !quiet; {
		select {
		case p := <-watcher.Msgs:
			t.Fatalf("%s %q published after a rolling restart", p.Topic, p.Payload)
		case <-window:
			quiet = true
		}
	}
	testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "rr-dev", SessionExpiry: 600})
	tc.client("n3", "rr-marker").Pub(t, "rr/marker", 1, false, []byte("end"))
	if p := watcher.MustNext(t, wait); p.Topic != "rr/marker" {
		t.Fatalf("got %s %q, want only the marker", p.Topic, p.Payload)
	}
}

// TestWillPublishedWithoutQuorumReachesTheLogLater: a clean session's
// client drops on a node without a quorum. The node publishes the will to
// its own side at once; once the quorum is back the will also reaches the
// log, once: queued for persistent subscribers and retained, and not sent
// live a second time. Before, the node's sweep closed the mirror after the
// quorum came back and the leader's claim sent a second live copy to the
// clean subscribers that had the first.
func TestWillPublishedWithoutQuorumReachesTheLogLater(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	w := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "lw-watch", CleanStart: true, SessionExpiry: 600})
	w.Sub(t, 1, "lw/#")
	w.Close()
	dev := testutil.Connect(t, tc.nodes["n3"].Addr("mqtt"), testutil.ClientOptions{ID: "lw-dev", CleanStart: true,
		Will: &paho.WillMessage{Topic: "lw/dev", QoS: 1, Retain: true, Payload: []byte("offline")}})
	testutil.Eventually(t, wait, func() error {
		if s, ok := tc.nodes["n3"].repl.Session("lw-dev"); !ok || s.Will == nil {
			return errMsg("will mirror not in n3's state yet")
		}
		return nil
	})
	clean := tc.client("n3", "lw-clean")
	clean.Sub(t, 1, "lw/#")
	tc.leaveAlone("n3", "n1", "n2")
	_ = dev.Conn.Close() // no DISCONNECT: the will is due
	if p := clean.MustNext(t, wait); string(p.Payload) != "offline" {
		t.Fatalf("this side's clean subscriber got %q, want the will at once", p.Payload)
	}
	tc.restart("n1")
	tc.restart("n2")
	tc.waitRetained(t, "lw/dev", "offline")
	again := testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "lw-watch", SessionExpiry: 600})
	defer again.Close()
	p := again.MustNext(t, 20*time.Second)
	if p.Topic != "lw/dev" || string(p.Payload) != "offline" {
		t.Fatalf("queued for the watcher: %s %q, want the will", p.Topic, p.Payload)
	}
	if p, err := again.Next(2 * time.Second); err == nil {
		t.Fatalf("the will reached the watcher twice (second: %s %q)", p.Topic, p.Payload)
	}
	if p, err := clean.Next(3 * time.Second); err == nil {
		t.Fatalf("this side's clean subscriber got the will a second time (%s %q)", p.Topic, p.Payload)
	}
}

// TestCleanConnectPublishesTheWillItEnds: a client drops (no DISCONNECT)
// and connects again at once, with clean start, on another node. Its old
// connection's close is in the log, the will not yet claimed by the leader
// (held here; in the chaos suite the leader had just resumed from a
// pause, seed 576349558). The clean start ends that session: the will must
// be published (a single broker had already published it at the drop),
// not discarded with the session. Clean and persistent old sessions alike.
func TestCleanConnectPublishesTheWillItEnds(t *testing.T) {
	tc := newSessionsTunedCluster(t, func(c *hooks.SessionsConfig) {
		c.HoldWillClaims = func(id string) bool { return strings.HasPrefix(id, "ew-") }
	}, "n1", "n2", "n3")
	tc.waitReady()
	watcher := tc.client("n3", "ew-watcher-clean")
	watcher.Sub(t, 1, "ew/#")
	for _, tt := range []struct {
		id     string
		expiry uint32
	}{{"ew-clean", 0}, {"ew-persistent", 600}} {
		t.Run(tt.id, func(t *testing.T) {
			dropWithWillPending(t, tc, testutil.ClientOptions{ID: tt.id, CleanStart: true, SessionExpiry: tt.expiry,
				Will: &paho.WillMessage{Topic: "ew/" + tt.id, QoS: 1, Retain: true, Payload: []byte("offline")}})
			testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: tt.id, CleanStart: true})
			p := watcher.MustNext(t, wait)
			if p.Topic != "ew/"+tt.id || string(p.Payload) != "offline" {
				t.Fatalf("watcher got %s %q, want the will", p.Topic, p.Payload)
			}
			tc.waitRetained(t, "ew/"+tt.id, "offline")
		})
	}
}

// dropWithWillPending connects o (with a will) on n1, drops it (no
// DISCONNECT) once the log holds the connection and its will, and returns
// once n2 holds the close with the will still pending (not claimed).
func dropWithWillPending(t *testing.T, tc *testCluster, o testutil.ClientOptions) {
	t.Helper()
	dev := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), o)
	tc.waitWillInLog(t, "n2", o.ID)
	_ = dev.Conn.Close()
	testutil.Eventually(t, wait, func() error {
		if s, ok := tc.nodes["n2"].repl.Session(o.ID); !ok || s.Connected || s.Will == nil {
			return fmt.Errorf("close with the will pending not in the log yet (%+v %v)", s, ok)
		}
		return nil
	})
}

// waitWillInLog waits until node's log shows id's session connected with
// a will.
func (tc *testCluster) waitWillInLog(t *testing.T, node, id string) {
	t.Helper()
	testutil.Eventually(t, wait, func() error {
		if s, ok := tc.nodes[node].repl.Session(id); !ok || s.Will == nil || !s.Connected {
			return fmt.Errorf("%s: %s's will not in the log yet (%+v, %v)", node, id, s, ok)
		}
		return nil
	})
}
