package node

import (
	"fmt"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// claimBurst is hooks.claimBurst: the claim entries a node writes at once
// before the pace holds them back.
const claimBurst = 16

// TestClaimsOfAConnectStormShareEntries: clients connecting one after
// another have their client-id claims written in few log entries once the
// burst is spent, not one each (hooks.claimPace: one entry per connect
// cost a node of three more than the connect itself), and the first claim
// after a quiet spell is not held back.
func TestClaimsOfAConnectStormShareEntries(t *testing.T) {
	const pace = 5 * time.Second
	tc := newTunedCluster(t, func(c *Config) { c.claimPace = pace }, "n1")
	tc.waitReady()
	n := tc.nodes["n1"]
	owned := func(ids ...string) func() error {
		return func() error {
			for _, id := range ids {
				if o, ok := n.repl.Owner(id); !ok || o.Node != "n1" {
					return fmt.Errorf("no claim of %s applied", id)
				}
			}
			return nil
		}
	}
	testutil.Connect(t, n.Addr("mqtt"), testutil.ClientOptions{ID: "storm-0", CleanStart: true})
	testutil.Eventually(t, pace/2, owned("storm-0"))
	before := n.repl.Status().AppliedIndex
	var ids []string
	for i := 1; i <= claimBurst+20; i++ {
		id := fmt.Sprintf("storm-%d", i)
		testutil.Connect(t, n.Addr("mqtt"), testutil.ClientOptions{ID: id, CleanStart: true})
		ids = append(ids, id)
	}
	testutil.Eventually(t, 2*pace+wait, owned(ids...))
	if entries := n.repl.Status().AppliedIndex - before; entries > claimBurst+2 {
		t.Fatalf("%d claims took %d log entries, want the burst's %d and then one or two", len(ids), entries, claimBurst-1)
	}
}

// TestPacedNodeDoesNotHoldBackAClaim: a client connects to n1, which has
// just written another client's claim, and at once to n2. n1's claim of
// the older connection must not wait for the pace: held back, it landed
// after n2's and, the later claim in log order winning, dropped the
// client's newer connection (3 rounds of 3 with n1's pace at 1 s; with the
// 10 ms default, 58 of 60 against 1-3 of 60 with n1 quiet; found by
// review).
func TestPacedNodeDoesNotHoldBackAClaim(t *testing.T) {
	tc := newTunedCluster(t, func(c *Config) {
		if c.NodeID == "n1" {
			c.claimPace = time.Second
		}
	}, "n1", "n2")
	tc.waitReady()
	for i := range 3 {
		f := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: fmt.Sprintf("pace-f-%d", i), CleanStart: true})
		id := fmt.Sprintf("pace-x-%d", i)
		old := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: id, CleanStart: true})
		cur := testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: id, CleanStart: true})
		select {
		case <-old.Done():
		case <-cur.Done():
			t.Fatalf("round %d: the newer connection, on n2, was dropped by the older one's claim, held back on n1", i)
		case <-time.After(wait):
			t.Fatalf("round %d: neither connection was dropped", i)
		}
		old.Close()
		cur.Close()
		f.Close()
	}
}
