package e2e

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// TestPreConnectFlood: a node with the default message_size_limit (256 MB)
// takes three waves of 40 TCP and 10 WebSocket sockets that each send only
// the fixed header of a CONNECT declaring 268,435,455 bytes. It closes
// every one (refused from the header, counted as connect_too_large), its
// resident memory never grows by more than 64 MB, and mosquitto_pub and
// mosquitto_sub are served while the flood is on.
func TestPreConnectFlood(t *testing.T) {
	t.Parallel()
	const (
		waves      = 3
		tcpPerWave = 40
		wsPerWave  = 10
		rssBound   = 64 << 20
	)
	wsAddr := freeAddr(t)
	b := startBroker(t, "--ws-addr", wsAddr, "--connect-timeout", "2s")
	sub := b.sub(t, "-q", "1", "-t", "e2e/flood/+", "-C", strconv.Itoa(waves))

	rss := func() int64 {
		t.Helper()
		v, err := b.RSS()
		if err != nil {
			t.Fatalf("broker %s: %v", b.ID, err)
		}
		return v
	}
	base := rss()
	peak := base
	header := []byte{0x10, 0xFF, 0xFF, 0xFF, 0x7F} // CONNECT, remaining length 268,435,455
	var want []message
	for w := range waves {
		var closed atomic.Int64
		// flood sends the header on c and counts c once the node closes it.
		flood := func(c net.Conn) {
			t.Cleanup(func() { _ = c.Close() })
			if _, err := c.Write(header); err != nil {
				t.Fatalf("wave %d: write header: %v", w, err)
			}
			_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
			go func() {
				_, err := io.Copy(io.Discard, c)
				if ne := net.Error(nil); !errors.As(err, &ne) || !ne.Timeout() {
					closed.Add(1)
				}
			}()
		}
		for range tcpPerWave {
			flood(dialTCP(t, b.MQTTAddr))
		}
		for range wsPerWave {
			flood(dialWS(t, "ws://"+wsAddr+"/mqtt"))
		}
		topic := fmt.Sprintf("e2e/flood/%d", w)
		b.mustPub(t, "-q", "1", "-t", topic, "-m", "served during the flood")
		want = append(want, msg(topic, 1, false, "served during the flood"))
		eventually(t, 10*time.Second, func() error {
			peak = max(peak, rss())
			if grown := peak - base; grown > rssBound {
				t.Fatalf("wave %d: RSS grew by %d MB (bound %d MB): %d MB before the flood, %d MB now",
					w, grown>>20, rssBound>>20, base>>20, peak>>20)
			}
			if k := closed.Load(); k < tcpPerWave+wsPerWave {
				return fmt.Errorf("wave %d: %d of %d flooding sockets still open (RSS %d MB before the flood, peak %d MB)",
					w, tcpPerWave+wsPerWave-k, tcpPerWave+wsPerWave, base>>20, peak>>20)
			}
			return nil
		})
	}
	t.Logf("RSS before the flood %d MB, peak %d MB (grew %d KB)", base>>20, peak>>20, (peak-base)>>10)
	assertMessages(t, sub.wait(t), want...)
	b.eventuallyMetric(t, waves*(tcpPerWave+wsPerWave), packetErrors, "reason", "connect_too_large")
	b.assertServing(t)
}
