package node

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	mqttpackets "github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/hooks"
	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestGracefulStopSpreadsDisconnects: a node that stops gracefully ends
// its clients' connections lameDuckStep apart (bounded by LameDuck), not
// all at once, so that they reconnect to the other nodes over time; each
// still gets DISCONNECT 0x8B (MQTT 5).
func TestGracefulStopSpreadsDisconnects(t *testing.T) {
	tc := newTunedCluster(t, func(cfg *Config) { cfg.LameDuck = 5 * time.Second }, "n1")
	tc.waitReady()
	const clients = 20
	var mu sync.Mutex
	var at []time.Time
	var wg sync.WaitGroup
	for i := range clients {
		c, _ := rawConnect(t, tc.nodes["n1"].Addr("mqtt"), fmt.Sprintf("ld-%d", i), true, 0)
		wg.Go(func() {
			_ = c.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
			cp, err := packets.ReadPacket(c.conn)
			mu.Lock()
			defer mu.Unlock()
			at = append(at, time.Now())
			if err != nil {
				t.Errorf("read: %v (want DISCONNECT)", err)
				return
			}
			if d, ok := cp.Content.(*packets.Disconnect); !ok || d.ReasonCode != 0x8B {
				t.Errorf("got %s, want DISCONNECT 0x8B", cp)
			}
		})
	}
	// Generous: the spread is what is checked, not how fast a loaded
	// machine drains (CI once took over the harness's 5 s here).
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	if err := tc.nodes["n1"].Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	t.Logf("shutdown took %v", time.Since(start))
	wg.Wait()
	slices.SortFunc(at, func(a, b time.Time) int { return a.Compare(b) })
	// 19 gaps of lameDuckStep at least (sleeps only make it longer).
	if span := at[len(at)-1].Sub(at[0]); span < (clients-1)*lameDuckStep {
		t.Fatalf("disconnects spread over %v, want at least %v", span, (clients-1)*lameDuckStep)
	}
}

// TestClientDropInLameDuckKeepsItsWill: once a node has begun a graceful
// stop, a client that drops its connection on its own before the stop has
// disconnected it (the lame duck spreads disconnects over seconds) ended
// its connection without DISCONNECT: its will is due. Before, every
// connection ending during the stop was taken for the stop's, its will
// left for the leave grace, and a client back within it with a clean
// session lost its will (chaos seed 621146620, will-missing).
func TestClientDropInLameDuckKeepsItsWill(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2")
	tc.waitReady()
	watch := tc.client("n2", "ldw-watch")
	watch.Sub(t, 1, "ldw/#")
	dev := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "ldw-dev", CleanStart: true,
		Will: &paho.WillMessage{Topic: "ldw/dev", QoS: 1, Payload: []byte("offline")}})
	// The will is mirrored in the log once the session is open there.
	tc.waitWillInLog(t, "n1", "ldw-dev")
	tc.nodes["n1"].sessionsHook.PrepareStop() // the stop begins; dev is not disconnected yet
	_ = dev.Conn.Close()                      // and drops on its own
	back := testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "ldw-dev", CleanStart: true})
	defer back.Close()
	p, err := watch.Next(wait)
	if err != nil {
		t.Fatalf("no will after a drop during the lame duck: %v", err)
	}
	if string(p.Payload) != "offline" {
		t.Fatalf("got %s %q", p.Topic, p.Payload)
	}
}

// TestLameDuckLeavesToldSessionsOpen: a connection the graceful stop has
// ended (0x8B) stays open in the log, owned by the stopping node, for the
// leave grace: the client reconnects elsewhere and its will must not
// fire. The stale-session sweep, which closes this node's sessions that
// have no connection here, ran on through the lame duck and closed them;
// the leader then published their wills (chaos seed 444047167,
// will-on-graceful-stop, twice in CI).
func TestLameDuckLeavesToldSessionsOpen(t *testing.T) {
	var rounds atomic.Int64
	tc := newSessionsTunedCluster(t, func(c *hooks.SessionsConfig) {
		c.AfterMaintain = func() { rounds.Add(1) }
	}, "n1", "n2")
	tc.waitReady()
	n1 := tc.nodes["n1"]
	dev := testutil.Connect(t, n1.Addr("mqtt"), testutil.ClientOptions{ID: "ldo-dev", CleanStart: true,
		Will: &paho.WillMessage{Topic: "ldo/dev", QoS: 1, Payload: []byte("offline")}})
	defer dev.Close()
	tc.waitWillInLog(t, "n2", "ldo-dev")
	// The stop's first steps, as Shutdown takes them, for this client.
	n1.sessionsHook.PrepareStop()
	cl, ok := n1.mqtt.Clients.Get("ldo-dev")
	if !ok {
		t.Fatal("ldo-dev not connected to n1")
	}
	n1.sessionsHook.TellStop(cl)
	_ = n1.mqtt.DisconnectClient(cl, mqttpackets.ErrServerShuttingDown)
	testutil.Eventually(t, wait, func() error {
		if !cl.Closed() {
			return fmt.Errorf("still connected")
		}
		return nil
	})
	// The rest of the lame duck: the sweep closes a session it sees
	// without a connection twice, so three rounds are enough.
	from := rounds.Load()
	testutil.Eventually(t, 5*time.Second, func() error {
		if n := rounds.Load() - from; n < 3 {
			return fmt.Errorf("%d maintenance rounds since the disconnect", n)
		}
		return nil
	})
	s, ok := tc.nodes["n2"].repl.Session("ldo-dev")
	if !ok || !s.Connected || s.Owner != "n1" || s.Will == nil {
		t.Fatalf("session after the stop disconnected it: %+v (present %v); want open, owned by n1, will kept for the leave grace", s, ok)
	}
}
