package hooks

import (
	"context"
	"log/slog"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/system"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mqtt-ha/broker/replication"
)

// TestAssertDoesNotUndoANewerApply: assert (after mochi stored its own
// copy of a retained publish) reads this node's state and then writes
// mochi's index. A newer value applied in between was overwritten by the
// older one read, and the node served it until the topic changed again:
// on a follower, whose own forwarded write returns before it applies it
// (chaos seed 20261213: the old connection's "online" served after the
// new connection's acknowledged "new").
func TestAssertDoesNotUndoANewerApply(t *testing.T) {
	s := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
	h := NewRetained(s, 5*time.Second, NewMetrics(prometheus.NewRegistry(), &system.Info{}), slog.New(slog.DiscardHandler))
	// observed is told when the observer has written a change of "new"
	// to the index (it cannot while assert holds the index, with the fix).
	observed := make(chan struct{}, 1)
	n := startSingleNode(t, func(c *replication.Config) {
		c.OnRetained = func(ch replication.RetainedChange) {
			h.Apply(ch)
			if string(ch.Msg.Payload) == "new" {
				observed <- struct{}{}
			}
		}
	})
	h.SetReplication(n)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	set := func(v string) *replication.RetainSet {
		return &replication.RetainSet{Msg: replication.RetainedMessage{Topic: "dev/status", Payload: []byte(v), Created: time.Now().UnixMilli()}}
	}
	if _, err := n.Apply(ctx, set("online")); err != nil {
		t.Fatal(err)
	}
	applied := make(chan error, 1)
	h.assertGap = func(topic string) {
		// "new" commits and is applied while assert holds "online".
		go func() {
			_, err := n.Apply(ctx, set("new"))
			applied <- err
		}()
		// Without the fix the observer writes "new" at once; with it, it
		// waits for assert, so this bound only costs the passing run.
		select {
		case <-observed:
		case <-time.After(time.Second):
		}
	}
	h.assert("dev/status")
	if err := <-applied; err != nil {
		t.Fatal(err)
	}
	if pk, ok := s.Topics.Retained.Get("dev/status"); !ok || string(pk.Payload) != "new" {
		t.Fatalf("mochi's index holds %q after the newer value was applied, want \"new\"", pk.Payload)
	}
}

// TestExpirySweepDoesNotDropANewerValue: mochi's retained expiry sweep
// (clearExpiredRetainedMessages) copies the index, then deletes each
// expired topic by name and calls OnRetainedExpired. A value applied
// between the copy and the delete was deleted with the expired one; the
// hook must put the state's value back, and must not put back a value
// the state holds expired.
func TestExpirySweepDoesNotDropANewerValue(t *testing.T) {
	s := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
	h := NewRetained(s, 5*time.Second, NewMetrics(prometheus.NewRegistry(), &system.Info{}), slog.New(slog.DiscardHandler))
	if !h.Provides(mqtt.OnRetainedExpired) {
		t.Fatal("the retained hook does not take mochi's OnRetainedExpired")
	}
	n := startSingleNode(t, func(c *replication.Config) { c.OnRetained = h.Apply })
	h.SetReplication(n)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	set := func(topic, v string, expires int64) {
		t.Helper()
		if _, err := n.Apply(ctx, &replication.RetainSet{Msg: replication.RetainedMessage{Topic: topic, Payload: []byte(v),
			Created: time.Now().UnixMilli(), Expires: expires}}); err != nil {
			t.Fatal(err)
		}
	}
	set("dev/status", "new", 0)
	set("dev/gone", "old", time.Now().Add(-time.Minute).UnixMilli())
	for _, topic := range []string{"dev/status", "dev/gone"} {
		s.Topics.Retained.Delete(topic) // the sweep's delete
		h.OnRetainedExpired(topic)
	}
	if pk, ok := s.Topics.Retained.Get("dev/status"); !ok || string(pk.Payload) != "new" {
		t.Fatalf("after mochi's expiry sweep the index holds %q (present %t), want the state's unexpired \"new\"", pk.Payload, ok)
	}
	if pk, ok := s.Topics.Retained.Get("dev/gone"); ok {
		t.Fatalf("the index holds %q, which the state holds expired", pk.Payload)
	}
}
