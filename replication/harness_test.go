package replication

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// testConfig holds every tightened timing of the in-process tests in one
// place. Raft's LeaderLeaseTimeout must stay below HeartbeatTimeout.
// REPLICATION_LOG_STORE picks the log store (make test runs the package
// once with each).
func testConfig() Config {
	return Config{
		LogStore:                os.Getenv("REPLICATION_LOG_STORE"),
		HeartbeatTimeout:        150 * time.Millisecond,
		ElectionTimeout:         150 * time.Millisecond,
		LeaderLeaseTimeout:      100 * time.Millisecond,
		CommitTimeout:           5 * time.Millisecond,
		ReconcileInterval:       40 * time.Millisecond,
		StabilizationTime:       200 * time.Millisecond,
		DialTimeout:             time.Second,
		IOTimeout:               2 * time.Second,
		HandshakeTimeout:        time.Second,
		ShutdownTransferTimeout: time.Second,
		ExpirySweepInterval:     -1,
	}
}

// waitFor is the default bound of eventually.
const waitFor = 10 * time.Second

// eventually polls f until it returns nil or the timeout passes, then fails
// with f's last error. It is the only way tests wait.
func eventually(t testing.TB, timeout time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %v", timeout, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// testLogger routes logs to t.Log until the test ends (t.Log after that
// panics, and raft's goroutines may still log while shutting down).
func testLogger(t testing.TB) *slog.Logger {
	w := &tlogWriter{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tlogWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *tlogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// testCluster runs nodes in one process. Advertise addresses are logical
// names ("n1.raft.test:7947") that Dial resolves to the node's current
// listener, like a StatefulSet's stable DNS names: a node restarted on
// another port keeps its raft address.
type testCluster struct {
	t      testing.TB
	expect int
	base   string
	log    *slog.Logger
	// mutate adjusts every node's config.
	mutate func(*Config)
	// claims, if set, rewrites what membership shows (an impostor).
	claims func([]Peer) []Peer

	mu    sync.Mutex
	nodes map[string]*testNode
}

type testNode struct {
	id, dir, advert string
	c               *testCluster
	expect          int

	mu   sync.Mutex
	n    *Node
	addr string // current listener address, "" while down

	retained atomic.Int64 // OnRetained calls
	owners   atomic.Int64 // OnOwner calls
	restores atomic.Int64 // OnRestore calls
}

func newTestCluster(t testing.TB, expect int) *testCluster {
	// The log sink and the data dirs must outlive the nodes: cleanups run
	// last-registered first, so register them before closeAll.
	c := &testCluster{t: t, expect: expect, nodes: map[string]*testNode{}, base: t.TempDir()}
	c.log = testLogger(t)
	t.Cleanup(c.closeAll)
	return c
}

// add registers a node without starting it.
func (c *testCluster) add(id string) *testNode {
	tn := &testNode{id: id, dir: filepath.Join(c.base, id), advert: id + ".raft.test:7947", c: c, expect: c.expect}
	c.mu.Lock()
	c.nodes[id] = tn
	c.mu.Unlock()
	return tn
}

// startNew adds and starts nodes concurrently.
func (c *testCluster) startNew(ids ...string) []*testNode {
	out := make([]*testNode, len(ids))
	for i, id := range ids {
		out[i] = c.add(id)
	}
	var wg sync.WaitGroup
	errs := make([]error, len(ids))
	for i, tn := range out {
		wg.Go(func() { errs[i] = tn.start() })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		c.t.Fatal(err)
	}
	return out
}

func (c *testCluster) node(id string) *testNode {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[id]
}

func (c *testCluster) all() []*testNode {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*testNode, 0, len(c.nodes))
	for _, tn := range c.nodes {
		out = append(out, tn)
	}
	slices.SortFunc(out, func(a, b *testNode) int { return strings.Compare(a.id, b.id) })
	return out
}

func (c *testCluster) up() []*testNode {
	var out []*testNode
	for _, tn := range c.all() {
		if tn.node() != nil {
			out = append(out, tn)
		}
	}
	return out
}

// peers is Config.Peers: every running node, as gossip would show it.
func (c *testCluster) peers() []Peer {
	var out []Peer
	for _, tn := range c.up() {
		n := tn.node()
		out = append(out, Peer{ID: tn.id, Addr: tn.advert, BootstrapExpect: tn.expect, HasState: n.HasState()})
	}
	c.mu.Lock()
	claims := c.claims
	c.mu.Unlock()
	if claims != nil {
		out = claims(out)
	}
	return out
}

// dial resolves a logical address to the node's current listener.
func (c *testCluster) dial(ctx context.Context, addr string) (net.Conn, error) {
	for _, tn := range c.all() {
		if tn.advert != addr {
			continue
		}
		tn.mu.Lock()
		real := tn.addr
		tn.mu.Unlock()
		if real == "" {
			return nil, fmt.Errorf("%s is down: %w", addr, errors.New("connection refused"))
		}
		var d net.Dialer
		return d.DialContext(ctx, "tcp", real)
	}
	return nil, fmt.Errorf("no such host %s", addr)
}

func (tn *testNode) node() *Node {
	tn.mu.Lock()
	defer tn.mu.Unlock()
	return tn.n
}

func (tn *testNode) config(ln net.Listener) Config {
	cfg := testConfig()
	cfg.NodeID, cfg.Advertise, cfg.DataDir = tn.id, tn.advert, tn.dir
	cfg.BootstrapExpect = tn.expect
	cfg.Peers = tn.c.peers
	cfg.Listener, cfg.Dial = ln, tn.c.dial
	cfg.Logger = tn.c.log
	cfg.OnRetained = func(RetainedChange) { tn.retained.Add(1) }
	cfg.OnOwner = func(OwnerChange) { tn.owners.Add(1) }
	cfg.OnRestore = func() { tn.restores.Add(1) }
	if tn.c.mutate != nil {
		tn.c.mutate(&cfg)
	}
	return cfg
}

// start starts (or restarts) the node from its data dir on a new port.
func (tn *testNode) start() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	n, err := New(tn.config(ln))
	if err != nil {
		_ = ln.Close()
		return err
	}
	if err := n.Start(context.Background()); err != nil {
		return fmt.Errorf("start %s: %w", tn.id, err)
	}
	tn.mu.Lock()
	tn.n, tn.addr = n, ln.Addr().String()
	tn.mu.Unlock()
	return nil
}

// stop closes the node (gracefully, or like a crash with kill).
func (tn *testNode) stop(kill bool) {
	tn.mu.Lock()
	n := tn.n
	tn.n, tn.addr = nil, ""
	tn.mu.Unlock()
	if n == nil {
		return
	}
	errc := make(chan error, 1)
	go func() {
		if kill {
			errc <- n.kill()
		} else {
			errc <- n.Close()
		}
	}()
	select {
	case err := <-errc:
		if err != nil {
			tn.c.t.Errorf("close %s: %v", tn.id, err)
		}
	case <-time.After(stopTimeout):
		// Fail with what is stuck rather than hang until go test's
		// timeout, whose dump CI cuts off.
		tn.c.t.Errorf("close %s hung for %v; goroutines:\n%s", tn.id, stopTimeout, testutil.Goroutines())
	}
}

// stopTimeout bounds one node's Close in the tests.
const stopTimeout = 20 * time.Second

func (tn *testNode) restart(t testing.TB) {
	t.Helper()
	tn.stop(false)
	if err := tn.start(); err != nil {
		t.Fatal(err)
	}
}

// closeAll stops every node, bounded: a hung Close fails the test loudly.
func (c *testCluster) closeAll() {
	done := make(chan struct{})
	go func() {
		defer close(done)
		var wg sync.WaitGroup
		for _, tn := range c.all() {
			wg.Go(func() { tn.stop(true) })
		}
		wg.Wait()
	}()
	select {
	case <-done:
	case <-time.After(stopTimeout + 5*time.Second):
		c.t.Errorf("cluster teardown hung")
	}
}

// leader waits until exactly one running node is leader and every running
// node in the configuration agrees on it.
func (c *testCluster) leader() *testNode {
	c.t.Helper()
	var lead *testNode
	eventually(c.t, waitFor, func() error {
		lead = nil
		for _, tn := range c.up() {
			if tn.node().raft.State() == raft.Leader {
				if lead != nil {
					return fmt.Errorf("two leaders: %s and %s", lead.id, tn.id)
				}
				lead = tn
			}
		}
		if lead == nil {
			return errors.New("no leader")
		}
		for _, tn := range c.up() {
			if _, id := tn.node().raft.LeaderWithID(); string(id) != lead.id {
				return fmt.Errorf("%s thinks the leader is %q, not %s", tn.id, id, lead.id)
			}
		}
		return nil
	})
	return lead
}

// follower returns a running node that is not the leader.
func (c *testCluster) follower(lead *testNode) *testNode {
	for _, tn := range c.up() {
		if tn != lead {
			return tn
		}
	}
	c.t.Fatal("no follower")
	return nil
}

// waitVoters waits until node tn's configuration has exactly these voters
// and non-voters.
func waitConfig(t testing.TB, tn *testNode, voters, nonvoters []string) {
	t.Helper()
	eventually(t, waitFor, func() error {
		st := tn.node().Status()
		v, nv := ids(st.Voters), ids(st.NonVoters)
		if !slices.Equal(v, voters) || !slices.Equal(nv, nonvoters) {
			return fmt.Errorf("%s: voters %v non-voters %v, want %v / %v", tn.id, v, nv, voters, nonvoters)
		}
		return nil
	})
}

func ids(ss []Server) []string {
	out := make([]string, 0, len(ss))
	for _, s := range ss {
		out = append(out, s.ID)
	}
	slices.Sort(out)
	return out
}

// waitRetained waits until every running node's state has exactly want
// (topic -> payload).
func (c *testCluster) waitRetained(want map[string]string) {
	c.t.Helper()
	eventually(c.t, waitFor, func() error {
		for _, tn := range c.up() {
			got := map[string]string{}
			for _, m := range tn.node().Retained() {
				got[m.Topic] = string(m.Payload)
			}
			if len(got) != len(want) {
				return fmt.Errorf("%s has %d retained, want %d", tn.id, len(got), len(want))
			}
			for k, v := range want {
				if got[k] != v {
					return fmt.Errorf("%s: %s = %q, want %q", tn.id, k, got[k], v)
				}
			}
		}
		return nil
	})
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func setRetained(topic, payload string) *RetainSet {
	return &RetainSet{Msg: RetainedMessage{Topic: topic, Payload: []byte(payload), QoS: 1}}
}
