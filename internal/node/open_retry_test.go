package node

import (
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

// heldOpen stands in for a leader that died after committing the first
// SessionOpen of a client id on one node: that write commits, then its
// CONNECT waits for release and learns an unknown outcome.
type heldOpen struct {
	committed, release chan struct{}
	tries              atomic.Int32
}

// holdFirstOpen returns the heldOpen of id on node self and the tuning
// that installs it.
func holdFirstOpen(self, id string) (*heldOpen, func(*hooks.SessionsConfig)) {
	h := &heldOpen{committed: make(chan struct{}), release: make(chan struct{})}
	return h, func(c *hooks.SessionsConfig) {
		if c.Self != self {
			return
		}
		c.AfterOpenWrite = func(cid string, err error) error {
			if cid != id || err != nil || h.tries.Add(1) != 1 {
				return err
			}
			close(h.committed)
			<-h.release
			return fmt.Errorf("%w: stand-in for a leader that died after committing", replication.ErrUnknownOutcome)
		}
	}
}

func (h *heldOpen) waitCommitted(t *testing.T) {
	t.Helper()
	select {
	case <-h.committed:
	case <-time.After(wait):
		t.Fatal("the first open was not written")
	}
}

// sendPersistentConnect writes a persistent CONNECT (expiry 300) of id,
// with a QoS 1 will on willTopic unless it is "", without waiting for the
// CONNACK.
func sendPersistentConnect(t *testing.T, addr, id, willTopic string) net.Conn {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	cp := packets.NewControlPacket(packets.CONNECT)
	cn := cp.Content.(*packets.Connect)
	exp := uint32(300)
	cn.ClientID, cn.CleanStart, cn.KeepAlive = id, false, 30
	cn.Properties.SessionExpiryInterval = &exp
	if willTopic != "" {
		cn.WillFlag, cn.WillTopic, cn.WillMessage, cn.WillQOS = true, willTopic, []byte("offline"), 1
		cn.WillProperties = &packets.Properties{}
	}
	if _, err := cp.WriteTo(conn); err != nil {
		t.Fatal(err)
	}
	return conn
}

// notServed fails when conn's CONNECT is answered with success (a
// refusal or a closed socket is fine).
func notServed(t *testing.T, conn net.Conn) {
	t.Helper()
	_ = conn.SetReadDeadline(time.Now().Add(wait))
	if p, err := packets.ReadPacket(conn); err == nil {
		if a, ok := p.Content.(*packets.Connack); ok && a.ReasonCode == 0 {
			t.Fatalf("the abandoned CONNECT was served: %+v", a)
		}
	}
}

// TestRetriedOpenDoesNotReviveSessionDeletedByNewerConnect: a persistent
// CONNECT's first SessionOpen commits, but the node learns nothing (the
// leader died after committing: unknown outcome), so it tries again. The
// client meanwhile gives up and connects with clean start on another
// node, which deletes the session. The retry, fenced to "no session" as
// the first try read, found no session again and created it anew: the
// next resume answered session present 1 after a clean start (chaos,
// clean-start-session-present). The node saw its first try commit; the
// session that try opened is gone, so a newer CONNECT took it: the retry
// must give up.
func TestRetriedOpenDoesNotReviveSessionDeletedByNewerConnect(t *testing.T) {
	held, tune := holdFirstOpen("n1", "rt-dev")
	tc := newSessionsTunedCluster(t, tune, "n1", "n2", "n3")
	tc.waitReady()
	waitOpenFence(t, tc)
	// The persistent CONNECT on n1; the client will give up on it.
	conn := sendPersistentConnect(t, tc.nodes["n1"].Addr("mqtt"), "rt-dev", "")
	held.waitCommitted(t)
	// The clean CONNECT on n2 deletes the session the first try opened.
	c2, ack := rawConnect(t, tc.nodes["n2"].Addr("mqtt"), "rt-dev", true, 0)
	if ack.SessionPresent {
		t.Fatal("clean start answered session present")
	}
	_ = c2.conn.Close()
	testutil.Eventually(t, wait, func() error {
		if _, ok := tc.nodes["n1"].repl.Session("rt-dev"); ok {
			return fmt.Errorf("n1 still sees the session")
		}
		return nil
	})
	close(held.release) // the retry
	notServed(t, conn)
	if n := held.tries.Load(); n > 1 {
		t.Fatalf("the open was written %d times after a newer connection took the client id", n)
	}
	if s, ok := tc.nodes["n1"].repl.Session("rt-dev"); ok {
		t.Fatalf("the session is back after the clean start: %+v", s)
	}
	c3, ack := rawConnect(t, tc.nodes["n1"].Addr("mqtt"), "rt-dev", false, 300)
	defer c3.conn.Close()
	if ack.SessionPresent {
		t.Fatal("resume after a clean start answered session present 1")
	}
}

// TestRetriedOpenGivesUpAfterNewerConnectionCameAndWent (found by
// review): a persistent CONNECT on n1 retries its open (outcome unknown,
// nothing committed). Meanwhile the client gives up, connects with a
// clean session on n2 and leaves again: its claim and its release are in
// the log, its session ended with it. n1's retry is refused (the client
// id changed since it read), and must then give up: the connection that
// came after it won, as the later CONNECT does on one broker. Deciding
// by the current owner alone (none: released) opened again and brought a
// session back after the clean start.
func TestRetriedOpenGivesUpAfterNewerConnectionCameAndWent(t *testing.T) {
	var blocked atomic.Bool
	blocked.Store(true)
	tried := make(chan struct{}, 1)
	tc := newSessionsTunedCluster(t, func(c *hooks.SessionsConfig) {
		if c.Self != "n1" {
			return
		}
		c.Timeout = 10 * time.Second
		c.BeforeOpenWrite = func(id string, _ replication.Command) error {
			if id != "cw-dev" || !blocked.Load() {
				return nil
			}
			select {
			case tried <- struct{}{}:
			default:
			}
			return fmt.Errorf("%w: stand-in for a leader that died before committing", replication.ErrUnknownOutcome)
		}
	}, "n1", "n2", "n3")
	tc.waitReady()
	waitOpenAsOf(t, tc)
	warm, _ := rawConnect(t, tc.nodes["n3"].Addr("mqtt"), "cw-warm", false, 300) // touches recorded from here
	_ = warm.conn.Close()
	conn := sendPersistentConnect(t, tc.nodes["n1"].Addr("mqtt"), "cw-dev", "")
	select {
	case <-tried:
	case <-time.After(wait):
		t.Fatal("the open was not tried")
	}
	c2, _ := rawConnect(t, tc.nodes["n2"].Addr("mqtt"), "cw-dev", true, 0)
	testutil.Eventually(t, wait, func() error {
		if o, ok := tc.nodes["n1"].repl.Owner("cw-dev"); !ok || o.Node != "n2" {
			return fmt.Errorf("n2's claim not applied on n1 yet")
		}
		return nil
	})
	_ = c2.conn.Close()
	testutil.Eventually(t, wait, func() error {
		if o, ok := tc.nodes["n1"].repl.Owner("cw-dev"); ok {
			return fmt.Errorf("n2's release not applied on n1 yet: %+v", o)
		}
		return nil
	})
	blocked.Store(false) // the next retry is written
	notServed(t, conn)
	if s, ok := tc.nodes["n1"].repl.Session("cw-dev"); ok {
		t.Fatalf("the retry opened the session after the newer clean connection: %+v", s)
	}
}
