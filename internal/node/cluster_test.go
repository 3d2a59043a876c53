package node

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/internal/testutil"
)

const wait = 10 * time.Second

// expectNone fails if c receives anything within d. It is used only after a
// later message from the same path has arrived, so the window is a margin,
// not the synchronisation.
func expectNone(t *testing.T, c *testutil.Client, d time.Duration) {
	t.Helper()
	if p, err := c.Next(d); err == nil {
		t.Fatalf("%s got an unexpected message: %s %q", c.ID, p.Topic, p.Payload)
	}
}

func TestCrossNodeDelivery(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	// A QoS 1 publish passes the read barrier, which needs a raft leader:
	// while the cluster forms it is refused (0x83; failed once in CI).
	tc.waitReady()
	// The first subscriber of the filter is on the publishing node, the
	// second on another node: both must get the message (a hole another
	// mochi-based cluster had: only the first subscriber was routed).
	local := tc.client("n1", "local")
	local.Sub(t, 1, "home/+/temp")
	remote := tc.client("n2", "remote")
	remote.Sub(t, 1, "home/+/temp")
	tc.waitRoutes(t, "n1", "n2", 1)

	pub := tc.client("n1", "pub")
	pub.Pub(t, "home/kitchen/temp", 1, false, []byte("21.5"))
	for _, c := range []*testutil.Client{local, remote} {
		p := c.MustNext(t, wait)
		if p.Topic != "home/kitchen/temp" || string(p.Payload) != "21.5" || p.QoS != 1 {
			t.Fatalf("%s got %s %q qos %d", c.ID, p.Topic, p.Payload, p.QoS)
		}
	}
}

func TestForwardedPropertiesSurvive(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	// The publish is retained: it needs a raft leader, or it is refused
	// (PUBREC 0x80+, which paho returns without an error: 1 run in 15 did
	// not find a leader in time).
	tc.waitReady()
	sub := tc.client("n2", "sub")
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, err := sub.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{
		{Topic: "rpc/#", QoS: 2, RetainAsPublished: true}}}); err != nil {
		t.Fatal(err)
	}
	tc.waitRoutes(t, "n1", "n2", 1)
	pub := tc.client("n1", "pub")
	expiry, format := uint32(3600), byte(1)
	resp, err := pub.Publish(ctx, &paho.Publish{Topic: "rpc/req", QoS: 2, Retain: true, Payload: []byte(`{"a":1}`),
		Properties: &paho.PublishProperties{
			MessageExpiry: &expiry, PayloadFormat: &format, ContentType: "application/json",
			ResponseTopic: "rpc/resp", CorrelationData: []byte{1, 2, 3},
			User: paho.UserProperties{{Key: "k", Value: "v1"}, {Key: "k", Value: "v2"}},
		}})
	if err != nil {
		t.Fatal(err)
	}
	if resp != nil && resp.ReasonCode >= 0x80 {
		t.Fatalf("publish refused: reason %#x", resp.ReasonCode)
	}
	p := sub.MustNext(t, wait)
	pp := p.Properties
	switch {
	case p.QoS != 2 || !p.Retain:
		t.Fatalf("qos %d retain %v, want 2 and retain-as-published", p.QoS, p.Retain)
	case pp == nil || pp.ContentType != "application/json" || pp.ResponseTopic != "rpc/resp" ||
		string(pp.CorrelationData) != "\x01\x02\x03" || pp.PayloadFormat == nil || *pp.PayloadFormat != 1:
		t.Fatalf("properties lost: %+v", pp)
	case pp.MessageExpiry == nil || *pp.MessageExpiry > 3600 || *pp.MessageExpiry < 3590:
		t.Fatalf("message expiry %v, want the remaining lifetime (~3600)", pp.MessageExpiry)
	case len(pp.User) != 2 || pp.User[0].Value != "v1" || pp.User[1].Value != "v2":
		t.Fatalf("user properties %v", pp.User)
	}
}

func TestOverlappingFiltersNoDuplicatesNoLoops(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	var subs []*testutil.Client
	for _, id := range []string{"n1", "n2", "n3"} {
		c := tc.client(id, "sub-"+id)
		c.Sub(t, 1, "a/#", "a/+", "a/b", "#")
		subs = append(subs, c)
	}
	for _, from := range []string{"n1", "n2", "n3"} {
		for _, of := range []string{"n1", "n2", "n3"} {
			if from != of {
				tc.waitRoutes(t, from, of, 4)
			}
		}
	}
	pub := tc.client("n1", "pub")
	pub.Pub(t, "a/b", 1, false, []byte("one"))
	pub.Pub(t, "a/b", 1, false, []byte("sentinel"))
	for _, c := range subs {
		// mochi delivers one copy per client however many of its filters
		// match; the cluster must add none.
		if p := c.MustNext(t, wait); string(p.Payload) != "one" {
			t.Fatalf("%s first message %q", c.ID, p.Payload)
		}
		if p := c.MustNext(t, wait); string(p.Payload) != "sentinel" {
			t.Fatalf("%s got %q, want the sentinel: a duplicate", c.ID, p.Payload)
		}
		expectNone(t, c, 200*time.Millisecond)
	}
	if got := tc.forwarded("n1"); got != 4 {
		t.Errorf("n1 forwarded %d messages, want 4 (2 messages x 2 nodes)", got)
	}
	for _, id := range []string{"n2", "n3"} {
		if got := tc.forwarded(id); got != 0 {
			t.Errorf("%s forwarded %d messages: a received message was forwarded again", id, got)
		}
	}
}

// TestOrderPerPublisher: two publishers on two nodes send 10,000 numbered
// messages each to one subscriber on a third node, at each QoS; each
// publisher's messages must arrive complete and in order.
func TestOrderPerPublisher(t *testing.T) {
	if testing.Short() {
		t.Skip("10,000 messages per publisher")
	}
	const perPublisher = 10000
	tc := newTestCluster(t, "n1", "n2", "n3")
	for _, qos := range []byte{0, 1, 2} {
		t.Run(fmt.Sprintf("qos%d", qos), func(t *testing.T) {
			topic := fmt.Sprintf("order/%d", qos)
			sub := tc.client("n2", fmt.Sprintf("sub-%d", qos))
			sub.Sub(t, qos, topic+"/#")
			tc.waitRoutes(t, "n1", "n2", 1)
			tc.waitRoutes(t, "n3", "n2", 1)
			var wg sync.WaitGroup
			for i, node := range []string{"n1", "n3"} {
				pub := tc.client(node, fmt.Sprintf("pub-%d-%d", qos, i))
				wg.Add(1)
				go func() {
					defer wg.Done()
					payload := make([]byte, 8)
					for seq := range perPublisher {
						binary.BigEndian.PutUint64(payload, uint64(seq))
						if err := pub.TryPub(fmt.Sprintf("%s/%d", topic, i), qos, false, payload); err != nil {
							t.Errorf("publisher %d seq %d: %v", i, seq, err)
							return
						}
					}
				}()
			}
			// QoS 1 and 2: every message, in order. QoS 0 may lose messages
			// under overload (a full queue drops, by design), so there the
			// check is order without duplicates: strictly increasing.
			next := map[string]uint64{}
			received := 0
			for received < 2*perPublisher {
				timeout := wait
				if qos == 0 {
					timeout = 2 * time.Second // quiet this long: the rest was dropped
				}
				p, err := sub.Next(timeout)
				if err != nil {
					if qos == 0 {
						break
					}
					t.Fatalf("after %v: %v", next, err)
				}
				seq := binary.BigEndian.Uint64(p.Payload)
				if qos > 0 && seq != next[p.Topic] || qos == 0 && seq < next[p.Topic] {
					t.Fatalf("%s: got seq %d, want %d (reordered, lost or duplicated)", p.Topic, seq, next[p.Topic])
				}
				next[p.Topic] = seq + 1
				received++
			}
			if lost := 2*perPublisher - received; lost > 0 {
				t.Logf("QoS 0: %d of %d messages dropped under load (allowed at QoS 0)", lost, 2*perPublisher)
			}
			wg.Wait()
			sub.Close()
			tc.waitRoutes(t, "n1", "n2", 0)
		})
	}
}

func TestSharedSubscriptionExactlyOnce(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	const filter, n = "$share/workers/jobs/#", 300
	var members []*testutil.Client
	for _, node := range []string{"n2", "n2", "n3", "n3"} {
		c := tc.client(node, fmt.Sprintf("w%d-%s", len(members), node))
		c.Sub(t, 1, filter)
		members = append(members, c)
	}
	tc.waitRoutes(t, "n1", "n2", 1)
	tc.waitRoutes(t, "n1", "n3", 1)
	// A plain subscriber on n2 too: its node gets a forward for it, which
	// must not make n2's group members deliver a second copy.
	plain := tc.client("n2", "plain")
	plain.Sub(t, 1, "jobs/#")
	tc.waitRoutes(t, "n1", "n2", 2)

	pub := tc.client("n1", "pub")
	for i := range n {
		pub.Pub(t, "jobs/x", 1, false, fmt.Appendf(nil, "%d", i))
	}
	for range n {
		plain.MustNext(t, wait) // all n reached n2: the forwards have landed
	}
	seen := map[string]int{}
	perNode := map[string]int{}
	testutil.Eventually(t, wait, func() error {
		for i, c := range members {
			for {
				p, err := c.Next(0)
				if err != nil {
					break
				}
				seen[string(p.Payload)]++
				perNode[[]string{"n2", "n2", "n3", "n3"}[i]]++
			}
		}
		if len(seen) < n {
			return fmt.Errorf("group got %d distinct of %d", len(seen), n)
		}
		return nil
	})
	for m, k := range seen {
		if k != 1 {
			t.Fatalf("message %s delivered %d times to the group", m, k)
		}
	}
	if perNode["n2"] == 0 || perNode["n3"] == 0 {
		t.Errorf("deliveries per node %v: the group should be spread over both nodes", perNode)
	}

	// A member on the publishing node takes every message from now on.
	local := tc.client("n1", "w-local")
	local.Sub(t, 1, filter)
	pub.Pub(t, "jobs/y", 1, false, []byte("local"))
	if p := local.MustNext(t, wait); string(p.Payload) != "local" {
		t.Fatalf("local member got %q", p.Payload)
	}
	plain.MustNext(t, wait)
	for _, c := range members {
		expectNone(t, c, 100*time.Millisecond)
	}
}

func TestRoutesFollowKilledAndRestartedNode(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	sub3 := tc.client("n3", "sub3")
	sub3.Sub(t, 0, "k/#")
	sub2 := tc.client("n2", "sub2")
	sub2.Sub(t, 0, "k/#")
	tc.waitRoutes(t, "n1", "n3", 1)
	tc.waitRoutes(t, "n1", "n2", 1)

	tc.nodes["n3"].Kill()
	delete(tc.nodes, "n3")
	tc.waitMembers(2)
	tc.waitRoutes(t, "n1", "n3", 0)
	tc.waitRoutes(t, "n2", "n3", 0)

	// The survivors keep serving.
	pub := tc.client("n1", "pub")
	pub.Pub(t, "k/1", 0, false, []byte("after-kill"))
	if p := sub2.MustNext(t, wait); string(p.Payload) != "after-kill" {
		t.Fatalf("sub2 got %q", p.Payload)
	}

	// The same node id comes back (new ports, as after a pod reschedule).
	tc.start("n3")
	tc.waitMembers(3)
	sub3b := tc.client("n3", "sub3b")
	sub3b.Sub(t, 0, "k/#")
	tc.waitRoutes(t, "n1", "n3", 1)
	pub.Pub(t, "k/2", 0, false, []byte("after-restart"))
	if p := sub3b.MustNext(t, wait); string(p.Payload) != "after-restart" {
		t.Fatalf("sub3b got %q", p.Payload)
	}
}

func TestWillReachesOtherNodes(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	sub := tc.client("n1", "watcher")
	sub.Sub(t, 1, "devices/+/status")
	tc.waitRoutes(t, "n2", "n1", 1)
	dev, err := testutil.TryConnect(tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "dev", CleanStart: true,
		Will: &paho.WillMessage{Topic: "devices/dev/status", QoS: 1, Payload: []byte("offline")}})
	if err != nil {
		t.Fatal(err)
	}
	_ = dev.Conn.Close() // abrupt: no DISCONNECT, so the will must fire
	p := sub.MustNext(t, wait)
	if p.Topic != "devices/dev/status" || string(p.Payload) != "offline" {
		t.Fatalf("got %s %q", p.Topic, p.Payload)
	}
	expectNone(t, sub, 300*time.Millisecond)
}
func TestRetainedReachesEveryNode(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	pub := tc.client("n1", "pub")
	pub.Pub(t, "status/car", 1, true, []byte("parked"))
	// No node had a subscriber when it was published; a new subscriber on
	// any node must still get it.
	for _, id := range []string{"n1", "n2", "n3"} {
		testutil.Eventually(t, wait, func() error {
			c, err := testutil.TryConnect(tc.nodes[id].Addr("mqtt"), testutil.ClientOptions{ID: "late-" + id, CleanStart: true})
			if err != nil {
				return err
			}
			defer c.Close()
			c.Sub(t, 1, "status/#")
			p, err := c.Next(time.Second)
			if err != nil {
				return fmt.Errorf("%s: no retained message", id)
			}
			if string(p.Payload) != "parked" || !p.Retain {
				t.Fatalf("%s: got %q retain %v", id, p.Payload, p.Retain)
			}
			return nil
		})
	}
}

// TestRequestResponseAcrossNodes: a client on n2 subscribes to a reply
// topic and, as soon as SUBACK arrives, a client on n1 publishes the reply
// (request/response across nodes). On one broker the reply always
// matches; here it did only after the route had gossiped (3-200 ms), so
// most replies were lost. SUBACK now waits until every peer acknowledged
// the route.
func TestRequestResponseAcrossNodes(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	requester := tc.client("n2", "requester")
	responders := tc.warmResponders(t, requester)
	const rounds = 200
	for i := range rounds {
		topic := fmt.Sprintf("reply/%d", i)
		requester.Sub(t, 0, topic)
		responders[i%2].Pub(t, topic, 0, false, []byte("r"))
		if p, err := requester.Next(2 * time.Second); err != nil || p.Topic != topic {
			t.Fatalf("round %d of %d: the reply published right after SUBACK on another node was lost (%v)", i, rounds, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		_, _ = requester.Unsubscribe(ctx, &paho.Unsubscribe{Topics: []string{topic}})
		cancel()
	}
}

// warmResponders connects a responder on n1 and on n3 for a requester on
// n2 and brings every forwarding connection up first (a peer without one
// is not waited for before SUBACK: it learns the route by gossip).
func (tc *testCluster) warmResponders(t *testing.T, requester *testutil.Client) []*testutil.Client {
	t.Helper()
	responders := []*testutil.Client{tc.client("n1", "responder1"), tc.client("n3", "responder3")}
	requester.Sub(t, 0, "warm/#")
	tc.waitRoutes(t, "n1", "n2", 1)
	tc.waitRoutes(t, "n3", "n2", 1)
	for _, r := range responders {
		r.Pub(t, "warm/up", 0, false, []byte("w"))
		requester.MustNext(t, wait)
	}
	return responders
}
