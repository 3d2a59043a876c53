package node

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
	"github.com/mqtt-ha/broker/replication"
)

// applyGate holds one node's raft FSM goroutine when it reaches the
// retained change of gateTopic: that node is behind the log (a slow disk,
// a paused process) for as long as the gate is shut.
type applyGate struct {
	node    atomic.Pointer[string]
	release chan struct{}
	once    sync.Once
	reached chan struct{}
	rOnce   sync.Once
	topic   string // the retained topic that shuts it; gateTopic if empty
}

const gateTopic = "review/gate"

func newApplyGate(t testing.TB) *applyGate {
	g := &applyGate{release: make(chan struct{}), reached: make(chan struct{})}
	t.Cleanup(g.open)
	return g
}

func (g *applyGate) gated() string {
	if g.topic != "" {
		return g.topic
	}
	return gateTopic
}

func (g *applyGate) open() { g.once.Do(func() { close(g.release) }) }

func (g *applyGate) tune(cfg *Config) {
	id := cfg.NodeID
	cfg.ReplicationTuning = func(rc *replication.Config) {
		fastRaft(rc)
		orig := rc.OnRetained
		rc.OnRetained = func(ch replication.RetainedChange) {
			if p := g.node.Load(); p != nil && *p == id && ch.Topic == g.gated() {
				g.rOnce.Do(func() { close(g.reached) })
				<-g.release
			}
			orig(ch)
		}
	}
}

// TestNewSubscriberOnLaggingNodeGetsLatestRetained: guarantee 2 ("a new
// subscriber on any node gets the latest retained value of each matching
// topic") and 8 (read-your-writes across nodes). A retained message is
// acknowledged on one node; a subscriber on a node that has not applied it
// yet subscribes afterwards. OnSubscribe (persistent sessions: retainedFor)
// and mochi (clean sessions) read the retained set of this node's mochi
// store with no read barrier, so the subscriber never gets the value.
func TestNewSubscriberOnLaggingNodeGetsLatestRetained(t *testing.T) {
	g := newApplyGate(t)
	tc := newTunedCluster(t, g.tune, "n1", "n2", "n3")
	tc.waitReady()
	var lagging, other string
	for _, id := range []string{"n1", "n2", "n3"} {
		if tc.nodes[id].repl.IsLeader() {
			other = id
		} else if lagging == "" {
			lagging = id
		}
	}
	if other == "" || lagging == "" {
		t.Fatal("no leader")
	}
	persistent := testutil.Connect(t, tc.nodes[lagging].Addr("mqtt"), testutil.ClientOptions{ID: "rv-persist",
		CleanStart: true, SessionExpiry: 600, Buffer: 10})
	clean := testutil.Connect(t, tc.nodes[lagging].Addr("mqtt"), testutil.ClientOptions{ID: "rv-clean",
		CleanStart: true, Buffer: 10})
	g.node.Store(&lagging)
	pub := tc.client(other, "rv-pub")
	pub.Pub(t, gateTopic, 1, true, []byte("gate"))
	pub.Pub(t, "rv/x", 1, true, []byte("latest")) // acknowledged: committed
	select {
	case <-g.reached:
	case <-time.After(10 * time.Second):
		t.Fatal("the lagging node never reached the gate")
	}
	subscribed := make(chan struct{})
	go func() {
		// Open the gate once both SUBACKs are in (or, for a build that
		// waits for the log before SUBACK, after 2 s, so it is not stuck).
		select {
		case <-subscribed:
		case <-time.After(2 * time.Second):
		}
		g.open()
	}()
	clean.Sub(t, 1, "rv/x")
	persistent.Sub(t, 1, "rv/x")
	close(subscribed)
	for _, c := range []*testutil.Client{clean, persistent} {
		p, err := c.Next(5 * time.Second)
		if err != nil {
			t.Errorf("%s (subscribed on %s after the retained value was acknowledged on %s) got no retained message: %v",
				c.ID, lagging, other, err)
			continue
		}
		if string(p.Payload) != "latest" {
			t.Errorf("%s got %q, want the latest retained value", c.ID, p.Payload)
		}
	}
}
