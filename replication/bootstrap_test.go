package replication

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/hashicorp/raft"
)

func TestBootstrapPlan(t *testing.T) {
	p := func(id string, expect int, state bool) Peer {
		return Peer{ID: id, Addr: id + ":7947", BootstrapExpect: expect, HasState: state}
	}
	for _, tc := range []struct {
		name   string
		self   string
		expect int
		peers  []Peer
		want   []string // voters, nil: no bootstrap
	}{
		{"single", "a", 1, []Peer{p("a", 1, false)}, []string{"a"}},
		{"three visible", "b", 3, []Peer{p("c", 3, false), p("a", 3, false), p("b", 3, false)}, []string{"a", "b", "c"}},
		{"two of three", "a", 3, []Peer{p("a", 3, false), p("b", 3, false)}, nil},
		{"peer has state", "a", 3, []Peer{p("a", 3, false), p("b", 3, true), p("c", 3, false)}, nil},
		{"expect mismatch", "a", 3, []Peer{p("a", 3, false), p("b", 5, false), p("c", 3, false)}, nil},
		{"join-only peers ignored", "a", 2, []Peer{p("a", 2, false), p("j", 0, false), p("b", 2, false)}, []string{"a", "b"}},
		{"four visible, self among lowest", "c", 3, []Peer{p("d", 3, false), p("c", 3, false), p("b", 3, false), p("a", 3, false)}, []string{"a", "b", "c"}},
		{"four visible, self outside", "d", 3, []Peer{p("d", 3, false), p("c", 3, false), p("b", 3, false), p("a", 3, false)}, nil},
		{"disabled", "a", 0, []Peer{p("a", 0, false)}, nil},
		{"single sees existing cluster", "a", 1, []Peer{p("a", 1, false), p("z", 3, true)}, nil},
		{"duplicate id, two addresses", "a", 2, []Peer{p("a", 2, false), p("b", 2, false), {ID: "b", Addr: "x:1", BootstrapExpect: 2}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			servers, reason := bootstrapPlan(Peer{ID: tc.self}, tc.expect, tc.peers)
			var got []string
			for _, s := range servers {
				got = append(got, string(s.ID))
				if s.Suffrage != raft.Voter || string(s.Address) != string(s.ID)+":7947" {
					t.Fatalf("server %+v", s)
				}
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("plan %v (reason %q), want %v", got, reason, tc.want)
			}
			if tc.want == nil && reason == "" {
				t.Fatal("no bootstrap without a reason")
			}
		})
	}
	// Every node that sees the same peers computes the same configuration.
	peers := []Peer{p("n3", 3, false), p("n1", 3, false), p("n2", 3, false)}
	a, _ := bootstrapPlan(Peer{ID: "n1"}, 3, peers)
	rev := slices.Clone(peers)
	slices.Reverse(rev)
	b, _ := bootstrapPlan(Peer{ID: "n3"}, 3, rev)
	if fmt.Sprint(a) != fmt.Sprint(b) {
		t.Fatalf("plans differ: %v vs %v", a, b)
	}
}

func TestBootstrapThreeAtOnce(t *testing.T) {
	c := newTestCluster(t, 3)
	nodes := c.startNew("n1", "n2", "n3")
	lead := c.leader()
	for _, tn := range nodes {
		waitConfig(t, tn, []string{"n1", "n2", "n3"}, nil)
	}
	eventually(t, waitFor, func() error {
		for _, tn := range nodes {
			if err := tn.node().Ready(); err != nil {
				return fmt.Errorf("%s: %w", tn.id, err)
			}
		}
		return nil
	})
	st := lead.node().Status()
	if st.State != "Leader" || st.LeaderID != lead.id || !st.HasQuorumContact || st.Term == 0 || st.CommitIndex == 0 {
		t.Fatalf("leader status %+v", st)
	}
}

func TestBootstrapOneAtATime(t *testing.T) {
	c := newTestCluster(t, 3)
	n1 := c.startNew("n1")[0]
	// Several bootstrap rounds with one node visible: nothing happens.
	waitTicks(t, n1, 5)
	if n1.node().HasState() {
		t.Fatal("n1 bootstrapped alone with bootstrap_expect 3")
	}
	n2 := c.startNew("n2")[0]
	waitTicks(t, n2, 5)
	waitTicks(t, n1, 5)
	if n1.node().HasState() || n2.node().HasState() {
		t.Fatal("bootstrapped with two of three nodes")
	}
	if err := n1.node().Ready(); !errors.Is(err, ErrNotMember) {
		t.Fatalf("Ready before bootstrap = %v, want ErrNotMember", err)
	}
	c.startNew("n3")
	c.leader()
	for _, tn := range c.all() {
		waitConfig(t, tn, []string{"n1", "n2", "n3"}, nil)
	}
}

// waitTicks waits until the node's manage loop ran n more times.
func waitTicks(t testing.TB, tn *testNode, n uint64) {
	t.Helper()
	start := tn.node().ticks.Load()
	eventually(t, waitFor, func() error {
		if got := tn.node().ticks.Load(); got < start+n {
			return fmt.Errorf("%s: %d ticks", tn.id, got-start)
		}
		return nil
	})
}

func TestBootstrapSingleNode(t *testing.T) {
	c := newTestCluster(t, 1)
	tn := c.add("solo")
	tn.c.mutate = func(cfg *Config) { cfg.Peers = nil } // a lone node without membership
	if err := tn.start(); err != nil {
		t.Fatal(err)
	}
	c.leader()
	res, err := tn.node().Apply(ctxT(t, waitFor), setRetained("a", "1"))
	if err != nil || res.Index == 0 {
		t.Fatalf("apply: %+v %v", res, err)
	}
	eventually(t, waitFor, tn.node().Ready)
}

func TestHasStateDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "d")
	if ok, err := HasState(dir); ok || err != nil {
		t.Fatalf("missing dir: %v %v", ok, err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("HasState created the data dir")
	}
	c := newTestCluster(t, 1)
	tn := c.add("x")
	tn.dir = dir
	tn.c.mutate = func(cfg *Config) { cfg.Peers = nil }
	if err := tn.start(); err != nil {
		t.Fatal(err)
	}
	c.leader()
	tn.stop(false)
	if ok, err := HasState(dir); !ok || err != nil {
		t.Fatalf("after bootstrap: %v %v", ok, err)
	}
}

// TestRestartNeverRebootstraps: all three nodes of a cluster stop; one
// restarts alone with the same bootstrap_expect. It has state, so it must
// neither bootstrap a new cluster nor elect itself: it waits for a quorum
// of the old configuration, and the data is still there when one comes.
func TestRestartNeverRebootstraps(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	if _, err := lead.node().Apply(ctxT(t, waitFor), setRetained("keep", "v")); err != nil {
		t.Fatal(err)
	}
	for _, tn := range c.all() {
		tn.stop(true)
	}
	n1 := c.node("n1")
	if err := n1.start(); err != nil {
		t.Fatal(err)
	}
	waitTicks(t, n1, 10)
	st := n1.node().Status()
	if st.State == "Leader" || len(st.Voters) != 3 {
		t.Fatalf("restarted alone: %+v", st)
	}
	if err := c.node("n2").start(); err != nil {
		t.Fatal(err)
	}
	c.leader()
	c.waitRetained(map[string]string{"keep": "v"})
	waitConfig(t, n1, []string{"n1", "n2", "n3"}, nil)
}
