package node

import (
	"testing"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// MQTT 5 conformance of what the broker itself says, beyond the session
// engine: CONNACK properties and acknowledgements.

// maxMQTTPacket is the largest packet MQTT can express (a 4-byte remaining
// length): 268,435,455. Maximum Packet Size above it is a malformed CONNACK
// to strict clients (Python paho refuses the connection).
const maxMQTTPacket = 268435455

// TestConnackPropertiesInRange: with the seed config (256 MB message size
// limit) every property of a CONNACK is inside the range the MQTT 5 spec
// gives it, and the limits the broker enforces are advertised.
func TestConnackPropertiesInRange(t *testing.T) {
	tc := newTunedCluster(t, func(c *Config) { c.MaxPacketSize = 256 << 20 }, "n1")
	tc.waitReady()
	c := tc.client("n1", "props")
	p := c.Connack.Properties
	if p == nil {
		t.Fatal("CONNACK without properties")
	}
	if p.MaximumPacketSize == nil || *p.MaximumPacketSize == 0 || *p.MaximumPacketSize > maxMQTTPacket {
		t.Fatalf("Maximum Packet Size %v, want 1..%d", deref(p.MaximumPacketSize), maxMQTTPacket)
	}
	if p.ReceiveMaximum != nil && *p.ReceiveMaximum == 0 {
		t.Fatal("Receive Maximum 0 (the spec forbids it)")
	}
	if p.MaximumQoS != nil && *p.MaximumQoS > 1 {
		t.Fatalf("Maximum QoS %d sent (only 0 or 1 may be)", *p.MaximumQoS)
	}
	// The broker accepts topic aliases up to 10 (Mosquitto's default): a
	// client may use them only if CONNACK says so (MQTT-3.2.2-17).
	if p.TopicAliasMaximum == nil || *p.TopicAliasMaximum != 10 {
		t.Fatalf("Topic Alias Maximum %v, want 10", deref(p.TopicAliasMaximum))
	}
	if !p.RetainAvailable || !p.WildcardSubAvailable || !p.SubIDAvailable || !p.SharedSubAvailable {
		t.Fatalf("features advertised unavailable: %+v", p)
	}
	// Packets up to the configured limit are still accepted.
	c.Sub(t, 1, "big")
	big := make([]byte, 300<<10)
	c.Pub(t, "big", 1, false, big)
	if m := c.MustNext(t, wait); len(m.Payload) != len(big) {
		t.Fatalf("got %d bytes, want %d", len(m.Payload), len(big))
	}
}

// TestConnackRetainUnavailable: a node with retain disabled tells MQTT 5
// clients so in CONNACK (Retain Available 0) instead of refusing their
// retained publishes unannounced.
func TestConnackRetainUnavailable(t *testing.T) {
	tc := newTunedCluster(t, func(c *Config) { c.RetainAvailable = false }, "n1")
	tc.waitReady()
	c := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "noretain", CleanStart: true})
	if p := c.Connack.Properties; p == nil || p.RetainAvailable {
		t.Fatalf("CONNACK properties %+v: Retain Available not 0", p)
	}
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}
