package hooks

import (
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/internal/session"
)

// TestSubscribeCodesAreMochis: internal/session spells the SUBACK reason
// codes without mochi; they must be the codes mochi itself sends.
func TestSubscribeCodesAreMochis(t *testing.T) {
	for _, c := range []struct {
		name                    string
		valid, allowed, obscure bool
		version                 byte
		want                    packets.Code
	}{
		{"invalid filter", false, false, false, 5, packets.ErrTopicFilterInvalid},
		{"not authorized", true, false, false, 5, packets.ErrNotAuthorized},
		{"not authorized, obscured", true, false, true, 5, packets.ErrUnspecifiedError},
		{"3.1.1 failure", false, false, false, 4, packets.ErrUnspecifiedError},
		{"granted QoS 2", true, true, false, 5, packets.CodeGrantedQos2},
	} {
		if got, _, _ := session.SubscribeCode(c.valid, c.allowed, c.obscure, 2, 2, c.version); got != c.want.Code {
			t.Errorf("%s: %#x, mochi's %#x", c.name, got, c.want.Code)
		}
	}
}
