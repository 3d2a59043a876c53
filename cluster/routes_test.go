package cluster

import (
	"math"
	"slices"
	"testing"
)

func TestLocalRoutesAreReferenceCounted(t *testing.T) {
	rt := newRouteTable("n1", 100)
	d, changed, err := rt.addLocal("a/+")
	if err != nil || !changed {
		t.Fatalf("first add: changed=%v err=%v", changed, err)
	}
	if d != (routeDelta{Node: "n1", Incarnation: 100, Version: 1, Op: opAdd, Filter: "a/+"}) {
		t.Fatalf("first delta = %+v", d)
	}
	if _, changed, _ := rt.addLocal("a/+"); changed {
		t.Fatal("second add of the same filter announced it again")
	}
	if _, changed := rt.removeLocal("a/+"); changed {
		t.Fatal("removing one of two references withdrew the filter")
	}
	if !rt.hasLocal("a/+") {
		t.Fatal("filter gone while one reference remains")
	}
	d, changed = rt.removeLocal("a/+")
	if !changed || d.Op != opRemove || d.Version != 2 {
		t.Fatalf("last remove: changed=%v delta=%+v", changed, d)
	}
	if _, changed := rt.removeLocal("a/+"); changed {
		t.Fatal("removing an unknown filter produced a delta")
	}
	if _, _, err := rt.addLocal("a/#/b"); err == nil {
		t.Fatal("invalid filter accepted")
	}
}

func addMembers(rt *routeTable, ids ...string) {
	for _, id := range ids {
		rt.setMember(id, true)
	}
}

func TestDeltasApplyInVersionOrder(t *testing.T) {
	rt := newRouteTable("n1", 1)
	addMembers(rt, "n2")
	add := func(v uint64, f string) routeDelta {
		return routeDelta{Node: "n2", Incarnation: 7, Version: v, Op: opAdd, Filter: f}
	}
	steps := []struct {
		d    routeDelta
		want applyResult
		have []string
	}{
		{add(1, "a"), deltaApplied, []string{"a"}},
		{add(1, "a"), deltaStale, []string{"a"}},                  // retransmission
		{add(3, "c"), deltaBuffered, []string{"a"}},               // gap: v2 missing
		{add(4, "d"), deltaBuffered, []string{"a"}},               //
		{add(2, "b"), deltaApplied, []string{"a", "b", "c", "d"}}, // fills the gap, drains 3 and 4
		{add(3, "c"), deltaStale, []string{"a", "b", "c", "d"}},
		{routeDelta{Node: "n2", Incarnation: 7, Version: 5, Op: opRemove, Filter: "a"}, deltaApplied, []string{"b", "c", "d"}},
		{routeDelta{Node: "n2", Incarnation: 6, Version: 9, Op: opAdd, Filter: "old"}, deltaStale, []string{"b", "c", "d"}},
		{routeDelta{Node: "n1", Incarnation: 9, Version: 1, Op: opAdd, Filter: "x"}, deltaIgnored, []string{"b", "c", "d"}}, // about us
		{routeDelta{Node: "n9", Incarnation: 9, Version: 1, Op: opAdd, Filter: "x"}, deltaIgnored, []string{"b", "c", "d"}}, // not a member
		{routeDelta{Node: "n2", Incarnation: 7, Version: 6, Op: 9, Filter: "x"}, deltaInvalid, []string{"b", "c", "d"}},
		{routeDelta{Node: "n2", Incarnation: 7, Version: 6, Op: opAdd, Filter: "a/#/b"}, deltaInvalid, []string{"b", "c", "d"}},
	}
	for i, s := range steps {
		if i == 4 && !rt.needsRepair("n2") {
			t.Fatal("needsRepair = false with v2 missing")
		}
		if i == 5 && rt.needsRepair("n2") {
			t.Fatal("needsRepair = true after the gap filled")
		}
		if got := rt.applyDelta(s.d); got != s.want {
			t.Fatalf("step %d %+v: result %v, want %v", i, s.d, got, s.want)
		}
		if got := rt.remoteFilters("n2"); !slices.Equal(got, s.have) {
			t.Fatalf("step %d: filters %v, want %v", i, got, s.have)
		}
	}
	var res matchResult
	rt.match("c", &res)
	if !slices.Equal(res.plain, []string{"n2"}) {
		t.Fatalf("match(c) = %v", res.plain)
	}
}

func TestNewIncarnationSupersedes(t *testing.T) {
	rt := newRouteTable("n1", 1)
	addMembers(rt, "n2")
	rt.applyDelta(routeDelta{Node: "n2", Incarnation: 10, Version: 1, Op: opAdd, Filter: "old/#"})
	rt.applyDelta(routeDelta{Node: "n2", Incarnation: 10, Version: 2, Op: opAdd, Filter: "keep"})

	// A restarted node: version 1 of a newer incarnation applies to the empty set.
	if got := rt.applyDelta(routeDelta{Node: "n2", Incarnation: 20, Version: 1, Op: opAdd, Filter: "new"}); got != deltaApplied {
		t.Fatalf("first delta of new incarnation: %v", got)
	}
	if got := rt.remoteFilters("n2"); !slices.Equal(got, []string{"new"}) {
		t.Fatalf("filters after restart = %v, want [new]", got)
	}
	// A later delta of the new incarnation whose predecessor was lost waits
	// for anti-entropy; the old incarnation's deltas are stale.
	if got := rt.applyDelta(routeDelta{Node: "n2", Incarnation: 20, Version: 3, Op: opAdd, Filter: "z"}); got != deltaBuffered {
		t.Fatalf("gap delta: %v", got)
	}
	if got := rt.applyDelta(routeDelta{Node: "n2", Incarnation: 10, Version: 3, Op: opAdd, Filter: "zombie"}); got != deltaStale {
		t.Fatalf("old incarnation delta: %v", got)
	}
	// Anti-entropy brings version 2; the buffered version 3 then applies.
	res := rt.merge([]nodeRoutes{{Node: "n2", Incarnation: 20, Version: 2, Filters: []string{"new", "y"}}})
	if res.Replaced != 1 {
		t.Fatalf("merge replaced %d", res.Replaced)
	}
	if got := rt.remoteFilters("n2"); !slices.Equal(got, []string{"new", "y", "z"}) {
		t.Fatalf("filters after merge = %v", got)
	}
}

func TestMergeKeepsNewerEntry(t *testing.T) {
	rt := newRouteTable("n1", 1)
	addMembers(rt, "n2", "n3")
	rt.merge([]nodeRoutes{{Node: "n2", Incarnation: 5, Version: 4, Filters: []string{"a", "b"}}})
	// Older version of the same incarnation, and an older incarnation: ignored.
	res := rt.merge([]nodeRoutes{
		{Node: "n2", Incarnation: 5, Version: 3, Filters: []string{"stale"}},
		{Node: "n2", Incarnation: 4, Version: 99, Filters: []string{"older-life"}},
		{Node: "n3", Incarnation: 2, Version: 1, Filters: []string{"c"}},
		{Node: "n4", Incarnation: 2, Version: 1, Filters: []string{"not-a-member"}},
	})
	if res.Replaced != 1 {
		t.Fatalf("replaced %d, want 1 (n3 only)", res.Replaced)
	}
	if got := rt.remoteFilters("n2"); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("n2 = %v", got)
	}
	if got := rt.remoteFilters("n4"); got != nil {
		t.Fatalf("routes accepted for a non-member: %v", got)
	}
	// A full entry that removes a filter removes it from the index too.
	rt.merge([]nodeRoutes{{Node: "n2", Incarnation: 5, Version: 6, Filters: []string{"b"}}})
	var m matchResult
	rt.match("a", &m)
	if len(m.plain) != 0 {
		t.Fatalf("match(a) after withdrawal = %v", m.plain)
	}
}

func TestSnapshotMergeRoundTrip(t *testing.T) {
	a := newRouteTable("a", 11)
	b := newRouteTable("b", 22)
	c := newRouteTable("c", 33)
	addMembers(a, "b", "c")
	addMembers(b, "a", "c")
	addMembers(c, "a", "b")
	for _, f := range []string{"x/#", "$share/g/y/+", "z"} {
		a.addLocal(f)
	}
	c.addLocal("only-c")
	// a and c exchange with b only; b's state relays a's entry to c (transitive).
	b.merge(mustDecodeState(t, appendState(nil, a.snapshot(0))))
	b.merge(mustDecodeState(t, appendState(nil, c.snapshot(0))))
	c.merge(mustDecodeState(t, appendState(nil, b.snapshot(0))))
	if got := c.remoteFilters("a"); !slices.Equal(got, []string{"$share/g/y/+", "x/#", "z"}) {
		t.Fatalf("c's view of a = %v", got)
	}
	var m matchResult
	c.match("y/1", &m)
	if len(m.shared) != 1 || m.shared[0].Group != "$share/g/y/+" || !slices.Equal(m.shared[0].Nodes, []string{"a"}) {
		t.Fatalf("shared match = %+v", m.shared)
	}
}

func mustDecodeState(t *testing.T, b []byte) []nodeRoutes {
	t.Helper()
	s, err := decodeState(b)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestDeadNodeRoutesRemovedAndNotResurrected(t *testing.T) {
	rt := newRouteTable("n1", 1)
	addMembers(rt, "n2")
	rt.merge([]nodeRoutes{{Node: "n2", Incarnation: 5, Version: 2, Filters: []string{"a/#"}}})
	rt.setMember("n2", false)
	var m matchResult
	rt.match("a/b", &m)
	if len(m.plain) != 0 || rt.remoteFilters("n2") != nil {
		t.Fatalf("routes of a dead node still match: %v", m.plain)
	}
	// A peer that has not noticed the death relays the old entry, and a late
	// delta arrives: both ignored.
	rt.merge([]nodeRoutes{{Node: "n2", Incarnation: 5, Version: 2, Filters: []string{"a/#"}}})
	if got := rt.applyDelta(routeDelta{Node: "n2", Incarnation: 5, Version: 3, Op: opAdd, Filter: "b"}); got != deltaIgnored {
		t.Fatalf("delta of a dead node: %v", got)
	}
	if rt.remoteFilters("n2") != nil || rt.index.size != 0 {
		t.Fatalf("dead node resurrected: %v", rt.remoteFilters("n2"))
	}
	// When it comes back, its state is accepted again.
	rt.setMember("n2", true)
	rt.merge([]nodeRoutes{{Node: "n2", Incarnation: 5, Version: 3, Filters: []string{"a/#", "b"}}})
	if got := rt.remoteFilters("n2"); !slices.Equal(got, []string{"a/#", "b"}) {
		t.Fatalf("after rejoin: %v", got)
	}
}

func TestMergeBumpsOwnIncarnationWhenPeerKnowsNewer(t *testing.T) {
	rt := newRouteTable("n1", 100)
	rt.addLocal("a")
	res := rt.merge([]nodeRoutes{{Node: "n1", Incarnation: 100, Version: 1, Filters: []string{"a"}}})
	if res.Bumped {
		t.Fatal("an exact copy of our own entry bumped the incarnation")
	}
	res = rt.merge([]nodeRoutes{{Node: "n1", Incarnation: 500, Version: 7, Filters: []string{"ghost"}}})
	if !res.Bumped {
		t.Fatal("a newer entry about us did not bump the incarnation")
	}
	own := rt.snapshot(0)[0]
	if own.Incarnation <= 500 || !slices.Equal(own.Filters, []string{"a"}) {
		t.Fatalf("own entry after bump = %+v", own)
	}
	// A peer holding the ghost entry takes ours now.
	peer := newRouteTable("n2", 1)
	addMembers(peer, "n1")
	peer.merge([]nodeRoutes{{Node: "n1", Incarnation: 500, Version: 7, Filters: []string{"ghost"}}})
	peer.merge([]nodeRoutes{own})
	if got := peer.remoteFilters("n1"); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("peer still holds the ghost: %v", got)
	}
	// A claim at the largest incarnation cannot be outranked; ours must not
	// wrap to 0 trying (found by FuzzRouteGossip).
	inc, _ := rt.head()
	if res := rt.merge([]nodeRoutes{{Node: "n1", Incarnation: math.MaxUint64, Version: 1}}); res.Bumped {
		t.Fatal("bumped past the largest incarnation")
	}
	if got, _ := rt.head(); got != inc {
		t.Fatalf("incarnation %d after a MaxUint64 claim, want %d", got, inc)
	}
}

func TestPendingBufferIsBounded(t *testing.T) {
	rt := newRouteTable("n1", 1)
	addMembers(rt, "n2")
	for v := uint64(2); v < 2+maxPendingDeltas; v++ {
		if got := rt.applyDelta(routeDelta{Node: "n2", Incarnation: 1, Version: v, Op: opAdd, Filter: "f"}); got != deltaBuffered {
			t.Fatalf("v%d: %v", v, got)
		}
	}
	if got := rt.applyDelta(routeDelta{Node: "n2", Incarnation: 1, Version: 5000, Op: opAdd, Filter: "f"}); got != deltaStale {
		t.Fatalf("over the bound: %v", got)
	}
}

func TestHeadRevealsMissedDeltas(t *testing.T) {
	rt := newRouteTable("n1", 1)
	addMembers(rt, "n2")
	rt.merge([]nodeRoutes{{Node: "n2", Incarnation: 5, Version: 3, Filters: []string{"a"}}})
	if rt.noteHead("n2", 5, 3) || rt.needsRepair("n2") {
		t.Fatal("up to date entry reported behind")
	}
	if !rt.noteHead("n2", 5, 4) || !rt.needsRepair("n2") {
		t.Fatal("missed delta not detected")
	}
	if rt.noteHead("n9", 1, 1) {
		t.Fatal("head of a non-member acted upon")
	}
	rt.merge([]nodeRoutes{{Node: "n2", Incarnation: 5, Version: 4, Filters: []string{"a", "b"}}})
	if rt.needsRepair("n2") {
		t.Fatal("still behind after the full entry arrived")
	}
	if !rt.noteHead("n2", 6, 1) {
		t.Fatal("a restart (newer incarnation) not detected")
	}
}
