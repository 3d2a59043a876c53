package node

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestReconnectAfterDisconnectKeepsOrderReview: the client sends its last
// retained "online" behind QoS 1 retained publishes still being committed
// in its pipe, then DISCONNECT, and connects again at once on the same
// node and sets "new". The old read loop has ended (readers forgot it), so
// the new connection does not wait for the old pipe: "online" lands last.
func TestReconnectAfterDisconnectKeepsOrderReview(t *testing.T) {
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
		// Wait for the server to close the old connection (its read loop ended).
		_ = old.conn.SetReadDeadline(time.Now().Add(wait))
		_, _ = io.Copy(io.Discard, old.conn)
		time.Sleep(20 * time.Millisecond)
		busy := n1.pipeline.Busy()
		nc, _ := rawConnect(t, n1.Addr("mqtt"), id, true, 0)
		var b bytes.Buffer
		pubBytes(t, &b, status, 0, 0, "new", true, false)
		if _, err := nc.conn.Write(b.Bytes()); err != nil {
			t.Fatal(err)
		}
		testutil.Eventually(t, wait, func() error { return idle(n1) })
		if v, _ := retainedValue(n1, status); v != "new" {
			t.Errorf("round %d: %s retained %q after the reconnected client set \"new\" (old pipe busy at reconnect: %d)", round, status, v, busy)
		}
		_ = nc.conn.Close()
	}
}

// TestCleanTakeoverNotRefusedBySlowOldPipeReview: a persistent session
// with a retained will has many QoS 1 retained publishes in its pipe
// (each committed on its own); the client connects again on the same node
// with clean start. takeoverWill now waits up to the write timeout (5 s)
// for the old pipe, inside discardSession's 2 s bound: the discard then
// fails and the CONNECT is refused.
func TestCleanTakeoverNotRefusedBySlowOldPipeReview(t *testing.T) {
	cl := newTestCluster(t, "n1", "n2", "n3")
	cl.waitReady()
	var n1 *Node
	for _, n := range cl.nodes {
		if !n.repl.IsLeader() {
			n1 = n // a follower: each commit is a round trip to the leader
		}
	}
	id := "ct-dev"
	status := "ct/status"
	conn, err := net.DialTimeout("tcp", n1.Addr("mqtt"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	old := &rawClient{t: t, conn: conn}
	cp := packets.NewControlPacket(packets.CONNECT)
	cn := cp.Content.(*packets.Connect)
	cn.ClientID, cn.CleanStart, cn.KeepAlive = id, false, 30
	expiry := uint32(600)
	cn.Properties.SessionExpiryInterval = &expiry
	cn.WillFlag, cn.WillTopic, cn.WillMessage, cn.WillRetain = true, status, []byte("offline"), true
	old.send(cp)
	if ack := old.expect(packets.CONNACK).Content.(*packets.Connack); ack.ReasonCode != 0 {
		t.Fatal(ack)
	}
	var buf bytes.Buffer
	n := 1000
	for i := 0; i < n; i++ {
		pubBytes(t, &buf, fmt.Sprintf("ct/a/%d", i), 1, uint16(i+1), "a", true, false)
	}
	pubBytes(t, &buf, status, 0, 0, "online", true, false)
	go func() { _, _ = io.Copy(io.Discard, conn) }() // read the PUBACKs
	if _, err := conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	nc, ack := rawConnectAnswer(t, n1.Addr("mqtt"), id, true, 0)
	took := time.Since(start)
	busy := n1.pipeline.Busy()
	t.Logf("CONNACK 0x%02x after %v (pipes busy %d)", ack.ReasonCode, took, busy)
	start = time.Now()
	testutil.Eventually(t, 60*time.Second, func() error { return idle(n1) })
	t.Logf("old pipe drained %v later", time.Since(start))
	if ack.ReasonCode != 0 {
		t.Errorf("clean takeover refused: CONNACK 0x%02x after %v", ack.ReasonCode, took)
	}
	time.Sleep(time.Second)
	for nid, n := range cl.nodes {
		v, _ := retainedValue(n, status)
		l, _ := retainedValue(n, "ct/a/999")
		t.Logf("%s: %s retained %q, ct/a/999 %q", nid, status, v, l)
	}
	_ = nc.conn.Close()
}
