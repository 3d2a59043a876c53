package hooks

import (
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Acks fixes the acknowledgements mochi builds for QoS 1 and 2 (PUBACK,
// PUBREC, PUBREL, PUBCOMP). mochi copies the acknowledged packet's
// properties into them, user properties included, and puts the granted
// QoS (0x01, 0x02: SUBACK codes) in the reason code, which it encodes only
// when there are properties. A client then receives a PUBACK with reason
// code 0x01 and someone else's user properties: the Eclipse Paho test
// client and Python paho reject it. Mosquitto sends neither. User
// properties of an acknowledgement are the sender's own (MQTT 5 section
// 3.4.2.2.3), so they are dropped here, and a success is 0x00.
type Acks struct {
	mqtt.HookBase
}

// ID implements mqtt.Hook.
func (h *Acks) ID() string { return "acks" }

// Provides implements mqtt.Hook.
func (h *Acks) Provides(b byte) bool { return b == mqtt.OnPacketEncode }

// OnPacketEncode implements mqtt.Hook.
func (h *Acks) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	switch pk.FixedHeader.Type {
	case packets.Puback, packets.Pubrec, packets.Pubrel, packets.Pubcomp:
	default:
		return pk
	}
	pk.Properties.User = nil
	if pk.ReasonCode == packets.CodeGrantedQos1.Code || pk.ReasonCode == packets.CodeGrantedQos2.Code {
		pk.ReasonCode = packets.CodeSuccess.Code
	}
	return pk
}
