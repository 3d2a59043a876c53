package node

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// The MQTT session lifecycle across nodes (DESIGN.md guarantee 8): clean
// start discards a session, session expiry from CONNECT and DISCONNECT,
// message expiry while queued.

// persistentSub opens a persistent session (expiry 600) for id on node,
// subscribes it to filter at QoS 1 and disconnects normally, waiting until
// the log on every node shows it disconnected.
func (tc *testCluster) persistentSub(t *testing.T, node, id, filter string) {
	t.Helper()
	c := testutil.Connect(t, tc.nodes[node].Addr("mqtt"), testutil.ClientOptions{ID: id, CleanStart: true, SessionExpiry: 600})
	c.Sub(t, 1, filter)
	c.Close()
	tc.waitSession(t, id, func(s sessionView) error {
		if !s.ok || s.Connected {
			return fmt.Errorf("session %s: exists %v, connected %v", id, s.ok, s.Connected)
		}
		return nil
	})
}

type sessionView struct {
	ok        bool
	Connected bool
	Expiry    uint32
	Queue     int
	Opened    uint64
}

// waitSession waits until cond holds for id's session in every node's log.
func (tc *testCluster) waitSession(t *testing.T, id string, cond func(sessionView) error) {
	t.Helper()
	testutil.Eventually(t, wait, func() error {
		for name, n := range tc.nodes {
			s, ok := n.repl.Session(id)
			v := sessionView{ok: ok, Connected: s.Connected, Expiry: s.ExpiryInterval, Queue: len(s.Queue), Opened: s.OpenedIndex}
			if err := cond(v); err != nil {
				return fmt.Errorf("on %s: %w", name, err)
			}
		}
		return nil
	})
}

func sessionGone(s sessionView) error {
	if s.ok {
		return fmt.Errorf("session still in the log (connected %v, %d queued)", s.Connected, s.Queue)
	}
	return nil
}

// connect311 opens an MQTT 3.1.1 connection (hand-encoded: the test
// client speaks MQTT 5 only) and returns it with CONNACK's session-present
// flag.
func connect311(t *testing.T, addr, id string, clean bool) (net.Conn, bool) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	var body bytes.Buffer
	body.Write([]byte{0, 4, 'M', 'Q', 'T', 'T', 4})
	flags := byte(0)
	if clean {
		flags = 0x02
	}
	body.Write([]byte{flags, 0, 60, 0, byte(len(id))})
	body.WriteString(id)
	pkt := append([]byte{0x10, byte(body.Len())}, body.Bytes()...)
	_ = conn.SetDeadline(time.Now().Add(wait))
	if _, err := conn.Write(pkt); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	if _, err := io.ReadFull(conn, ack); err != nil {
		t.Fatalf("CONNACK: %v", err)
	}
	if ack[0] != 0x20 || ack[3] != 0 {
		t.Fatalf("CONNACK % x", ack)
	}
	_ = conn.SetDeadline(time.Time{})
	return conn, ack[2]&1 == 1
}

// disconnect311 sends DISCONNECT and closes.
func disconnect311(conn net.Conn) {
	_, _ = conn.Write([]byte{0xE0, 0})
	_ = conn.Close()
}

// resumeFresh reconnects id persistently (clean start 0) on node and fails
// unless the broker reports no session and delivers nothing old: a marker
// published after its new subscription is the first message it gets.
func (tc *testCluster) resumeFresh(t *testing.T, node, id, topic string) {
	t.Helper()
	c := testutil.Connect(t, tc.nodes[node].Addr("mqtt"), testutil.ClientOptions{ID: id, SessionExpiry: 600})
	if c.Connack.SessionPresent {
		t.Fatalf("%s: session present after the session was discarded", id)
	}
	c.Sub(t, 1, topic)
	tc.client(node, id+"-marker").Pub(t, topic, 1, false, []byte("marker"))
	if p := c.MustNext(t, wait); string(p.Payload) != "marker" {
		t.Fatalf("%s: got %q from the discarded session's queue", id, p.Payload)
	}
	c.Close()
}

// TestCleanConnectDiscardsSession: a clean-session CONNECT (MQTT 5 clean
// start 1 with expiry 0, MQTT 3.1.1 clean session 1), with no will, on the
// session's node or another, ends the persistent session in the log: it
// stops queueing, and the next persistent CONNECT finds no session.
func TestCleanConnectDiscardsSession(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	pub := tc.client("n2", "discard-pub")
	for _, tt := range []struct {
		name, on string
		v311     bool
	}{
		{"v5 same node", "n1", false},
		{"v5 other node", "n3", false},
		{"v311 same node", "n1", true},
		{"v311 other node", "n2", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			id := fmt.Sprintf("discard-%s-%v", tt.on, tt.v311)
			topic := "discard/" + id
			tc.persistentSub(t, "n1", id, topic)
			pub.Pub(t, topic, 1, false, []byte("old"))
			tc.waitSession(t, id, func(s sessionView) error {
				if s.Queue != 1 {
					return fmt.Errorf("%d queued, want 1", s.Queue)
				}
				return nil
			})
			addr := tc.nodes[tt.on].Addr("mqtt")
			if tt.v311 {
				conn, present := connect311(t, addr, id, true)
				if present {
					t.Fatal("clean session: session present 1")
				}
				tc.waitSession(t, id, sessionGone)
				disconnect311(conn)
			} else {
				c := testutil.Connect(t, addr, testutil.ClientOptions{ID: id, CleanStart: true})
				if c.Connack.SessionPresent {
					t.Fatal("clean start: session present 1")
				}
				tc.waitSession(t, id, sessionGone)
				c.Close()
			}
			pub.Pub(t, topic, 1, false, []byte("while clean"))
			tc.resumeFresh(t, "n2", id, topic)
		})
	}
}

// TestCleanStartWithExpiryReplacesSession: MQTT 5 clean start 1 with
// session expiry > 0 replaces the old session (one SessionOpen with clean
// start): nothing of the old queue or subscriptions survives.
func TestCleanStartWithExpiryReplacesSession(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	tc.persistentSub(t, "n1", "replace", "replace/t")
	tc.client("n2", "replace-pub").Pub(t, "replace/t", 1, false, []byte("old"))
	c := testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "replace", CleanStart: true, SessionExpiry: 600})
	if c.Connack.SessionPresent {
		t.Fatal("clean start: session present 1")
	}
	c.Close()
	tc.waitSession(t, "replace", func(s sessionView) error {
		if !s.ok || s.Connected || s.Queue != 0 {
			return fmt.Errorf("session %+v, want a new, empty, disconnected one", s)
		}
		return nil
	})
	tc.resumeFreshPresent(t, "n1", "replace", "replace/t")
}

// resumeFreshPresent is resumeFresh for a session that exists but is
// empty: present 1, and the marker is the first message.
func (tc *testCluster) resumeFreshPresent(t *testing.T, node, id, topic string) {
	t.Helper()
	c := testutil.Connect(t, tc.nodes[node].Addr("mqtt"), testutil.ClientOptions{ID: id, SessionExpiry: 600})
	if !c.Connack.SessionPresent {
		t.Fatalf("%s: session not present", id)
	}
	c.Sub(t, 1, topic)
	tc.client(node, id+"-marker").Pub(t, topic, 1, false, []byte("marker"))
	if p := c.MustNext(t, wait); string(p.Payload) != "marker" {
		t.Fatalf("%s: got %q from the replaced session's queue", id, p.Payload)
	}
}

// TestResumeWithZeroExpiry: MQTT 5 clean start 0 with session expiry 0
// resumes the existing session (session present 1, its queued messages
// delivered, on another node) and ends it when that connection ends.
func TestResumeWithZeroExpiry(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	tc.persistentSub(t, "n1", "zero", "zero/t")
	tc.client("n2", "zero-pub").Pub(t, "zero/t", 1, false, []byte("queued"))
	c := testutil.Connect(t, tc.nodes["n3"].Addr("mqtt"), testutil.ClientOptions{ID: "zero"})
	if !c.Connack.SessionPresent {
		t.Fatal("clean start 0, expiry 0: session not present")
	}
	if p := c.MustNext(t, wait); string(p.Payload) != "queued" {
		t.Fatalf("got %q, want the queued message", p.Payload)
	}
	c.Close()
	tc.waitSession(t, "zero", sessionGone)
	tc.resumeFresh(t, "n1", "zero", "zero/t")
}

// disconnectWithExpiry sends DISCONNECT (normal) with a session expiry.
func disconnectWithExpiry(t *testing.T, c *testutil.Client, expiry uint32) {
	t.Helper()
	if err := c.Disconnect(&paho.Disconnect{ReasonCode: 0, Properties: &paho.DisconnectProperties{SessionExpiryInterval: &expiry}}); err != nil {
		t.Fatalf("DISCONNECT: %v", err)
	}
}

// TestSessionExpiryFromDisconnect: DISCONNECT's session expiry replaces
// CONNECT's: 0 ends the session at once, a larger one is kept (the spec
// allows raising it), and a non-zero one after CONNECT's 0 is a protocol
// error (0x82) that does not make the session persistent.
func TestSessionExpiryFromDisconnect(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	addr := tc.nodes["n1"].Addr("mqtt")

	c := testutil.Connect(t, addr, testutil.ClientOptions{ID: "dx-zero", CleanStart: true, SessionExpiry: 600})
	c.Sub(t, 1, "dx/zero")
	disconnectWithExpiry(t, c, 0)
	tc.waitSession(t, "dx-zero", func(s sessionView) error {
		if s.ok && s.Connected {
			return fmt.Errorf("still connected")
		}
		return nil
	})
	tc.resumeFresh(t, "n2", "dx-zero", "dx/zero")

	c = testutil.Connect(t, addr, testutil.ClientOptions{ID: "dx-raise", CleanStart: true, SessionExpiry: 1})
	c.Sub(t, 1, "dx/raise")
	disconnectWithExpiry(t, c, 600)
	tc.waitSession(t, "dx-raise", func(s sessionView) error {
		if !s.ok || s.Connected || s.Expiry != 600 {
			return fmt.Errorf("session %+v, want disconnected with expiry 600", s)
		}
		return nil
	})

	c = testutil.Connect(t, addr, testutil.ClientOptions{ID: "dx-bad", CleanStart: true})
	// DISCONNECT, reason 0, session expiry 60: written by hand, paho
	// refuses to send it.
	if _, err := c.Conn.Write([]byte{0xE0, 7, 0, 5, 0x11, 0, 0, 0, 60}); err != nil {
		t.Fatal(err)
	}
	select {
	case d := <-c.Disconnects:
		if d.ReasonCode != 0x82 {
			t.Fatalf("server DISCONNECT 0x%02x, want 0x82", d.ReasonCode)
		}
	case <-time.After(wait):
		t.Fatal("no DISCONNECT 0x82 from the server")
	}
	if s, ok := tc.nodes["n1"].repl.Session("dx-bad"); ok {
		t.Fatalf("session stored: %+v", s)
	}
}

// TestReconnectExpiryAndExpiredSession: a reconnect's session expiry
// replaces the stored one; once a session has expired, a resume gets
// session present 0 (even before the leader's sweep removed it).
func TestReconnectExpiryAndExpiredSession(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	tc.persistentSub(t, "n1", "rx", "rx/t")
	c := testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "rx", SessionExpiry: 1})
	if !c.Connack.SessionPresent {
		t.Fatal("session not present")
	}
	tc.waitSession(t, "rx", func(s sessionView) error {
		if s.Expiry != 1 {
			return fmt.Errorf("expiry %d, want 1 (the reconnect's)", s.Expiry)
		}
		return nil
	})
	c.Close()
	var closed time.Time
	tc.waitSession(t, "rx", func(s sessionView) error {
		if s.ok && s.Connected {
			return fmt.Errorf("still connected")
		}
		closed = time.Now()
		return nil
	})
	// Expired one second after the close: resume just after that.
	testutil.Eventually(t, wait, func() error {
		if d := time.Since(closed); d < 1100*time.Millisecond {
			return fmt.Errorf("%s since the close", d)
		}
		return nil
	})
	tc.resumeFresh(t, "n1", "rx", "rx/t")
}

// TestCleanConnectWithoutQuorum: on a node cut off from the raft quorum a
// clean session is still served (guarantee 5), promptly; a clean CONNECT
// for a client id whose persistent session it cannot discard is refused,
// promptly too (TestCleanConnectWithoutQuorumKeepsSession has why).
func TestCleanConnectWithoutQuorum(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	tc.persistentSub(t, "n2", "noquorum", "noquorum/t")
	for _, id := range []string{"n2", "n3"} {
		tc.nodes[id].Kill()
		delete(tc.nodes, id)
	}
	start := time.Now()
	_, err := testutil.TryConnect(tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "noquorum", CleanStart: true})
	if err == nil {
		t.Fatal("clean CONNECT served over a persistent session it could not discard")
	}
	if took := time.Since(start); took > 4*time.Second {
		t.Fatalf("refusal took %s without a quorum", took)
	}
	start = time.Now()
	c := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "noquorum-fresh", CleanStart: true})
	if took := time.Since(start); took > 4*time.Second {
		t.Fatalf("clean CONNACK took %s without a quorum", took)
	}
	if c.Connack.SessionPresent {
		t.Fatal("clean session: session present 1")
	}
	c.Sub(t, 0, "noquorum/live")
	tc.client("n1", "noquorum-pub").Pub(t, "noquorum/live", 0, false, []byte("served"))
	if p := c.MustNext(t, wait); string(p.Payload) != "served" {
		t.Fatalf("got %q", p.Payload)
	}
}
