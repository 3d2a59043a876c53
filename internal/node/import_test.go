package node

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
	"github.com/mqtt-ha/broker/replication"
)

// TestImportRetainedAndSessions: imported retained messages and
// disconnected sessions (one small, written in one entry; one with a large
// message, written in several) are served like the cluster's own on any
// node; importing the same things again changes nothing, and a retained
// message or session the cluster has is kept, not overwritten.
func TestImportRetainedAndSessions(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	n1 := tc.nodes["n1"]
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	tc.client("n2", "imp-own").Pub(t, "imp/r/own", 1, true, []byte("the cluster's"))
	retained := []ImportMessage{
		{Topic: "imp/r/a", Payload: []byte("A"), QoS: 1, Properties: replication.Properties{ContentType: "text/plain"}},
		{Topic: "imp/r/own", Payload: []byte("imported"), QoS: 1},
	}
	big := bytes.Repeat([]byte("x"), replication.BlobThreshold+1000)
	small := ImportSession{ClientID: "imp-small", ProtocolVersion: 4, ExpiryInterval: 1<<32 - 1,
		Subscriptions: []replication.Subscription{{Filter: "imp/q/#", QoS: 1}},
		Queue:         []ImportMessage{{Topic: "imp/q/1", Payload: []byte("one"), QoS: 1}, {Topic: "imp/q/2", Payload: []byte("two"), QoS: 2}}}
	large := ImportSession{ClientID: "imp-large", ProtocolVersion: 5, ExpiryInterval: 3600,
		Subscriptions: []replication.Subscription{{Filter: "imp/l/#", QoS: 2}},
		Queue:         []ImportMessage{{Topic: "imp/l/1", Payload: big, QoS: 1}, {Topic: "imp/l/2", Payload: []byte("after"), QoS: 1}}}
	for round := range 2 {
		first := round == 0
		for _, m := range retained {
			res, err := n1.ImportRetained(ctx, m)
			if err != nil {
				t.Fatal(err)
			}
			if want := first && m.Topic != "imp/r/own"; res.Imported != want {
				t.Fatalf("round %d: retained %s imported %v, want %v", round, m.Topic, res.Imported, want)
			}
		}
		for _, s := range []ImportSession{small, large} {
			res, err := n1.ImportSession(ctx, s)
			if err != nil {
				t.Fatal(err)
			}
			want := ImportResult{}
			if first {
				want = ImportResult{Imported: true, Queued: 2}
			}
			if res.Imported != want.Imported || res.Queued != want.Queued || len(res.Skipped) != 0 {
				t.Fatalf("round %d: session %s: %+v, want %+v", round, s.ClientID, res, want)
			}
		}
	}

	sub := tc.client("n2", "imp-reader")
	sub.Sub(t, 1, "imp/r/#")
	got := map[string]string{}
	for range 2 {
		p := sub.MustNext(t, wait)
		got[p.Topic] = string(p.Payload)
	}
	if got["imp/r/a"] != "A" || got["imp/r/own"] != "the cluster's" {
		t.Fatalf("retained after import: %v", got)
	}

	// The sessions resume on n2 with their queues in order, and their
	// subscriptions take new messages.
	for _, c := range []struct {
		id, topic string
		want      [][]byte
	}{{"imp-small", "imp/q/3", [][]byte{[]byte("one"), []byte("two")}}, {"imp-large", "imp/l/3", [][]byte{big, []byte("after")}}} {
		cl := testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: c.id, SessionExpiry: 3600})
		if !cl.Connack.SessionPresent {
			t.Fatalf("%s: no session present", c.id)
		}
		for i, w := range c.want {
			if p := cl.MustNext(t, wait); !bytes.Equal(p.Payload, w) {
				t.Fatalf("%s: message %d is %d bytes on %s, want %d bytes", c.id, i, len(p.Payload), p.Topic, len(w))
			}
		}
		tc.client("n1", c.id+"-pub").Pub(t, c.topic, 1, false, []byte("new"))
		if p := cl.MustNext(t, wait); p.Topic != c.topic {
			t.Fatalf("%s: got %s, want the new message on %s", c.id, p.Topic, c.topic)
		}
	}
}

// TestImportRefusesWhatItCannotStore: bad input is refused with a reason,
// and nothing of the refused session is written.
func TestImportRefusesWhatItCannotStore(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	n1 := tc.nodes["n1"]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, s := range []ImportSession{
		{ClientID: "", ProtocolVersion: 4},
		{ClientID: "bad-shared", ProtocolVersion: 5, Subscriptions: []replication.Subscription{{Filter: "$share/g/t", QoS: 1}}},
		{ClientID: "bad-filter", ProtocolVersion: 5, Subscriptions: []replication.Subscription{{Filter: "a/#/b", QoS: 1}}},
		{ClientID: "bad-topic", ProtocolVersion: 5, Queue: []ImportMessage{{Topic: "a/+", Payload: []byte("x"), QoS: 1}}},
		{ClientID: "bad-qos0", ProtocolVersion: 5, Queue: []ImportMessage{{Topic: "a", Payload: []byte("x"), QoS: 0}}},
	} {
		if _, err := n1.ImportSession(ctx, s); !errors.Is(err, errBadImport) {
			t.Fatalf("%+v: %v, want a refusal", s, err)
		}
		if _, ok := n1.repl.Session(s.ClientID); ok {
			t.Fatalf("%q: a refused session was written", s.ClientID)
		}
	}
	for _, m := range []ImportMessage{{Topic: "a/#", Payload: []byte("x")}, {Topic: "empty"}, {Topic: "q", Payload: []byte("x"), QoS: 3}} {
		if _, err := n1.ImportRetained(ctx, m); !errors.Is(err, errBadImport) {
			t.Fatalf("%+v: %v, want a refusal", m, err)
		}
	}
	if got := fmt.Sprint(len(n1.repl.Retained())); got != "0" {
		t.Fatalf("%s retained messages after refusals", got)
	}
}

// TestImportedSubscriptionsPassTheACL: the cluster's ACL decides on each
// imported subscription for the client id and username, as on a
// SUBSCRIBE (found by review: a denied filter was imported and delivered).
func TestImportedSubscriptionsPassTheACL(t *testing.T) {
	acl := t.TempDir() + "/acl"
	if err := os.WriteFile(acl, []byte("user alice\ntopic read alice/#\npattern read clients/%c/#\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tc := newTunedCluster(t, func(c *Config) { c.ACLFile = acl }, "n1")
	tc.waitReady()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := tc.nodes["n1"].ImportSession(ctx, ImportSession{ClientID: "dev1", Username: "alice", ProtocolVersion: 5, ExpiryInterval: 600,
		Subscriptions: []replication.Subscription{{Filter: "alice/#", QoS: 1}, {Filter: "clients/dev1/cmd", QoS: 1}, {Filter: "secret/#", QoS: 1}}})
	if err != nil {
		t.Fatal(err)
	}
	s, _ := tc.nodes["n1"].repl.Session("dev1")
	if !res.Imported || len(s.Subscriptions) != 2 || len(res.Skipped) != 1 || !strings.Contains(res.Skipped[0], `"secret/#": denied by the ACL`) {
		t.Fatalf("import %+v; subscriptions %v", res, s.Subscriptions)
	}
}
