package node

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/mqtt-ha/broker/internal/testutil"
	"github.com/mqtt-ha/broker/replication"
)

// TestReviewDisconnectBehindSlowPublishPublishesWill: MQTT-3.1.2-10, a
// DISCONNECT deletes the will. The client publishes QoS 1 and sends
// DISCONNECT (both bytes are on the server's socket), then reconnects on
// the same node. The old connection's read loop is still in OnPublish
// (its read barrier waits for this node to apply the log: here the node
// is behind, as under load or during an election), so the DISCONNECT is
// not processed yet. takeoverWill waits only 500 ms (awaitDisconnectInFlight)
// and then publishes the will of a client that disconnected normally.
func TestReviewDisconnectBehindSlowPublishPublishesWill(t *testing.T) {
	g := newApplyGate(t)
	tc := newTunedCluster(t, g.tune, "n1", "n2", "n3")
	tc.waitReady()
	leader, follower := tc.leaderAndFollower(t)
	const id, topic = "atk-dw", "atk/dw/will"
	sub := tc.client(leader, "atk-dw-sub")
	sub.Sub(t, 1, topic)
	old := testutil.Connect(t, tc.nodes[follower].Addr("mqtt"), testutil.ClientOptions{ID: id, CleanStart: true,
		Will: &paho.WillMessage{Topic: topic, Payload: []byte("gone"), QoS: 1}})
	testutil.Eventually(t, wait, func() error {
		if _, ok := tc.nodes[follower].repl.Session(id); !ok {
			return errMsg("the will mirror is not applied on the follower yet")
		}
		return nil
	})
	// The follower falls behind the log.
	g.node.Store(&follower)
	defer g.open()
	_ = tc.client(follower, "atk-dw-gate").TryPub(gateTopic, 0, true, []byte("g"))
	select {
	case <-g.reached:
	case <-time.After(10 * time.Second):
		t.Fatal("the follower never reached the gate")
	}
	// A subscription committed after the gate: the follower's sessions
	// barrier (every QoS 1/2 PUBLISH passes it) now waits for it.
	p := testutil.Connect(t, tc.nodes[leader].Addr("mqtt"), testutil.ClientOptions{ID: "atk-dw-p", CleanStart: true, SessionExpiry: 600})
	p.Sub(t, 1, "atk/other")
	// PUBLISH QoS 1 (packet id 7) then DISCONNECT (0x00), in one write.
	pub := []byte{0x32, 0x0b, 0x00, 0x06, 'a', 't', 'k', '/', 'd', 'w', 0x00, 0x07, 0x00, 'x'}
	pub[1] = byte(len(pub) - 2)
	if _, err := old.Conn.Write(append(pub, 0xE0, 0x00)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // both packets are in the node's socket buffer
	// The client reconnects (persistent session this time, no will).
	done := make(chan error, 1)
	go func() {
		c, err := testutil.TryConnect(tc.nodes[follower].Addr("mqtt"), testutil.ClientOptions{ID: id, SessionExpiry: 600})
		if err == nil {
			t.Cleanup(c.Close)
		}
		done <- err
	}()
	if p, err := sub.Next(8 * time.Second); err == nil {
		t.Fatalf("will %q published although the client sent DISCONNECT (0x00) before reconnecting (MQTT-3.1.2-10)", p.Payload)
	}
	g.open()
	<-done
}

// TestReviewTakeoverWillDelayIgnored: MQTT-3.1.2-8 (3.1.2.5): the will is
// published after the connection closes and the delay elapsed or the
// session ended, "unless ... a new Network Connection for the ClientID is
// opened before the Will Delay Interval has elapsed". Mosquitto 2.0.11
// publishes nothing here, clean start or not (it cancels the delayed will:
// will_delay__remove after context__send_will). TakeoverWill with
// EndsSession publishes it at once, on a takeover on the same node.
func TestReviewTakeoverWillDelayIgnored(t *testing.T) {
	tc := newTestCluster(t, "n1")
	tc.waitReady()
	for _, persistent := range []bool{false, true} {
		name := map[bool]string{false: "clean", true: "persistent"}[persistent]
		t.Run(name, func(t *testing.T) {
			id, topic := "atk-wd-"+name, "atk/wd/"+name
			sub := tc.client("n1", id+"-sub")
			sub.Sub(t, 1, topic)
			opts := testutil.ClientOptions{ID: id, CleanStart: true, WillDelay: 30,
				Will: &paho.WillMessage{Topic: topic, Payload: []byte("gone"), QoS: 1}}
			if persistent {
				opts.SessionExpiry = 600
			}
			old := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), opts)
			opts.Will, opts.WillDelay = nil, 0
			cur := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), opts) // clean start again
			defer cur.Close()
			select {
			case <-old.Done():
			case <-time.After(wait):
				t.Fatal("not taken over")
			}
			if p, err := sub.Next(3 * time.Second); err == nil {
				t.Fatalf("will (delay 30 s) published %q at once on a takeover by a clean start; a new connection opened before the delay elapsed (MQTT-3.1.2-8; Mosquitto publishes nothing)", p.Payload)
			}
		})
	}
}

// TestReviewCleanConnectOnLaggingNodeKeepsSession: MQTT-3.1.2-4. A clean
// CONNECT (no will, so discardSession) on a node that is behind the log
// (slow disk, GC pause, catching up) while the cluster has a quorum: the
// sessions barrier times out after cleanDiscardTimeout, the error is only
// logged at debug level, and the stale local view has no session for the
// client id, so the CONNECT is served without discarding the persistent
// session created on another node. The next resume finds it (session
// present 1, old subscriptions): the chaos finding
// clean-start-session-present, through a lagging node instead of a
// minority.
func TestReviewCleanConnectOnLaggingNodeKeepsSession(t *testing.T) {
	g := newApplyGate(t)
	tc := newTunedCluster(t, g.tune, "n1", "n2", "n3")
	tc.waitReady()
	leader, follower := tc.leaderAndFollower(t)
	g.node.Store(&follower)
	defer g.open()
	_ = tc.client(follower, "atk-lag-gate").TryPub(gateTopic, 0, true, []byte("g"))
	select {
	case <-g.reached:
	case <-time.After(10 * time.Second):
		t.Fatal("the follower never reached the gate")
	}
	// A persistent session created on the leader after the follower fell
	// behind.
	p := testutil.Connect(t, tc.nodes[leader].Addr("mqtt"), testutil.ClientOptions{ID: "atk-lag", CleanStart: true, SessionExpiry: 600})
	p.Sub(t, 1, "atk/lag/#")
	p.Close()
	// Clean CONNECT on the lagging follower (MQTT 5 clean start, expiry 0).
	c, err := testutil.TryConnect(tc.nodes[follower].Addr("mqtt"), testutil.ClientOptions{ID: "atk-lag", CleanStart: true})
	if err != nil {
		t.Logf("clean CONNECT refused (acceptable): %v", err)
		return
	}
	t.Log("clean CONNECT served on the lagging node")
	c.Close()
	g.open()
	time.Sleep(time.Second)
	r, err := testutil.TryConnect(tc.nodes[leader].Addr("mqtt"), testutil.ClientOptions{ID: "atk-lag", SessionExpiry: 600})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Connack.SessionPresent {
		s, _ := tc.nodes[leader].repl.Session("atk-lag")
		t.Fatalf("resume after a served clean CONNECT found the old session (present=1, subscriptions %v)", s.Subscriptions)
	}
}

// TestReviewRefusedCleanConnectKillsLiveConnection: without a quorum a
// clean CONNECT for a client id with a persistent session is refused
// (0x88, 2b08eed), but mochi still runs inheritClientSession after
// OnSessionEstablish: the refused CONNECT takes over, and closes, the
// client's live connection on this node. The client is then offline on
// both connections (a persistent reconnect is refused without a leader).
func TestReviewRefusedCleanConnectKillsLiveConnection(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	live := testutil.Connect(t, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "atk-rk", CleanStart: true, SessionExpiry: 600})
	live.Sub(t, 1, "atk/rk")
	tc.leaveAlone("n1", "n2", "n3")
	c, err := testutil.TryConnect(tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: "atk-rk", CleanStart: true})
	if err == nil {
		c.Close()
		t.Fatal("clean CONNECT served without quorum (expected refused)")
	}
	t.Logf("clean CONNECT refused: %v", err)
	select {
	case <-live.Done():
		t.Fatal("the refused CONNECT closed the client's live connection (mochi's takeover ran although CONNACK refused it)")
	case <-time.After(2 * time.Second):
	}
}

// allGate holds every node's FSM goroutine at the retained change of
// gateTopic until open: the log commits, nobody applies.
type allGate struct {
	shut    atomic.Bool
	release chan struct{}
	once    sync.Once
}

func (g *allGate) open() { g.once.Do(func() { close(g.release) }) }

func (g *allGate) tune(cfg *Config) {
	cfg.ReplicationTuning = func(rc *replication.Config) {
		fastRaft(rc)
		orig := rc.OnRetained
		rc.OnRetained = func(ch replication.RetainedChange) {
			if g.shut.Load() && ch.Topic == gateTopic {
				<-g.release
			}
			orig(ch)
		}
	}
}

// TestReviewLateMirrorPublishesWillOfConnectedClient: openMirror's write
// times out with an unknown outcome (the leader is slow to apply), the
// clean CONNECT is served with mochi holding the will (c.unmirrored set).
// The mirror then commits late. The comment says a late commit is
// harmless, but isLive does not count a connection with unmirrored set, so
// this node's closeStale closes the mirror it owns within two ticks, and
// the leader publishes the will of a client that is still connected.
func TestReviewLateMirrorPublishesWillOfConnectedClient(t *testing.T) {
	g := &allGate{release: make(chan struct{})}
	t.Cleanup(g.open)
	tc := newTunedCluster(t, g.tune, "n1", "n2", "n3")
	tc.waitReady()
	leader, follower := tc.leaderAndFollower(t)
	const id, topic = "atk-late", "atk/late/will"
	sub := tc.client(leader, "atk-late-sub")
	sub.Sub(t, 1, topic)
	g.shut.Store(true)
	_ = tc.client(follower, "atk-late-gate").TryPub(gateTopic, 0, true, []byte("g"))
	time.Sleep(300 * time.Millisecond)
	c, err := testutil.TryConnect(tc.nodes[follower].Addr("mqtt"), testutil.ClientOptions{ID: id, CleanStart: true,
		Will: &paho.WillMessage{Topic: topic, Payload: []byte("gone"), QoS: 1}})
	g.open()
	if err != nil {
		t.Skipf("clean CONNECT refused (not the path under test): %v", err)
	}
	defer c.Close()
	if p, err := sub.Next(6 * time.Second); err == nil {
		select {
		case <-c.Done():
			t.Fatalf("will %q published and the client's connection closed", p.Payload)
		default:
		}
		t.Fatalf("will %q published while the client is still connected (late mirror closed by closeStale)", p.Payload)
	}
}
