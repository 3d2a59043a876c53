package node

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestReviewRequestResponsePersistentRequester is TestRequestResponseAcrossNodes
// with a requester that keeps a session (clean start 0, session expiry >
// 0): the most common MQTT client configuration. The Sessions hook takes
// a persistent session's filters out of the SUBSCRIBE in OnSubscribe
// (hooks/session_subscribe.go) and routes them with h.cluster.addRoute
// directly (session_subscribe.go:141), so Cluster.OnSubscribed never sees
// them and SUBACK does not wait for the peers' route acks
// (hooks/cluster.go: added stays false). A QoS 0 reply published on
// another node right after SUBACK travels by the route (QoS 0 copies are
// not queued in the log) and is lost, as in issue 16.
func TestReviewRequestResponsePersistentRequester(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	requester := testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"),
		testutil.ClientOptions{ID: "requester", CleanStart: false, SessionExpiry: 3600, Buffer: 50000})
	responders := tc.warmResponders(t, requester)
	const rounds = 100
	lost := 0
	for i := range rounds {
		topic := fmt.Sprintf("reply/%d", i)
		requester.Sub(t, 0, topic)
		responders[i%2].Pub(t, topic, 0, false, []byte("r"))
		if p, err := requester.Next(time.Second); err != nil || p.Topic != topic {
			lost++
		}
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		_, _ = requester.Unsubscribe(ctx, &paho.Unsubscribe{Topics: []string{topic}})
		cancel()
	}
	if lost > 0 {
		t.Fatalf("%d of %d replies published right after a persistent session's SUBACK on another node were lost", lost, rounds)
	}
}
