package replication

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"
)

func TestConfigValidate(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	ok := func() Config {
		c := testConfig()
		c.NodeID, c.Advertise, c.DataDir, c.Listener = "n", "n.test:7947", t.TempDir(), ln
		c.Dial = (&testCluster{}).dial
		return c
	}
	for name, mut := range map[string]func(*Config){
		"no id":          func(c *Config) { c.NodeID = "" },
		"no dir":         func(c *Config) { c.DataDir = "" },
		"no listener":    func(c *Config) { c.Listener = nil },
		"no dial":        func(c *Config) { c.Dial = nil },
		"advertise":      func(c *Config) { c.Advertise = "nohostport" },
		"advertise port": func(c *Config) { c.Advertise = "h:0" },
		"expect no peer": func(c *Config) { c.BootstrapExpect = 3 },
		"lease":          func(c *Config) { c.LeaderLeaseTimeout = time.Hour },
		"negative":       func(c *Config) { c.BootstrapExpect = -1 },
		"log store":      func(c *Config) { c.LogStore = "sqlite" },
		"wal entry size": func(c *Config) { c.LogStore, c.MaxBatchBytes = LogStoreWAL, 64<<20 },
	} {
		c := ok()
		mut(&c)
		if _, err := New(c); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: New = %v, want ErrInvalidConfig", name, err)
		}
	}
	if _, err := New(ok()); err != nil {
		t.Fatal(err)
	}
}

// TestApplyOnLeaderAndFollowers: writes from every node (followers forward
// to the leader) are applied everywhere, observers fire on every node, and
// ownership epochs and takeovers come back to the callers.
func TestApplyOnLeaderAndFollowers(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	f := c.follower(lead)
	ctx := ctxT(t, waitFor)

	if _, err := lead.node().Apply(ctx, setRetained("from/leader", "L")); err != nil {
		t.Fatal(err)
	}
	res, err := f.node().Apply(ctx, setRetained("from/follower", "F"))
	if err != nil || !res.Changed || res.Index == 0 {
		t.Fatalf("forwarded apply: %+v %v", res, err)
	}
	c.waitRetained(map[string]string{"from/leader": "L", "from/follower": "F"})
	for _, tn := range c.up() {
		if got := tn.retained.Load(); got != 2 {
			t.Fatalf("%s: OnRetained called %d times, want 2", tn.id, got)
		}
	}

	// Takeover across nodes: the claim returns the previous owner.
	r1, err := lead.node().Apply(ctx, &ClaimOwner{ClientID: "dev", Node: lead.id, At: 1})
	if err != nil {
		t.Fatal(err)
	}
	r2, err := f.node().Apply(ctx, &ClaimOwner{ClientID: "dev", Node: f.id, At: 2})
	if err != nil {
		t.Fatal(err)
	}
	if r2.Epoch <= r1.Epoch || r2.Prev.Node != lead.id || r2.Prev.Epoch != r1.Epoch {
		t.Fatalf("takeover: first %+v, second %+v", r1, r2)
	}
	// The loser's stale release is refused, the winner's accepted.
	if res, err := lead.node().Apply(ctx, &ReleaseOwner{ClientID: "dev", Node: lead.id, Epoch: r1.Epoch}); err != nil || res.Changed {
		t.Fatalf("stale release: %+v %v", res, err)
	}
	if res, err := f.node().Apply(ctx, &ReleaseOwner{ClientID: "dev", Node: f.id, Epoch: r2.Epoch}); err != nil || !res.Changed {
		t.Fatalf("release: %+v %v", res, err)
	}

	// A forwarded Batch: atomic, one result per command.
	res, err = f.node().Apply(ctx, &Batch{Commands: []Command{
		setRetained("b/1", "1"), &RetainClear{Topic: "from/leader"}, &ClaimOwner{ClientID: "x", Node: f.id},
	}})
	if err != nil || len(res.Results) != 3 || !res.Results[1].Changed || res.Results[2].Epoch == 0 {
		t.Fatalf("batch: %+v %v", res, err)
	}
	c.waitRetained(map[string]string{"from/follower": "F", "b/1": "1"})
	// Ownership observers ran on every node: two claims, one effective
	// release, one claim in the batch (the stale release changed nothing).
	eventually(t, waitFor, func() error {
		for _, tn := range c.up() {
			if got := tn.owners.Load(); got != 4 {
				return fmt.Errorf("%s: OnOwner called %d times, want 4", tn.id, got)
			}
			if o, ok := tn.node().Owner("x"); !ok || o.Node != f.id {
				return fmt.Errorf("%s: owner of x = %+v", tn.id, o)
			}
		}
		return nil
	})

	// Domain errors come back as errors (and are caught before proposing).
	if _, err := f.node().Apply(ctx, &RetainSet{Msg: RetainedMessage{Topic: "t"}}); !errors.Is(err, ErrInvalidCommand) {
		t.Fatalf("invalid command: %v", err)
	}
	big := &RetainSet{Msg: RetainedMessage{Topic: "big", Payload: make([]byte, 2<<20)}}
	if _, err := f.node().Apply(ctx, big); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized command: %v", err)
	}
}

// TestApplyWithoutQuorum: with two of three nodes dead, writes fail with a
// clear error within the caller's deadline (and, once the node has been
// leaderless for longer than an election takes, at once).
func TestApplyWithoutQuorum(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	survivor := c.follower(lead)
	// The survivor must hold the configuration first (a follower picked
	// right after the election may not have it yet, and without it Ready
	// says "not a member" rather than "no leader": CI flake).
	eventually(t, waitFor, func() error { return survivor.node().Ready() })
	for _, tn := range c.up() {
		if tn != survivor {
			tn.stop(true)
		}
	}
	const deadline = 800 * time.Millisecond
	start := time.Now()
	_, err := survivor.node().Apply(ctxT(t, deadline), setRetained("t", "v"))
	took := time.Since(start)
	if !errors.Is(err, ErrTimeout) && !errors.Is(err, ErrNoLeader) && !errors.Is(err, ErrUnknownOutcome) {
		t.Fatalf("apply without quorum: %v", err)
	}
	if took > deadline+300*time.Millisecond {
		t.Fatalf("apply took %v, deadline %v", took, deadline)
	}
	t.Logf("first apply: %v after %v", err, took)
	// Leaderless for longer than an election: fail fast.
	eventually(t, waitFor, func() error {
		start := time.Now()
		_, err := survivor.node().Apply(ctxT(t, 5*time.Second), setRetained("t", "v"))
		if !errors.Is(err, ErrNoLeader) || time.Since(start) > 100*time.Millisecond {
			return fmt.Errorf("not failing fast yet: %v after %v", err, time.Since(start))
		}
		return nil
	})
	if err := survivor.node().Ready(); !errors.Is(err, ErrNoLeader) {
		t.Fatalf("Ready without quorum = %v", err)
	}
	if st := survivor.node().Status(); st.HasQuorumContact || st.LeaderID != "" {
		t.Fatalf("status without quorum: %+v", st)
	}
}

// TestFullRestartKeepsRetained: every node stops; all restart from their
// data dirs; every acknowledged write is still there, on every node.
func TestFullRestartKeepsRetained(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	ctx := ctxT(t, waitFor)
	want := map[string]string{}
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i := range 60 {
		tn := c.up()[i%3]
		wg.Go(func() {
			topic, payload := fmt.Sprintf("t/%d", i), fmt.Sprintf("v%d", i)
			if _, err := tn.node().Apply(ctx, setRetained(topic, payload)); err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			want[topic] = payload
			mu.Unlock()
		})
	}
	wg.Wait()
	if _, err := lead.node().Apply(ctx, &RetainClear{Topic: "t/0"}); err != nil {
		t.Fatal(err)
	}
	delete(want, "t/0")
	c.waitRetained(want)
	for _, tn := range c.all() {
		tn.stop(true)
	}
	for _, tn := range c.all() {
		if err := tn.start(); err != nil {
			t.Fatal(err)
		}
	}
	c.leader()
	c.waitRetained(want)
}

// TestSnapshotRestoreOnRestart: a node whose log was compacted into a
// snapshot restarts from disk: the snapshot is restored (OnRestore fires),
// the entries after it are replayed, and the state is complete.
func TestSnapshotRestoreOnRestart(t *testing.T) {
	c := newTestCluster(t, 1)
	c.mutate = func(cfg *Config) { cfg.TrailingLogs = 2 }
	tn := c.startNew("solo")[0]
	c.leader()
	ctx := ctxT(t, waitFor)
	want := map[string]string{}
	for i := range 20 {
		k, v := fmt.Sprintf("s/%d", i), fmt.Sprint(i)
		if _, err := tn.node().Apply(ctx, setRetained(k, v)); err != nil {
			t.Fatal(err)
		}
		want[k] = v
	}
	if _, err := tn.node().Apply(ctx, &ClaimOwner{ClientID: "c", Node: "solo"}); err != nil {
		t.Fatal(err)
	}
	if err := tn.node().raft.Snapshot().Error(); err != nil {
		t.Fatal(err)
	}
	for i := 20; i < 25; i++ { // after the snapshot: replayed from the log
		k, v := fmt.Sprintf("s/%d", i), fmt.Sprint(i)
		if _, err := tn.node().Apply(ctx, setRetained(k, v)); err != nil {
			t.Fatal(err)
		}
		want[k] = v
	}
	tn.restart(t)
	if got := tn.node().fsm.Restores(); got != 1 || tn.restores.Load() != 1 {
		t.Fatalf("restores after restart: %d (OnRestore %d), want 1", got, tn.restores.Load())
	}
	c.leader()
	c.waitRetained(want)
	if o, ok := tn.node().Owner("c"); !ok || o.Epoch != 1 {
		t.Fatalf("owner after restore: %+v %v", o, ok)
	}
}

// TestLaggingFollowerGetsSnapshot: a follower that was down while the
// leader compacted its log catches up through InstallSnapshot.
func TestLaggingFollowerGetsSnapshot(t *testing.T) {
	c := newTestCluster(t, 3)
	c.mutate = func(cfg *Config) { cfg.TrailingLogs = 2 }
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	lag := c.follower(lead)
	lag.stop(true)
	ctx := ctxT(t, waitFor)
	want := map[string]string{}
	for i := range 30 {
		k := fmt.Sprintf("l/%d", i)
		if _, err := lead.node().Apply(ctx, setRetained(k, "x")); err != nil {
			t.Fatal(err)
		}
		want[k] = "x"
	}
	if err := lead.node().raft.Snapshot().Error(); err != nil {
		t.Fatal(err)
	}
	if err := lag.start(); err != nil {
		t.Fatal(err)
	}
	c.waitRetained(want)
	if lag.node().fsm.Restores() == 0 {
		t.Fatal("lagging follower caught up without a snapshot")
	}
}

// TestGroupCommit: concurrent writers share log entries.
func TestGroupCommit(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	before := lead.node().raft.LastIndex()
	ctx := ctxT(t, waitFor)
	const writers, each = 32, 20
	var wg sync.WaitGroup
	for w := range writers {
		tn := c.up()[w%3]
		wg.Go(func() {
			for i := range each {
				// A leader change under load (2 cores, -race, other
				// packages' tests) may leave an outcome unknown; the write
				// is idempotent, so it is retried like a client would.
				for {
					_, err := tn.node().Apply(ctx, setRetained(fmt.Sprintf("g/%d/%d", w, i), "x"))
					if err == nil {
						break
					}
					if ctx.Err() != nil || !(errors.Is(err, ErrUnknownOutcome) || errors.Is(err, ErrNotLeader) || errors.Is(err, ErrNoLeader)) {
						t.Error(err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	entries := lead.node().raft.LastIndex() - before
	t.Logf("%d commands in %d log entries", writers*each, entries)
	if entries >= writers*each {
		t.Fatalf("no batching: %d commands took %d entries", writers*each, entries)
	}
	eventually(t, waitFor, func() error {
		for _, tn := range c.up() {
			if n := len(tn.node().Retained()); n != writers*each {
				return fmt.Errorf("%s has %d", tn.id, n)
			}
		}
		return nil
	})
}

// TestExpirySweep: the leader clears expired retained messages everywhere.
func TestExpirySweep(t *testing.T) {
	c := newTestCluster(t, 1)
	c.mutate = func(cfg *Config) { cfg.ExpirySweepInterval = 50 * time.Millisecond }
	tn := c.startNew("solo")[0]
	c.leader()
	ctx := ctxT(t, waitFor)
	expired := setRetained("old", "x")
	expired.Msg.Expires = time.Now().Add(-time.Second).UnixMilli()
	if _, err := tn.node().Apply(ctx, expired); err != nil {
		t.Fatal(err)
	}
	if _, err := tn.node().Apply(ctx, setRetained("keep", "y")); err != nil {
		t.Fatal(err)
	}
	c.waitRetained(map[string]string{"keep": "y"})
}

// TestJunkOnReplicationPort: garbage never crashes a node.
func TestJunkOnReplicationPort(t *testing.T) {
	c := newTestCluster(t, 1)
	tn := c.startNew("solo")[0]
	c.leader()
	for _, junk := range [][]byte{
		{0xff, 1, 2, 3},                         // unknown sub-protocol
		{subRPC, 0xff, 0xff, 0xff, 0xff, 1},     // absurd frame length
		{subRPC, 0, 0, 0, 3, rpcApply, 1, 0xff}, // truncated apply body
		{subRPC, 0, 0, 0, 2, 0x42, 1},           // unknown rpc kind
		{subRaft, 0xee, 0xee, 0xee},             // garbage raft rpc
	} {
		conn, err := c.dial(ctxT(t, time.Second), tn.advert)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = conn.Write(junk)
		_ = conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		_, _ = conn.Read(make([]byte, 64))
		_ = conn.Close()
	}
	if _, err := tn.node().Apply(ctxT(t, waitFor), setRetained("still", "ok")); err != nil {
		t.Fatalf("node broken by junk: %v", err)
	}
}

// TestApplyAcrossLeaderCrash: writers keep going through followers while
// the leader crashes. Every acknowledged write is on every survivor
// afterwards; every failure carries one of the documented sentinels.
func TestApplyAcrossLeaderCrash(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	var targets []*testNode
	for _, tn := range c.up() {
		if tn != lead {
			targets = append(targets, tn)
		}
	}
	var mu sync.Mutex
	acked := map[string]string{}
	stop := make(chan struct{})
	var stopOnce sync.Once
	halt := func() { stopOnce.Do(func() { close(stop) }) }
	var wg sync.WaitGroup
	// On a failure, stop the writers before the cluster closes (cleanups
	// run last-registered first).
	t.Cleanup(func() { halt(); wg.Wait() })
	var seq, fails int
	for w := range 8 {
		n := targets[w%2].node()
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				mu.Lock()
				seq++
				topic := fmt.Sprintf("crash/%d", seq)
				mu.Unlock()
				_, err := n.Apply(ctxT(t, 3*time.Second), setRetained(topic, "v"))
				mu.Lock()
				if err == nil {
					acked[topic] = "v"
				} else {
					fails++
					if !errors.Is(err, ErrTimeout) && !errors.Is(err, ErrNoLeader) && !errors.Is(err, ErrUnknownOutcome) {
						t.Errorf("unexpected error kind: %v", err)
					}
				}
				mu.Unlock()
			}
		})
	}
	eventually(t, waitFor, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(acked) < 50 {
			return fmt.Errorf("%d acked", len(acked))
		}
		return nil
	})
	lead.stop(true)
	newLead := c.leader()
	eventually(t, waitFor, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(acked) < 150 {
			return fmt.Errorf("%d acked after the crash", len(acked))
		}
		return nil
	})
	halt()
	wg.Wait()
	t.Logf("%d acked, %d failed around the crash; new leader %s", len(acked), fails, newLead.id)
	// Unacknowledged writes may have committed too: check containment.
	eventually(t, waitFor, func() error {
		for _, tn := range c.up() {
			for topic := range acked {
				if _, ok := tn.node().RetainedMessage(topic); !ok {
					return fmt.Errorf("%s lost acknowledged %s", tn.id, topic)
				}
			}
		}
		return nil
	})
}

func TestCloseIdempotent(t *testing.T) {
	c := newTestCluster(t, 1)
	tn := c.startNew("solo")[0]
	c.leader()
	n := tn.node()
	for range 2 {
		if err := n.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := n.Apply(ctxT(t, time.Second), setRetained("a", "b")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Apply after Close = %v", err)
	}
	if err := n.Ready(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Ready after Close = %v", err)
	}
	if st := n.Status(); st.State != "closed" {
		t.Fatalf("status after Close %+v", st)
	}
	if err := n.Start(ctxT(t, time.Second)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Start after Close = %v", err)
	}
	tn.mu.Lock()
	tn.n, tn.addr = nil, ""
	tn.mu.Unlock()
}

// TestWaitApplied: once WaitApplied returns for a write's index, every node
// reads the write (no polling).
func TestWaitApplied(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	f := c.follower(c.leader())
	ctx := ctxT(t, waitFor)
	for i := range 20 {
		topic := fmt.Sprintf("visible/%d", i)
		res, err := f.node().Apply(ctx, setRetained(topic, "v"))
		if err != nil {
			t.Fatal(err)
		}
		if err := f.node().WaitApplied(ctx, res.Index); err != nil {
			t.Fatal(err)
		}
		for _, tn := range c.up() {
			if _, ok := tn.node().RetainedMessage(topic); !ok {
				t.Fatalf("%s has not applied index %d after WaitApplied", tn.id, res.Index)
			}
		}
	}
}
