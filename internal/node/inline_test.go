package node

import (
	"bytes"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/mqtt-ha/broker/hooks"
)

// TestInlineNeverHoldsTheReader: on a one-node broker whose FSM is behind
// its commit index (a slow apply; here the apply gate), a clean
// publisher's QoS 1 PUBLISH followed by PINGREQ. The PUBLISH must go to
// the pipe, whose barrier waits off the read loop: PINGRESP comes while
// the apply is still held, and the PUBLISH is acknowledged once it is
// released (found by review: when Pipeline.inline took the barrier on
// the reader, PINGRESP waited the whole write timeout, and the PUBLISH
// was refused after two). The write timeout is far longer than the wait
// for PINGRESP, so a held reader cannot pass.
func TestInlineNeverHoldsTheReader(t *testing.T) {
	g := newApplyGate(t)
	tc := newTunedCluster(t, func(c *Config) {
		g.tune(c)
		c.SessionsTuning = func(s *hooks.SessionsConfig) { s.Timeout = 5 * wait }
	}, "n1")
	tc.waitReady()
	n1 := tc.nodes["n1"]
	id := "n1"
	pub, _ := rawConnect(t, n1.Addr("mqtt"), "ib-pub", true, 0)
	g.node.Store(&id)
	_ = tc.client("n1", "ib-gate").TryPub(gateTopic, 0, true, []byte("g"))
	select {
	case <-g.reached:
	case <-time.After(wait):
		t.Fatal("the gate was never reached")
	}
	var buf bytes.Buffer
	pubBytes(t, &buf, "ib/x", 1, 1, "x", false, false)
	if _, err := packets.NewControlPacket(packets.PINGREQ).WriteTo(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := pub.conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	if cp := pub.next(); cp.Type != packets.PINGRESP { // within wait
		t.Fatalf("got %s while the apply was held, want PINGRESP", cp)
	}
	g.open()
	if a := pub.expect(packets.PUBACK).Content.(*packets.Puback); a.PacketID != 1 || a.ReasonCode != 0 {
		t.Fatalf("PUBACK %+v once the apply was released, want 0x00", a)
	}
}
