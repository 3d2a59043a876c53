package cluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// expectClosed waits until the server closes c (reads return an error).
func expectClosed(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, c); err != nil && !errors.Is(err, net.ErrClosed) {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("server kept the connection open")
		}
	}
}

func rawDial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// intruder is a Mux that is not part of any Node: it speaks the protocol,
// so it can reach the frame layer of a node and misbehave there.
func intruder(t *testing.T, key []byte) *Mux {
	t.Helper()
	m, err := newMetrics(prometheus.NewRegistry(), newRouteTable("intruder", 1))
	if err != nil {
		t.Fatal(err)
	}
	return newMux("intruder", key, nil, time.Second, time.Second, testLogger(t), m)
}

func TestJunkOnClusterPortIsDroppedAndCounted(t *testing.T) {
	nodes := startCluster(t, 2)
	n1, n2 := nodes[0], nodes[1]
	addr := n1.clusterAddr()

	// Unknown protocol byte, then junk after a valid protocol byte.
	c := rawDial(t, addr)
	_, _ = c.Write([]byte{0x7F, 'G', 'E', 'T', ' ', '/'})
	expectClosed(t, c)
	c = rawDial(t, addr)
	_, _ = c.Write(append([]byte{ProtoForward}, []byte("\x00\x10GET / HTTP/1.1\r\n\r\n")...))
	expectClosed(t, c)
	c = rawDial(t, addr) // connects and says nothing: dropped at the handshake timeout
	expectClosed(t, c)
	eventually(t, 5*time.Second, func() bool {
		return n1.counter(n1.metrics.handshake.WithLabelValues("in", "unknown_protocol")) == 1 &&
			n1.counter(n1.metrics.handshake.WithLabelValues("in", "malformed")) == 1 &&
			n1.counter(n1.metrics.handshake.WithLabelValues("in", "timeout")) == 1
	}, "handshake failures not counted: %v", handshakeCounts(n1))

	// Past the handshake: oversize, zero-length, truncated and undecodable
	// frames each drop the connection and count a bad frame.
	x := intruder(t, nil)
	frames := [][]byte{
		{0xFF, 0xFF, 0xFF, 0xFF},
		{0, 0, 0, 0},
		append([]byte{0, 0, 0, 100}, bytes.Repeat([]byte{1}, 10)...), // then EOF
		{0, 0, 0, 3, 9, 9, 9}, // unknown frame type
		append(binary.BigEndian.AppendUint32(nil, 5), framePublish, 0xF0, 1, 't', 0), // reserved flags
	}
	for i, f := range frames {
		pc, err := x.Dial(t.Context(), addr, ProtoForward)
		if err != nil {
			t.Fatalf("intruder dial: %v", err)
		}
		if _, err := pc.Write(f); err != nil {
			t.Fatal(err)
		}
		if i == 2 {
			_ = pc.Conn.(*net.TCPConn).CloseWrite()
		}
		expectClosed(t, pc)
		_ = pc.Close()
	}
	eventually(t, 5*time.Second, func() bool { return n1.counter(n1.metrics.badFrames) == float64(len(frames)) },
		"bad_frames_total = %v, want %d", n1.counter(n1.metrics.badFrames), len(frames))
	if n1.rec.count() != 0 {
		t.Fatalf("junk reached the deliverer: %+v", n1.rec.all())
	}

	// The node keeps serving.
	if err := n1.AddRoute("still/+"); err != nil {
		t.Fatal(err)
	}
	waitRoutes(t, nodes, "n1", "still/+")
	n2.Forward(msg("still/alive", "ok"))
	eventually(t, 5*time.Second, func() bool { return n1.rec.countTopic("still/alive") == 1 }, "no delivery after junk")
}

func TestJunkOnGossipPortDoesNotHurt(t *testing.T) {
	n1 := startNode(t, "n1", nil)
	junk := make([]byte, 2048)
	for i := 0; i < 20; i++ {
		_, _ = rand.Read(junk)
		if c, err := net.Dial("tcp", n1.selfGossip); err == nil {
			_, _ = c.Write(junk[:64+i*50])
			_ = c.Close()
		}
		if c, err := net.Dial("udp", n1.selfGossip); err == nil {
			_, _ = c.Write(junk[:16+i*60])
			_ = c.Close()
		}
	}
	// A gossip message with our type byte but a broken body, as memberlist
	// would hand it to us: dropped and counted.
	(&delegate{n: n1.Node}).NotifyMsg([]byte{gossipRouteDelta, 1, 0xFF})
	(&delegate{n: n1.Node}).MergeRemoteState([]byte{stateFormat, 0xFF, 0xFF}, false)
	(&delegate{n: n1.Node}).NotifyMsg([]byte{0x77})
	// >= because random UDP junk may itself parse as a memberlist user message.
	if got := n1.counter(n1.metrics.badGossip); got < 3 {
		t.Fatalf("bad_gossip_total = %v, want >= 3", got)
	}
	n2 := startNode(t, "n2", []string{n1.selfGossip})
	nodes := []*testNode{n1, n2}
	waitMembers(t, nodes, 2)
	if err := n2.AddRoute("after/junk"); err != nil {
		t.Fatal(err)
	}
	waitRoutes(t, nodes, "n2", "after/junk")
}

func TestClusterKey(t *testing.T) {
	key := withConfig(func(c *Config) { c.ClusterKey = []byte("correct horse battery staple") })
	nodes := startCluster(t, 2, key)
	n1, n2 := nodes[0], nodes[1]
	if err := n2.AddRoute("secure/#"); err != nil {
		t.Fatal(err)
	}
	waitRoutes(t, nodes, "n2", "secure/#")
	n1.Forward(msg("secure/x", "sealed"))
	eventually(t, 5*time.Second, func() bool { return n2.rec.count() == 1 }, "no delivery with a cluster key")
	if !n1.Status().Encrypted {
		t.Fatal("status does not report encryption")
	}

	// A node with another key cannot join: memberlist cannot decrypt.
	stranger := startNode(t, "stranger", nil, withConfig(func(c *Config) { c.ClusterKey = []byte("wrong") }))
	if k, err := stranger.ml.Join([]string{n1.selfGossip}); err == nil || k != 0 {
		t.Fatalf("join with the wrong key: joined %d, err %v", k, err)
	}
	if got := n1.numAlive.Load(); got != 2 {
		t.Fatalf("n1 has %d members after a stranger tried to join", got)
	}

	// The cluster port refuses wrong keys and missing keys, in both directions.
	for _, k := range [][]byte{[]byte("wrong"), nil} {
		if _, err := intruder(t, k).Dial(t.Context(), n1.clusterAddr(), ProtoForward); !errors.Is(err, ErrAuth) {
			t.Fatalf("dial with key %q: err = %v, want ErrAuth", k, err)
		}
	}
	eventually(t, 5*time.Second, func() bool { return n1.counter(n1.metrics.handshake.WithLabelValues("in", "auth")) == 2 },
		"auth failures not counted")
	open := startNode(t, "open", nil)
	if _, err := n1.mux.Dial(t.Context(), open.clusterAddr(), ProtoForward); !errors.Is(err, ErrAuth) {
		t.Fatalf("keyed node dialing an open node: err = %v, want ErrAuth", err)
	}
	if pc, err := intruder(t, []byte("correct horse battery staple")).Dial(t.Context(), n1.clusterAddr(), ProtoForward); err != nil {
		t.Fatalf("dial with the right key: %v", err)
	} else {
		_ = pc.Close()
	}
	if n1.rec.count() != 0 {
		t.Fatal("unauthenticated traffic delivered")
	}
}

func TestProtocolVersionMismatchIsRefused(t *testing.T) {
	n1 := startNode(t, "n1", nil)
	c := rawDial(t, n1.clusterAddr())
	hello := append([]byte(handshakeMagic), 99, 0)
	hello = append(hello, make([]byte, nonceLen)...)
	hello = appendString(hello, "future-node")
	_, _ = c.Write(append([]byte{ProtoForward}, binary.BigEndian.AppendUint16(nil, uint16(len(hello)))...))
	_, _ = c.Write(hello)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	reply, err := readHandshake(c)
	if err != nil {
		t.Fatal(err)
	}
	if reply[len(handshakeMagic)+1] != hsVersion {
		t.Fatalf("status %d, want hsVersion", reply[len(handshakeMagic)+1])
	}
	expectClosed(t, c)
	eventually(t, 5*time.Second, func() bool { return n1.counter(n1.metrics.handshake.WithLabelValues("in", "version")) == 1 },
		"version refusal not counted")

	// Client side: a server answering with another version is refused.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		s, err := ln.Accept()
		if err != nil {
			return
		}
		defer s.Close()
		var b [1]byte
		_, _ = io.ReadFull(s, b[:])
		_, _ = readHandshake(s)
		ch := append([]byte(handshakeMagic), ProtocolVersion+1, hsVersion)
		ch = append(ch, make([]byte, nonceLen)...)
		ch = appendBytes(ch, nil)
		ch = appendString(ch, "future")
		_ = writeHandshake(s, ch)
	}()
	if _, err := n1.mux.Dial(t.Context(), ln.Addr().String(), ProtoForward); !errors.Is(err, ErrProtocolVersion) {
		t.Fatalf("err = %v, want ErrProtocolVersion", err)
	}
}

func TestMuxCarriesOtherProtocols(t *testing.T) {
	nodes := startCluster(t, 2, withConfig(func(c *Config) { c.ClusterKey = []byte("k") }))
	n1, n2 := nodes[0], nodes[1]
	ln, err := n1.Mux().Listen(ProtoRaft)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n1.Mux().Listen(ProtoRaft); !errors.Is(err, ErrProtoInUse) {
		t.Fatalf("second Listen: %v", err)
	}
	done := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err.Error()
			return
		}
		defer c.Close()
		buf := make([]byte, 4)
		_, _ = io.ReadFull(c, buf)
		_, _ = c.Write(buf)
		done <- c.(interface{ Peer() string }).Peer()
	}()
	c, err := n2.Mux().Dial(t.Context(), n1.clusterAddr(), ProtoRaft)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Peer() != "n1" {
		t.Fatalf("dialed peer %q", c.Peer())
	}
	_, _ = c.Write([]byte("ping"))
	echo := make([]byte, 4)
	if _, err := io.ReadFull(c, echo); err != nil || string(echo) != "ping" {
		t.Fatalf("echo %q %v", echo, err)
	}
	if p := <-done; p != "n2" {
		t.Fatalf("accepted peer %q", p)
	}
	_ = ln.Close()
	if _, err := n2.Mux().Dial(t.Context(), n1.clusterAddr(), ProtoRaft); err == nil {
		t.Fatal("dial succeeded after the protocol's listener closed")
	}
	if _, err := n1.Mux().Listen(ProtoRaft); err != nil {
		t.Fatalf("Listen after Close: %v", err)
	}
}

func TestQueueBoundsAndDropReasons(t *testing.T) {
	cfg := testConfig(t, "q")
	cfg.QueueSize = 3
	cfg.QueueBytes = 1000
	n, err := New(cfg, &recorder{})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	small := outMsg{m: msg("t", "x"), size: 100}
	p := newPeer(n, "peer", "127.0.0.1:1") // nothing listens there
	go p.run()
	for i := 0; i < 3; i++ {
		if ok, _ := p.enqueue(small); !ok {
			t.Fatalf("enqueue %d refused", i)
		}
	}
	if ok, reason := p.enqueue(small); ok || reason != dropQueueFull {
		t.Fatalf("4th enqueue: ok=%v reason=%q, want queue_full", ok, reason)
	}
	p.stop(dropPeerGone)
	if ok, reason := p.enqueue(small); ok || reason != dropPeerGone {
		t.Fatalf("enqueue after stop: ok=%v reason=%q", ok, reason)
	}
	tn := &testNode{Node: n, t: t}
	if got := tn.dropped(dropPeerGone); got != 3 {
		t.Fatalf("dropped{peer_gone} = %v, want the 3 queued", got)
	}

	// The byte bound: one big message fits an empty queue, nothing after it.
	p2 := newPeer(n, "peer2", "127.0.0.1:1")
	go p2.run()
	defer p2.stop(dropShutdown)
	if ok, _ := p2.enqueue(outMsg{m: msg("t", ""), size: 5000}); !ok {
		t.Fatal("a message larger than QueueBytes was refused by an empty queue")
	}
	if ok, reason := p2.enqueue(small); ok || reason != dropQueueFull {
		t.Fatalf("enqueue over QueueBytes: ok=%v reason=%q", ok, reason)
	}
}

func TestOversizeMessageIsDroppedAtTheSender(t *testing.T) {
	nodes := startCluster(t, 2, withConfig(func(c *Config) { c.MaxFrameSize = 1024 }))
	n1, n2 := nodes[0], nodes[1]
	if err := n2.AddRoute("big"); err != nil {
		t.Fatal(err)
	}
	waitRoutes(t, nodes, "n2", "big")
	if got := n1.Forward(&Message{Topic: "big", Payload: make([]byte, 2000)}); got != 0 {
		t.Fatalf("oversize message queued for %d nodes", got)
	}
	if got := n1.dropped(dropOversize); got != 1 {
		t.Fatalf("dropped{oversize} = %v", got)
	}
	if got := n1.Forward(&Message{Topic: "big", Payload: make([]byte, 900)}); got != 1 {
		t.Fatalf("a message under the limit was not queued (%d)", got)
	}
	eventually(t, 5*time.Second, func() bool { return n2.rec.count() == 1 }, "no delivery")
}

func TestResolveSeeds(t *testing.T) {
	lookup := func(_ context.Context, host string) ([]string, error) {
		switch host {
		case "broker-headless.messaging.svc":
			return []string{"10.0.0.1", "10.0.0.2", "10.0.0.3"}, nil
		case "v6.example":
			return []string{"fd00::1"}, nil
		}
		return nil, errors.New("no such host")
	}
	got, err := resolveSeeds(context.Background(), lookup,
		[]string{"broker-headless.messaging.svc:7946", "10.0.0.2:7946", "v6.example", "[fd00::2]:8000", "gone.example:7946", "x:notaport"}, 7946)
	want := []string{"10.0.0.1:7946", "10.0.0.2:7946", "10.0.0.3:7946", "[fd00::1]:7946", "[fd00::2]:8000"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("resolved %v, want %v", got, want)
	}
	if err == nil || !strings.Contains(err.Error(), "gone.example") || !strings.Contains(err.Error(), "notaport") {
		t.Fatalf("errors not reported: %v", err)
	}
}

// TestJoinRetriesUntilSeedAnswers starts a node whose only seed is not up
// yet; it must keep retrying and join once the seed appears.
func TestJoinRetriesUntilSeedAnswers(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	seedAddr := l.Addr().String()
	_ = l.Close()
	n2 := startNode(t, "n2", []string{seedAddr})
	eventually(t, 5*time.Second, func() bool { return n2.counter(n2.metrics.members) == 1 }, "n2 not up")
	n1 := startNode(t, "n1", nil, withConfig(func(c *Config) { c.GossipAddr = seedAddr }))
	waitMembers(t, []*testNode{n1, n2}, 2)
}

func TestMemberEvents(t *testing.T) {
	events := make(chan MemberEvent, 16)
	n1 := startNode(t, "n1", nil, withConfig(func(c *Config) { c.OnMemberEvent = func(e MemberEvent) { events <- e } }))
	n2 := startNode(t, "n2", []string{n1.selfGossip})
	n3 := startNode(t, "n3", []string{n1.selfGossip})
	waitMembers(t, []*testNode{n1, n2, n3}, 3)
	if err := n2.Close(); err != nil {
		t.Fatal(err)
	}
	n3.kill()
	want := map[string][]MemberEventType{"n2": {MemberJoin, MemberLeave}, "n3": {MemberJoin, MemberFail}}
	got := map[string][]MemberEventType{}
	timeout := time.After(10 * time.Second)
	for len(got["n2"]) < 2 || len(got["n3"]) < 2 {
		select {
		case e := <-events:
			if e.Type != MemberUpdate {
				got[e.NodeID] = append(got[e.NodeID], e.Type)
			}
			if e.Type == MemberJoin && (e.ClusterAddr == "" || e.MQTTPort != 1883) {
				t.Fatalf("join event lacks addresses: %+v", e)
			}
		case <-timeout:
			t.Fatalf("events so far: %v", got)
		}
	}
	for id, w := range want {
		if len(got[id]) != 2 || got[id][0] != w[0] || got[id][1] != w[1] {
			t.Fatalf("%s: events %v, want %v", id, got[id], w)
		}
	}
	if s := n1.memberState("n2"); s != "left" {
		t.Fatalf("n2 state %q, want left", s)
	}
	if s := n1.memberState("n3"); s != "dead" {
		t.Fatalf("n3 state %q, want dead", s)
	}
}

func handshakeCounts(tn *testNode) map[string]float64 {
	out := map[string]float64{}
	for _, r := range []string{"unknown_protocol", "malformed", "timeout", "auth", "version"} {
		out[r] = tn.counter(tn.metrics.handshake.WithLabelValues("in", r))
	}
	return out
}
