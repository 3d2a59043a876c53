package node

import (
	"fmt"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestStuckSubscriberDoesNotStallForwarding: mochi's write loop holds a
// client's lock while its write to a full socket blocks, and delivering a
// QoS 1/2 message to that client takes the same lock. A subscriber that
// stopped reading then stalled the goroutine delivering one to it: for a
// message forwarded from a peer node, every later message from that peer
// (found by review: a healthy subscriber on the same node got nothing for
// as long as the stuck connection lived, 1.5 × keepalive). The write
// timeout closes the stuck connection, and forwarding goes on.
func TestStuckSubscriberDoesNotStallForwarding(t *testing.T) {
	_, healthy, pub := stuckSubscriber(t)
	// A QoS 1 message for the stuck subscriber, then one for the healthy
	// one, forwarded after it on the same peer connection.
	pub.Pub(t, "hol/b", 1, false, []byte("q1"))
	pub.Pub(t, "other/x", 0, false, []byte("hello"))
	if _, err := healthy.Next(wait); err != nil {
		t.Fatalf("the healthy subscriber on n2 got nothing from n1 while another subscriber there is stuck: %v\n%s",
			err, testutil.Goroutines())
	}
}

// stuckSubscriber starts n1 and n2 with a 1 s write timeout and a 16-packet
// outbound queue, connects to n2 a subscriber to hol/# that never reads
// ("stuck") and a healthy one to other/#, and fills the stuck one's socket
// from a publisher on n1 with QoS 0 (whose delivery never waits) until
// mochi's write loop blocks writing to it.
func stuckSubscriber(t *testing.T) (stuck *rawClient, healthy, pub *testutil.Client) {
	t.Helper()
	c := newTunedCluster(t, func(cfg *Config) {
		cfg.WriteTimeout = time.Second
		cfg.MaxPendingWrites = 16 // the queue fills with few messages
	}, "n1", "n2")
	c.waitReady()
	n1, n2 := c.nodes["n1"], c.nodes["n2"]
	stuck, _ = rawConnect(t, n2.Addr("mqtt"), "stuck", true, 0)
	_ = stuck.conn.(*net.TCPConn).SetReadBuffer(4 << 10)
	stuck.subscribe("hol/#", 1) // and never reads again
	healthy = testutil.Connect(t, n2.Addr("mqtt"), testutil.ClientOptions{ID: "healthy", CleanStart: true, Buffer: 16})
	healthy.Sub(t, 0, "other/#")
	c.waitRoutes(t, "n1", "n2", 2)

	pub = testutil.Connect(t, n1.Addr("mqtt"), testutil.ClientOptions{ID: "pub", CleanStart: true})
	big := []byte(strings.Repeat("x", 16<<10))
	deadline := time.Now().Add(wait)
	for i := 0; !writeLoopBlocked(); i++ {
		if time.Now().After(deadline) {
			t.Fatalf("no write loop blocked on a full socket after %d messages", i)
		}
		pub.Pub(t, fmt.Sprintf("hol/a/%d", i), 0, false, big)
	}
	return stuck, healthy, pub
}

// writeLoopBlocked reports whether a mochi write loop is blocked writing to
// a full socket (the only one here is the stuck subscriber's: the others
// read what they get).
func writeLoopBlocked() bool {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "(*Client).WriteLoop") && strings.Contains(g, "waitWrite") {
			return true
		}
	}
	return false
}

// TestStuckSubscriberThatPublishesIsCutOff: as
// TestStuckSubscriberDoesNotStallForwarding, but the stuck subscriber keeps
// publishing QoS 0 telemetry (its receive path stuck, its send path not).
// mochi's read loop sets the deadlines before every packet it reads, which
// moved the blocked write's deadline past the write timeout (found by
// review).
func TestStuckSubscriberThatPublishesIsCutOff(t *testing.T) {
	stuck, healthy, pub := stuckSubscriber(t)
	stop := make(chan struct{})
	defer close(stop)
	go func() { // telemetry from the stuck device, QoS 0, every 200 ms
		for {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			cp := packets.NewControlPacket(packets.PUBLISH)
			p := cp.Content.(*packets.Publish)
			p.Topic, p.Payload = "tele/stuck", []byte("t")
			_ = stuck.conn.SetWriteDeadline(time.Now().Add(time.Second))
			_, _ = cp.WriteTo(stuck.conn)
		}
	}()
	pub.Pub(t, "hol/b", 1, false, []byte("q1"))
	pub.Pub(t, "other/x", 0, false, []byte("hello"))
	start := time.Now()
	if _, err := healthy.Next(wait); err != nil {
		t.Fatalf("healthy subscriber got nothing for %v (write timeout 1s) while the stuck subscriber publishes QoS 0: %v",
			time.Since(start), err)
	}
}
