package node

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// retainedValue is n's committed retained value of topic.
func retainedValue(n *Node, topic string) (string, bool) {
	m, ok := n.repl.RetainedMessage(topic)
	return string(m.Payload), ok
}

// idle reports whether n's pipes and retained lanes are empty: every
// retained write it was given is written (or failed).
func idle(n *Node) error {
	if p := n.pipeline.Busy(); p != 0 {
		return fmt.Errorf("%d publish pipes busy", p)
	}
	if l, _ := n.retainedHook.LaneLen(); l != 0 {
		return fmt.Errorf("%d retained lanes busy", l)
	}
	return nil
}

// TestRetainedQoS0BurstKeepsLastValue: a publisher that replaces a
// retained value many times at QoS 0, back to back on one connection,
// leaves its last value retained, as Mosquitto does. Each QoS 0 retained
// write used to be committed on a goroutine of its own, in any order
// (300 writes left the 238th retained); now they go through the client's
// lane, in order (hooks/retained_lane.go).
func TestRetainedQoS0BurstKeepsLastValue(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	n1 := tc.nodes["n1"]
	pub, _ := rawConnect(t, n1.Addr("mqtt"), "rq0-pub", true, 0)
	const n = 300
	var buf bytes.Buffer
	for i := 1; i <= n; i++ {
		pubBytes(t, &buf, "rq0/state", 0, 0, fmt.Sprint(i), true, false)
	}
	pubBytes(t, &buf, "rq0/done", 1, 1, "x", false, false)
	if _, err := pub.conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	// Every QoS 0 write joined the lane before the QoS 1 PUBLISH was read.
	pub.expect(packets.PUBACK)
	testutil.Eventually(t, wait, func() error { return idle(n1) })
	if got, _ := retainedValue(n1, "rq0/state"); got != fmt.Sprint(n) {
		t.Fatalf("retained %q after publishing 1..%d at QoS 0, want %d", got, n, n)
	}
}

// TestWillAfterClientsLastRetainedWrites: a clean session sets its
// availability topic "online" (retained) while a QoS 1 retained publish
// before it is still being committed in its publish pipe, and drops: its
// retained will "offline" comes last, as on Mosquitto. mochi publishes the
// will as soon as the read loop ends, while the pipe still held "online"
// (review: the will committed first, 5 runs of 6); the will now waits for
// the pipe (Pipeline.AfterPublishes).
func TestWillAfterClientsLastRetainedWrites(t *testing.T) {
	for _, qos := range []byte{0, 1} {
		t.Run(fmt.Sprint("qos", qos), func(t *testing.T) {
			tc := newTestCluster(t, "n1")
			tc.waitReady()
			n1 := tc.nodes["n1"]
			conn, err := net.DialTimeout("tcp", n1.Addr("mqtt"), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			c := &rawClient{t: t, conn: conn}
			cp := packets.NewControlPacket(packets.CONNECT)
			cn := cp.Content.(*packets.Connect)
			cn.ClientID, cn.CleanStart, cn.KeepAlive = "wo-dev", true, 30
			cn.WillFlag, cn.WillTopic, cn.WillMessage, cn.WillRetain = true, "wo/status", []byte("offline"), true
			c.send(cp)
			if ack := c.expect(packets.CONNACK).Content.(*packets.Connack); ack.ReasonCode != 0 {
				t.Fatal(ack)
			}
			var buf bytes.Buffer
			pubBytes(t, &buf, "wo/a", 1, 1, "a", true, false) // keeps the pipe busy with a commit
			pubBytes(t, &buf, "wo/status", qos, 2, "online", true, false)
			if _, err := conn.Write(buf.Bytes()); err != nil {
				t.Fatal(err)
			}
			_ = conn.(*net.TCPConn).SetLinger(0)
			_ = conn.Close() // no DISCONNECT: the will is due
			testutil.Eventually(t, wait, func() error {
				if v, _ := retainedValue(n1, "wo/status"); v != "offline" {
					return fmt.Errorf("wo/status retained %q, want offline", v)
				}
				return idle(n1)
			})
		})
	}
}

// TestStopWithFullRetainedLane: a client floods retained QoS 0 writes while
// the node cannot commit (its state machine stalled), so its lane is full
// and its read loop waits for room; a graceful stop must not wait for the
// lane (review: "clients still draining" after 3 s): the drain ends the
// wait, and the writes that found no room fail.
func TestStopWithFullRetainedLane(t *testing.T) {
	g := newApplyGate(t)
	tc := newTunedCluster(t, g.tune, "n1")
	tc.waitReady()
	id := "n1"
	g.node.Store(&id)
	n1 := tc.nodes["n1"]
	pub, _ := rawConnect(t, n1.Addr("mqtt"), "sd-pub", true, 0)
	var buf bytes.Buffer
	pubBytes(t, &buf, gateTopic, 0, 0, "g", true, false)
	for i := 0; i < 3000; i++ {
		pubBytes(t, &buf, fmt.Sprintf("sd/%d", i), 0, 0, "v", true, false)
	}
	go func() { _, _ = pub.conn.Write(buf.Bytes()) }()
	select {
	case <-g.reached:
	case <-time.After(wait):
		t.Fatal("the gate's entry was not applied")
	}
	testutil.Eventually(t, wait, func() error {
		if l, q := n1.retainedHook.LaneLen(); l != 1 || q < 1024 {
			return fmt.Errorf("%d lanes, %d writes queued; want sd-pub's, full (1024)", l, q)
		}
		return nil
	})
	defer g.open()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	// Raft's own stop needs the state machine back; by then the clients'
	// drain has succeeded or failed.
	context.AfterFunc(ctx, g.open)
	if err := n1.Shutdown(ctx); err != nil {
		t.Fatalf("stop with a full retained lane: %v", err)
	}
}
