package replication

import (
	"errors"
	"reflect"
	"testing"
	"time"
)

func msg(topic, payload string) RetainedMessage {
	return RetainedMessage{Topic: topic, Payload: []byte(payload)}
}

func TestStateRetainSetAndClear(t *testing.T) {
	s := newState()
	res, evs := s.applyCommand(&RetainSet{Msg: msg("a", "1")}, 10, nil)
	if !res.Changed || res.Index != 10 || res.Err != nil {
		t.Fatalf("set: %+v", res)
	}
	if got := s.retained["a"]; got.Index != 10 || string(got.Payload) != "1" {
		t.Fatalf("stored %+v", got)
	}
	if len(evs) != 1 || evs[0].retained == nil || evs[0].retained.Cleared || evs[0].retained.Msg.Index != 10 {
		t.Fatalf("set event %+v", evs)
	}
	// Replace.
	s.applyCommand(&RetainSet{Msg: msg("a", "2")}, 11, nil)
	if got := s.retained["a"]; got.Index != 11 || string(got.Payload) != "2" {
		t.Fatalf("replaced %+v", got)
	}
	// Conditional clear with a stale index: no-op, no event.
	res, evs = s.applyCommand(&RetainClear{Topic: "a", IfIndex: 10}, 12, nil)
	if res.Changed || len(evs) != 0 || len(s.retained) != 1 {
		t.Fatalf("stale conditional clear changed state: %+v %+v", res, evs)
	}
	// Conditional clear with the current index.
	res, evs = s.applyCommand(&RetainClear{Topic: "a", IfIndex: 11}, 13, nil)
	if !res.Changed || len(evs) != 1 || !evs[0].retained.Cleared || len(s.retained) != 0 {
		t.Fatalf("conditional clear: %+v %+v", res, evs)
	}
	// Clear of an absent topic.
	res, evs = s.applyCommand(&RetainClear{Topic: "a"}, 14, nil)
	if res.Changed || len(evs) != 0 {
		t.Fatalf("clear absent: %+v %+v", res, evs)
	}
	// Unconditional clear.
	s.applyCommand(&RetainSet{Msg: msg("b", "x")}, 15, nil)
	if res, _ := s.applyCommand(&RetainClear{Topic: "b"}, 16, nil); !res.Changed || len(s.retained) != 0 {
		t.Fatalf("unconditional clear: %+v", res)
	}
}

func TestStateOwnership(t *testing.T) {
	s := newState()
	r1, evs := s.applyCommand(&ClaimOwner{ClientID: "c", Node: "A", At: 100}, 1, nil)
	if r1.Epoch != 1 || r1.Prev != (Owner{}) || !r1.Changed {
		t.Fatalf("first claim %+v", r1)
	}
	if len(evs) != 1 || evs[0].owner.Owner != (Owner{Node: "A", Epoch: 1, Since: 100}) {
		t.Fatalf("claim event %+v", evs)
	}
	// Epochs are cluster-wide: another client's claim takes the next one.
	if r, _ := s.applyCommand(&ClaimOwner{ClientID: "other", Node: "A"}, 2, nil); r.Epoch != 2 {
		t.Fatalf("other client epoch %d", r.Epoch)
	}
	// Takeover by B: new epoch, previous owner returned.
	r2, evs := s.applyCommand(&ClaimOwner{ClientID: "c", Node: "B", At: 200}, 3, nil)
	if r2.Epoch != 3 || r2.Prev != (Owner{Node: "A", Epoch: 1, Since: 100}) {
		t.Fatalf("takeover %+v", r2)
	}
	if evs[0].owner.Prev.Node != "A" || evs[0].owner.Owner.Node != "B" {
		t.Fatalf("takeover event %+v", evs[0].owner)
	}
	// A's late release (its old epoch) must not release B.
	res, evs := s.applyCommand(&ReleaseOwner{ClientID: "c", Node: "A", Epoch: 1}, 4, nil)
	if res.Changed || len(evs) != 0 || s.owners["c"].Node != "B" {
		t.Fatalf("stale release changed state: %+v", res)
	}
	if res.Prev.Node != "B" {
		t.Fatalf("stale release should report the current owner: %+v", res.Prev)
	}
	// Right epoch, wrong node.
	if res, _ := s.applyCommand(&ReleaseOwner{ClientID: "c", Node: "A", Epoch: 3}, 5, nil); res.Changed {
		t.Fatal("release by the wrong node succeeded")
	}
	// Current release.
	res, evs = s.applyCommand(&ReleaseOwner{ClientID: "c", Node: "B", Epoch: 3}, 6, nil)
	if !res.Changed || res.Epoch != 3 || len(evs) != 1 || evs[0].owner.Owner != (Owner{}) {
		t.Fatalf("release %+v %+v", res, evs)
	}
	if _, ok := s.owners["c"]; ok {
		t.Fatal("released owner still present")
	}
	// Release of an unknown client.
	if res, _ := s.applyCommand(&ReleaseOwner{ClientID: "zz", Node: "B", Epoch: 3}, 7, nil); res.Changed {
		t.Fatal("release of unknown client changed state")
	}
	// A claim after a release never reuses an epoch (fencing).
	if r, _ := s.applyCommand(&ClaimOwner{ClientID: "c", Node: "A"}, 8, nil); r.Epoch != 4 {
		t.Fatalf("epoch after release %d, want 4", r.Epoch)
	}
}

func TestStateBatch(t *testing.T) {
	s := newState()
	res, evs := s.applyCommand(&Batch{Commands: []Command{
		&RetainSet{Msg: msg("a", "1")},
		&RetainSet{Msg: RetainedMessage{Topic: "bad"}}, // invalid: empty payload
		&ClaimOwner{ClientID: "c", Node: "A"},
		&RetainClear{Topic: "missing"},
	}}, 5, nil)
	if res.Err != nil || !res.Changed || len(res.Results) != 4 {
		t.Fatalf("batch %+v", res)
	}
	if !errors.Is(res.Results[1].Err, ErrInvalidCommand) {
		t.Fatalf("invalid sub-command: %+v", res.Results[1])
	}
	if !res.Results[0].Changed || res.Results[2].Epoch != 1 || res.Results[3].Changed {
		t.Fatalf("sub-results %+v", res.Results)
	}
	for _, r := range res.Results {
		if r.Index != 5 {
			t.Fatalf("sub-result index %d", r.Index)
		}
	}
	if len(evs) != 2 || len(s.retained) != 1 || len(s.owners) != 1 {
		t.Fatalf("batch effects: %d events, %d retained, %d owners", len(evs), len(s.retained), len(s.owners))
	}
}

func TestStateInvalidCommandChangesNothing(t *testing.T) {
	s := newState()
	for _, c := range []Command{
		&RetainSet{Msg: msg("", "x")}, &RetainClear{}, &ClaimOwner{}, &ReleaseOwner{},
		&Batch{Commands: []Command{&Batch{}}},
	} {
		res, evs := s.applyCommand(c, 1, nil)
		if !errors.Is(res.Err, ErrInvalidCommand) || len(evs) != 0 {
			t.Fatalf("%v: %+v", c.Type(), res)
		}
	}
	if !reflect.DeepEqual(s, newState()) {
		t.Fatal("invalid commands changed the state")
	}
}

// TestStateDeterministic applies the same log to two states and compares.
func TestStateDeterministic(t *testing.T) {
	log := []Command{
		&RetainSet{Msg: msg("x", "1")},
		&ClaimOwner{ClientID: "c1", Node: "A", At: 1},
		&Batch{Commands: []Command{&ClaimOwner{ClientID: "c2", Node: "B"}, &RetainSet{Msg: msg("y", "2")}}},
		&ReleaseOwner{ClientID: "c1", Node: "A", Epoch: 1},
		&RetainClear{Topic: "x"},
	}
	a, b := newState(), newState()
	for i, c := range log {
		ra, _ := a.applyCommand(c, uint64(i+1), nil)
		rb, _ := b.applyCommand(c, uint64(i+1), nil)
		if !reflect.DeepEqual(ra, rb) {
			t.Fatalf("results diverge at %d", i)
		}
	}
	if !reflect.DeepEqual(a, b) {
		t.Fatal("states diverge")
	}
}

func TestRetainedMessageExpiry(t *testing.T) {
	now := time.UnixMilli(1_000_000)
	m := RetainedMessage{Expires: 1_000_000 + 1500}
	if m.Expired(now) {
		t.Fatal("expired early")
	}
	if s, ok := m.ExpiryInterval(now); !ok || s != 2 {
		t.Fatalf("interval %d %v, want 2 (rounded up)", s, ok)
	}
	if !m.Expired(now.Add(1500 * time.Millisecond)) {
		t.Fatal("not expired at the deadline")
	}
	never := RetainedMessage{}
	if never.Expired(now.Add(1e6 * time.Hour)) {
		t.Fatal("message without expiry expired")
	}
	if _, ok := never.ExpiryInterval(now); ok {
		t.Fatal("message without expiry has an interval")
	}
}

// TestReclaimOwner: a retried claim never takes a client id from a newer
// connection on another node, but does take it from an older one.
func TestReclaimOwner(t *testing.T) {
	s := newState()
	s.applyCommand(&ClaimOwner{ClientID: "c", Node: "B", At: 200}, 1, nil)
	if r, evs := s.applyCommand(&ReclaimOwner{ClientID: "c", Node: "A", At: 100}, 2, nil); r.Changed || len(evs) != 0 ||
		r.Prev.Node != "B" || s.owners["c"].Node != "B" {
		t.Fatalf("stale reclaim took over: %+v", r)
	}
	if r, _ := s.applyCommand(&ReclaimOwner{ClientID: "c", Node: "A", At: 300}, 3, nil); !r.Changed || s.owners["c"].Node != "A" {
		t.Fatalf("newer reclaim refused: %+v", r)
	}
	// Its own earlier claim (same node) never blocks it; nor does no owner.
	if r, _ := s.applyCommand(&ReclaimOwner{ClientID: "c", Node: "A", At: 250}, 4, nil); !r.Changed {
		t.Fatalf("reclaim over own claim: %+v", r)
	}
	if r, _ := s.applyCommand(&ReclaimOwner{ClientID: "d", Node: "A", At: 1}, 5, nil); !r.Changed {
		t.Fatalf("reclaim of a free id: %+v", r)
	}
}
