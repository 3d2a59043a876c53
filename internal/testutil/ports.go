package testutil

import (
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
)

// FreeAddr returns a 127.0.0.1 address whose port is free for both TCP and
// UDP (gossip binds both) at the time of the call. Ports come from below
// Linux's ephemeral range (32768-60999): a port picked by listening on ":0"
// is an ephemeral one, which any outgoing connection of a parallel test may
// take before the broker binds it. Callers still retry on "address already
// in use": another test process may pick the same port.
func FreeAddr() (string, error) {
	for range 200 {
		port := 20000 + rand.IntN(12000)
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		tl, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		ul, err := net.ListenPacket("udp", addr)
		_ = tl.Close()
		if err != nil {
			continue
		}
		_ = ul.Close()
		return addr, nil
	}
	return "", fmt.Errorf("no free port found in 20000-31999")
}
