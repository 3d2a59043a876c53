package hooks

import (
	"errors"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/replication"
)

// errRefusedV311 is the stop cause of an MQTT 3.1.1 connection closed
// because one of its QoS 1/2 messages could not be stored durably.
var errRefusedV311 = errors.New("message not stored in the cluster's log: closing the MQTT 3.1.1 connection so that the client resends it")

// refusePublish answers a QoS 1/2 PUBLISH whose durable write failed
// (no quorum, a timeout, a message over --replicated-size-limit), so that
// the publisher is never left waiting for an acknowledgement that cannot
// come:
//   - MQTT 5: a negative acknowledgement at once, 0x97 (quota exceeded)
//     for a message too large to store, else 0x83 (implementation
//     specific), with a reason string; a PUBREC for QoS 2, because mochi
//     would answer a refused QoS 2 PUBLISH with a PUBACK, which a QoS 2
//     flow has no place for;
//   - MQTT 3.1.1 has no negative acknowledgement, and a client resends an
//     unacknowledged PUBLISH only on a new connection: the connection is
//     closed, and the client's reconnect resends it (the will, if any,
//     fires as for any connection the server closes).
//
// Acknowledging and dropping it, as Mosquitto does with a message over
// its size limit, would lose a message the client was told was stored.
func refusePublish(cl *mqtt.Client, pk packets.Packet, what string, err error) error {
	if cl.Properties.ProtocolVersion < 5 {
		cl.Stop(errRefusedV311)
		return packets.ErrRejectPacket
	}
	code := packets.ErrImplementationSpecificError
	if errors.Is(err, replication.ErrTooLarge) {
		code = packets.ErrQuotaExceeded
	}
	code.Reason = what + " not replicated: " + err.Error()
	if pk.FixedHeader.Qos == 2 {
		_ = cl.WritePacket(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Pubrec},
			PacketID:    pk.PacketID,
			ReasonCode:  code.Code,
			Properties:  packets.Properties{ReasonString: code.Reason},
		})
		return packets.ErrRejectPacket
	}
	return code
}
