package cluster

import (
	"fmt"
	"slices"
	"testing"
	"time"
)

// TestNewIncarnationDuringBatchedSnapshot: a node restarts (new
// incarnation) while a large snapshot of its previous life is applied in
// batches. Its first deltas (version 1, 2 of the new incarnation) arrive
// meanwhile and are buffered. After the merge, the entry must follow the
// new incarnation: its version 1 applies to the empty set. drainLocked
// leaves a buffer of a newer incarnation untouched, so the dead life's
// routes stay and the new life's deltas wait for a repair.
func TestNewIncarnationDuringBatchedSnapshot(t *testing.T) {
	rt := newRouteTable("self", 1)
	rt.setMember("p", true)
	var old []string
	for i := range 200 * mergeBatch {
		old = append(old, fmt.Sprintf("old/%d", i))
	}
	done := make(chan bool)
	go func() {
		done <- rt.mergeSnapshot(nodeRoutes{Node: "p", Incarnation: 1, Version: uint64(len(old)), Filters: old})
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		rt.mu.RLock()
		e := rt.remote["p"]
		syncing := e != nil && e.syncing
		rt.mu.RUnlock()
		if syncing {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("snapshot never started syncing")
		}
		time.Sleep(50 * time.Microsecond)
	}
	for v, f := range []string{"new/a", "new/b"} {
		if res := rt.applyDelta(routeDelta{Node: "p", Incarnation: 2, Version: uint64(v + 1), Op: opAdd, Filter: f}); res != deltaBuffered {
			t.Fatalf("delta %d during the sync: %v, want buffered", v+1, res)
		}
	}
	if !<-done {
		t.Fatal("snapshot not merged")
	}
	// One more delta of the new life after the merge.
	res := rt.applyDelta(routeDelta{Node: "p", Incarnation: 2, Version: 3, Op: opAdd, Filter: "new/c"})
	inc, ver := rt.remoteHead("p")
	got := rt.remoteFilters("p")
	want := []string{"new/a", "new/b", "new/c"}
	if inc != 2 || ver != 3 || !slices.Equal(got, want) {
		t.Fatalf("after the sync and one more delta (%v): head %d/%d with %d filters (first %q), want 2/3 %v; needsRepair=%v",
			res, inc, ver, len(got), got[:min(3, len(got))], want, rt.needsRepair("p"))
	}
}
