package node

import (
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestTakeoverPublishesWill: a connection taken over by a new CONNECT with
// the same client id ends without DISCONNECT, so its will (delay 0) is
// published once (MQTT-3.1.4-3 with 3.1.2.5; Mosquitto does), for clean
// and persistent sessions, on the same node. (Before, the new connection's
// SessionOpen cleared it unpublished.) A takeover from another node does
// not publish it yet (known gap, hooks/session_takeover.go): there the
// test checks only that it is not published twice.
func TestTakeoverPublishesWill(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	for _, tk := range []struct {
		name       string
		persistent bool
		to         string
		published  bool
	}{
		{"clean, same node", false, "n1", true},
		{"persistent, same node", true, "n1", true},
		{"persistent to clean, same node", true, "n1", true},
		{"clean, other node", false, "n2", false},
		{"persistent, other node", true, "n2", false},
	} {
		t.Run(tk.name, func(t *testing.T) {
			id := fmt.Sprintf("tw-%v-%s", tk.persistent, tk.to)
			topic := "tw/" + id
			sub := tc.client("n2", id+"-sub")
			sub.Sub(t, 1, topic)
			opts := testutil.ClientOptions{ID: id, CleanStart: true,
				Will: &paho.WillMessage{Topic: topic, Payload: []byte("gone"), QoS: 1}}
			if tk.persistent {
				opts.SessionExpiry = 600
			}
			old := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), opts)
			opts.Will, opts.CleanStart = nil, !tk.persistent
			if tk.name == "persistent to clean, same node" {
				opts.CleanStart, opts.SessionExpiry = true, 0
			}
			cur := testutil.Connect(t, tc.nodes[tk.to].Addr("mqtt"), opts)
			defer cur.Close()
			select {
			case <-old.Done():
			case <-time.After(wait):
				t.Fatal("the old connection was not taken over")
			}
			if !tk.published {
				if p, err := sub.Next(2 * time.Second); err == nil && string(p.Payload) == "gone" {
					if p, err := sub.Next(time.Second); err == nil {
						t.Fatalf("will published twice (second: %q)", p.Payload)
					}
				}
				return
			}
			p, err := sub.Next(wait)
			if err != nil {
				t.Fatalf("no will after the takeover: %v", err)
			}
			if string(p.Payload) != "gone" {
				t.Fatalf("got %q", p.Payload)
			}
			if p, err := sub.Next(time.Second); err == nil {
				t.Fatalf("will published twice (second: %q)", p.Payload)
			}
		})
	}
}
