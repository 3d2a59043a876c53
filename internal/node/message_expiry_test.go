package node

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestQueuedMessageExpiry: a queued message's expiry counts down while it
// waits: the PUBLISH delivered carries the remaining interval (never more
// than what is left, MQTT-3.3.2-6), and an expired one is not delivered.
func TestQueuedMessageExpiry(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	tc.persistentSub(t, "n1", "mx", "mx/#")
	pub := tc.client("n2", "mx-pub")
	publish := func(topic string, expiry uint32) {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		if _, err := pub.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: []byte(topic),
			Properties: &paho.PublishProperties{MessageExpiry: &expiry}}); err != nil {
			t.Fatal(err)
		}
	}
	// Rounding is where it goes wrong: publish just after a second
	// starts and resume in the second half of a second, so that rounding
	// the deadline up and the clock down both show.
	atFraction := func(lo, hi time.Duration) {
		testutil.Eventually(t, 3*time.Second, func() error {
			if f := time.Duration(time.Now().Nanosecond()); f < lo || f >= hi {
				return fmt.Errorf("at %s into the second", f)
			}
			return nil
		})
	}
	atFraction(0, 200*time.Millisecond)
	publish("mx/short", 1)
	publish("mx/long", 10)
	acked := time.Now()
	testutil.Eventually(t, wait, func() error {
		if d := time.Since(acked); d < 2500*time.Millisecond {
			return fmt.Errorf("%s since the publish", d)
		}
		return nil
	})
	atFraction(500*time.Millisecond, 800*time.Millisecond)
	start := time.Now()
	c := testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "mx", SessionExpiry: 600})
	p := c.MustNext(t, wait)
	if p.Topic != "mx/long" {
		t.Fatalf("got %s first; mx/short had expired", p.Topic)
	}
	left := 10 - start.Sub(acked).Seconds() // at most this much remained when it was sent
	if p.Properties == nil || p.Properties.MessageExpiry == nil {
		t.Fatal("no message expiry on the delivered message")
	}
	if got := *p.Properties.MessageExpiry; got < 1 || float64(got) > left+0.999 {
		t.Fatalf("message expiry %d delivered, at most %.2f s remained", got, left)
	}
}
