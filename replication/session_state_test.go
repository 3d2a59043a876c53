package replication

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"testing"
)

// sessionApplier applies commands at increasing indexes and records events.
type sessionApplier struct {
	t   *testing.T
	s   *state
	idx uint64
	evs []event
}

func newSessionApplier(t *testing.T) *sessionApplier { return &sessionApplier{t: t, s: newState()} }

func (a *sessionApplier) apply(c Command) Result {
	a.t.Helper()
	a.idx++
	res, evs := a.s.applyCommand(c, a.idx, nil)
	a.evs = evs
	return res
}

func (a *sessionApplier) kinds() []SessionChangeKind {
	var out []SessionChangeKind
	for _, e := range a.evs {
		out = append(out, e.session.Kind)
	}
	return out
}

func (a *sessionApplier) sess(id string) Session {
	a.t.Helper()
	e, ok := a.s.sessions[id]
	if !ok {
		a.t.Fatalf("no session %q", id)
	}
	return e.export()
}

// openAt makes every open's At unique, as the hooks do (an equal At from
// the same owner means a retry of the same open).
var openAt int64 = 1000

func open(id, owner string, clean bool) *SessionOpen {
	openAt++
	return &SessionOpen{ClientID: id, ProtocolVersion: 5, ExpiryInterval: 60, Owner: owner, At: openAt, CleanStart: clean}
}

func enqueue(payload string, max uint32, policy DropPolicy, ids ...string) *Enqueue {
	e := &Enqueue{Topic: "t", Payload: []byte(payload), MaxQueued: max, Policy: policy, Created: 7}
	for _, id := range ids {
		e.Targets = append(e.Targets, QueueTarget{ClientID: id, QoS: 1})
	}
	return e
}

func seqs(q []QueuedMessage) []uint64 {
	var out []uint64
	for _, m := range q {
		out = append(out, m.Seq)
	}
	return out
}

func payloads(q []QueuedMessage) string {
	var out string
	for _, m := range q {
		out += string(m.Payload)
	}
	return out
}

func TestSessionOpenCloseDelete(t *testing.T) {
	a := newSessionApplier(t)
	r := a.apply(open("c", "A", false))
	if !r.Changed || r.Present || !slices.Equal(a.kinds(), []SessionChangeKind{SessionOpened}) {
		t.Fatalf("first open %+v %v", r, a.kinds())
	}
	s := a.sess("c")
	if !s.Connected || s.Owner != "A" || s.OpenedIndex != 1 || s.NextSeq != 1 || s.ExpiryInterval != 60 {
		t.Fatalf("opened %+v", s)
	}
	a.apply(&Subscribe{ClientID: "c", Subscriptions: []Subscription{{Filter: "a/#", QoS: 1}}})
	a.apply(&SetWill{ClientID: "c", Will: Will{Topic: "w", Payload: []byte("bye")}})
	a.apply(enqueue("1", 0, DropNewest, "c"))

	// A stale close: wrong owner, or an older open index.
	if r := a.apply(&SessionClose{ClientID: "c", Owner: "B", At: 5}); r.Changed || len(a.evs) != 0 {
		t.Fatal("close by a non-owner applied")
	}
	if r := a.apply(&SessionClose{ClientID: "c", Owner: "A", IfOpened: 99, At: 5}); r.Changed {
		t.Fatal("close fenced by another open applied")
	}
	// The owner's close keeps the will (not published) and sets the expiry.
	r = a.apply(&SessionClose{ClientID: "c", Owner: "A", IfOpened: 1, At: 5000, SetExpiry: true, ExpiryInterval: 10})
	s = a.sess("c")
	if !r.Changed || s.Connected || s.DisconnectedAt != 5000 || s.ExpiryInterval != 10 || s.Will == nil {
		t.Fatalf("closed %+v", s)
	}
	if a.evs[0].session.Kind != SessionClosed || a.evs[0].session.Will == nil {
		t.Fatalf("close event %+v", a.evs[0].session)
	}
	if r := a.apply(&SessionClose{ClientID: "c", Owner: "A", At: 6000}); r.Changed {
		t.Fatal("second close applied")
	}

	// Resume on another node: subscriptions and queue kept, will cleared.
	r = a.apply(open("c", "B", false))
	s = a.sess("c")
	if !r.Present || s.Owner != "B" || !s.Connected || s.DisconnectedAt != 0 || s.Will != nil ||
		len(s.Subscriptions) != 1 || len(s.Queue) != 1 || s.OpenedIndex != a.idx {
		t.Fatalf("resumed %+v %+v", r, s)
	}
	// A close with the will published clears it.
	a.apply(&SetWill{ClientID: "c", Will: Will{Topic: "w"}})
	a.apply(&SessionClose{ClientID: "c", Owner: "B", At: 1, WillPublished: true})
	if a.sess("c").Will != nil {
		t.Fatal("published will kept")
	}

	// Clean start drops everything: a delete, then an open.
	r = a.apply(open("c", "A", true))
	s = a.sess("c")
	if r.Present || len(s.Subscriptions) != 0 || len(s.Queue) != 0 || s.NextSeq != 1 ||
		!slices.Equal(a.kinds(), []SessionChangeKind{SessionDeleted, SessionOpened}) {
		t.Fatalf("clean start %+v %+v %v", r, s, a.kinds())
	}

	// Conditional delete fenced by a reopen; unconditional delete.
	opened := s.OpenedIndex
	a.apply(open("c", "A", false))
	if r := a.apply(&SessionDelete{ClientID: "c", IfOpened: opened}); r.Changed {
		t.Fatal("delete of a reopened session applied")
	}
	if r := a.apply(&SessionDelete{ClientID: "c"}); !r.Changed || len(a.s.sessions) != 0 {
		t.Fatal("delete failed")
	}
	if r := a.apply(&SessionDelete{ClientID: "c"}); r.Changed || r.Err != nil {
		t.Fatal("delete of a missing session is not a no-op")
	}
}

func TestSessionSubscriptions(t *testing.T) {
	a := newSessionApplier(t)
	if r := a.apply(&Subscribe{ClientID: "x", Subscriptions: []Subscription{{Filter: "a"}}}); !errors.Is(r.Err, ErrNoSession) ||
		!errors.Is(r.Err, ErrInvalidCommand) {
		t.Fatalf("subscribe without session: %v", r.Err)
	}
	a.apply(open("c", "A", false))
	sub := Subscription{Filter: "a/+", QoS: 2, NoLocal: true, RetainAsPublished: true, RetainHandling: 1, Identifier: 42}
	a.apply(&Subscribe{ClientID: "c", Subscriptions: []Subscription{sub, {Filter: "b"}}})
	if ev := a.evs[0].session; ev.Kind != SessionSubscribed || !slices.Equal(ev.Filters, []string{"a/+", "b"}) {
		t.Fatalf("subscribe event %+v", ev)
	}
	if got := a.sess("c").Subscriptions["a/+"]; got != sub {
		t.Fatalf("stored %+v", got)
	}
	// Replace options of an existing filter.
	sub.QoS = 0
	a.apply(&Subscribe{ClientID: "c", Subscriptions: []Subscription{sub}})
	if a.sess("c").Subscriptions["a/+"].QoS != 0 {
		t.Fatal("subscription not replaced")
	}
	r := a.apply(&Unsubscribe{ClientID: "c", Filters: []string{"b", "nope"}})
	if !r.Changed || !slices.Equal(a.evs[0].session.Filters, []string{"b"}) || len(a.sess("c").Subscriptions) != 1 {
		t.Fatalf("unsubscribe %+v", r)
	}
	if r := a.apply(&Unsubscribe{ClientID: "c", Filters: []string{"nope"}}); r.Changed || len(a.evs) != 0 {
		t.Fatal("unsubscribe of an unknown filter changed something")
	}
}

func TestEnqueueFanOutAndOrder(t *testing.T) {
	a := newSessionApplier(t)
	a.apply(open("a", "A", false))
	a.apply(open("b", "B", false))
	e := enqueue("x", 0, DropNewest, "a", "missing", "b")
	e.Targets[2] = QueueTarget{ClientID: "b", QoS: 2, Retain: true, SubscriptionIDs: []uint32{3}}
	e.Properties = Properties{ContentType: "ct"}
	e.Expires = 99
	r := a.apply(e)
	if !r.Changed || !slices.Equal(r.Seqs, []uint64{1, 0, 1}) || r.Dropped != 0 {
		t.Fatalf("fan-out %+v", r)
	}
	if !slices.Equal(a.kinds(), []SessionChangeKind{QueueAppended, QueueAppended}) {
		t.Fatalf("events %v", a.kinds())
	}
	got := a.sess("b").Queue[0]
	want := QueuedMessage{Seq: 1, Topic: "t", Payload: []byte("x"), QoS: 2, Retain: true, SubscriptionIDs: []uint32{3},
		Properties: Properties{ContentType: "ct"}, Expires: 99, Created: 7}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("queued\n got %+v\nwant %+v", got, want)
	}
	for i := 2; i <= 50; i++ {
		if r := a.apply(enqueue(fmt.Sprint(i%10), 0, DropNewest, "a")); r.Seqs[0] != uint64(i) {
			t.Fatalf("seq %d, want %d", r.Seqs[0], i)
		}
	}
	q := a.sess("a").Queue
	if len(q) != 50 || !slices.IsSorted(seqs(q)) || q[0].Seq != 1 || q[49].Seq != 50 {
		t.Fatalf("queue order %v", seqs(q))
	}
	// Enqueue with no live target changes nothing.
	if r := a.apply(enqueue("z", 0, DropNewest, "missing")); r.Changed || r.Seqs[0] != 0 || len(a.evs) != 0 {
		t.Fatalf("enqueue to nobody %+v", r)
	}
}

func TestEnqueueLimitDropNewest(t *testing.T) {
	a := newSessionApplier(t)
	a.apply(open("a", "A", false))
	a.apply(open("b", "A", false))
	for i := range 3 {
		a.apply(enqueue(fmt.Sprint(i), 3, DropNewest, "a"))
	}
	r := a.apply(enqueue("X", 3, DropNewest, "a", "b"))
	if r.Dropped != 1 || !slices.Equal(r.Seqs, []uint64{0, 1}) {
		t.Fatalf("drop newest %+v", r)
	}
	if ev := a.evs[0].session; ev.Kind != QueueDropped || !ev.DroppedNew || len(ev.Seqs) != 0 || ev.ClientID != "a" {
		t.Fatalf("drop event %+v", ev)
	}
	if got := payloads(a.sess("a").Queue); got != "012" {
		t.Fatalf("queue %q", got)
	}
	// The dropped message took no seq: the next one continues at 4.
	a.apply(&Ack{ClientID: "a", UpTo: 1})
	if r := a.apply(enqueue("Y", 3, DropNewest, "a")); r.Seqs[0] != 4 || r.Dropped != 0 {
		t.Fatalf("after ack %+v", r)
	}
	// MaxQueued 0: no limit.
	for range 10 {
		if r := a.apply(enqueue("z", 0, DropNewest, "a")); r.Dropped != 0 {
			t.Fatal("dropped without a limit")
		}
	}
}

func TestEnqueueLimitDropOldest(t *testing.T) {
	a := newSessionApplier(t)
	a.apply(open("a", "A", false))
	for i := range 5 {
		a.apply(enqueue(fmt.Sprint(i), 5, DropOldest, "a"))
	}
	// The oldest is released (PUBREC'd): it needs its PUBREL and stays.
	a.apply(&QueueRelease{ClientID: "a", Seq: 1, PacketID: 7})
	r := a.apply(enqueue("X", 5, DropOldest, "a"))
	if r.Dropped != 1 || r.Seqs[0] != 6 {
		t.Fatalf("drop oldest %+v", r)
	}
	if ev := a.evs[0].session; ev.Kind != QueueDropped || ev.DroppedNew || !slices.Equal(ev.Seqs, []uint64{2}) {
		t.Fatalf("drop event %+v", ev)
	}
	if got := payloads(a.sess("a").Queue); got != "0234X" {
		t.Fatalf("queue %q", got)
	}
	// A lowered limit evicts down to it in one go.
	r = a.apply(enqueue("Y", 3, DropOldest, "a"))
	if r.Dropped != 3 || payloads(a.sess("a").Queue) != "0XY" {
		t.Fatalf("lowered limit %+v %q", r, payloads(a.sess("a").Queue))
	}
	// Only released messages left: the new one is dropped.
	a.apply(&Ack{ClientID: "a", Seqs: []uint64{6, 7}})
	r = a.apply(enqueue("Z", 1, DropOldest, "a"))
	if r.Dropped != 1 || r.Seqs[0] != 0 || !a.evs[0].session.DroppedNew {
		t.Fatalf("all released %+v", r)
	}
}

func TestAckSemantics(t *testing.T) {
	a := newSessionApplier(t)
	a.apply(open("a", "A", false))
	for i := range 10 {
		a.apply(enqueue(fmt.Sprint(i), 0, DropNewest, "a"))
	}
	r := a.apply(&Ack{ClientID: "a", UpTo: 3, Seqs: []uint64{5, 7, 99}})
	if !r.Changed || !slices.Equal(a.evs[0].session.Seqs, []uint64{1, 2, 3, 5, 7}) {
		t.Fatalf("ack %+v %+v", r, a.evs)
	}
	if got := seqs(a.sess("a").Queue); !slices.Equal(got, []uint64{4, 6, 8, 9, 10}) {
		t.Fatalf("after ack %v", got)
	}
	// Idempotent: acking again, or a missing session, changes nothing.
	if r := a.apply(&Ack{ClientID: "a", UpTo: 3, Seqs: []uint64{5}}); r.Changed || r.Err != nil {
		t.Fatal("repeated ack changed something")
	}
	if r := a.apply(&Ack{ClientID: "gone", UpTo: 3}); r.Changed || r.Err != nil {
		t.Fatal("ack of a missing session is not a no-op")
	}
	// Seqs are never reused after acks.
	if r := a.apply(enqueue("n", 0, DropNewest, "a")); r.Seqs[0] != 11 {
		t.Fatalf("seq after ack %d", r.Seqs[0])
	}
	// QueueRelease of an acked or unknown seq is a no-op.
	if r := a.apply(&QueueRelease{ClientID: "a", Seq: 1, PacketID: 3}); r.Changed {
		t.Fatal("release of an acked seq")
	}
	r = a.apply(&QueueRelease{ClientID: "a", Seq: 8, PacketID: 3})
	if m := a.sess("a").Queue[2]; !r.Changed || m.Seq != 8 || !m.Released || m.PacketID != 3 {
		t.Fatalf("release %+v", m)
	}
	if r := a.apply(&QueueRelease{ClientID: "a", Seq: 8, PacketID: 3}); r.Changed {
		t.Fatal("repeated release changed something")
	}
}

func TestQoS2ReceiveState(t *testing.T) {
	a := newSessionApplier(t)
	if r := a.apply(&QoS2Received{ClientID: "c", PacketID: 1}); !errors.Is(r.Err, ErrNoSession) {
		t.Fatalf("without session: %v", r.Err)
	}
	a.apply(open("c", "A", false))
	for _, p := range []uint16{9, 3, 65535} {
		if r := a.apply(&QoS2Received{ClientID: "c", PacketID: p}); !r.Changed {
			t.Fatalf("first receive of %d not recorded", p)
		}
	}
	// A duplicate PUBLISH (DUP=1, same id): not Changed, must not be delivered.
	if r := a.apply(&QoS2Received{ClientID: "c", PacketID: 3}); r.Changed {
		t.Fatal("duplicate receive reported as new")
	}
	// The state survives a close and a resume on another node.
	a.apply(&SessionClose{ClientID: "c", Owner: "A", At: 1})
	a.apply(open("c", "B", false))
	if got := a.sess("c").AwaitingRelease; !slices.Equal(got, []uint16{3, 9, 65535}) {
		t.Fatalf("awaiting release %v", got)
	}
	if r := a.apply(&QoS2Released{ClientID: "c", PacketID: 3}); !r.Changed {
		t.Fatal("release not applied")
	}
	if r := a.apply(&QoS2Released{ClientID: "c", PacketID: 3}); r.Changed {
		t.Fatal("repeated release changed something")
	}
	// After PUBREL the id is free again: a new message with it is new.
	if r := a.apply(&QoS2Received{ClientID: "c", PacketID: 3}); !r.Changed {
		t.Fatal("reused packet id treated as duplicate")
	}
	// Clean start drops it.
	a.apply(open("c", "B", true))
	if len(a.sess("c").AwaitingRelease) != 0 {
		t.Fatal("clean start kept QoS 2 state")
	}
}

func TestWillCommands(t *testing.T) {
	a := newSessionApplier(t)
	if r := a.apply(&SetWill{ClientID: "c", Will: Will{Topic: "w"}}); !errors.Is(r.Err, ErrNoSession) {
		t.Fatalf("will without session: %v", r.Err)
	}
	a.apply(open("c", "A", false))
	w := Will{Topic: "w", Payload: []byte("p"), QoS: 1, Retain: true, DelaySeconds: 5, ExpirySeconds: 9,
		Properties: Properties{UserProperties: []UserProperty{{Key: "k", Value: "v"}}}}
	a.apply(&SetWill{ClientID: "c", Will: w})
	if got := a.sess("c").Will; !reflect.DeepEqual(*got, w) || a.evs[0].session.Kind != WillSet {
		t.Fatalf("will %+v", got)
	}
	if r := a.apply(&ClearWill{ClientID: "c"}); !r.Changed || a.sess("c").Will != nil || a.evs[0].session.Kind != WillCleared {
		t.Fatal("clear will")
	}
	if r := a.apply(&ClearWill{ClientID: "c"}); r.Changed || len(a.evs) != 0 {
		t.Fatal("clear of no will changed something")
	}
}

// TestClaimWill: the will is claimed once, only while the session is still
// disconnected from the connection the claimer saw.
func TestClaimWill(t *testing.T) {
	a := newSessionApplier(t)
	if r := a.apply(&ClaimWill{ClientID: "c", IfOpened: 1}); r.Changed || r.Err != nil {
		t.Fatalf("claim without session: %+v", r)
	}
	opened := a.apply(open("c", "A", false)).Index
	a.apply(&SetWill{ClientID: "c", Will: Will{Topic: "w"}})
	if r := a.apply(&ClaimWill{ClientID: "c", IfOpened: opened}); r.Changed {
		t.Fatal("claimed the will of a connected session")
	}
	a.apply(&SessionClose{ClientID: "c", Owner: "A", IfOpened: opened, At: 5})
	if r := a.apply(&ClaimWill{ClientID: "c", IfOpened: opened + 1}); r.Changed {
		t.Fatal("claimed with a stale if_opened")
	}
	if r := a.apply(&ClaimWill{ClientID: "c", IfOpened: opened}); !r.Changed || a.sess("c").Will != nil ||
		a.evs[0].session.Kind != WillCleared {
		t.Fatal("claim of a disconnected session's will")
	}
	if r := a.apply(&ClaimWill{ClientID: "c", IfOpened: opened}); r.Changed {
		t.Fatal("will claimed twice")
	}
	// Reconnected with a new will: a claim made for the old connection
	// must not take the new one.
	reopened := a.apply(open("c", "B", false)).Index
	a.apply(&SetWill{ClientID: "c", Will: Will{Topic: "w2"}})
	a.apply(&SessionClose{ClientID: "c", Owner: "B", IfOpened: reopened, At: 9})
	if r := a.apply(&ClaimWill{ClientID: "c", IfOpened: opened}); r.Changed || a.sess("c").Will == nil {
		t.Fatal("stale claim took the new connection's will")
	}
}

// TestSessionReadsAreDeepCopies: nothing a reader gets aliases the state.
func TestSessionReadsAreDeepCopies(t *testing.T) {
	f := testFSM(observers{})
	f.Apply(entry(1, open("c", "A", false)))
	f.Apply(entry(2, &Subscribe{ClientID: "c", Subscriptions: []Subscription{{Filter: "a"}}}))
	f.Apply(entry(3, &SetWill{ClientID: "c", Will: Will{Topic: "w", Payload: []byte("w")}}))
	f.Apply(entry(4, enqueue("q", 0, DropNewest, "c")))
	s, _ := f.Session("c")
	s.Subscriptions["evil"] = Subscription{}
	s.Will.Payload[0] = 'X'
	s.Queue[0].Payload[0] = 'X'
	q := f.Queue("c", 0, 0)
	q[0].Payload[0] = 'Y'
	again, _ := f.Session("c")
	if len(again.Subscriptions) != 1 || string(again.Will.Payload) != "w" || string(again.Queue[0].Payload) != "q" {
		t.Fatalf("read APIs alias the state: %+v", again)
	}
}

// TestSessionHead: SessionHead is Session without the queue, and as deep
// a copy.
func TestSessionHead(t *testing.T) {
	f := testFSM(observers{})
	f.Apply(entry(1, open("c", "A", false)))
	f.Apply(entry(2, &Subscribe{ClientID: "c", Subscriptions: []Subscription{{Filter: "a"}}}))
	f.Apply(entry(3, &SetWill{ClientID: "c", Will: Will{Topic: "w", Payload: []byte("w")}}))
	f.Apply(entry(4, enqueue("q", 0, DropNewest, "c")))
	f.Apply(entry(5, &QoS2Received{ClientID: "c", PacketID: 7}))
	full, _ := f.Session("c")
	head, ok := f.SessionHead("c")
	if !ok || head.Queue != nil {
		t.Fatalf("SessionHead: found %v, queue %v", ok, head.Queue)
	}
	full.Queue = nil
	if !reflect.DeepEqual(head, full) {
		t.Fatalf("SessionHead differs from Session beyond the queue:\n got %+v\nwant %+v", head, full)
	}
	head.Subscriptions["evil"] = Subscription{}
	head.Will.Payload[0] = 'X'
	head.AwaitingRelease[0] = 9
	again, _ := f.SessionHead("c")
	if len(again.Subscriptions) != 1 || string(again.Will.Payload) != "w" || again.AwaitingRelease[0] != 7 {
		t.Fatalf("SessionHead aliases the state: %+v", again)
	}
	if _, ok := f.SessionHead("nobody"); ok {
		t.Fatal("missing session found")
	}
}

// BenchmarkAckOldest: a session with 10,000 queued messages receives one
// more and acknowledges its oldest, as a subscriber draining a backlog
// does for every message.
func BenchmarkAckOldest(b *testing.B) {
	f := testFSM(observers{})
	f.Apply(entry(1, open("c", "A", false)))
	payload := make([]byte, 64)
	idx := uint64(1)
	enq := &Enqueue{Topic: "t", Payload: payload, Targets: []QueueTarget{{ClientID: "c", QoS: 1}}}
	for range 10000 {
		idx++
		f.Apply(entry(idx, enq))
	}
	oldest := uint64(1)
	for b.Loop() {
		idx++
		f.Apply(entry(idx, enq))
		idx++
		f.Apply(entry(idx, &Ack{ClientID: "c", Seqs: []uint64{oldest}}))
		oldest++
	}
	if all := f.Sessions(); len(all) != 1 || all[0].QueueDepth != 10000 {
		b.Fatalf("queue depth %+v, want 10000: the acknowledgements missed", all)
	}
}

// BenchmarkSessionRead: reading a session whose queue holds 10,000
// messages of 1 KiB, with and without the queue.
func BenchmarkSessionRead(b *testing.B) {
	f := testFSM(observers{})
	f.Apply(entry(1, open("c", "A", false)))
	payload := make([]byte, 1024)
	for i := range 10000 {
		f.Apply(entry(uint64(2+i), &Enqueue{Topic: "t", Payload: payload, Targets: []QueueTarget{{ClientID: "c", QoS: 1}}}))
	}
	b.Run("Session", func(b *testing.B) {
		for b.Loop() {
			f.Session("c")
		}
	})
	b.Run("SessionHead", func(b *testing.B) {
		for b.Loop() {
			f.SessionHead("c")
		}
	})
}

func TestSessionReadAPIs(t *testing.T) {
	f := testFSM(observers{})
	idx := uint64(0)
	apply := func(c Command) { idx++; f.Apply(entry(idx, c)) }
	apply(open("b", "n2", false))
	apply(open("a", "n1", false))
	apply(open("c", "n1", false))
	apply(&SessionClose{ClientID: "c", Owner: "n1", At: 50})
	apply(&SetWill{ClientID: "a", Will: Will{Topic: "w"}})
	for i := range 7 {
		apply(enqueue(fmt.Sprint(i), 0, DropNewest, "a", "b"))
	}
	apply(&Ack{ClientID: "b", UpTo: 2})
	all := f.Sessions()
	want := []SessionSummary{
		{ClientID: "a", Owner: "n1", Connected: true, QueueDepth: 7, HasWill: true, ExpiryInterval: 60, OpenedIndex: 2},
		{ClientID: "b", Owner: "n2", Connected: true, QueueDepth: 5, ExpiryInterval: 60, OpenedIndex: 1},
		{ClientID: "c", Owner: "n1", ExpiryInterval: 60, DisconnectedAt: 50, OpenedIndex: 3},
	}
	if !reflect.DeepEqual(all, want) {
		t.Fatalf("Sessions\n got %+v\nwant %+v", all, want)
	}
	if got := f.SessionsOwnedBy("n1"); len(got) != 2 || got[0].ClientID != "a" || got[1].ClientID != "c" {
		t.Fatalf("owned by n1 %+v", got)
	}
	if got := seqs(f.Queue("a", 3, 2)); !slices.Equal(got, []uint64{3, 4}) {
		t.Fatalf("page %v", got)
	}
	if got := seqs(f.Queue("b", 0, 0)); !slices.Equal(got, []uint64{3, 4, 5, 6, 7}) {
		t.Fatalf("whole queue %v", got)
	}
	if f.Queue("nobody", 0, 0) != nil {
		t.Fatal("queue of a missing session")
	}
	if _, ok := f.Session("nobody"); ok {
		t.Fatal("missing session found")
	}
}

// TestSessionDeterministic: two replicas applying the same log agree.
func TestSessionDeterministic(t *testing.T) {
	a, b := testFSM(observers{}), testFSM(observers{})
	for _, f := range []*FSM{a, b} {
		fillSessions(f, 1, 400)
	}
	if !reflect.DeepEqual(exportAll(a), exportAll(b)) {
		t.Fatal("replicas diverge")
	}
}

// fillSessions applies a mixed session workload at indexes from..to.
func fillSessions(f *FSM, from, to int) {
	for i := from; i <= to; i++ {
		id := fmt.Sprintf("c%d", i%5)
		var c Command
		switch i % 9 {
		case 0:
			o := open(id, fmt.Sprintf("n%d", i%3), i%45 == 0)
			o.At = int64(i) // replicas must apply byte-equal commands
			c = o
		case 1:
			c = &Subscribe{ClientID: id, Subscriptions: []Subscription{{Filter: fmt.Sprintf("f/%d", i%4), QoS: byte(i % 3), Identifier: uint32(i)}}}
		case 2, 3, 4:
			c = enqueue(fmt.Sprint(i), 20, DropPolicy(i%2), "c0", "c1", "c2", "c3", "c4")
		case 5:
			c = &Ack{ClientID: id, UpTo: uint64(i / 10), Seqs: []uint64{uint64(i / 3)}}
		case 6:
			c = &Batch{Commands: []Command{&QoS2Received{ClientID: id, PacketID: uint16(i)}, &QueueRelease{ClientID: id, Seq: uint64(i / 5), PacketID: 1}}}
		case 7:
			c = &SetWill{ClientID: id, Will: Will{Topic: "w", Payload: []byte{byte(i)}}}
		case 8:
			c = &SessionClose{ClientID: id, Owner: fmt.Sprintf("n%d", (i-8)%3), At: int64(i)}
		}
		f.Apply(entry(uint64(i), c))
	}
}

func exportAll(f *FSM) map[string]Session {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := map[string]Session{}
	for id, e := range f.st.sessions {
		out[id] = e.export()
	}
	return out
}

// TestQoS2PublishIsOneStep: receipt and enqueue of a QoS 2 PUBLISH are
// applied together; a duplicate queues nothing; a publish that matched no
// session still records the receipt.
func TestQoS2PublishIsOneStep(t *testing.T) {
	a := newSessionApplier(t)
	a.apply(open("pub", "A", false))
	a.apply(open("sub", "A", false))
	enq := func(p string) *Enqueue {
		return &Enqueue{Topic: "t", Payload: []byte(p), Targets: []QueueTarget{{ClientID: "sub", QoS: 2}}}
	}
	r := a.apply(&QoS2Publish{ClientID: "pub", PacketID: 5, Enqueue: enq("one")})
	if !r.Changed || len(r.Seqs) != 1 || r.Seqs[0] == 0 {
		t.Fatalf("first publish: %+v", r)
	}
	if got := a.sess("pub").AwaitingRelease; !slices.Equal(got, []uint16{5}) {
		t.Fatalf("receipt not recorded: %v", got)
	}
	if r := a.apply(&QoS2Publish{ClientID: "pub", PacketID: 5, Enqueue: enq("dup")}); r.Changed || len(r.Seqs) != 0 {
		t.Fatalf("duplicate applied: %+v", r)
	}
	if q := a.sess("sub").Queue; len(q) != 1 || string(q[0].Payload) != "one" {
		t.Fatalf("queue after duplicate: %+v", q)
	}
	if r := a.apply(&QoS2Publish{ClientID: "pub", PacketID: 6}); !r.Changed {
		t.Fatal("receipt without matches not recorded")
	}
	if r := a.apply(&QoS2Publish{ClientID: "nobody", PacketID: 1, Enqueue: enq("x")}); !errors.Is(r.Err, ErrNoSession) {
		t.Fatalf("unknown publisher: %v", r.Err)
	}
	if q := a.sess("sub").Queue; len(q) != 1 {
		t.Fatalf("an unknown publisher's message was queued: %+v", q)
	}
}

// TestQoS2PublishFencedToItsConnection: a QoS 2 PUBLISH forwarded by the
// connection that opened the session at index i (IfOpened) and applied
// after the client resumed elsewhere, resent it and completed the flow,
// must not queue the message again (chaos seed 772869237: a forward that
// timed out during a partition reached the leader 9 s later).
func TestQoS2PublishFencedToItsConnection(t *testing.T) {
	a := newSessionApplier(t)
	first := a.apply(open("pub", "A", false)).Index
	a.apply(open("sub", "A", false))
	enq := &Enqueue{Topic: "t", Payload: []byte("m"), Targets: []QueueTarget{{ClientID: "sub", QoS: 2}}}
	late := &QoS2Publish{ClientID: "pub", PacketID: 5, Enqueue: enq, IfOpened: first}
	// The client resumes on B, resends the PUBLISH, and completes it.
	second := a.apply(open("pub", "B", false)).Index
	if r := a.apply(&QoS2Publish{ClientID: "pub", PacketID: 5, Enqueue: enq, IfOpened: second}); !r.Changed || r.Err != nil {
		t.Fatalf("resent publish: %+v", r)
	}
	a.apply(&QoS2Released{ClientID: "pub", PacketID: 5})
	// The old connection's forward arrives now.
	if r := a.apply(late); !errors.Is(r.Err, ErrReopened) || !errors.Is(r.Err, ErrInvalidCommand) || r.Changed {
		t.Fatalf("late publish of the old connection: %+v", r)
	}
	if q := a.sess("sub").Queue; len(q) != 1 {
		t.Fatalf("queued %d times, want once", len(q))
	}
	if got := a.sess("pub").AwaitingRelease; len(got) != 0 {
		t.Fatalf("the late publish recorded a receipt: %v", got)
	}
}

// TestRetriedOpenKeepsFirstAnswer: an owner that retries a SessionOpen
// whose outcome it could not learn (the leader died after committing it)
// gets the first try's answer. Before, the retry reported session present
// for the session the first try had just created, and a retried clean
// start discarded it.
func TestRetriedOpenKeepsFirstAnswer(t *testing.T) {
	for _, clean := range []bool{false, true} {
		t.Run(fmt.Sprintf("clean=%v", clean), func(t *testing.T) {
			a := newSessionApplier(t)
			first := open("c", "A", clean)
			r1 := a.apply(first)
			if r1.Present {
				t.Fatalf("first open: present")
			}
			a.apply(&SetWill{ClientID: "c", Will: Will{Topic: "w", Payload: []byte("x")}})
			retry := *first
			r := a.apply(&retry)
			if r.Present {
				t.Fatal("retried open reports session present for the session its first try created")
			}
			if slices.Contains(a.kinds(), SessionDeleted) {
				t.Fatalf("retried open discarded the session: %v", a.kinds())
			}
			// The owner may have learnt either try's index; it reads the
			// fence from the state, which keeps the first try's (a retry
			// that moved it broke the fence when the first try was the
			// one that committed late).
			if s := a.sess("c"); s.OpenedIndex != r1.Index || !s.Connected {
				t.Fatalf("retry must keep the first try's index as the fence: %+v (first at %d)", s, r1.Index)
			}
			// Another open (a new connection: another At) resumes it.
			if r := a.apply(open("c", "A", false)); !r.Present {
				t.Fatal("a later open of the same owner is not a retry")
			}
			// The same At from another owner is not a retry either.
			other := *first
			other.Owner = "B"
			other.CleanStart = false
			if r := a.apply(&other); !r.Present {
				t.Fatal("an open from another owner with an equal At counted as a retry")
			}
		})
	}
}

// TestRetriedOpenAfterPresentSession: the first try resumed a session
// (present); its retry answers present too, not a fresh session.
func TestRetriedOpenAfterPresentSession(t *testing.T) {
	a := newSessionApplier(t)
	a.apply(open("c", "A", false))
	a.apply(&SessionClose{ClientID: "c", Owner: "A", At: 5})
	first := open("c", "B", false)
	if r := a.apply(first); !r.Present {
		t.Fatal("resume: not present")
	}
	retry := *first
	if r := a.apply(&retry); !r.Present {
		t.Fatal("retried resume lost its present answer")
	}
}

// TestSessionOpenFencedToTheStateItRead: a CONNECT's open that commits
// late, after the client moved on (resumed elsewhere, or connected with a
// clean session that deleted the session), must change nothing: unfenced,
// it took the session back from the new connection or recreated a
// deleted one (chaos: clean-start-session-present). A retry of the same
// open is still answered as the first try.
func TestSessionOpenFencedToTheStateItRead(t *testing.T) {
	a := newSessionApplier(t)
	first := a.apply(open("c", "A", false)).Index
	will := &Will{Topic: "w", Payload: []byte("gone"), QoS: 1}
	// Node A reads OpenedIndex first and writes an open that is slow.
	late := &SessionOpen{ClientID: "c", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "A", At: 5000,
		Fenced: true, IfOpened: first, Will: will}
	// Meanwhile the client resumes on B.
	second := a.apply(&SessionOpen{ClientID: "c", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "B", At: 5001,
		Fenced: true, IfOpened: first}).Index
	if r := a.apply(late); !errors.Is(r.Err, ErrReopened) || r.Changed {
		t.Fatalf("late open of the old connection: %+v", r)
	}
	if s := a.sess("c"); s.Owner != "B" || s.OpenedIndex != second || s.Will != nil {
		t.Fatalf("the late open changed the session: owner %s, opened %d (want %d), will %v", s.Owner, s.OpenedIndex, second, s.Will)
	}
	// A clean CONNECT deletes it; a late persistent open must not bring it back.
	a.apply(&SessionDelete{ClientID: "c"})
	if r := a.apply(&SessionOpen{ClientID: "c", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "B", At: 5002,
		Fenced: true, IfOpened: second}); !errors.Is(r.Err, ErrReopened) {
		t.Fatalf("late open after the delete: %+v", r)
	}
	if _, ok := a.s.sessions["c"]; ok {
		t.Fatal("a late open recreated a deleted session")
	}
	// The fence holds with no session: IfOpened 0 opens, and its retry
	// (same owner and At) is answered again, with the will.
	o := &SessionOpen{ClientID: "c", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "A", At: 6000, Fenced: true, Will: will}
	r1 := a.apply(o)
	if r1.Err != nil || !r1.Changed || r1.Present {
		t.Fatalf("open of a new session: %+v", r1)
	}
	if r2 := a.apply(o); r2.Err != nil || a.sess("c").OpenedIndex != r1.Index {
		t.Fatalf("retry of the same open: %+v, opened %d, want %d", r2, a.sess("c").OpenedIndex, r1.Index)
	}
	if s := a.sess("c"); s.Will == nil || string(s.Will.Payload) != "gone" {
		t.Fatalf("the open's will: %+v", s.Will)
	}
}

// TestDisconnectAfterReopenKeepsTheNewWill: the entry a DISCONNECT writes
// (internal/session.CloseCommands: the close, then a ClaimWill fenced to
// that connection's open) clears the will of that connection only. When
// the client connected again elsewhere first (its open, with a new will,
// committed before the old node's DISCONNECT), the new connection keeps
// its will: the unfenced ClearWill used before cleared it, and it never
// fired. And when the leader had closed the session on the old node's
// behalf (a node thought dead), the DISCONNECT still clears the will: no
// will after a DISCONNECT.
func TestDisconnectAfterReopenKeepsTheNewWill(t *testing.T) {
	a := newSessionApplier(t)
	oldWill := &Will{Topic: "w", Payload: []byte("old")}
	first := a.apply(&SessionOpen{ClientID: "c", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "A", At: 7000, Fenced: true, Will: oldWill}).Index
	newWill := &Will{Topic: "w", Payload: []byte("new")}
	a.apply(&SessionOpen{ClientID: "c", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "B", At: 7001, Fenced: true, IfOpened: first, Will: newWill})
	disconnectOf := func(owner string, opened uint64) Command {
		return &Batch{Commands: []Command{
			&SessionClose{ClientID: "c", Owner: owner, IfOpened: opened, At: 7002},
			&ClaimWill{ClientID: "c", IfOpened: opened},
		}}
	}
	a.apply(disconnectOf("A", first))
	if s := a.sess("c"); s.Will == nil || string(s.Will.Payload) != "new" || !s.Connected {
		t.Fatalf("the old connection's DISCONNECT changed the new one: connected %v, will %+v", s.Connected, s.Will)
	}
	// The leader closes B's connection on its behalf, then B's DISCONNECT
	// arrives: the will must not be left to fire.
	cur := a.sess("c")
	a.apply(&SessionClose{ClientID: "c", Owner: "B", IfOpened: cur.OpenedIndex, At: 7003})
	a.apply(disconnectOf("B", cur.OpenedIndex))
	if s := a.sess("c"); s.Will != nil {
		t.Fatalf("will left after a DISCONNECT: %+v", s.Will)
	}
	// The unfenced ClearWill is what cleared the new will before.
	b := newSessionApplier(t)
	first = b.apply(&SessionOpen{ClientID: "c", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "A", At: 7000, Fenced: true, Will: oldWill}).Index
	b.apply(&SessionOpen{ClientID: "c", ProtocolVersion: 5, ExpiryInterval: 60, Owner: "B", At: 7001, Fenced: true, IfOpened: first, Will: newWill})
	b.apply(&Batch{Commands: []Command{&ClearWill{ClientID: "c"}, &SessionClose{ClientID: "c", Owner: "A", IfOpened: first, At: 7002}}})
	if s := b.sess("c"); s.Will != nil {
		t.Fatal("ClearWill no longer clears unconditionally: update this test's account of the old bug")
	}
}
