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

// TestPacedNodeDoesNotHoldBackAClaim: a client that connects to n1 just
// after another one is not held back by the pace: its claim is written at
// once. Held back, it could land after the claim of the client's newer
// connection on another node and, the later claim in log order winning,
// drop that connection (58 of 60 rounds with a plain 10 ms pace against
// 1-3 of 60 with n1 quiet; found by review). That race itself is the
// README's known gap and is not what this test measures: only that the
// claim is not held for the pace (5 s here).
func TestPacedNodeDoesNotHoldBackAClaim(t *testing.T) {
	const pace = 5 * time.Second
	tc := newTunedCluster(t, func(c *Config) { c.claimPace = pace }, "n1")
	tc.waitReady()
	n := tc.nodes["n1"]
	for i := range 3 {
		f := testutil.Connect(t, n.Addr("mqtt"), testutil.ClientOptions{ID: fmt.Sprintf("pace-f-%d", i), CleanStart: true})
		id := fmt.Sprintf("pace-x-%d", i)
		x := testutil.Connect(t, n.Addr("mqtt"), testutil.ClientOptions{ID: id, CleanStart: true})
		testutil.Eventually(t, pace/2, func() error {
			if o, ok := n.repl.Owner(id); !ok || o.Node != "n1" {
				return fmt.Errorf("round %d: the claim of %s is held back", i, id)
			}
			return nil
		})
		x.Close()
		f.Close()
	}
}
