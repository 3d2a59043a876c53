package node

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestSameNodeTakeoverKeepsRoutes: a persistent client reconnects to the
// same node (its old connection is taken over); QoS 0 messages published on
// another node must keep reaching the new connection. The old connection's
// disconnect used to withdraw the routes (keyed by client id) that the new
// one relies on.
func TestSameNodeTakeoverKeepsRoutes(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	opts := testutil.ClientOptions{ID: "tk", CleanStart: true, SessionExpiry: 600, Buffer: 100}
	old := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), opts)
	old.Sub(t, 0, "tk/x")
	opts.CleanStart = false
	cur := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), opts)
	select {
	case <-old.Done():
	case <-time.After(wait):
		t.Fatal("the old connection was not taken over")
	}
	pub := tc.client("n2", "tk-pub")
	testutil.Eventually(t, wait, func() error {
		pub.Pub(t, "tk/x", 0, false, []byte("ping"))
		if _, err := cur.Next(200 * time.Millisecond); err != nil {
			return fmt.Errorf("QoS 0 from n2 does not reach the new connection: %w", err)
		}
		return nil
	})
	// And it stays so once the old connection's disconnect has been
	// processed everywhere: the route must still be there a while later.
	tc.waitRoutes(t, "n2", "n1", 1)
	pub.Pub(t, "tk/x", 0, false, []byte("again"))
	for {
		p, err := cur.Next(wait)
		if err != nil {
			t.Fatalf("QoS 0 from n2 stopped reaching the new connection: %v", err)
		}
		if string(p.Payload) == "again" {
			return
		}
	}
}

// TestUnsubackOfPersistentSession: UNSUBACK reports what the log did
// (0x00 for a filter the session had, 0x11 for one it did not), not mochi's
// view, where a persistent session's filters never are.
func TestUnsubackOfPersistentSession(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	c := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "unsub", CleanStart: true,
		SessionExpiry: 600, Buffer: 10})
	c.Sub(t, 1, "u/a")
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	ack, err := c.Unsubscribe(ctx, &paho.Unsubscribe{Topics: []string{"u/a", "u/b"}})
	if err != nil && ack == nil {
		t.Fatal(err)
	}
	if len(ack.Reasons) != 2 || ack.Reasons[0] != 0x00 || ack.Reasons[1] != 0x11 {
		t.Fatalf("UNSUBACK reasons %x, want [00 11]", ack.Reasons)
	}
	if s, _ := tc.nodes["n1"].repl.Session("unsub"); len(s.Subscriptions) != 0 {
		t.Fatalf("subscriptions left in the log: %v", s.Subscriptions)
	}
}

// TestOwnershipOfCrashedNodeReleased: the client ids held by a node that
// died are released by the leader (they used to stay in the log for ever).
func TestOwnershipOfCrashedNodeReleased(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	tc.client("n2", "own-x")
	testutil.Eventually(t, wait, func() error {
		if o, ok := tc.nodes["n1"].repl.Owner("own-x"); !ok || o.Node != "n2" {
			return fmt.Errorf("owner %+v %v, want n2", o, ok)
		}
		return nil
	})
	tc.nodes["n2"].Kill()
	delete(tc.nodes, "n2")
	testutil.Eventually(t, 20*time.Second, func() error {
		if o, ok := tc.nodes["n1"].repl.Owner("own-x"); ok {
			return fmt.Errorf("client id still owned by %+v", o)
		}
		return nil
	})
}
