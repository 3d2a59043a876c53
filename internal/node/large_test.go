package node

import (
	"bytes"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestLargeDurableMessagesByDefault: with the default limit (the message
// size limit), 2 MB QoS 1 and QoS 2 messages (the latter from a persistent
// publisher: receipt and enqueue in one entry) are queued for an offline
// persistent subscriber, and a 2 MB retained message is stored; all arrive
// whole. Before blobs, each was refused for being over the 1 MB cap.
func TestLargeDurableMessagesByDefault(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	addr := tc.nodes["n1"].Addr("mqtt")
	sub := testutil.Connect(t, addr, testutil.ClientOptions{ID: "large-sub", CleanStart: true, SessionExpiry: 600, Buffer: 10})
	sub.Sub(t, 2, "large/#")
	sub.Close()
	pub := testutil.Connect(t, addr, testutil.ClientOptions{ID: "large-pub", CleanStart: true, SessionExpiry: 600})
	payloads := map[string][]byte{}
	for i, topic := range []string{"large/q1", "large/q2", "large/retained"} {
		p := bytes.Repeat([]byte{byte('a' + i)}, 2<<20+i)
		payloads[topic] = p
		qos := byte(1)
		if topic == "large/q2" {
			qos = 2
		}
		pub.Pub(t, topic, qos, topic == "large/retained", p)
	}
	if s, ok := tc.nodes["n1"].repl.Session("large-pub"); !ok || len(s.AwaitingRelease) != 0 {
		t.Fatalf("QoS 2 receipt left awaiting release after PUBCOMP: %+v", s.AwaitingRelease)
	}
	back := testutil.Connect(t, addr, testutil.ClientOptions{ID: "large-sub", SessionExpiry: 600, Buffer: 10})
	for range payloads {
		m := back.MustNext(t, 20*time.Second)
		if want, ok := payloads[m.Topic]; !ok || !bytes.Equal(m.Payload, want) {
			t.Fatalf("got %d bytes on %s", len(m.Payload), m.Topic)
		}
		delete(payloads, m.Topic)
	}
	fresh := testutil.Connect(t, addr, testutil.ClientOptions{ID: "large-fresh", CleanStart: true, Buffer: 10})
	fresh.Sub(t, 1, "large/retained")
	if m := fresh.MustNext(t, 20*time.Second); !bytes.Equal(m.Payload, bytes.Repeat([]byte{'c'}, 2<<20+2)) || !m.Retain {
		t.Fatalf("retained: %d bytes, retain %v", len(m.Payload), m.Retain)
	}
	// A persistent session subscribing now gets it queued by reference.
	late := testutil.Connect(t, addr, testutil.ClientOptions{ID: "large-late", CleanStart: true, SessionExpiry: 600, Buffer: 10})
	late.Sub(t, 1, "large/retained")
	if m := late.MustNext(t, 20*time.Second); !bytes.Equal(m.Payload, bytes.Repeat([]byte{'c'}, 2<<20+2)) || !m.Retain {
		t.Fatalf("retained for a persistent subscriber: %d bytes, retain %v", len(m.Payload), m.Retain)
	}
	// mochi's in-memory retained index holds a placeholder, not the 2 MB.
	if pk, ok := tc.nodes["n1"].mqtt.Topics.Retained.Get("large/retained"); !ok || len(pk.Payload) > 16 {
		t.Fatalf("mochi's retained index holds %d bytes for the large value", len(pk.Payload))
	}
	if n, size := tc.nodes["n1"].repl.Blobs(); n == 0 || size < 2<<20 {
		t.Fatalf("blobs held: %d (%d bytes); the retained value's should be there", n, size)
	}
}
