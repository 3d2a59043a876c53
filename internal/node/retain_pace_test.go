package node

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
	"github.com/mqtt-ha/broker/replication"
)

// TestSubscribeGetsEveryRetainedMessage: mochi queues the retained
// messages that match a new subscription without waiting and drops what
// does not fit in the client's outbound queue, so a subscriber to a
// filter with more retained messages than the queue holds lost some
// (mosquitto_sub on a default node: 14,075 and 18,105 of 20,000; Mosquitto
// sends them all). hooks.RetainPacer paces them. The queue is made small
// here so that a thousand messages are far more than it holds.
func TestSubscribeGetsEveryRetainedMessage(t *testing.T) {
	const n = 1000
	c := newTunedCluster(t, func(cfg *Config) { cfg.MaxPendingWrites = 16 }, "n1")
	c.waitReady()
	var cmds []replication.Command
	for i := range n {
		cmds = append(cmds, &replication.RetainSet{Msg: replication.RetainedMessage{
			Topic: fmt.Sprintf("rp/%d/%d", i/100, i), Payload: []byte(fmt.Sprint(i)), QoS: 1}})
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, err := c.nodes["n1"].repl.Apply(ctx, &replication.Batch{Commands: cmds}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, wait, func() error {
		if got := len(c.nodes["n1"].mqtt.Topics.Messages("rp/#")); got != n {
			return fmt.Errorf("%d of %d retained messages in mochi's store", got, n)
		}
		return nil
	})
	for _, qos := range []byte{0, 1} {
		sub := c.client("n1", fmt.Sprintf("rp-sub-%d", qos))
		sub.Sub(t, qos, "rp/#")
		seen := map[string]bool{}
		for len(seen) < n {
			m, err := sub.Next(5 * time.Second)
			if err != nil {
				t.Fatalf("QoS %d: %d of %d retained messages arrived: %v", qos, len(seen), n, err)
			}
			if !m.Retain {
				t.Fatalf("QoS %d: %s arrived without the retain flag", qos, m.Topic)
			}
			seen[m.Topic] = true
		}
		sub.Close()
	}
}
