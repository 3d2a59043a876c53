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
	committed := make(chan struct{})
	release := make(chan struct{})
	var tries atomic.Int32
	tc := newSessionsTunedCluster(t, func(c *hooks.SessionsConfig) {
		if c.Self != "n1" {
			return
		}
		c.AfterOpenWrite = func(id string, err error) error {
			if id != "rt-dev" || err != nil || tries.Add(1) != 1 {
				return err
			}
			close(committed)
			<-release
			return fmt.Errorf("%w: stand-in for a leader that died after committing", replication.ErrUnknownOutcome)
		}
	}, "n1", "n2", "n3")
	tc.waitReady()
	waitOpenFence(t, tc)
	// The persistent CONNECT on n1; the client will give up on it.
	conn, err := net.DialTimeout("tcp", tc.nodes["n1"].Addr("mqtt"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cp := packets.NewControlPacket(packets.CONNECT)
	cn := cp.Content.(*packets.Connect)
	exp := uint32(300)
	cn.ClientID, cn.CleanStart, cn.KeepAlive = "rt-dev", false, 30
	cn.Properties.SessionExpiryInterval = &exp
	if _, err := cp.WriteTo(conn); err != nil {
		t.Fatal(err)
	}
	select {
	case <-committed:
	case <-time.After(wait):
		t.Fatal("the first open was not written")
	}
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
	close(release) // the retry
	// The abandoned CONNECT gets its answer (refused, or the socket closed).
	_ = conn.SetReadDeadline(time.Now().Add(wait))
	if p, err := packets.ReadPacket(conn); err == nil {
		if a, ok := p.Content.(*packets.Connack); ok && a.ReasonCode == 0 {
			t.Fatalf("the abandoned CONNECT was served after the newer clean start: %+v", a)
		}
	}
	if tries.Load() > 1 {
		t.Fatalf("the open was written %d times after a newer connection took the client id", tries.Load())
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
