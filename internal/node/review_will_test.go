package node

import (
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestCleanWillNotPublishedTwiceWhenCloseTimesOut: guarantee 4 ("a will is
// never published twice"). A clean session's will mirror is closed when
// its connection drops (endMirror). If that write times out, the node
// publishes the will itself; but a timeout does not mean the close was
// not committed: here the close is in the log (a quorum holds it) while
// the leader is slow to apply it. Once the leader applies it, it claims
// and publishes the will again.
func TestCleanWillNotPublishedTwiceWhenCloseTimesOut(t *testing.T) {
	g := newApplyGate(t)
	tc := newTunedCluster(t, g.tune, "n1", "n2", "n3")
	tc.waitReady()
	leader, follower := tc.leaderAndFollower(t)
	watcher := tc.client(follower, "rw-watch")
	watcher.Sub(t, 1, "rw/will")
	dev := testutil.Connect(t, tc.nodes[follower].Addr("mqtt"), testutil.ClientOptions{ID: "rw-dev", CleanStart: true,
		Will: &paho.WillMessage{Topic: "rw/will", QoS: 1, Payload: []byte("gone")}})
	testutil.Eventually(t, 10*time.Second, func() error {
		if s, ok := tc.nodes[leader].repl.Session("rw-dev"); !ok || s.Will == nil {
			return errMsg("the will mirror is not in the leader's state")
		}
		return nil
	})
	// The leader falls behind applying (its log and the quorum go on).
	g.node.Store(&leader)
	gp := tc.client(follower, "rw-gate")
	_ = gp.TryPub(gateTopic, 0, true, []byte("g"))
	select {
	case <-g.reached:
	case <-time.After(10 * time.Second):
		t.Fatal("the leader never reached the gate")
	}
	defer g.open()       // never leave the leader stuck: the cleanup would hang
	_ = dev.Conn.Close() // the connection drops: no DISCONNECT, the will is due
	// The follower's close reaches the log but the leader cannot apply it:
	// the write times out with an unknown outcome. Publishing the will
	// then (the old behaviour) published it twice once the leader caught
	// up. Let the timeout pass, then the leader.
	if p, err := watcher.Next(7 * time.Second); err == nil {
		t.Logf("will published while the leader was stuck: %q", p.Payload)
		g.open()
		if p2, err := watcher.Next(5 * time.Second); err == nil {
			t.Fatalf("the will was published twice (second copy %q, dup %v)", p2.Payload, p2.Duplicate())
		}
		return
	}
	g.open()
	first, err := watcher.Next(15 * time.Second)
	if err != nil {
		t.Fatalf("will never published: %v", err)
	}
	t.Logf("will: %q", first.Payload)
	testutil.Eventually(t, 15*time.Second, func() error {
		if s, ok := tc.nodes[leader].repl.Session("rw-dev"); ok && s.Will != nil {
			return errMsg("the leader has not dealt with the mirror yet")
		}
		return nil
	})
	if p, err := watcher.Next(3 * time.Second); err == nil {
		t.Fatalf("the will was published twice (second copy %q, dup %v): once by %s when its close timed out, once by the leader's claim of the committed close",
			p.Payload, p.Duplicate(), follower)
	}
}

type errMsg string

func (e errMsg) Error() string { return string(e) }

// TestWillClaimPublishedLiveWhenItsWriteTimesOut: guarantee 4 ("wills
// fire ... published once"). The leader claims a dropped client's will in
// the log, then publishes the live copies (clean subscribers) when the
// claim's write returns. When that write times out with an unknown outcome
// but commits after all, nobody published the live copies: the retries
// find the will gone, and a clean subscriber never got it. Here the
// leader's state machine is slow to apply the claim (it is held on the
// retained will's change), so the claim's write times out.
func TestWillClaimPublishedLiveWhenItsWriteTimesOut(t *testing.T) {
	g := newApplyGate(t)
	g.topic = "wc/will"
	tc := newTunedCluster(t, g.tune, "n1", "n2", "n3")
	tc.waitReady()
	leader, follower := tc.leaderAndFollower(t)
	watcher := tc.client(follower, "wc-watch")
	watcher.Sub(t, 1, "wc/will")
	dev := testutil.Connect(t, tc.nodes[follower].Addr("mqtt"), testutil.ClientOptions{ID: "wc-dev", CleanStart: true,
		Will: &paho.WillMessage{Topic: "wc/will", QoS: 1, Retain: true, Payload: []byte("gone")}})
	testutil.Eventually(t, 10*time.Second, func() error {
		if s, ok := tc.nodes[leader].repl.Session("wc-dev"); !ok || s.Will == nil {
			return errMsg("the will mirror is not in the leader's state")
		}
		return nil
	})
	g.node.Store(&leader)
	defer g.open()
	_ = dev.Conn.Close() // no DISCONNECT: the will is due
	select {
	case <-g.reached: // the leader is applying its claim (the retained will)
	case <-time.After(15 * time.Second):
		t.Fatal("the leader never applied a claim of the will")
	}
	// The claim is committed (the leader is applying it); its write
	// returns only once the entry is applied, so it times out (5 s) with
	// an unknown outcome. The live copy is due all the same, from the
	// commit.
	first, err := watcher.Next(7 * time.Second)
	g.open()
	if err != nil {
		if first, err = watcher.Next(15 * time.Second); err != nil {
			t.Fatalf("the committed claim's will never reached the clean subscriber: %v", err)
		}
	}
	t.Logf("will: %q", first.Payload)
	if p, err := watcher.Next(3 * time.Second); err == nil {
		t.Fatalf("the will was published twice (second copy %q)", p.Payload)
	}
}
