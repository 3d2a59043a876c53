package node

import (
	"testing"
)

// TestWriteQueueFollowsMaxQueued: a connected client's outbound queue
// (mochi's MaximumClientWritesPending, preallocated per connection) makes
// room for max_queued_messages live messages (as Mosquitto bounds the QoS
// 0 packets it queues for a connected client, within [minWriteQueue,
// maxWriteQueue]), a quarter of that for paced retained messages, and the
// QoS 1/2 messages in flight (max_queued_messages), plus slack; a test's
// explicit MaxPendingWrites wins. mochi's default of 8,192 cost 64 KiB
// per idle connection.
func TestWriteQueueFollowsMaxQueued(t *testing.T) {
	for _, tc := range []struct {
		maxQueued int
		explicit  int32
		want      int32
	}{
		{maxQueued: 1000, want: 1000 + 250 + 1000 + writeQueueSlack},
		{maxQueued: 1, want: minWriteQueue + minWriteQueue/4 + 1 + writeQueueSlack},
		{maxQueued: 65535, want: maxWriteQueue + maxWriteQueue/4 + maxWriteQueue + writeQueueSlack},
		{maxQueued: 1000, explicit: 16, want: 16},
	} {
		c := Config{MaxQueuedMessages: tc.maxQueued, MaxPendingWrites: tc.explicit}
		if got := c.capabilities().MaximumClientWritesPending; got != tc.want {
			t.Errorf("max_queued_messages %d, MaxPendingWrites %d: outbound queue %d, want %d",
				tc.maxQueued, tc.explicit, got, tc.want)
		}
	}

	c := newTestCluster(t, "n1")
	c.waitReady()
	if got := c.nodes["n1"].mqtt.Options.Capabilities.MaximumClientWritesPending; got != 2314 {
		t.Fatalf("running node's outbound queue: %d packets, want 2314 (max_queued_messages 1000)", got)
	}
}
