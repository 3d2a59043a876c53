package node

import (
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// Wills and the retained store, graceful stops (DESIGN.md guarantee 4).

// retainedOn reads the retained value of topic as a new subscriber on node
// sees it ("" when there is none).
func (tc *testCluster) retainedOn(t *testing.T, node, topic string, n int) (string, error) {
	t.Helper()
	c, err := testutil.TryConnect(tc.nodes[node].Addr("mqtt"), testutil.ClientOptions{ID: fmt.Sprintf("reader-%s-%d", node, n), CleanStart: true})
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.Sub(t, 1, topic)
	p, err := c.Next(200 * time.Millisecond)
	if err != nil {
		return "", nil
	}
	if !p.Retain {
		return "", fmt.Errorf("%s: got a live message %q, not the retained value", node, p.Payload)
	}
	return string(p.Payload), nil
}

// waitRetained waits until a new subscriber on every running node gets
// want as the retained value of topic.
func (tc *testCluster) waitRetained(t *testing.T, topic, want string) {
	t.Helper()
	n := 0
	testutil.Eventually(t, wait, func() error {
		for id := range tc.nodes {
			n++
			got, err := tc.retainedOn(t, id, topic, n)
			if err != nil {
				return err
			}
			if got != want {
				return fmt.Errorf("a new subscriber on %s reads %q, want %q", id, got, want)
			}
		}
		return nil
	})
}

// TestRetainedWillOfCleanSessionReplicated: a clean session's retained will
// (published by mochi on the node that held the connection) replaces the
// retained value on every node, as Home Assistant availability topics need.
func TestRetainedWillOfCleanSessionReplicated(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	tc.client("n1", "avail-pub").Pub(t, "avail/plug", 1, true, []byte("online"))
	tc.waitRetained(t, "avail/plug", "online")
	dev := testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "plug", CleanStart: true,
		Will: &paho.WillMessage{Topic: "avail/plug", QoS: 1, Retain: true, Payload: []byte("offline")}})
	_ = dev.Conn.Close() // no DISCONNECT: the will is published
	tc.waitRetained(t, "avail/plug", "offline")
}
