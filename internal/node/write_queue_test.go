package node

import (
	"testing"
)

// TestWriteQueueFollowsMaxQueued: a connected client's outbound queue
// (mochi's MaximumClientWritesPending, preallocated per connection) holds
// max_queued_messages packets, as Mosquitto bounds the QoS 0 packets it
// queues for a connected client, within [minWriteQueue, maxWriteQueue]; a
// test's explicit MaxPendingWrites wins. mochi's default of 8,192 cost
// 64 KiB per idle connection.
func TestWriteQueueFollowsMaxQueued(t *testing.T) {
	for _, tc := range []struct {
		maxQueued int
		explicit  int32
		want      int32
	}{
		{maxQueued: 1000, want: 1000},
		{maxQueued: 1, want: minWriteQueue},
		{maxQueued: 65535, want: maxWriteQueue},
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
	if got := c.nodes["n1"].mqtt.Options.Capabilities.MaximumClientWritesPending; got != 1000 {
		t.Fatalf("running node's outbound queue: %d packets, want 1000 (max_queued_messages)", got)
	}
}
