package hooks

import (
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

func TestRenumberQueueRestoresPublishOrder(t *testing.T) {
	in := mqtt.NewInflights()
	// 40 messages queued within two seconds, packet ids wrapping past 65535.
	for i := range 40 {
		id := uint16((65520+i)%65535 + 1)
		in.Set(packets.Packet{PacketID: id, Created: 1000 + int64(i/20), Payload: []byte{byte(i)}})
	}
	renumberQueue(in, 1_800_000_000)
	for i, p := range in.GetAll(false) {
		if int(p.Payload[0]) != i {
			t.Fatalf("position %d holds message %d: %v", i, p.Payload[0], in.GetAll(false))
		}
	}
}
