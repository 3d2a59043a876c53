package node

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/cluster"
	"github.com/mqtt-ha/broker/internal/testutil"
	"github.com/mqtt-ha/broker/replication"
)

// testCluster runs N full broker nodes (mochi, hooks, cluster) in this
// process, every port chosen by the OS. Timings are tightened here, once.
type testCluster struct {
	t     testing.TB
	nodes map[string]*Node
	seed  string // gossip address of the first node
	// expect is every node's --bootstrap-expect: the initial cluster size.
	expect int
	cfgs   map[string]Config // the last configuration of each node, bound addresses filled in
	// tune, if set, adjusts each node's configuration before it starts.
	tune func(*Config)
}

func testLogger() *slog.Logger {
	if os.Getenv("BROKER_TEST_LOG") == "info" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	if os.Getenv("BROKER_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

func fastCluster(c *cluster.Config) {
	c.ProbeInterval = 200 * time.Millisecond
	c.ProbeTimeout = 100 * time.Millisecond
	c.SuspicionMult = 2
	c.SuspicionMaxTimeoutMult = 2
	c.GossipInterval = 20 * time.Millisecond
	c.PushPullInterval = time.Second
	c.RejoinInterval = 300 * time.Millisecond
	c.LeaveTimeout = 500 * time.Millisecond
}

func fastRaft(c *replication.Config) {
	c.HeartbeatTimeout = 200 * time.Millisecond
	c.ElectionTimeout = 200 * time.Millisecond
	c.LeaderLeaseTimeout = 150 * time.Millisecond
	c.CommitTimeout = 5 * time.Millisecond
	c.ReconcileInterval = 50 * time.Millisecond
	c.StabilizationTime = 300 * time.Millisecond
}

func newTestCluster(t testing.TB, ids ...string) *testCluster {
	return newTunedCluster(t, nil, ids...)
}

// newTunedCluster is newTestCluster with tune applied to every node's
// configuration.
func newTunedCluster(t testing.TB, tune func(*Config), ids ...string) *testCluster {
	tc := &testCluster{t: t, nodes: map[string]*Node{}, expect: len(ids), cfgs: map[string]Config{}, tune: tune}
	for _, id := range ids {
		tc.start(id)
	}
	tc.waitMembers(len(ids))
	return tc
}

func (tc *testCluster) start(id string) *Node {
	tc.t.Helper()
	cfg := Config{
		NodeID: id, DataDir: tc.t.TempDir(),
		MQTTAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0",
		GossipAddr: "127.0.0.1:0", ClusterAddr: "127.0.0.1:0", AdvertiseHost: "127.0.0.1",
		AllowAnonymous: true, MaxPacketSize: 4 << 20, MaxQueuedMessages: 1000, MaxKeepalive: 65535,
		RetainAvailable: true, ConnectTimeout: 5 * time.Second, ShutdownTimeout: 5 * time.Second,
		Logger: testLogger(), ClusterTuning: fastCluster, ReplicationTuning: fastRaft,
		BootstrapExpect: tc.expect,
	}
	if tc.seed != "" {
		cfg.Join = []string{tc.seed}
	}
	if tc.tune != nil {
		tc.tune(&cfg)
	}
	return tc.run(id, cfg)
}

// restart starts node id again from its data directory, on the same
// addresses (raft knows its peers by address, as by DNS name in Kubernetes).
// It does not wait for the node to be ready.
func (tc *testCluster) restart(id string) *Node {
	tc.t.Helper()
	cfg := tc.cfgs[id]
	cfg.Join = nil
	for other, c := range tc.cfgs {
		if other != id {
			cfg.Join = append(cfg.Join, c.GossipAddr)
		}
	}
	return tc.run(id, cfg)
}

func (tc *testCluster) run(id string, cfg Config) *Node {
	tc.t.Helper()
	n, err := New(cfg)
	if err != nil {
		tc.t.Fatalf("node %s: %v", id, err)
	}
	if err := n.Start(context.Background()); err != nil {
		tc.t.Fatalf("start %s: %v", id, err)
	}
	if tc.seed == "" {
		tc.seed = n.ClusterStatus().GossipAddr
	}
	tc.nodes[id] = n
	cfg.MQTTAddr, cfg.HTTPAddr = n.Addr("mqtt"), n.Addr("http")
	cfg.GossipAddr, cfg.ClusterAddr = n.ClusterStatus().GossipAddr, n.ClusterStatus().ClusterAddr
	tc.cfgs[id] = cfg
	tc.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = n.Shutdown(ctx)
	})
	return n
}

// waitMembers waits until every running node sees want alive members.
func (tc *testCluster) waitMembers(want int) {
	tc.t.Helper()
	testutil.Eventually(tc.t, 10*time.Second, func() error {
		for id, n := range tc.nodes {
			if got := n.ClusterStatus().AliveMembers; got != want {
				return fmt.Errorf("%s sees %d alive members, want %d", id, got, want)
			}
		}
		return nil
	})
}

// waitRoutes waits until node `at` holds exactly n routes of node `of` and
// has caught up with of's route version: a count alone would also match a
// stale set (an old filter not yet withdrawn, the new one not yet added).
func (tc *testCluster) waitRoutes(t testing.TB, at, of string, n int) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, func() error {
		want := uint64(0)
		if o := tc.nodes[of]; o != nil {
			want = o.ClusterStatus().RouteVersion
		}
		for _, m := range tc.nodes[at].ClusterStatus().Members {
			if m.ID == of {
				if m.Routes == n && m.RouteVersion == want {
					return nil
				}
				return fmt.Errorf("%s holds %d routes of %s at version %d, want %d at %d", at, m.Routes, of, m.RouteVersion, n, want)
			}
		}
		if n == 0 {
			return nil // the member is gone, and its routes with it
		}
		return fmt.Errorf("%s does not know %s", at, of)
	})
}

// stop shuts node id down gracefully and forgets it (restart brings it back).
func (tc *testCluster) stop(id string) {
	tc.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := tc.nodes[id].Shutdown(ctx); err != nil {
		tc.t.Fatalf("shutdown %s: %v", id, err)
	}
	delete(tc.nodes, id)
}

// waitReady waits until every running node's readiness checks pass.
func (tc *testCluster) waitReady() {
	tc.t.Helper()
	testutil.Eventually(tc.t, 20*time.Second, func() error {
		for id, n := range tc.nodes {
			for _, c := range n.checks {
				if err := c.check(); err != nil {
					return fmt.Errorf("%s %s: %w", id, c.name, err)
				}
			}
		}
		return nil
	})
}

func (tc *testCluster) client(node, id string) *testutil.Client {
	tc.t.Helper()
	return testutil.Connect(tc.t, tc.nodes[node].Addr("mqtt"), testutil.ClientOptions{ID: id, CleanStart: true, Buffer: 50000})
}

// forwarded sums the messages node `id` has forwarded to its peers.
func (tc *testCluster) forwarded(id string) uint64 {
	var sum uint64
	for _, m := range tc.nodes[id].ClusterStatus().Members {
		sum += m.Forwarded
	}
	return sum
}

// leaderAndFollower returns the current raft leader and one follower.
func (tc *testCluster) leaderAndFollower(t testing.TB) (leader, follower string) {
	t.Helper()
	for _, id := range slices.Sorted(maps.Keys(tc.nodes)) {
		if tc.nodes[id].repl.IsLeader() {
			leader = id
		} else if follower == "" {
			follower = id
		}
	}
	if leader == "" || follower == "" {
		t.Fatal("no leader")
	}
	return leader, follower
}
