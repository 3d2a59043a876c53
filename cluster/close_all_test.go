package cluster

import (
	"sync"
	"testing"
)

// TestCloseAllAtOnce: every node of a cluster closed at the same moment
// (a whole StatefulSet deleted, make run stopped with Ctrl-C). A node
// that learnt of a peer's leave while it was leaving itself used to drop
// the peer from its table without stopping it, so its Close waited the
// full closeWait for the peer's goroutine and failed with "goroutines
// still running" (2 nodes of 3 in a manual run took 12 s to stop).
func TestCloseAllAtOnce(t *testing.T) {
	for round := 0; round < 3; round++ {
		nodes := startCluster(t, 3)
		var wg sync.WaitGroup
		errs := make([]error, len(nodes))
		for i, tn := range nodes {
			wg.Go(func() { errs[i] = tn.Close() })
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d: close n%d: %v", round, i+1, err)
			}
		}
	}
}
