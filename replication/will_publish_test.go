package replication

import (
	"reflect"
	"testing"
)

// TestPublishWillQueuesAndRetainsInTheClaim: the entry that claims a will
// also queues it for every matching persistent session and stores it as
// the retained value, so no failure after the commit can lose either.
func TestPublishWillQueuesAndRetainsInTheClaim(t *testing.T) {
	a := newSessionApplier(t)
	a.apply(open("dev", "n2", true))
	devOpened := a.idx
	a.apply(&Subscribe{ClientID: "dev", Subscriptions: []Subscription{{Filter: "status/dev", QoS: 1, NoLocal: true}}})
	a.apply(&SetWill{ClientID: "dev", Will: Will{Topic: "status/dev", Payload: []byte("offline"), QoS: 2, Retain: true,
		ExpirySeconds: 60, Properties: Properties{ContentType: "text/plain"}}})
	subs := map[string][]Subscription{
		"ha":    {{Filter: "status/#", QoS: 1, Identifier: 7}, {Filter: "status/+", QoS: 2, Identifier: 9}},
		"low":   {{Filter: "status/+", QoS: 0}},
		"other": {{Filter: "x/#", QoS: 2}},
		"sh":    {{Filter: "$share/g/status/#", QoS: 2}},
		"rap":   {{Filter: "+/dev", QoS: 1, RetainAsPublished: true}},
	}
	for id, ss := range subs {
		a.apply(open(id, "n1", true))
		a.apply(&Subscribe{ClientID: id, Subscriptions: ss})
	}
	a.apply(&SessionClose{ClientID: "dev", Owner: "n2", At: 500})

	if r := a.apply(&PublishWill{ClientID: "dev", IfOpened: devOpened + 1, At: 1000, MaxQueued: 10}); r.Changed {
		t.Fatal("claimed the will of a connection that is not the one disconnected")
	}
	r := a.apply(&PublishWill{ClientID: "dev", IfOpened: devOpened, At: 1000, MaxQueued: 10})
	if !r.Changed || r.Err != nil {
		t.Fatalf("not claimed: %+v", r)
	}
	if a.sess("dev").Will != nil {
		t.Fatal("will still held after the claim")
	}
	props := Properties{ContentType: "text/plain"}
	want := map[string][]QueuedMessage{
		"ha": {{Seq: 1, Topic: "status/dev", Payload: []byte("offline"), QoS: 2, SubscriptionIDs: []uint32{7, 9},
			Properties: props, Expires: 61000, Created: 1000}},
		"rap": {{Seq: 1, Topic: "status/dev", Payload: []byte("offline"), QoS: 1, Retain: true,
			Properties: props, Expires: 61000, Created: 1000}},
	}
	for _, id := range []string{"dev", "ha", "low", "other", "sh", "rap"} {
		if got := a.sess(id).Queue; (len(got) != 0 || want[id] != nil) && !reflect.DeepEqual(got, want[id]) {
			t.Errorf("queue of %s:\n got %+v\nwant %+v", id, got, want[id])
		}
	}
	m, ok := a.s.retained["status/dev"]
	wantRet := RetainedMessage{Topic: "status/dev", Payload: []byte("offline"), QoS: 2, ContentType: "text/plain",
		Expires: 61000, Created: 1000, Index: a.idx}
	if !ok || !reflect.DeepEqual(m, wantRet) {
		t.Fatalf("retained value:\n got %+v (%v)\nwant %+v", m, ok, wantRet)
	}
	var retainedEv, queuedEv int
	for _, e := range a.evs {
		switch {
		case e.retained != nil:
			retainedEv++
		case e.session != nil && e.session.Kind == QueueAppended:
			queuedEv++
		}
	}
	if retainedEv != 1 || queuedEv != 2 {
		t.Fatalf("events: %d retained, %d queued; want 1 and 2", retainedEv, queuedEv)
	}

	// Claimed once: a second claim changes nothing.
	if r := a.apply(&PublishWill{ClientID: "dev", IfOpened: devOpened, At: 2000, MaxQueued: 10}); r.Changed {
		t.Fatal("will claimed twice")
	}
	if len(a.sess("ha").Queue) != 1 {
		t.Fatal("queued twice")
	}
}

// TestPublishWillEmptyRetainedClears: a retained will with an empty
// payload clears the retained value (MQTT-3.3.1-6); a QoS 0 will queues
// nothing; a full queue drops the will (max_queued_messages).
func TestPublishWillEmptyRetainedClears(t *testing.T) {
	a := newSessionApplier(t)
	a.apply(&RetainSet{Msg: RetainedMessage{Topic: "s/d", Payload: []byte("online")}})
	a.apply(open("d", "n2", true))
	opened := a.idx
	a.apply(&SetWill{ClientID: "d", Will: Will{Topic: "s/d", Retain: true}})
	a.apply(open("w", "n1", true))
	a.apply(&Subscribe{ClientID: "w", Subscriptions: []Subscription{{Filter: "#", QoS: 1}}})
	a.apply(&SessionClose{ClientID: "d", Owner: "n2", At: 5})
	if r := a.apply(&PublishWill{ClientID: "d", IfOpened: opened, At: 9}); !r.Changed {
		t.Fatal("not claimed")
	}
	if _, ok := a.s.retained["s/d"]; ok {
		t.Fatal("empty retained will did not clear the retained value")
	}
	if q := a.sess("w").Queue; len(q) != 0 {
		t.Fatalf("QoS 0 will queued: %+v", q)
	}
}

func TestMatchFilter(t *testing.T) {
	cases := []struct {
		filter, topic string
		want          bool
	}{
		{"a/b", "a/b", true},
		{"a/b", "a/c", false},
		{"a/+", "a/b", true},
		{"a/+", "a/b/c", false},
		{"a/+", "a/", true},
		{"+/+", "/x", true},
		{"a/#", "a", true},
		{"a/#", "a/b/c", true},
		{"#", "a/b", true},
		{"#", "$SYS/x", false},
		{"+/x", "$SYS/x", false},
		{"$SYS/#", "$SYS/x", true},
		{"a/b/#", "a", false},
		{"a", "a/b", false},
		{"a/+/c", "a/b/c", true},
		{"a/+/c", "a/b/d", false},
	}
	for _, c := range cases {
		if got := matchFilter(c.filter, c.topic); got != c.want {
			t.Errorf("matchFilter(%q, %q) = %v, want %v", c.filter, c.topic, got, c.want)
		}
	}
}

// TestTakeoverWill: the will of a connection taken over is published in the
// entry that opens the new connection, once, only while that connection is
// the one opened at IfOpened and still connected, and only when the
// takeover ends the session and the will has no delay (as Mosquitto).
func TestTakeoverWill(t *testing.T) {
	setup := func(delay uint32) (*sessionApplier, uint64) {
		a := newSessionApplier(t)
		a.apply(open("ha", "n1", true))
		a.apply(&Subscribe{ClientID: "ha", Subscriptions: []Subscription{{Filter: "status/#", QoS: 1}}})
		a.apply(open("dev", "n2", true))
		opened := a.idx
		a.apply(&SetWill{ClientID: "dev", Will: Will{Topic: "status/dev", Payload: []byte("offline"), QoS: 1, Retain: true, DelaySeconds: delay}})
		return a, opened
	}
	a, opened := setup(0)
	if r := a.apply(&TakeoverWill{ClientID: "dev", IfOpened: opened + 1, At: 5, MaxQueued: 10}); r.Changed {
		t.Fatal("published the will of another connection")
	}
	if r := a.apply(&TakeoverWill{ClientID: "dev", IfOpened: opened, At: 5, MaxQueued: 10}); r.Changed {
		t.Fatal("published although the session continues on the new connection")
	}
	r := a.apply(&Batch{Commands: []Command{&TakeoverWill{ClientID: "dev", IfOpened: opened, At: 5, MaxQueued: 10, EndsSession: true}, open("dev", "n1", true)}})
	if !r.Results[0].Changed {
		t.Fatalf("takeover: %+v", r.Results)
	}
	if q := a.sess("ha").Queue; len(q) != 1 || string(q[0].Payload) != "offline" {
		t.Fatalf("queued copy: %+v", q)
	}
	if m, ok := a.s.retained["status/dev"]; !ok || string(m.Payload) != "offline" {
		t.Fatal("retained will not stored")
	}
	if r := a.apply(&TakeoverWill{ClientID: "dev", IfOpened: opened, At: 6, MaxQueued: 10, EndsSession: true}); r.Changed {
		t.Fatal("published twice")
	}

	// A disconnected session's will is PublishWill's business.
	a, opened = setup(0)
	a.apply(&SessionClose{ClientID: "dev", Owner: "n2", At: 3})
	if r := a.apply(&TakeoverWill{ClientID: "dev", IfOpened: opened, At: 5, EndsSession: true}); r.Changed {
		t.Fatal("takeover will of a disconnected session")
	}

	// With a will delay the new connection arrives before it elapses: not
	// published (MQTT 5 3.1.2.5; Mosquitto neither when the session ends).
	a, opened = setup(30)
	if r := a.apply(&TakeoverWill{ClientID: "dev", IfOpened: opened, At: 5, EndsSession: true}); r.Changed {
		t.Fatal("delayed will published at a takeover")
	}
}
