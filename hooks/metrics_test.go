package hooks

import (
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/mochi-mqtt/server/v2/system"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// TestMetricsHookCountsByQoS: each PUBLISH read or sent is counted, with its
// payload, under its own QoS label and no other; other packets are not.
func TestMetricsHookCountsByQoS(t *testing.T) {
	m := NewMetrics(prometheus.NewRegistry(), new(system.Info))
	h := NewMetricsHook(m, nil)
	cl := new(mqtt.Client)
	pub := func(qos byte, size int) packets.Packet {
		return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}, Payload: make([]byte, size)}
	}
	for _, pk := range []packets.Packet{pub(0, 3), pub(1, 5), pub(1, 7), pub(2, 11),
		{FixedHeader: packets.FixedHeader{Type: packets.Puback}}} {
		if _, err := h.OnPacketRead(cl, pk); err != nil {
			t.Fatal(err)
		}
	}
	h.OnPacketSent(cl, pub(2, 13), nil)
	h.OnPacketSent(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingresp}}, nil)

	want := []struct {
		name  string
		vec   *prometheus.CounterVec
		label string
		value float64
	}{
		{"messages_received", m.msgsIn, "0", 1}, {"messages_received", m.msgsIn, "1", 2}, {"messages_received", m.msgsIn, "2", 1},
		{"payload_received", m.payloadIn, "0", 3}, {"payload_received", m.payloadIn, "1", 12}, {"payload_received", m.payloadIn, "2", 11},
		{"messages_sent", m.msgsOut, "0", 0}, {"messages_sent", m.msgsOut, "1", 0}, {"messages_sent", m.msgsOut, "2", 1},
		{"payload_sent", m.payloadOut, "0", 0}, {"payload_sent", m.payloadOut, "1", 0}, {"payload_sent", m.payloadOut, "2", 13},
	}
	for _, w := range want {
		var d dto.Metric
		if err := w.vec.WithLabelValues(w.label).Write(&d); err != nil {
			t.Fatal(err)
		}
		if got := d.GetCounter().GetValue(); got != w.value {
			t.Errorf("%s{qos=%q} = %v, want %v", w.name, w.label, got, w.value)
		}
	}
}
