package replication

import (
	"bytes"
	"io"
	"reflect"
	"testing"
)

// oweOpen is the open of a CONNECT on owner that read id's session opened
// at ifOpened and owes its will if it replaces a connection elsewhere.
func oweOpen(id, owner string, clean bool, ifOpened uint64) *SessionOpen {
	o := open(id, owner, clean)
	o.Fenced, o.IfOpened, o.OweWill = true, ifOpened, true
	return o
}

// owedSetup: dev connected on n1 with a retained will without delay, a
// persistent subscriber of its topic on n3, then dev's CONNECT with clean
// start on n2. Returns the index of dev's n1 connection.
func owedSetup(t *testing.T, a *sessionApplier) uint64 {
	t.Helper()
	a.apply(open("ha", "n3", true))
	a.apply(&Subscribe{ClientID: "ha", Subscriptions: []Subscription{{Filter: "status/#", QoS: 1}}})
	a.apply(open("dev", "n1", true))
	opened := a.idx
	a.apply(&SetWill{ClientID: "dev", Will: Will{Topic: "status/dev", Payload: []byte("offline"), QoS: 1, Retain: true}})
	if r := a.apply(oweOpen("dev", "n2", true, opened)); r.Err != nil || !r.Changed {
		t.Fatalf("open: %+v", r)
	}
	if s := a.sess("dev"); s.Owner != "n2" || s.Will != nil {
		t.Fatalf("new session %+v", s)
	}
	if w, ok := a.s.owed[owedKey{"dev", opened}]; !ok || w.Owner != "n1" || w.Closed || !w.EndsSession || string(w.Will.Payload) != "offline" {
		t.Fatalf("owed will %+v (%v)", w, ok)
	}
	return opened
}

// TestOwedWillClosedThenPublished: the old node's close (addressed to its
// connection's index) makes the owed will due, and the leader's
// PublishWill queues and retains it once, as for a session's will; the
// new session is untouched by either.
func TestOwedWillClosedThenPublished(t *testing.T) {
	a := newSessionApplier(t)
	opened := owedSetup(t, a)
	if r := a.apply(&PublishWill{ClientID: "dev", IfOpened: opened, At: 900}); r.Changed {
		t.Fatal("published an owed will whose connection may still be live")
	}
	if r := a.apply(&SessionClose{ClientID: "dev", Owner: "n3", IfOpened: opened, At: 950}); r.Changed {
		t.Fatal("closed by a node that does not own the connection")
	}
	r := a.apply(&SessionClose{ClientID: "dev", Owner: "n1", IfOpened: opened, At: 1000})
	if !r.Changed || len(a.evs) != 1 || a.evs[0].session.Kind != WillOwedDue {
		t.Fatalf("close: %+v, events %v", r, a.kinds())
	}
	if s := a.sess("dev"); !s.Connected || s.Owner != "n2" {
		t.Fatalf("the close of the old connection closed the new session: %+v", s)
	}
	r = a.apply(&PublishWill{ClientID: "dev", IfOpened: opened, At: 1100, MaxQueued: 10})
	if !r.Changed {
		t.Fatal("due owed will not published")
	}
	if q := a.sess("ha").Queue; len(q) != 1 || string(q[0].Payload) != "offline" || q[0].Created != 1100 {
		t.Fatalf("subscriber's queue %+v", q)
	}
	if m, ok := a.s.retained["status/dev"]; !ok || string(m.Payload) != "offline" {
		t.Fatalf("retained %+v (%v)", m, ok)
	}
	if len(a.s.owed) != 0 {
		t.Fatalf("owed wills left: %v", a.s.owed)
	}
	if r := a.apply(&PublishWill{ClientID: "dev", IfOpened: opened, At: 1200, MaxQueued: 10}); r.Changed {
		t.Fatal("published twice")
	}
	if len(a.sess("ha").Queue) != 1 {
		t.Fatal("queued twice")
	}
}

// TestOwedWillDiscarded: a DISCONNECT on the old connection (a close with
// WillPublished), a close whose owner published the will itself, and a
// graceful departure of the owner each discard the owed will; a departure
// leaves a due one to be published.
func TestOwedWillDiscarded(t *testing.T) {
	t.Run("disconnect", func(t *testing.T) {
		a := newSessionApplier(t)
		opened := owedSetup(t, a)
		// A delete or a claim on that index (the new connection's node
		// retrying its discard) is not the owner's settlement.
		a.apply(&SessionDelete{ClientID: "dev", IfOpened: opened})
		a.apply(&ClaimWill{ClientID: "dev", IfOpened: opened})
		if len(a.s.owed) != 1 {
			t.Fatal("an owed will settled by a delete or claim that does not name its owner")
		}
		// endMirror's DISCONNECT: close with the will discarded, delete.
		r := a.apply(&Batch{Commands: []Command{&SessionClose{ClientID: "dev", Owner: "n1", IfOpened: opened, At: 1000, WillPublished: true},
			&SessionDelete{ClientID: "dev", IfOpened: opened}}})
		if !r.Changed || len(a.s.owed) != 0 {
			t.Fatalf("disconnect: %+v, owed %v", r, a.s.owed)
		}
		if s := a.sess("dev"); !s.Connected || s.Owner != "n2" {
			t.Fatalf("the old connection's delete deleted the new session: %+v", s)
		}
	})
	t.Run("persistent session's disconnect", func(t *testing.T) {
		a := newSessionApplier(t)
		opened := owedSetup(t, a)
		// session.CloseCommands for a DISCONNECT.
		a.apply(&Batch{Commands: []Command{&SessionClose{ClientID: "dev", Owner: "n1", IfOpened: opened, At: 1000, WillPublished: true},
			&ClaimWill{ClientID: "dev", IfOpened: opened}}})
		if len(a.s.owed) != 0 {
			t.Fatalf("owed %v", a.s.owed)
		}
	})
	t.Run("published by its owner", func(t *testing.T) {
		a := newSessionApplier(t)
		opened := owedSetup(t, a)
		a.apply(&SessionClose{ClientID: "dev", Owner: "n1", IfOpened: opened, At: 1000, WillPublished: true})
		if len(a.s.owed) != 0 {
			t.Fatalf("owed %v", a.s.owed)
		}
	})
	t.Run("departure", func(t *testing.T) {
		a := newSessionApplier(t)
		owedSetup(t, a)
		a.apply(&Departure{Server: "n2", At: 5})
		if len(a.s.owed) != 1 {
			t.Fatal("another node's departure discarded the owed will")
		}
		a.apply(&Departure{Server: "n1", At: 5})
		if len(a.s.owed) != 0 {
			t.Fatal("the owner's departure kept its owed will")
		}
		// A departed owner owes no will from then on.
		a.apply(&Departure{Server: "n1"}) // restarted
		a.apply(open("dev", "n1", true))
		opened := a.idx
		a.apply(&SetWill{ClientID: "dev", Will: Will{Topic: "status/dev", Payload: []byte("offline")}})
		a.apply(&Departure{Server: "n1", At: 6})
		a.apply(oweOpen("dev", "n2", true, opened))
		if len(a.s.owed) != 0 {
			t.Fatal("a departed node's connection owes its will")
		}
	})
	t.Run("departure after the close", func(t *testing.T) {
		a := newSessionApplier(t)
		opened := owedSetup(t, a)
		a.apply(&SessionClose{ClientID: "dev", Owner: "n1", IfOpened: opened, At: 1000})
		a.apply(&Departure{Server: "n1", At: 5})
		if w := a.s.owed[owedKey{"dev", opened}]; !w.Closed {
			t.Fatal("the owner's departure discarded a will already due")
		}
	})
}

// TestOweWillConditions: only a connection on another node, connected,
// with a will without delay, owes it, and only to an open that asks and
// is not refused by its fence; otherwise the open treats the will as
// before (cancelled, or deleted with the session).
func TestOweWillConditions(t *testing.T) {
	cases := []struct {
		name  string
		setup func(a *sessionApplier, opened uint64)
		open  func(opened uint64) *SessionOpen
	}{
		{"no will", func(*sessionApplier, uint64) {}, func(o uint64) *SessionOpen { return oweOpen("dev", "n2", true, o) }},
		{"delayed will", func(a *sessionApplier, _ uint64) {
			a.apply(&SetWill{ClientID: "dev", Will: Will{Topic: "t", DelaySeconds: 5}})
		}, func(o uint64) *SessionOpen { return oweOpen("dev", "n2", true, o) }},
		{"same node", func(a *sessionApplier, _ uint64) {
			a.apply(&SetWill{ClientID: "dev", Will: Will{Topic: "t"}})
		}, func(o uint64) *SessionOpen { return oweOpen("dev", "n1", true, o) }},
		{"not asked", func(a *sessionApplier, _ uint64) {
			a.apply(&SetWill{ClientID: "dev", Will: Will{Topic: "t"}})
		}, func(o uint64) *SessionOpen {
			op := oweOpen("dev", "n2", true, o)
			op.OweWill = false
			return op
		}},
		{"fence refuses", func(a *sessionApplier, _ uint64) {
			a.apply(&SetWill{ClientID: "dev", Will: Will{Topic: "t"}})
		}, func(o uint64) *SessionOpen { return oweOpen("dev", "n2", true, o+100) }},
		{"closed", func(a *sessionApplier, opened uint64) {
			a.apply(&SetWill{ClientID: "dev", Will: Will{Topic: "t"}})
			a.apply(&SessionClose{ClientID: "dev", Owner: "n1", IfOpened: opened, At: 5})
		}, func(o uint64) *SessionOpen { return oweOpen("dev", "n2", false, o) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := newSessionApplier(t)
			a.apply(open("dev", "n1", true))
			opened := a.idx
			tc.setup(a, opened)
			a.apply(tc.open(opened))
			if len(a.s.owed) != 0 {
				t.Fatalf("owed: %+v", a.s.owed)
			}
		})
	}
	// A clean CONNECT served without a session deletes the old one: the
	// OweWill before its delete, on the same index, owes the will.
	a0 := newSessionApplier(t)
	a0.apply(open("dev", "n1", true))
	o0 := a0.idx
	a0.apply(&SetWill{ClientID: "dev", Will: Will{Topic: "t"}})
	a0.apply(&Batch{Commands: []Command{&OweWill{ClientID: "dev", IfOpened: o0 + 1, Owner: "n2"}, &SessionDelete{ClientID: "dev", IfOpened: o0 + 1}}})
	if len(a0.s.owed) != 0 {
		t.Fatal("owed on another index")
	}
	a0.apply(&Batch{Commands: []Command{&OweWill{ClientID: "dev", IfOpened: o0, Owner: "n2"}, &SessionDelete{ClientID: "dev", IfOpened: o0}}})
	if w, ok := a0.s.owed[owedKey{"dev", o0}]; !ok || !w.EndsSession || w.Owner != "n1" {
		t.Fatalf("owed before a clean discard: %+v (%v)", w, ok)
	}
	if _, ok := a0.s.sessions["dev"]; ok {
		t.Fatal("session not deleted")
	}
	// A resume owes the will too; the session continues (EndsSession
	// false) unless it had expiry 0.
	a := newSessionApplier(t)
	a.apply(open("dev", "n1", false))
	opened := a.idx
	a.apply(&SetWill{ClientID: "dev", Will: Will{Topic: "t"}})
	a.apply(oweOpen("dev", "n2", false, opened))
	if w, ok := a.s.owed[owedKey{"dev", opened}]; !ok || w.EndsSession {
		t.Fatalf("owed by a resumed session's connection: %+v (%v)", w, ok)
	}
}

// TestOwedWillSnapshot: owed wills survive a snapshot and restore, and the
// restored replica settles them as the original does.
func TestOwedWillSnapshot(t *testing.T) {
	f := testFSM(observers{})
	var idx uint64
	apply := func(c Command) {
		idx++
		f.Apply(entry(idx, c))
	}
	apply(open("dev", "n1", true))
	opened := idx
	apply(&SetWill{ClientID: "dev", Will: Will{Topic: "status/dev", Payload: []byte("offline"), QoS: 1}})
	apply(oweOpen("dev", "n2", true, opened))
	apply(open("lamp", "n3", true))
	lamp := idx
	apply(&SetWill{ClientID: "lamp", Will: Will{Topic: "status/lamp", Payload: []byte("gone")}})
	apply(oweOpen("lamp", "n1", false, lamp))
	apply(&SessionClose{ClientID: "lamp", Owner: "n3", IfOpened: lamp, At: 77})
	if n := len(f.OwedWills()); n != 2 {
		t.Fatalf("%d owed wills, want 2", n)
	}
	data := snapshotBytes(t, f)
	g := testFSM(observers{})
	if err := g.Restore(io.NopCloser(bytes.NewReader(data))); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(f.OwedWills(), g.OwedWills()) {
		t.Fatalf("restored owed wills differ:\n%+v\n%+v", f.OwedWills(), g.OwedWills())
	}
	if !bytes.Equal(data, snapshotBytes(t, g)) {
		t.Fatal("snapshot of the restored state differs")
	}
	w, ok := g.OwedWill("lamp", lamp)
	if !ok || !w.Closed || w.ClosedAt != 77 || w.EndsSession {
		t.Fatalf("lamp's owed will %+v (%v)", w, ok)
	}
}
