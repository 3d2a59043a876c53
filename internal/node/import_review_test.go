package node

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/session"
	"github.com/mqtt-ha/broker/internal/testutil"
	"github.com/mqtt-ha/broker/replication"
)

// Tests from the review of the importer; each failed before its fix.

// TestReviewImportedQueueLacksSubscriptionIdentifier: an imported queued
// message carries the identifier of the subscription it matches, as a
// live message does.
func TestReviewImportedQueueLacksSubscriptionIdentifier(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	n1 := tc.nodes["n1"]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := ImportSession{ClientID: "sid", ProtocolVersion: 5, ExpiryInterval: 3600,
		Subscriptions: []replication.Subscription{{Filter: "sid/#", QoS: 1, Identifier: 7}},
		Queue:         []ImportMessage{{Topic: "sid/old", Payload: []byte("old"), QoS: 1}}}
	if _, err := n1.ImportSession(ctx, s); err != nil {
		t.Fatal(err)
	}
	cl := testutil.Connect(t, n1.Addr("mqtt"), testutil.ClientOptions{ID: "sid", SessionExpiry: 3600})
	old := cl.MustNext(t, wait)
	if old.Properties.SubscriptionIdentifier == nil || *old.Properties.SubscriptionIdentifier != 7 {
		t.Fatalf("imported queued message delivered without subscription identifier 7: %v", old.Properties.SubscriptionIdentifier)
	}
}

// TestReviewImportRacesConnect: an import and a CONNECT of the same client
// id at once never leave the live session marked disconnected, nor merge
// the import into a session the import reports as kept.
func TestReviewImportRacesConnect(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	n1 := tc.nodes["n1"]
	for i := range 40 {
		id := fmt.Sprintf("race-%d", i)
		var wg sync.WaitGroup
		var cl *testutil.Client
		var res ImportResult
		var ierr error
		wg.Add(2)
		go func() {
			defer wg.Done()
			cl, _ = testutil.TryConnect(n1.Addr("mqtt"), testutil.ClientOptions{ID: id, SessionExpiry: 3600})
		}()
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			res, ierr = n1.ImportSession(ctx, ImportSession{ClientID: id, ProtocolVersion: 5, ExpiryInterval: 3600,
				Subscriptions: []replication.Subscription{{Filter: "imp/" + id, QoS: 1}},
				Queue:         []ImportMessage{{Topic: "imp/" + id, Payload: []byte("x"), QoS: 1}}})
		}()
		wg.Wait()
		if cl == nil || ierr != nil {
			t.Fatalf("%s: connect %v, import %v", id, cl, ierr)
		}
		s, _ := n1.repl.Session(id)
		_, merged := s.Subscriptions["imp/"+id]
		if !s.Connected || (merged && !res.Imported) {
			t.Fatalf("%s: import %+v; the client is connected (session present %v) but the log says connected=%v, imported subscription present=%v",
				id, res, cl.Connack.SessionPresent, s.Connected, merged)
		}
		cl.Close()
	}
}

// TestReviewImportOpenAtCollides: the import's fenced open cannot be
// taken for a retry of a CONNECT's open (same node, same millisecond):
// it opens under its own owner.
func TestReviewImportOpenAtCollides(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	n1 := tc.nodes["n1"]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	testutil.Connect(t, n1.Addr("mqtt"), testutil.ClientOptions{ID: "coll", SessionExpiry: 3600})
	s, _ := n1.repl.Session("coll")
	_, err := n1.repl.Apply(ctx, &replication.SessionOpen{ClientID: "coll", ProtocolVersion: 4, ExpiryInterval: 60,
		Owner: session.ImportOwner, At: s.OpenedAt, Fenced: true})
	if err == nil {
		t.Fatal("an import's fenced open of an existing session passed its fence")
	}
}

// TestUnfinishedImportIsRedone: a session left open under the import's
// owner (the importer died part way) is deleted and imported again by the
// next run; one a client has resumed is kept.
func TestUnfinishedImportIsRedone(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	n1 := tc.nodes["n1"]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, id := range []string{"half", "resumed"} {
		if _, err := n1.repl.Apply(ctx, &replication.Batch{Commands: []replication.Command{
			&replication.SessionOpen{ClientID: id, ProtocolVersion: 5, ExpiryInterval: 3600, Owner: session.ImportOwner,
				At: time.Now().UnixMilli(), Fenced: true},
			&replication.Subscribe{ClientID: id, Subscriptions: []replication.Subscription{{Filter: "half/partial", QoS: 1}}},
		}}); err != nil {
			t.Fatal(err)
		}
	}
	c := testutil.Connect(t, n1.Addr("mqtt"), testutil.ClientOptions{ID: "resumed", SessionExpiry: 3600})
	if !c.Connack.SessionPresent {
		t.Fatal("a client did not resume a session being imported")
	}
	for _, id := range []string{"half", "resumed"} {
		res, err := n1.ImportSession(ctx, ImportSession{ClientID: id, ProtocolVersion: 5, ExpiryInterval: 3600,
			Subscriptions: []replication.Subscription{{Filter: "half/whole", QoS: 1}},
			Queue:         []ImportMessage{{Topic: "half/whole", Payload: []byte("m"), QoS: 1}}})
		if err != nil {
			t.Fatal(err)
		}
		s, _ := n1.repl.Session(id)
		_, partial := s.Subscriptions["half/partial"]
		_, whole := s.Subscriptions["half/whole"]
		if want := id == "half"; res.Imported != want || partial == want || whole != want || (want && (s.Connected || len(s.Queue) != 1)) {
			t.Fatalf("%s: import %+v; session connected=%v partial=%v whole=%v queue=%d", id, res, s.Connected, partial, whole, len(s.Queue))
		}
	}
}
