package node

import (
	"fmt"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestClaimsOfAConnectStormShareEntries: clients connecting one after
// another have their client-id claims written in few log entries, not one
// each (hooks.claimPace: one entry per connect cost a node of three more
// than the connect itself), and the first claim after a quiet spell is
// not held back.
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
	for i := 1; i <= 20; i++ {
		id := fmt.Sprintf("storm-%d", i)
		testutil.Connect(t, n.Addr("mqtt"), testutil.ClientOptions{ID: id, CleanStart: true})
		ids = append(ids, id)
	}
	testutil.Eventually(t, 2*pace+wait, owned(ids...))
	if entries := n.repl.Status().AppliedIndex - before; entries > 3 {
		t.Fatalf("20 claims took %d log entries, want them to share one or two", entries)
	}
}
