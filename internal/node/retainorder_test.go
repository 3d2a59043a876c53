package node

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestRetainedBeforeLiveForNewPersistentSubscription: while a publisher
// keeps replacing a retained value with increasing numbers, persistent
// sessions subscribe. Each must see non-decreasing numbers: the retained
// value it gets for the subscription (older) must never arrive after a live
// message published after it (newer), as on a single Mosquitto.
func TestRetainedBeforeLiveForNewPersistentSubscription(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	pub := tc.client("n2", "ord-pub")
	pub.Pub(t, "ord/x", 1, true, []byte("0"))
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 1; ctx.Err() == nil; i++ {
			_ = pub.TryPub("ord/x", 1, true, []byte(strconv.Itoa(i)))
		}
	}()
	defer func() { cancel(); wg.Wait() }()
	for k := range 15 {
		sub := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: fmt.Sprintf("ord-sub-%d", k),
			CleanStart: true, SessionExpiry: 600, Buffer: 10000})
		sub.Sub(t, 1, "ord/x")
		last := -1
		var seq []string
		for range 20 {
			p := sub.MustNext(t, wait)
			n, _ := strconv.Atoi(string(p.Payload))
			seq = append(seq, fmt.Sprintf("%d/r%v/q%d", n, p.Retain, p.QoS))
			if n < last {
				t.Logf("received: %v", seq)
				t.Fatalf("subscriber %d: %d (retain %v, qos %d) after %d: an older value arrived after a newer one", k, n, p.Retain, p.QoS, last)
			}
			last = n
		}
		sub.Close()
	}
}
