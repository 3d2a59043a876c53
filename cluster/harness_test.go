package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Test harness: N real Nodes in one process on 127.0.0.1, ports chosen by
// the OS, tight timings set here and only here, logs routed to t.Log,
// teardown bounded by Close's own limit.

// testConfig returns a Config with timings tightened for loopback so that a
// killed node is declared dead in about a second, yet not so tight that a
// busy 2-core machine under -race produces false suspicions.
func testConfig(t testing.TB, id string) Config {
	return Config{
		NodeID:                  id,
		AdvertiseHost:           "127.0.0.1",
		GossipAddr:              "127.0.0.1:0",
		ClusterAddr:             "127.0.0.1:0",
		MQTTPort:                1883,
		ProbeInterval:           250 * time.Millisecond,
		ProbeTimeout:            150 * time.Millisecond,
		SuspicionMult:           3,
		SuspicionMaxTimeoutMult: 2,
		GossipInterval:          20 * time.Millisecond,
		PushPullInterval:        2 * time.Second,
		TCPTimeout:              time.Second,
		RejoinInterval:          300 * time.Millisecond,
		LeaveTimeout:            500 * time.Millisecond,
		DialTimeout:             time.Second,
		HandshakeTimeout:        time.Second,
		ReconnectMin:            10 * time.Millisecond,
		ReconnectMax:            200 * time.Millisecond,
		Logger:                  testLogger(t),
		Registerer:              prometheus.NewRegistry(),
	}
}

// testLogger routes logs to t.Log at Warn (CLUSTER_TEST_LOG=debug|info for
// more). Lines written after the test finished are dropped instead of
// panicking: memberlist goroutines may log during their own shutdown.
func testLogger(t testing.TB) *slog.Logger {
	level := slog.LevelWarn
	switch os.Getenv("CLUSTER_TEST_LOG") {
	case "debug":
		level = slog.LevelDebug
	case "info":
		level = slog.LevelInfo
	}
	w := &testWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

type testWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimSpace(string(p)))
	}
	return len(p), nil
}

// eventually polls cond until it holds or timeout passes. It is the only
// way tests wait: never a bare sleep.
func eventually(t testing.TB, timeout time.Duration, cond func() bool, format string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: "+format, append([]any{timeout}, args...)...)
		}
		<-tick.C
	}
}

// delivery is one message a node's Deliverer received.
type delivery struct {
	from string
	m    *Message
}

// recorder is a Deliverer that keeps everything; onDeliver, when set, runs
// inside Deliver (tests use it to play a buggy hook).
type recorder struct {
	mu        sync.Mutex
	got       []delivery
	onDeliver func(from string, m *Message)
}

func (r *recorder) Deliver(from string, m *Message) {
	r.mu.Lock()
	r.got = append(r.got, delivery{from, m})
	f := r.onDeliver
	r.mu.Unlock()
	if f != nil {
		f(from, m)
	}
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.got)
}

func (r *recorder) all() []delivery {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.got)
}

// countTopic counts deliveries on topic.
func (r *recorder) countTopic(topic string) int {
	n := 0
	for _, d := range r.all() {
		if d.m.Topic == topic {
			n++
		}
	}
	return n
}

type testNode struct {
	*Node
	t   testing.TB
	rec *recorder
	reg *prometheus.Registry
}

type nodeOption func(*Config, *Node)

func withConfig(f func(*Config)) nodeOption { return func(c *Config, _ *Node) { f(c) } }

// newTestNode builds (but does not start) a node; Close is registered as
// cleanup.
func newTestNode(t testing.TB, id string, join []string, opts ...nodeOption) *testNode {
	t.Helper()
	cfg := testConfig(t, id)
	cfg.Join = join
	for _, o := range opts {
		o(&cfg, nil)
	}
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	rec := &recorder{}
	n, err := New(cfg, rec)
	if err != nil {
		t.Fatalf("New(%s): %v", id, err)
	}
	for _, o := range opts {
		o(&cfg, n)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			// The stuck goroutine is the diagnosis: name it.
			t.Errorf("close %s: %v\n%s", id, err, testutil.Goroutines())
		}
	})
	return &testNode{Node: n, t: t, rec: rec, reg: reg}
}

func startNode(t testing.TB, id string, join []string, opts ...nodeOption) *testNode {
	t.Helper()
	tn := newTestNode(t, id, join, opts...)
	if err := tn.Start(context.Background()); err != nil {
		t.Fatalf("start %s: %v", id, err)
	}
	return tn
}

// startCluster starts n nodes n1..nN joined through n1 and waits until every
// node sees all of them alive.
func startCluster(t testing.TB, n int, opts ...nodeOption) []*testNode {
	t.Helper()
	nodes := []*testNode{startNode(t, "n1", nil, opts...)}
	for i := 2; i <= n; i++ {
		nodes = append(nodes, startNode(t, fmt.Sprintf("n%d", i), []string{nodes[0].selfGossip}, opts...))
	}
	waitMembers(t, nodes, n)
	return nodes
}

func waitMembers(t testing.TB, nodes []*testNode, want int) {
	t.Helper()
	eventually(t, 10*time.Second, func() bool {
		for _, tn := range nodes {
			if int(tn.numAlive.Load()) != want {
				return false
			}
		}
		return true
	}, "members did not converge to %d: %v", want, aliveCounts(nodes))
}

func aliveCounts(nodes []*testNode) map[string]int32 {
	out := map[string]int32{}
	for _, tn := range nodes {
		out[tn.ID()] = tn.numAlive.Load()
	}
	return out
}

// waitRoutes waits until every observer holds exactly filters for node.
func waitRoutes(t testing.TB, observers []*testNode, node string, filters ...string) {
	t.Helper()
	slices.Sort(filters)
	eventually(t, 10*time.Second, func() bool {
		for _, o := range observers {
			if o.ID() == node {
				continue
			}
			got := o.routes.remoteFilters(node)
			if len(got) != len(filters) || (len(filters) > 0 && !slices.Equal(got, filters)) {
				return false
			}
		}
		return true
	}, "routes of %s did not converge to %v: %v", node, filters, routeViews(observers, node))
}

func routeViews(observers []*testNode, node string) map[string][]string {
	out := map[string][]string{}
	for _, o := range observers {
		out[o.ID()] = o.routes.remoteFilters(node)
	}
	return out
}

func (tn *testNode) kill() {
	if err := tn.Kill(); err != nil {
		tn.t.Errorf("kill %s: %v", tn.ID(), err)
	}
}

func (tn *testNode) clusterAddr() string { return tn.mux.Addr().String() }

// counter reads a counter or gauge (prometheus' testutil would pull in a
// module the shared go.sum does not have).
func (tn *testNode) counter(c prometheus.Metric) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		tn.t.Fatalf("read metric: %v", err)
	}
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	}
	tn.t.Fatalf("unsupported metric type")
	return 0
}

func (tn *testNode) dropped(reason string) float64 {
	return tn.counter(tn.metrics.dropped.WithLabelValues(reason))
}

func (tn *testNode) memberState(id string) string {
	for _, m := range tn.Status().Members {
		if m.ID == id {
			return m.State
		}
	}
	return ""
}

// partitionTransport drops gossip traffic to blocked addresses (packets are
// silently lost, streams fail to dial), like a network partition.
type partitionTransport struct {
	memberlist.NodeAwareTransport
	mu      sync.Mutex
	blocked map[string]bool
	all     bool
}

func (p *partitionTransport) set(all bool, addrs ...string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.all = all
	p.blocked = map[string]bool{}
	for _, a := range addrs {
		p.blocked[a] = true
	}
}

func (p *partitionTransport) isBlocked(addr string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.all || p.blocked[addr]
}

func (p *partitionTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	if p.isBlocked(addr) {
		return time.Now(), nil
	}
	return p.NodeAwareTransport.WriteTo(b, addr)
}

func (p *partitionTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	if p.isBlocked(a.Addr) {
		return time.Now(), nil
	}
	return p.NodeAwareTransport.WriteToAddress(b, a)
}

func (p *partitionTransport) DialTimeout(addr string, d time.Duration) (net.Conn, error) {
	if p.isBlocked(addr) {
		return nil, fmt.Errorf("partitioned from %s", addr)
	}
	return p.NodeAwareTransport.DialTimeout(addr, d)
}

func (p *partitionTransport) DialAddressTimeout(a memberlist.Address, d time.Duration) (net.Conn, error) {
	if p.isBlocked(a.Addr) {
		return nil, fmt.Errorf("partitioned from %s", a.Addr)
	}
	return p.NodeAwareTransport.DialAddressTimeout(a, d)
}

func withPartition(pt *partitionTransport) nodeOption {
	return func(_ *Config, n *Node) {
		if n != nil {
			n.wrapTransport = func(t memberlist.NodeAwareTransport) memberlist.NodeAwareTransport {
				pt.NodeAwareTransport = t
				return pt
			}
		}
	}
}

func msg(topic, payload string) *Message {
	return &Message{Topic: topic, Payload: []byte(payload)}
}
