package session

import (
	"errors"
	"testing"
	"time"
)

// claimsWith returns claims expected at t0 for the given (id, At) pairs,
// each publishing by appending its name to *paid.
func claimsWith(t0 time.Time, paid *[]string, ats map[string][]int64) *Claims {
	c := &Claims{}
	for id, list := range ats {
		for _, at := range list {
			name := id + "@" + time.UnixMilli(at).UTC().Format("05.000")
			c.Expect(id, at, t0, func() { *paid = append(*paid, name) })
		}
	}
	return c
}

func TestClaimsSettle(t *testing.T) {
	t0 := time.Unix(1000, 0)
	errUnknown := errors.New("unknown outcome")
	for _, c := range []struct {
		name     string
		changed  bool
		err      error
		wantPaid bool
		wantOwed int // claims of "a" still owed (it had At 1 and 2; 2 is settled)
	}{
		{"changed: paid, older claims moot", true, nil, true, 0},
		{"unchanged: forgotten alone", false, nil, false, 1},
		{"unknown outcome: still owed", false, errUnknown, false, 2},
		{"unknown outcome even if changed", true, errUnknown, false, 2},
	} {
		var paid []string
		cl := claimsWith(t0, &paid, map[string][]int64{"a": {1, 2}, "b": {2}})
		got, ok := cl.Settle("a", 2, c.changed, c.err)
		if ok != c.wantPaid {
			t.Errorf("%s: Settle ok = %v, want %v", c.name, ok, c.wantPaid)
		}
		if ok {
			got.Publish()
			if len(paid) != 1 || paid[0] != "a@00.002" {
				t.Errorf("%s: paid %v, want [a@00.002]", c.name, paid)
			}
		}
		if n := cl.Owed("a"); n != c.wantOwed {
			t.Errorf("%s: %d claims of a owed, want %d", c.name, n, c.wantOwed)
		}
		if n := cl.Owed("b"); n != 1 {
			t.Errorf("%s: %d claims of b owed, want 1 (another client)", c.name, n)
		}
		// Whatever happened, a claim is paid at most once.
		if _, again := cl.Settle("a", 2, true, nil); again && ok {
			t.Errorf("%s: claim paid twice", c.name)
		}
	}
}

func TestClaimsTake(t *testing.T) {
	var paid []string
	c := claimsWith(time.Unix(0, 0), &paid, map[string][]int64{"a": {1, 2, 3}})
	if _, ok := c.Take("a", 9); ok {
		t.Fatal("Take of an At never expected succeeded")
	}
	if n := c.Owed("a"); n != 3 {
		t.Fatalf("a failed Take changed the claims: %d owed, want 3", n)
	}
	cl, ok := c.Take("a", 2)
	if !ok {
		t.Fatal("Take of an owed claim failed")
	}
	cl.Publish()
	if len(paid) != 1 || paid[0] != "a@00.002" {
		t.Fatalf("paid %v, want [a@00.002]", paid)
	}
	if n := c.Owed("a"); n != 0 {
		t.Errorf("%d claims of a owed after Take, want 0 (one will per session)", n)
	}
	if _, ok := c.Take("a", 1); ok {
		t.Error("an older claim was still owed after a newer one was paid")
	}
	var zero Claims
	if _, ok := zero.Take("x", 1); ok {
		t.Error("zero Claims owes something")
	}
	if _, ok := zero.Settle("x", 1, false, nil); ok {
		t.Error("zero Claims paid something")
	}
	zero.Expire(time.Now(), time.Minute)
}

func TestClaimsExpire(t *testing.T) {
	t0 := time.Unix(1000, 0)
	var paid []string
	c := claimsWith(t0, &paid, map[string][]int64{"old": {1}})
	c.Expect("mixed", 1, t0, func() {})
	c.Expect("mixed", 2, t0.Add(30*time.Second), func() {})
	c.Expire(t0.Add(ClaimDebtTTL), ClaimDebtTTL) // not more than the TTL yet
	if c.Owed("old") != 1 || c.Owed("mixed") != 2 {
		t.Fatalf("claims expired at exactly the TTL: old %d, mixed %d", c.Owed("old"), c.Owed("mixed"))
	}
	c.Expire(t0.Add(ClaimDebtTTL+time.Millisecond), ClaimDebtTTL)
	if n := c.Owed("old"); n != 0 {
		t.Errorf("old: %d owed after its TTL, want 0", n)
	}
	if n := c.Owed("mixed"); n != 1 {
		t.Errorf("mixed: %d owed, want 1 (the newer claim)", n)
	}
	if _, ok := c.Take("mixed", 2); !ok {
		t.Error("the newer claim of mixed was dropped")
	}
	if len(paid) != 0 {
		t.Errorf("expired claims were paid: %v", paid)
	}
}
