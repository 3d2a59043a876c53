package hooks

import (
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/mochi-mqtt/server/v2/system"
	"github.com/prometheus/client_golang/prometheus"
)

// TestPublishHooksDoNotAllocate: the hooks every PUBLISH passes allocate
// nothing for a message they let through untouched. Retained.OnPublish
// used to move every packet (about 800 bytes) to the heap, because a
// goroutine for QoS 0 retained messages captured it.
func TestPublishHooksDoNotAllocate(t *testing.T) {
	m := NewMetrics(prometheus.NewRegistry(), new(system.Info))
	mh := NewMetricsHook(m, nil)
	r := new(Retained)
	cl := new(mqtt.Client)
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "a/b",
		Payload: []byte("payload"), PacketID: 7}
	for name, f := range map[string]func(){
		"Retained.OnPublish":       func() { _, _ = r.OnPublish(cl, pk) },
		"MetricsHook.OnPacketRead": func() { _, _ = mh.OnPacketRead(cl, pk) },
		"MetricsHook.OnPacketSent": func() { mh.OnPacketSent(cl, pk, nil) },
	} {
		if n := testing.AllocsPerRun(100, f); n != 0 {
			t.Errorf("%s: %v allocations per call, want 0", name, n)
		}
	}
}
