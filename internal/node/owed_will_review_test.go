package node

import (
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/hooks"
	"github.com/mqtt-ha/broker/internal/testutil"
)

// Owed wills, from the review (helper): each failed on the first version.

// queueOf is the length of id's queue in every node's log, or an error
// when the nodes disagree or have no session.
func (tc *testCluster) queueOf(id string) (int, error) {
	n := -1
	for name, nd := range tc.nodes {
		s, ok := nd.repl.Session(id)
		if !ok {
			return 0, fmt.Errorf("%s: no session %s", name, id)
		}
		if n >= 0 && len(s.Queue) != n {
			return 0, fmt.Errorf("%s: queue of %s %d, another node %d", name, id, len(s.Queue), n)
		}
		n = len(s.Queue)
	}
	return n, nil
}

// TestOwedWillOfEarlierRunAfterRollingRestartDiscarded: n2 stops
// gracefully and restarts, which clears its departure record; its old
// client comes back within the leave grace, on n1, with clean start. n1's
// discard leaves the will owed by n2's previous run's connection, which
// n2 told to go: after its restart grace n2's sweep must discard it, not
// make it due.
func TestOwedWillOfEarlierRunAfterRollingRestartDiscarded(t *testing.T) {
	const grace = 4 * time.Second
	tc := newSessionsTunedCluster(t, func(c *hooks.SessionsConfig) { c.LeaveGrace = grace }, "n1", "n2", "n3")
	tc.waitReady()
	tc.waitOwedWills()
	tc.persistentSub(t, "n1", "rv-ha", "rv/#")
	dev, err := testutil.TryConnect(tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "rv-dev", CleanStart: true,
		Will: &paho.WillMessage{Topic: "rv/dev", QoS: 1, Payload: []byte("offline")}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dev.Conn.Close() })
	tc.waitWillInLog(t, "n1", "rv-dev")
	tc.stop("n2")
	tc.restart("n2")
	tc.waitMembers(3)
	tc.waitReady()
	testutil.Eventually(t, wait, func() error {
		if _, ok := tc.nodes["n1"].repl.Departures()["n2"]; ok {
			return fmt.Errorf("n2's departure record not cleared yet")
		}
		return nil
	})
	back := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "rv-dev", CleanStart: true})
	defer back.Close()
	// Owed, then settled by n2 once its restart grace is over.
	tc.waitOwedCount(t, grace+wait, 0)
	if n, err := tc.queueOf("rv-ha"); err != nil || n != 0 {
		t.Fatalf("the will was queued (%d, %v) although the client came back within the leave grace", n, err)
	}
}

// TestOwedWillDiscardedByDisconnectAfterLongCut: the old connection sends
// DISCONNECT while its node (n3) cannot reach the leader for longer than
// the session writer retries a write; the client is back at once on n1
// with clean start. n3's sweep must then discard the owed will (n3 knows
// the connection ended with DISCONNECT), not take it for a drop.
func TestOwedWillDiscardedByDisconnectAfterLongCut(t *testing.T) {
	var cut cutDialer
	tc := newCutCluster(t, &cut)
	dev := owedDev(t, tc)
	cut.set(true)
	dev.Close() // DISCONNECT
	back := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "ow-dev", CleanStart: true})
	defer back.Close()
	tc.waitOwedCount(t, wait, 1, "n1")
	// n3 gives up writing the DISCONNECT's close (writeRetryFor).
	failed := tc.nodes["n3"].sessionsHook.WritesFailed()
	testutil.Eventually(t, 30*time.Second, func() error {
		if tc.nodes["n3"].sessionsHook.WritesFailed() == failed {
			return fmt.Errorf("n3 still retries its writes")
		}
		return nil
	})
	cut.set(false)
	tc.waitOwedCount(t, wait, 0)
	tc.noWill(t)
}

// TestOwedWillOfRefusedConnectDiscarded: a persistent CONNECT with a will
// on n1 whose first open commits with an unknown outcome; a newer clean
// CONNECT on n2 replaces that session, leaving its will owed by the n1
// connection; n1 then refuses its CONNECT. The will of a refused CONNECT
// must never be published.
func TestOwedWillOfRefusedConnectDiscarded(t *testing.T) {
	held, tune := holdFirstOpen("n1", "rf-dev")
	tc := newSessionsTunedCluster(t, tune, "n1", "n2", "n3")
	tc.waitReady()
	tc.waitOwedWills()
	tc.persistentSub(t, "n3", "rf-ha", "rf/#")
	conn := sendPersistentConnect(t, tc.nodes["n1"].Addr("mqtt"), "rf-dev", "rf/dev")
	held.waitCommitted(t)
	c2, _ := rawConnect(t, tc.nodes["n2"].Addr("mqtt"), "rf-dev", true, 0)
	defer c2.conn.Close()
	tc.waitOwedCount(t, wait, 1, "n1")
	close(held.release)
	notServed(t, conn)
	tc.waitOwedCount(t, wait, 0)
	if n, err := tc.queueOf("rf-ha"); err != nil || n != 0 {
		t.Fatalf("the will of a refused CONNECT was queued (%d, %v)", n, err)
	}
}
