package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/internal/testutil"
	"github.com/mqtt-ha/broker/replication"
)

// TestSubscribeGetsEveryRetainedMessage: mochi queues the retained
// messages that match a new subscription without waiting and drops what
// does not fit in the client's outbound queue, so a subscriber to a
// filter with more retained messages than the queue holds lost some
// (mosquitto_sub on a default node: 14,075 and 18,105 of 20,000; Mosquitto
// sends them all). hooks.RetainPacer paces them. The queue is made small
// here so that a thousand messages are far more than it holds. A
// persistent session gets its QoS 0 retained copies from its pump, whose
// queue (1,024) dropped the rest the same way (found by review: 1,665 of
// 5,000).
func TestSubscribeGetsEveryRetainedMessage(t *testing.T) {
	const n = 3000
	c := newTunedCluster(t, func(cfg *Config) { cfg.MaxPendingWrites = 16 }, "n1")
	c.waitReady()
	msgs := make(map[string][]byte, n)
	for i := range n {
		msgs[fmt.Sprintf("rp/%d/%d", i/100, i)] = []byte(fmt.Sprint(i))
	}
	seedRetained(t, c, msgs)
	for _, tc := range []struct {
		name       string
		qos        byte
		persistent bool
	}{{"clean-qos0", 0, false}, {"clean-qos1", 1, false}, {"persistent", 1, true}} {
		opts := testutil.ClientOptions{ID: "rp-" + tc.name, CleanStart: true, Buffer: 2 * n}
		if tc.persistent {
			opts.CleanStart, opts.SessionExpiry = false, 300
		}
		sub := testutil.Connect(t, c.nodes["n1"].Addr("mqtt"), opts)
		sub.Sub(t, tc.qos, "rp/#")
		seen := map[string]bool{}
		for len(seen) < n {
			m, err := sub.Next(5 * time.Second)
			if err != nil {
				t.Fatalf("%s: %d of %d retained messages arrived: %v", tc.name, len(seen), n, err)
			}
			if !m.Retain {
				t.Fatalf("%s: %s arrived without the retain flag", tc.name, m.Topic)
			}
			seen[m.Topic] = true
		}
		sub.Close()
	}
}

// seedRetained stores msgs as retained QoS 0 values through the log and
// waits until mochi's index on n1 holds them.
func seedRetained(t *testing.T, c *testCluster, msgs map[string][]byte) {
	t.Helper()
	var cmds []replication.Command
	for tp, p := range msgs {
		cmds = append(cmds, &replication.RetainSet{Msg: replication.RetainedMessage{Topic: tp, Payload: p}})
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	for len(cmds) > 0 {
		k := min(len(cmds), 100)
		if _, err := c.nodes["n1"].repl.Apply(ctx, &replication.Batch{Commands: cmds[:k]}); err != nil {
			t.Fatal(err)
		}
		cmds = cmds[k:]
	}
	testutil.Eventually(t, wait, func() error {
		if got := len(c.nodes["n1"].mqtt.Topics.Messages("#")); got < len(msgs) {
			return fmt.Errorf("%d of %d retained messages in mochi's store", got, len(msgs))
		}
		return nil
	})
}

// TestRetainPacerLetsKeepaliveReapDeadSubscriber: the pacer waits on the
// subscriber's read loop, where mochi's keepalive deadline lives. A
// subscriber that reads nothing must still be dropped about when its
// keepalive says (found by review: still connected after 12 s with a 2 s
// keepalive, when the wait was 10 s per message).
func TestRetainPacerLetsKeepaliveReapDeadSubscriber(t *testing.T) {
	c := newTunedCluster(t, func(cfg *Config) { cfg.MaxPendingWrites = 16 }, "n1")
	c.waitReady()
	m := map[string][]byte{}
	for i := range 1000 {
		m[fmt.Sprintf("dead/%d", i)] = []byte(strings.Repeat("d", 16<<10))
	}
	seedRetained(t, c, m)
	conn, err := net.Dial("tcp", c.nodes["n1"].Addr("mqtt"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.(*net.TCPConn).SetReadBuffer(4096)
	// MQTT 5 CONNECT (client "dead", keepalive 2 s), then SUBSCRIBE dead/#;
	// nothing is read after that.
	connect := []byte{0x10, 0x11, 0, 4, 'M', 'Q', 'T', 'T', 5, 2, 0, 2, 0, 0, 4, 'd', 'e', 'a', 'd'}
	sub := []byte{0x82, 0x0C, 0, 1, 0, 0, 6, 'd', 'e', 'a', 'd', '/', '#', 0}
	if _, err := conn.Write(connect); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, wait, func() error {
		if _, ok := c.nodes["n1"].mqtt.Clients.Get("dead"); !ok {
			return errors.New("not connected yet")
		}
		return nil
	})
	if _, err := conn.Write(sub); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	testutil.Eventually(t, 10*time.Second, func() error {
		if cl, ok := c.nodes["n1"].mqtt.Clients.Get("dead"); ok && !cl.Closed() {
			return fmt.Errorf("the silent subscriber is still connected after %v", time.Since(start).Round(time.Second))
		}
		return nil
	})
}

// TestRetainPacerCountsTooLargeMessages: retained messages over the
// client's Maximum Packet Size are taken by the write loop and refused
// before they are written; the pacer must count them as taken (found by
// review: each one after the window waited 10 s, and the client gave up on
// its PINGREQ).
func TestRetainPacerCountsTooLargeMessages(t *testing.T) {
	c := newTunedCluster(t, func(cfg *Config) { cfg.MaxPendingWrites = 16 }, "n1")
	c.waitReady()
	m := map[string][]byte{}
	for i := range 20 {
		m[fmt.Sprintf("big/%d", i)] = []byte(strings.Repeat("b", 2000))
	}
	for i := range 5 {
		m[fmt.Sprintf("small/%d", i)] = []byte("s")
	}
	seedRetained(t, c, m)
	conn, err := net.Dial("tcp", c.nodes["n1"].Addr("mqtt"))
	if err != nil {
		t.Fatal(err)
	}
	msgs := make(chan *paho.Publish, 100)
	cl := paho.NewClient(paho.ClientConfig{ClientID: "ovsub", Conn: packets.NewThreadSafeConn(conn),
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			msgs <- pr.Packet
			return true, nil
		}}})
	mps := uint32(1000)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, err := cl.Connect(ctx, &paho.Connect{ClientID: "ovsub", KeepAlive: 30, CleanStart: true,
		Properties: &paho.ConnectProperties{MaximumPacketSize: &mps}}); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cl.Disconnect(&paho.Disconnect{}) }()
	start := time.Now()
	if _, err := cl.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "big/#"}, {Topic: "small/#"}}}); err != nil {
		t.Fatal(err)
	}
	for got := 0; got < 5; got++ {
		select {
		case <-msgs:
		case <-time.After(5 * time.Second):
			t.Fatalf("%d of the 5 small retained messages after %v", got, time.Since(start).Round(time.Second))
		}
	}
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer scancel()
	if _, err := cl.Subscribe(sctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "nothing"}}}); err != nil {
		t.Fatalf("the next SUBSCRIBE was not answered: %v", err)
	}
}
