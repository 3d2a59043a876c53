package node

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/mqtt-ha/broker/hooks"
	"github.com/mqtt-ha/broker/internal/testutil"
	"github.com/mqtt-ha/broker/replication"
)

// pubBytes appends the encoding of one PUBLISH to buf.
func pubBytes(t *testing.T, buf *bytes.Buffer, topic string, qos byte, id uint16, payload string, retain, dup bool) {
	t.Helper()
	cp := packets.NewControlPacket(packets.PUBLISH)
	p := cp.Content.(*packets.Publish)
	p.Topic, p.QoS, p.PacketID, p.Payload, p.Retain, p.Duplicate = topic, qos, id, []byte(payload), retain, dup
	if _, err := cp.WriteTo(buf); err != nil {
		t.Fatal(err)
	}
}

// drainSub reads what sub gets for d, completing QoS 1/2 flows, and counts
// each payload.
func drainSub(t *testing.T, sub *rawClient, d time.Duration) (order []string, count map[string]int) {
	t.Helper()
	count = map[string]int{}
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		_ = sub.conn.SetReadDeadline(deadline)
		cp, err := packets.ReadPacket(sub.conn)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				break
			}
			t.Fatalf("subscriber read: %v", err)
		}
		switch p := cp.Content.(type) {
		case *packets.Publish:
			order = append(order, string(p.Payload))
			count[string(p.Payload)]++
			switch p.QoS {
			case 1:
				ack := packets.NewControlPacket(packets.PUBACK)
				ack.Content.(*packets.Puback).PacketID = p.PacketID
				sub.send(ack)
			case 2:
				ack := packets.NewControlPacket(packets.PUBREC)
				ack.Content.(*packets.Pubrec).PacketID = p.PacketID
				sub.send(ack)
			}
		case *packets.Pubrel:
			comp := packets.NewControlPacket(packets.PUBCOMP)
			comp.Content.(*packets.Pubcomp).PacketID = p.PacketID
			sub.send(comp)
		}
	}
	return order, count
}

// TestReviewPipeQoS2PublisherDropsMidBatch: a persistent MQTT 5 publisher
// sends QoS 2 messages and its connection drops before the PUBRECs. It
// resumes its session and resends them (DUP), as MQTT requires. Each must
// reach the persistent subscriber exactly once.
func TestReviewPipeQoS2PublisherDropsMidBatch(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	addr := tc.nodes["n1"].Addr("mqtt")
	sub, _ := rawConnect(t, addr, "rv-sub", false, 600)
	sub.subscribe("rv/#", 2)

	const n = 50
	pub, _ := rawConnect(t, addr, "rv-pub", false, 600)
	var buf bytes.Buffer
	for i := 1; i <= n; i++ {
		pubBytes(t, &buf, "rv/t", 2, uint16(i), fmt.Sprint(i), false, false)
	}
	if _, err := pub.conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	_ = pub.conn.Close() // dropped before any PUBREC was read
	testutil.Eventually(t, wait, func() error {
		if cl, ok := tc.nodes["n1"].mqtt.Clients.Get("rv-pub"); ok && !cl.Closed() {
			return errors.New("the dropped connection is still open on n1")
		}
		return nil
	})

	pub2, _ := rawConnect(t, addr, "rv-pub", false, 600)
	buf.Reset()
	for i := 1; i <= n; i++ {
		pubBytes(t, &buf, "rv/t", 2, uint16(i), fmt.Sprint(i), false, true)
	}
	if _, err := pub2.conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	for recs, comps := 0, 0; recs < n || comps < n; {
		switch a := pub2.next().Content.(type) {
		case *packets.Pubrec:
			recs++
			rel := packets.NewControlPacket(packets.PUBREL)
			rel.Content.(*packets.Pubrel).PacketID = a.PacketID
			pub2.send(rel)
		case *packets.Pubcomp:
			comps++
		default:
			t.Fatalf("publisher got %v", a)
		}
	}
	_, count := drainSub(t, sub, 2*time.Second)
	var dups []string
	for i := 1; i <= n; i++ {
		if c := count[fmt.Sprint(i)]; c != 1 {
			dups = append(dups, fmt.Sprintf("%d:x%d", i, c))
		}
	}
	if len(dups) > 0 {
		t.Fatalf("QoS 2 messages not delivered exactly once: %v", dups)
	}
}

// TestReviewPipeRetainedQoS1ThenQoS0: a publisher sets a retained value at
// QoS 1 and replaces it at QoS 0 right after, on one connection. The last
// value must be the one retained.
func TestReviewPipeRetainedQoS1ThenQoS0(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	addr := tc.nodes["n1"].Addr("mqtt")
	pub, _ := rawConnect(t, addr, "rv-rpub", true, 0)
	var buf bytes.Buffer
	pubBytes(t, &buf, "rv/state", 1, 1, "old", true, false)
	pubBytes(t, &buf, "rv/state", 0, 0, "new", true, false)
	if _, err := pub.conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	pub.expect(packets.PUBACK)
	testutil.Eventually(t, wait, func() error {
		for _, m := range tc.nodes["n1"].repl.Retained() {
			if m.Topic == "rv/state" && string(m.Payload) == "new" {
				return nil
			}
		}
		return fmt.Errorf("the log holds %v", tc.nodes["n1"].repl.Retained())
	})
	sub, _ := rawConnect(t, addr, "rv-rsub", true, 0)
	sub.subscribe("rv/state", 1)
	got := string(sub.expect(packets.PUBLISH).Content.(*packets.Publish).Payload)
	var log string
	for _, m := range tc.nodes["n1"].repl.Retained() {
		log += fmt.Sprintf("%v ", m)
	}
	if got != "new" {
		t.Fatalf("retained value %q after publishing old (QoS 1) then new (QoS 0); log holds %s", got, log)
	}
}

// TestReviewPipeOrderQoS1ThenQoS0: a live subscriber gets one publisher's
// messages on one topic in publish order whatever their QoS (Mosquitto
// does; guarantee 8 "ordering per publisher").
func TestReviewPipeOrderQoS1ThenQoS0(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	addr := tc.nodes["n1"].Addr("mqtt")
	sub, _ := rawConnect(t, addr, "rv-osub", false, 600)
	sub.subscribe("rv/o", 1)
	pub, _ := rawConnect(t, addr, "rv-opub", true, 0)
	var buf bytes.Buffer
	pubBytes(t, &buf, "rv/o", 1, 1, "first", false, false)
	pubBytes(t, &buf, "rv/o", 0, 0, "second", false, false)
	if _, err := pub.conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	order, _ := drainSub(t, sub, time.Second)
	if fmt.Sprint(order) != "[first second]" {
		t.Fatalf("subscriber got %v", order)
	}
}

// TestReviewPipeQoS2ResendWhileQueued: a clean MQTT 5 publisher sends a
// QoS 2 message and, before its PUBREC, the same packet again (DUP). A
// persistent subscriber must get it once (mochi answers the second copy
// with 0x91 without the pipeline).
func TestReviewPipeQoS2ResendWhileQueued(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	addr := tc.nodes["n1"].Addr("mqtt")
	sub, _ := rawConnect(t, addr, "rv-dsub", false, 600)
	sub.subscribe("rv/d", 2)
	pub, _ := rawConnect(t, addr, "rv-dpub", true, 0)
	var buf bytes.Buffer
	for i := 1; i <= 10; i++ {
		pubBytes(t, &buf, "rv/d", 2, uint16(i), fmt.Sprint(i), false, false)
		pubBytes(t, &buf, "rv/d", 2, uint16(i), fmt.Sprint(i), false, true)
	}
	if _, err := pub.conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	var recs []string
	for i := 1; i <= 20; i++ {
		r := pub.expect(packets.PUBREC).Content.(*packets.Pubrec)
		recs = append(recs, fmt.Sprintf("%d/0x%02x", r.PacketID, r.ReasonCode))
	}
	for i := 1; i <= 10; i++ {
		rel := packets.NewControlPacket(packets.PUBREL)
		rel.Content.(*packets.Pubrel).PacketID = uint16(i)
		pub.send(rel)
	}
	_, count := drainSub(t, sub, 2*time.Second)
	var bad []string
	for i := 1; i <= 10; i++ {
		if c := count[fmt.Sprint(i)]; c != 1 {
			bad = append(bad, fmt.Sprintf("%d:x%d", i, c))
		}
	}
	if len(bad) > 0 {
		t.Fatalf("persistent subscriber got QoS 2 messages %v (PUBRECs %v)", bad, recs)
	}
}

// TestReviewPipeReceivedCount: $SYS / Info counts each PUBLISH read once,
// also when the publisher is gone before the hand-back.
func TestReviewPipeReceivedCount(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	n1 := tc.nodes["n1"]
	addr := n1.Addr("mqtt")
	sub, _ := rawConnect(t, addr, "rv-msub", false, 600)
	sub.subscribe("rv/m", 1)
	before := atomic.LoadInt64(&n1.mqtt.Info.MessagesReceived)
	pub, _ := rawConnect(t, addr, "rv-mpub", true, 0)
	const n = 50
	var buf bytes.Buffer
	for i := 1; i <= n; i++ {
		pubBytes(t, &buf, "rv/m", 1, uint16(i), fmt.Sprint(i), false, false)
	}
	if _, err := pub.conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	_ = pub.conn.Close()
	testutil.Eventually(t, wait, func() error {
		read := plainCounter(t, n1.reg, "broker_sessions_pipelined_publishes_total") // each was read
		if got := atomic.LoadInt64(&n1.mqtt.Info.MessagesReceived) - before; float64(got) != read || read != n {
			return fmt.Errorf("messages received grew by %d; %v PUBLISH packets were read (pipelined_publishes_total)", got, read)
		}
		return nil
	})
}

// TestReviewPipeTimeoutSharedAcrossBatch: large payloads (written by the
// hooks, each with its own, size-scaled deadline) in front of small ones
// in one batch: the small ones must get the write timeout too, not what
// is left of the batch's.
func TestReviewPipeTimeoutSharedAcrossBatch(t *testing.T) {
	tc := newTunedCluster(t, func(c *Config) {
		c.SessionsTuning = func(s *hooks.SessionsConfig) { s.Timeout = 1500 * time.Millisecond }
	}, "n1")
	tc.waitReady()
	addr := tc.nodes["n1"].Addr("mqtt")
	sub, _ := rawConnect(t, addr, "rv-tsub", false, 600)
	sub.subscribe("rv/big", 1)
	pub, _ := rawConnect(t, addr, "rv-tpub", true, 0)
	var buf bytes.Buffer
	const large = 4
	for i := 1; i <= large; i++ {
		pubBytes(t, &buf, "rv/big", 1, uint16(i), fmt.Sprint(i)+string(bytes.Repeat([]byte("L"), 3<<20)), false, false)
	}
	pubBytes(t, &buf, "rv/big", 1, large+1, "small", false, false)
	start := time.Now()
	go func() { _, _ = pub.conn.Write(buf.Bytes()) }()
	var codes []string
	var last byte
	for i := 1; i <= large+1; i++ {
		a := pub.expect(packets.PUBACK).Content.(*packets.Puback)
		last = a.ReasonCode
		codes = append(codes, fmt.Sprintf("%d:0x%02x@%v", a.PacketID, a.ReasonCode, time.Since(start).Round(time.Millisecond)))
	}
	for _, c := range codes[:large] {
		t.Log(c)
	}
	if last != 0 {
		t.Fatalf("small message after %d large ones refused: %v", large, codes)
	}
}

// TestReviewPipeBatchIgnoresCommandErr: a persistent QoS 2 publisher whose
// session is gone from the log (here deleted directly, as an operator's
// delete racing its Connected check would) gets its QoS2Publish refused
// by the FSM (ErrNoSession). Alone (one command, Node.Apply returns the
// error) the publisher gets 0x83; inside a Batch the per-command Err is
// ignored and Changed=false reads as "duplicate": PUBREC 0x00, and the
// message is delivered to nobody.
func TestReviewPipeBatchIgnoresCommandErr(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	n1 := tc.nodes["n1"]
	addr := n1.Addr("mqtt")
	sub, _ := rawConnect(t, addr, "rv-esub", true, 0) // clean: mochi delivers
	sub.subscribe("rv/e", 2)
	pub, _ := rawConnect(t, addr, "rv-epub", false, 600)
	s, ok := n1.repl.Session("rv-epub")
	if !ok {
		t.Fatal("no session")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if res, err := n1.repl.Apply(ctx, &replication.SessionDelete{ClientID: "rv-epub", IfOpened: s.OpenedIndex}); err != nil || !res.Changed {
		t.Fatalf("delete: %v %v", res, err)
	}
	const n = 20
	var buf bytes.Buffer
	for i := 1; i <= n; i++ {
		pubBytes(t, &buf, "rv/e", 2, uint16(i), fmt.Sprint(i), false, false)
	}
	if _, err := pub.conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	acked := map[string]bool{}
	var codes []string
	for i := 1; i <= n; i++ {
		r := pub.expect(packets.PUBREC).Content.(*packets.Pubrec)
		codes = append(codes, fmt.Sprintf("%d/0x%02x", r.PacketID, r.ReasonCode))
		if r.ReasonCode < 0x80 {
			acked[fmt.Sprint(r.PacketID)] = true
		}
	}
	_, count := drainSub(t, sub, 2*time.Second)
	var lost []string
	for id := range acked {
		if count[id] == 0 {
			lost = append(lost, id)
		}
	}
	if len(lost) > 0 {
		t.Fatalf("acknowledged (PUBREC < 0x80) but delivered to nobody: %d of %d; PUBRECs %v", len(lost), n, codes)
	}
}
