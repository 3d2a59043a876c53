package hooks

import (
	"log/slog"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Limits enforces the per-client limits mochi leaves to its embedder:
// max_keepalive, and cleanup of expired sessions.
type Limits struct {
	mqtt.HookBase
	server        *mqtt.Server
	maxKeepalive  uint16
	maxPacketSize uint32
	log           *slog.Logger
}

// NewLimits returns the hook. maxKeepalive is Mosquitto's max_keepalive
// (65535 means no limit below the protocol's own); maxPacketSize is the
// largest packet accepted (0: the protocol's limit).
func NewLimits(s *mqtt.Server, maxKeepalive uint16, maxPacketSize uint32, log *slog.Logger) *Limits {
	return &Limits{server: s, maxKeepalive: maxKeepalive, maxPacketSize: maxPacketSize, log: log}
}

// ID implements mqtt.Hook.
func (h *Limits) ID() string { return "limits" }

// Provides implements mqtt.Hook.
func (h *Limits) Provides(b byte) bool {
	return b == mqtt.OnConnect || b == mqtt.OnClientExpired || b == mqtt.OnPacketEncode
}

// maxMQTTPacket is the largest Maximum Packet Size MQTT 5 allows in
// CONNACK (the largest variable byte integer): strict clients such as
// Python paho refuse a CONNACK above it.
const maxMQTTPacket = 268435455

// OnPacketEncode completes the CONNACK properties mochi leaves out, so that
// an MQTT 5 client knows the limits it is held to (each within the range
// the spec allows, MQTT 5 section 3.2.2.3):
//   - Maximum Packet Size: the configured limit, at most 268,435,455 (the
//     seed config's 256 MB is one byte more; packets up to the configured
//     limit are still accepted); without it a client learns the limit only
//     by being disconnected with 0x95.
//   - Topic Alias Maximum: mochi accepts aliases up to its capability but
//     never says so, and a client may only use them when told
//     (MQTT-3.2.2-17).
//   - Retain Available 0 when retain is disabled (MQTT-3.2.2-13).
//
// mochi already sends Receive Maximum (1..65535), Maximum QoS (only when
// below 2), Server Keep Alive and the capped Session Expiry Interval.
func (h *Limits) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type != packets.Connack || pk.ReasonCode >= 0x80 || cl.Properties.ProtocolVersion != 5 {
		return pk
	}
	if h.maxPacketSize > 0 {
		pk.Properties.MaximumPacketSize = min(h.maxPacketSize, maxMQTTPacket)
	}
	caps := h.server.Options.Capabilities
	pk.Properties.TopicAliasMaximum = caps.TopicAliasMaximum
	if caps.RetainAvailable == 0 {
		pk.Properties.RetainAvailable, pk.Properties.RetainAvailableFlag = 0, true
	}
	return pk
}

// OnConnect applies max_keepalive the way Mosquitto does: an MQTT 5 client
// asking for more (or for none) is told the server's value in CONNACK; an
// MQTT 3.1.1 client cannot be told, so asking for more is refused with
// "identifier rejected".
func (h *Limits) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	ka := pk.Connect.Keepalive
	if h.maxKeepalive == 0 || (ka != 0 && ka <= h.maxKeepalive) {
		return nil
	}
	if cl.Properties.ProtocolVersion == 5 {
		cl.State.Keepalive = h.maxKeepalive
		cl.State.ServerKeepalive = true
		return nil
	}
	if ka == 0 {
		return nil // 3.1.1 keepalive 0 is legal and cannot be corrected
	}
	h.log.Info("connect refused: keepalive above max_keepalive", "client", cl.ID,
		"keepalive", ka, "max_keepalive", h.maxKeepalive)
	_ = h.server.SendConnack(cl, packets.ErrClientIdentifierNotValid, false, nil)
	return packets.ErrClientIdentifierNotValid
}

// OnClientExpired finishes what mochi's expiry leaves behind: it deletes
// the session from Clients but not its subscriptions or queued messages,
// which would otherwise leak (and keep matching) forever.
func (h *Limits) OnClientExpired(cl *mqtt.Client) {
	h.server.UnsubscribeClient(cl)
	cl.ClearInflights()
	h.log.Debug("session expired", "client", cl.ID)
}
