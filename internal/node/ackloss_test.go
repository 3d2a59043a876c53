package node

import (
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestRestartedNodeAcksOnlyWhatItQueued: a persistent subscription made
// while n3 was down; n3 restarts and at once takes QoS 1 publishes for
// it. Every publish n3 acknowledges must reach the subscriber: a node
// that has not caught up with the log must not match (and acknowledge)
// against its stale view of the subscriptions.
func TestRestartedNodeAcksOnlyWhatItQueued(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	tc.stop("n3")
	sub := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "lag-sub", CleanStart: true,
		SessionExpiry: 600, Buffer: 1000})
	sub.Sub(t, 1, "lag/x")
	n3 := tc.restart("n3")
	pub, err := testutil.TryConnect(n3.Addr("mqtt"), testutil.ClientOptions{ID: "lag-pub", CleanStart: true, Buffer: 10})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	const total = 30
	acked := map[int]bool{}
	for i := range total {
		if err := pub.TryPub("lag/x", 1, false, []byte(strconv.Itoa(i))); err == nil {
			acked[i] = true
		}
	}
	if len(acked) == 0 {
		t.Fatal("n3 acknowledged nothing (the test needs a node that serves publishes while catching up)")
	}
	got := map[int]bool{}
	testutil.Eventually(t, 15*time.Second, func() error {
		for {
			select {
			case p := <-sub.Msgs:
				n, _ := strconv.Atoi(string(p.Payload))
				got[n] = true
				continue
			default:
			}
			break
		}
		for i := range acked {
			if !got[i] {
				return fmt.Errorf("message %d acknowledged by the restarted node never arrived (%d of %d acked, %d received)",
					i, len(acked), total, len(got))
			}
		}
		return nil
	})
}

// TestRefusedQoS2PublishLeavesNoReceipt: a persistent publisher's QoS 2
// message that could not be queued (over a 1 MB replicated size cap) must not
// leave its packet id "awaiting release": the client's next message under
// that id would be taken for a duplicate and dropped for every subscriber.
func TestRefusedQoS2PublishLeavesNoReceipt(t *testing.T) {
	tc := newTunedCluster(t, capDurable, "n1")
	tc.waitReady()
	sub := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "q2-sub", CleanStart: true,
		SessionExpiry: 600, Buffer: 10})
	sub.Sub(t, 2, "q2/x")
	pub := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "q2-pub", CleanStart: true,
		SessionExpiry: 600, Buffer: 10})
	if err := pub.TryPub("q2/x", 2, false, make([]byte, 2<<20)); err == nil {
		t.Fatal("a QoS 2 message over the replicated cap was accepted for a persistent subscriber")
	}
	if s, ok := tc.nodes["n1"].repl.Session("q2-pub"); !ok || len(s.AwaitingRelease) != 0 {
		t.Fatalf("refused QoS 2 publish left packet ids awaiting release: %+v", s.AwaitingRelease)
	}
	pub.Pub(t, "q2/x", 2, false, []byte("small"))
	if p := sub.MustNext(t, wait); string(p.Payload) != "small" {
		t.Fatalf("got %q", p.Payload)
	}
}
