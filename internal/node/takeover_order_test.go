package node

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/mqtt-ha/broker/hooks"
	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestReconnectAfterDisconnectKeepsOrder: the client sends its last
// retained "online" behind QoS 1 retained publishes still being committed
// in its pipe, then DISCONNECT, and connects again at once on the same
// node and sets "new". The old read loop has ended by then; the new
// connection's first publish must still wait for the old pipe (found by
// review: "online" landed last in 3 runs of 3 when only live readers were
// waited for).
func TestReconnectAfterDisconnectKeepsOrder(t *testing.T) {
	cl := newTestCluster(t, "n1")
	cl.waitReady()
	n1 := cl.nodes["n1"]
	for round := 0; round < 3; round++ {
		id := fmt.Sprintf("rd-dev-%d", round)
		status := fmt.Sprintf("rd/%d/status", round)
		old, _ := rawConnect(t, n1.Addr("mqtt"), id, true, 0)
		var buf bytes.Buffer
		for i := 0; i < 200; i++ {
			pubBytes(t, &buf, fmt.Sprintf("rd/%d/a/%d", round, i), 1, uint16(i+1), "a", true, false)
		}
		pubBytes(t, &buf, status, 0, 0, "online", true, false)
		if _, err := packets.NewControlPacket(packets.DISCONNECT).WriteTo(&buf); err != nil {
			t.Fatal(err)
		}
		if _, err := old.conn.Write(buf.Bytes()); err != nil {
			t.Fatal(err)
		}
		// Until the server closes the old connection: its read loop ended.
		_ = old.conn.SetReadDeadline(time.Now().Add(wait))
		_, _ = io.Copy(io.Discard, old.conn)
		nc, _ := rawConnect(t, n1.Addr("mqtt"), id, true, 0)
		var b bytes.Buffer
		pubBytes(t, &b, status, 0, 0, "new", true, false)
		if _, err := nc.conn.Write(b.Bytes()); err != nil {
			t.Fatal(err)
		}
		testutil.Eventually(t, wait, func() error {
			if v, _ := retainedValue(n1, status); v != "new" {
				return fmt.Errorf("round %d: %s retained %q, want the reconnected client's \"new\"", round, status, v)
			}
			return idle(n1)
		})
		_ = nc.conn.Close()
	}
}

// TestCleanTakeoverWithBacklog: a device's connection with a retained
// will has a backlog of 800 QoS 1 retained publishes in its pipe (each
// committed on its own, from a follower), then its "online"; the device
// connects again on the same node with clean start. The CONNECT is
// accepted, and the old connection's will comes after its "online", as
// on Mosquitto. Waiting for the backlog inside the open's or the clean
// discard's time budget made them fail: CONNACK 0x88 (found by review).
// With late, the client's last 400 publishes and its "online" reach the
// old connection only after the new CONNECT arrived: the old reader reads
// them while the takeover waits, and the will must still come after them
// (CI failed twice, "online" left, when only what the pipe held at the
// CONNECT's arrival was waited for).
func TestCleanTakeoverWithBacklog(t *testing.T) {
	for _, tc := range []struct {
		name       string
		persistent bool // the old session outlives its connection
		newWill    bool // the new connection has a will too
		late       bool // the backlog's tail is sent after the CONNECT
	}{
		{name: "persistent", persistent: true},
		{name: "clean"},
		{name: "clean/new-will", newWill: true},
		{name: "persistent/late", persistent: true, late: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// The takeover waits at most the write timeout for the
			// backlog, which took up to 4.2 s of the default 5 s with the
			// race detector: a longer one keeps this test about order, not
			// about the machine's speed.
			cl := newTunedCluster(t, func(c *Config) {
				c.SessionsTuning = func(s *hooks.SessionsConfig) { s.Timeout = 20 * time.Second }
			}, "n1", "n2", "n3")
			cl.waitReady()
			_, f := cl.leaderAndFollower(t)
			n1 := cl.nodes[f] // a follower: each commit is a round trip to the leader
			id, status := "bl-dev", "bl/status"
			send := func(clean, will bool) *rawClient {
				conn, err := net.DialTimeout("tcp", n1.Addr("mqtt"), 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = conn.Close() })
				c := &rawClient{t: t, conn: conn}
				cp := packets.NewControlPacket(packets.CONNECT)
				cn := cp.Content.(*packets.Connect)
				cn.ClientID, cn.CleanStart, cn.KeepAlive = id, clean, 30
				if !clean {
					expiry := uint32(600)
					cn.Properties.SessionExpiryInterval = &expiry
				}
				if will {
					cn.WillFlag, cn.WillTopic, cn.WillMessage, cn.WillRetain = true, status, []byte("offline"), true
				}
				c.send(cp)
				return c
			}
			connect := func(clean, will bool) (*rawClient, *packets.Connack) {
				c := send(clean, will)
				return c, c.expect(packets.CONNACK).Content.(*packets.Connack)
			}
			old, ack := connect(!tc.persistent, true)
			if ack.ReasonCode != 0 {
				t.Fatal(ack)
			}
			var buf bytes.Buffer
			// About 3 s of commits here, more than a clean start's 2 s
			// discard budget and less than the write timeout.
			for i := 0; i < 800; i++ {
				pubBytes(t, &buf, fmt.Sprintf("bl/a/%d", i), 1, uint16(i+1), "a", true, false)
			}
			pubBytes(t, &buf, status, 0, 0, "online", true, false)
			head, tail := buf.Bytes(), []byte(nil)
			if tc.late {
				n := buf.Len() * 400 / 800 // about 400 publishes: the cut need not fall between two
				head, tail = head[:n], head[n:]
			}
			go func() { _, _ = io.Copy(io.Discard, old.conn) }() // the PUBACKs
			_ = old.conn.SetWriteDeadline(time.Time{})
			go func() { _, _ = old.conn.Write(head) }()
			testutil.Eventually(t, wait, func() error {
				if n1.pipeline.Busy() == 0 {
					return fmt.Errorf("the old connection's pipe is idle")
				}
				return nil
			})
			start := time.Now()
			nc := send(true, tc.newWill)
			if tc.late {
				// mochi counts the new connection just before its
				// OnSessionEstablish; the head's commits take over a second.
				testutil.Eventually(t, wait, func() error {
					if c := atomic.LoadInt64(&n1.mqtt.Info.ClientsConnected); c < 2 {
						return fmt.Errorf("%d connections, want the new one too", c)
					}
					return nil
				})
				if _, err := old.conn.Write(tail); err != nil {
					t.Fatal(err)
				}
			}
			ack = nc.expect(packets.CONNACK).Content.(*packets.Connack)
			t.Logf("CONNACK 0x%02x after %v", ack.ReasonCode, time.Since(start))
			if ack.ReasonCode != 0 {
				t.Fatalf("clean takeover refused: CONNACK 0x%02x", ack.ReasonCode)
			}
			testutil.Eventually(t, 6*wait, func() error {
				if v, _ := retainedValue(n1, status); v != "offline" {
					return fmt.Errorf("%s retained %q, want the old connection's will after its \"online\"", status, v)
				}
				return idle(n1)
			})
		})
	}
}

// TestTakeoverChainWaitsForEveryOlderConnection: A sends a backlog of QoS
// 1 retained writes, its "online" and DISCONNECT; the client connects (B)
// and disconnects at once, then connects again (C) and sets "new". C's
// first publish must wait for A's pipe too: B being done says nothing of
// A (found by review: "online" was left in 3 rounds of 3 when only the
// newest older connection was waited for).
func TestTakeoverChainWaitsForEveryOlderConnection(t *testing.T) {
	cl := newTestCluster(t, "n1")
	cl.waitReady()
	n1 := cl.nodes["n1"]
	for round := 0; round < 3; round++ {
		id := fmt.Sprintf("ch-dev-%d", round)
		status := fmt.Sprintf("ch/%d/status", round)
		a, _ := rawConnect(t, n1.Addr("mqtt"), id, true, 0)
		var buf bytes.Buffer
		for i := 0; i < 300; i++ {
			pubBytes(t, &buf, fmt.Sprintf("ch/%d/a/%d", round, i), 1, uint16(i+1), "a", true, false)
		}
		pubBytes(t, &buf, status, 0, 0, "online", true, false)
		if _, err := packets.NewControlPacket(packets.DISCONNECT).WriteTo(&buf); err != nil {
			t.Fatal(err)
		}
		if _, err := a.conn.Write(buf.Bytes()); err != nil {
			t.Fatal(err)
		}
		_ = a.conn.SetReadDeadline(time.Now().Add(wait))
		_, _ = io.Copy(io.Discard, a.conn)
		b, _ := rawConnect(t, n1.Addr("mqtt"), id, true, 0)
		b.send(packets.NewControlPacket(packets.DISCONNECT))
		_ = b.conn.SetReadDeadline(time.Now().Add(wait))
		_, _ = io.Copy(io.Discard, b.conn)
		c, _ := rawConnect(t, n1.Addr("mqtt"), id, true, 0)
		var bb bytes.Buffer
		pubBytes(t, &bb, status, 0, 0, "new", true, false)
		if _, err := c.conn.Write(bb.Bytes()); err != nil {
			t.Fatal(err)
		}
		testutil.Eventually(t, 3*wait, func() error {
			if v, _ := retainedValue(n1, status); v != "new" {
				return fmt.Errorf("round %d: %s retained %q, want C's \"new\" after A's \"online\"", round, status, v)
			}
			return idle(n1)
		})
		_ = c.conn.Close()
	}
}

// TestTakeoverWithoutWillDoesNotWaitForBacklog: a takeover of a connection
// without a will has no will to order, so its CONNACK does not wait for
// the old connection's backlog (only its first publish does): CONNACK
// comes while the old pipe still holds messages. It used to wait for the
// backlog, up to the write timeout (found by review: 5 s).
func TestTakeoverWithoutWillDoesNotWaitForBacklog(t *testing.T) {
	cl := newTestCluster(t, "n1", "n2", "n3")
	cl.waitReady()
	_, f := cl.leaderAndFollower(t)
	n1 := cl.nodes[f] // a follower: each commit is a round trip to the leader
	id := "dl-dev"
	a, _ := rawConnect(t, n1.Addr("mqtt"), id, true, 0)
	var buf bytes.Buffer
	for i := 0; i < 1000; i++ {
		pubBytes(t, &buf, fmt.Sprintf("dl/a/%d", i), 1, uint16(i+1), "a", true, false)
	}
	go func() { _, _ = io.Copy(io.Discard, a.conn) }() // the PUBACKs
	_ = a.conn.SetWriteDeadline(time.Time{})
	go func() { _, _ = a.conn.Write(buf.Bytes()) }()
	testutil.Eventually(t, wait, func() error {
		if n1.pipeline.Busy() == 0 {
			return fmt.Errorf("the old connection's pipe is idle")
		}
		return nil
	})
	rawConnect(t, n1.Addr("mqtt"), id, true, 0)
	if n1.pipeline.Busy() == 0 {
		t.Fatal("CONNACK came only once the old connection's backlog was written")
	}
	testutil.Eventually(t, 6*wait, func() error { return idle(n1) })
}
