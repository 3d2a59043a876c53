package node

import (
	"net"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
)

// TestAbandonedConnectDoesNotReopenAfterCleanStart: guarantee 8 (clean
// start discards the session). A persistent CONNECT on a node behind the
// log is refused by the open's fence (SessionOpenIf); the client gives up
// on it and connects with clean start elsewhere, which deletes the
// session. The abandoned CONNECT's catch-up (hooks applyOpen: wait for the
// refusing entry, read again, open again) must not then recreate the
// session: on one broker, the clean CONNECT came last and the next resume
// finds no session (chaos: clean-start-session-present).
func TestAbandonedConnectDoesNotReopenAfterCleanStart(t *testing.T) {
	g := newApplyGate(t)
	tc := newTunedCluster(t, g.tune, "n1", "n2", "n3")
	tc.waitReady()
	leader, lag := tc.leaderAndFollower(t)
	waitOpenFence(t, tc)
	laddr := tc.nodes[leader].Addr("mqtt")
	// A persistent session, known to every node.
	closedSessionOn(t, tc, laddr, lag, "ac-dev")
	// The node falls behind applying.
	holdBehind(t, tc, g, lag, leader, "ac-gate")
	defer g.open()
	// The session moves on (resumed on the leader, then closed): the
	// lagging node's copy is stale.
	c1, _ := rawConnect(t, laddr, "ac-dev", false, 300)
	_ = c1.conn.Close()
	time.Sleep(300 * time.Millisecond)
	// The client resumes on the lagging node, gets no CONNACK and gives up.
	conn, err := net.DialTimeout("tcp", tc.nodes[lag].Addr("mqtt"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	cp := packets.NewControlPacket(packets.CONNECT)
	cn := cp.Content.(*packets.Connect)
	exp := uint32(300)
	cn.ClientID, cn.CleanStart, cn.KeepAlive = "ac-dev", false, 30
	cn.Properties.SessionExpiryInterval = &exp
	if _, err := cp.WriteTo(conn); err != nil {
		t.Fatal(err)
	}
	i0 := tc.nodes[leader].repl.Status().LastLogIndex
	time.Sleep(500 * time.Millisecond)
	_ = conn.Close()
	t.Logf("log index when the abandoned CONNECT was sent: %d; 500 ms later: %d", i0, tc.nodes[leader].repl.Status().LastLogIndex)
	// It connects with clean start on the leader: the session is discarded.
	c2, ack := rawConnect(t, laddr, "ac-dev", true, 0)
	if ack.SessionPresent {
		t.Fatal("clean start answered session present")
	}
	_ = c2.conn.Close()
	if _, ok := tc.nodes[leader].repl.Session("ac-dev"); ok {
		t.Fatal("the clean CONNECT left the session")
	}
	// The lagging node catches up.
	t.Logf("log index after the clean CONNECT: %d", tc.nodes[leader].repl.Status().LastLogIndex)
	g.open()
	time.Sleep(6 * time.Second)
	t.Logf("log index 6 s after catching up: %d", tc.nodes[leader].repl.Status().LastLogIndex)
	if s, ok := tc.nodes[leader].repl.Session("ac-dev"); ok {
		t.Errorf("the session is back after the clean start: owner %s, opened at %d, connected %v", s.Owner, s.OpenedIndex, s.Connected)
	}
	c3, ack := rawConnect(t, laddr, "ac-dev", false, 300)
	_ = c3
	if ack.SessionPresent {
		t.Fatal("resume after a clean start answered session present 1 (the abandoned CONNECT reopened the session)")
	}
}
