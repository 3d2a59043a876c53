package node

import (
	"log/slog"

	"github.com/mochi-mqtt/server/v2/packets"
)

// packetSummary replaces a packet logged by mochi with what an operator
// needs to find it (type, topic, packet id, QoS, sizes), never its
// payload, password or properties.
func packetSummary(a slog.Attr) slog.Attr {
	var pk packets.Packet
	switch v := a.Value.Any().(type) {
	case packets.Packet:
		pk = v
	case *packets.Packet:
		if v == nil {
			return a
		}
		pk = *v
	default:
		return a
	}
	attrs := []any{slog.String("type", packets.PacketNames[pk.FixedHeader.Type])}
	if pk.TopicName != "" {
		attrs = append(attrs, slog.String("topic", pk.TopicName))
	}
	if pk.PacketID != 0 {
		attrs = append(attrs, slog.Int("packet_id", int(pk.PacketID)))
	}
	attrs = append(attrs, slog.Int("qos", int(pk.FixedHeader.Qos)), slog.Bool("retain", pk.FixedHeader.Retain),
		slog.Int("payload_bytes", len(pk.Payload)))
	return slog.Group(a.Key, attrs...)
}
