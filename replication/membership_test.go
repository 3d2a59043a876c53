package replication

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// TestAddNodeNonvoterThenVoter: nodes joining an existing cluster are
// added by the leader as non-voters and promoted once caught up, keeping
// the voters odd: a fourth stays a non-voter (four voters tolerate one
// failure, like three, with a larger quorum) until a fifth is ready.
func TestAddNodeNonvoterThenVoter(t *testing.T) {
	c := newTestCluster(t, 3)
	c.mutate = func(cfg *Config) { cfg.StabilizationTime = 400 * time.Millisecond }
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	ctx := ctxT(t, waitFor)
	for i := range 50 {
		applyRetry(t, ctx, lead.node(), setRetained(fmt.Sprintf("pre/%d", i), "x"))
	}
	n4 := c.startNew("n4")[0]
	waitConfig(t, lead, []string{"n1", "n2", "n3"}, []string{"n4"})
	eventually(t, waitFor, n4.node().Ready) // caught up...
	// ...and still a non-voter, well past StabilizationTime.
	time.Sleep(4 * 400 * time.Millisecond)
	waitConfig(t, lead, []string{"n1", "n2", "n3"}, []string{"n4"})
	if got := len(n4.node().Retained()); got != 50 {
		t.Fatalf("n4 has %d retained, want 50", got)
	}
	// A non-voter serves forwarded writes like any member.
	applyRetry(t, ctx, n4.node(), setRetained("from/n4", "y"))
	// A fifth: both become voters.
	n5 := c.startNew("n5")[0]
	waitConfig(t, lead, []string{"n1", "n2", "n3", "n4", "n5"}, nil)
	waitConfig(t, n5, []string{"n1", "n2", "n3", "n4", "n5"}, nil)
}

// TestDepartedServersRemovedDownToMinVoters: a scale-down from 5 to 3
// (nodes that leave gracefully and do not come back) needs no operator:
// the leader removes each departed server after RemoveLeftAfter, one at a
// time, never below MinVoters; a node that left and comes back in time
// (a rolling restart) stays a voter.
func TestDepartedServersRemovedDownToMinVoters(t *testing.T) {
	c := newTestCluster(t, 5)
	departed := newDepartures(c, 1500*time.Millisecond)
	c.startNew("n1", "n2", "n3", "n4", "n5")
	lead := c.leader()
	all := []string{"n1", "n2", "n3", "n4", "n5"}
	waitConfig(t, lead, all, nil)
	leave := func(id string) {
		c.nodes[id].stop(false)
		departed.leave(id)
	}
	var others []string // not the leader, in order
	for _, id := range all {
		if id != lead.id {
			others = append(others, id)
		}
	}
	// A rolling restart: back within the bound, still a voter.
	leave(others[0])
	if err := c.nodes[others[0]].start(); err != nil {
		t.Fatal(err)
	}
	departed.back(others[0]) // membership sees it alive again
	time.Sleep(2 * 1500 * time.Millisecond)
	waitConfig(t, c.leader(), all, nil)
	// Scale down: the two highest leave for good.
	gone := others[2:]
	for _, id := range gone {
		leave(id)
	}
	lead = c.leader()
	var rest []string
	for _, id := range all {
		if !slices.Contains(gone, id) {
			rest = append(rest, id)
		}
	}
	waitConfig(t, lead, rest, nil)
	// One more leaves: three voters is the minimum, it stays.
	leave(others[1])
	time.Sleep(2 * 1500 * time.Millisecond)
	waitConfig(t, c.leader(), rest, nil)
}

// TestRemoveServerAndRejoin: a server removed by RemoveServer (issued on a
// follower, forwarded to the leader) is not re-added while it stays
// visible; once it has left membership and comes back with its old data,
// the leader adds it again and it catches up.
func TestRemoveServerAndRejoin(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	var victim, asker *testNode
	for _, tn := range c.up() {
		if tn == lead {
			continue
		}
		if victim == nil {
			victim = tn
		} else {
			asker = tn
		}
	}
	ctx := ctxT(t, waitFor)
	if err := asker.node().RemoveServer(ctx, victim.id); err != nil {
		t.Fatal(err)
	}
	rest := []string{lead.id, asker.id}
	slices.Sort(rest)
	waitConfig(t, lead, rest, nil)
	// Still running and visible, but removed on purpose: stays out.
	waitTicks(t, lead, 10)
	waitConfig(t, lead, rest, nil)
	// The removed node is not ready. It learns it is out only if the
	// leader's last best-effort append of the removing entry reaches it
	// (raft stops replicating to a removed server right after); otherwise
	// it campaigns, the others refuse its pre-votes, and it reports no
	// leader for good.
	eventually(t, waitFor, func() error {
		if err := victim.node().Ready(); !errors.Is(err, ErrNotMember) && !errors.Is(err, ErrNoLeader) {
			return fmt.Errorf("removed node Ready = %v, want ErrNotMember or ErrNoLeader", err)
		}
		return nil
	})
	// Writes go on with two voters.
	applyRetry(t, ctx, asker.node(), setRetained("after/remove", "x"))
	// It leaves membership (stops), then comes back with its data dir.
	victim.stop(false)
	waitTicks(t, lead, 3)
	if err := victim.start(); err != nil {
		t.Fatal(err)
	}
	waitConfig(t, lead, []string{"n1", "n2", "n3"}, nil)
	c.waitRetained(map[string]string{"after/remove": "x"})
	eventually(t, waitFor, victim.node().Ready)
}

// TestLeaveLeader: the leader leaves gracefully: leadership moves first,
// then it is removed, and the rest keep a leader and take writes.
func TestLeaveLeader(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	if err := lead.node().Leave(ctxT(t, waitFor)); err != nil {
		t.Fatal(err)
	}
	lead.stop(false)
	newLead := c.leader()
	if newLead == lead {
		t.Fatal("leader did not change")
	}
	var rest []string
	for _, tn := range c.up() {
		rest = append(rest, tn.id)
	}
	waitConfig(t, newLead, rest, nil)
	if _, err := c.follower(newLead).node().Apply(ctxT(t, waitFor), setRetained("after/leave", "x")); err != nil {
		t.Fatal(err)
	}
}

func TestLeaveLastVoterRefused(t *testing.T) {
	c := newTestCluster(t, 1)
	tn := c.startNew("solo")[0]
	c.leader()
	if err := tn.node().Leave(ctxT(t, waitFor)); !errors.Is(err, ErrLastVoter) {
		t.Fatalf("Leave of the only voter = %v, want ErrLastVoter", err)
	}
}

// TestGracefulCloseTransfersLeadership: Close on the leader hands over
// before stopping, so the others have a new leader without waiting out an
// election timeout (observable as: a leader among the rest right away).
func TestGracefulCloseTransfersLeadership(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	lead.stop(false)
	newLead := c.leader()
	if newLead == lead {
		t.Fatal("same leader")
	}
	// The stopped node stays in the configuration (Close is not Leave).
	waitConfig(t, newLead, []string{"n1", "n2", "n3"}, nil)
}

// TestVoterNotReplacedWhileItAnswers: a member that claims the id of a
// voter from another address does not take its place while the voter
// still answers at its configured address (before, the leader moved the
// voter to the claimed address at once); once the voter is gone from
// there (a rescheduled node), the address is updated.
func TestVoterNotReplacedWhileItAnswers(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	var victim *testNode
	for _, tn := range c.up() {
		if tn != lead {
			victim = tn
			break
		}
	}
	const claimed = "impostor.raft.test:7947"
	c.mu.Lock()
	c.claims = func(ps []Peer) []Peer {
		ps = slices.DeleteFunc(ps, func(p Peer) bool { return p.ID == victim.id })
		return append(ps, Peer{ID: victim.id, Addr: claimed, BootstrapExpect: 3, HasState: true})
	}
	c.mu.Unlock()
	addrOf := func() string {
		for _, s := range lead.node().Status().Voters {
			if s.ID == victim.id {
				return s.Address
			}
		}
		return ""
	}
	waitTicks(t, lead, 20)
	if got := addrOf(); got != victim.advert {
		t.Fatalf("voter %s moved to %q while it still answers at %s", victim.id, got, victim.advert)
	}
	victim.stop(true)
	eventually(t, waitFor, func() error {
		if got := addrOf(); got != claimed {
			return fmt.Errorf("voter %s at %q, want the claimed %s once the old address is dead", victim.id, got, claimed)
		}
		return nil
	})
}

// TestDepartedVoterReplacedByWaitingNonvoter: three voters and a fourth
// node held back as a non-voter (odd voters). When a voter leaves for
// good, the non-voter is promoted (a departed voter does not count) and
// the departed one removed: three voters again, all present.
func TestDepartedVoterReplacedByWaitingNonvoter(t *testing.T) {
	c := newTestCluster(t, 3)
	departed := newDepartures(c, time.Second)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	c.startNew("n4")
	waitConfig(t, lead, []string{"n1", "n2", "n3"}, []string{"n4"})
	var gone string
	for _, id := range []string{"n1", "n2", "n3"} {
		if id != lead.id {
			gone = id
			break
		}
	}
	c.nodes[gone].stop(false)
	departed.leave(gone)
	var want []string
	for _, id := range []string{"n1", "n2", "n3", "n4"} {
		if id != gone {
			want = append(want, id)
		}
	}
	waitConfig(t, c.leader(), want, nil)
}

// TestVoterWithLostVolumeDoesNotElectAStaleLeader: a voter whose data dir
// is wiped (a pod rescheduled with an empty volume) comes back with the
// same id and address, so the configuration still counts it. It must not
// vote before it has caught up: here n2 missed writes (down), n1 (leader)
// and n3 committed them, n3 lost its volume, and n1 is down. If empty n3
// voted, stale n2 would win an election and the committed writes would be
// lost when n1 returns. Instead no leader is elected until n1 is back, and
// every acknowledged write survives.
func TestVoterWithLostVolumeDoesNotElectAStaleLeader(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	// Name the roles: the leader keeps the data, one follower goes stale,
	// the other loses its volume.
	var stale, wiped *testNode
	for _, tn := range c.up() {
		if tn == lead {
			continue
		}
		if stale == nil {
			stale = tn
		} else {
			wiped = tn
		}
	}
	ctx := ctxT(t, waitFor)
	applyRetry(t, ctx, lead.node(), setRetained("lv/before", "x"))
	eventually(t, waitFor, func() error {
		if _, ok := stale.node().RetainedMessage("lv/before"); !ok {
			return errors.New("the stale node has not applied the first write")
		}
		return nil
	})
	stale.stop(true)
	for i := range 20 {
		applyRetry(t, ctx, lead.node(), setRetained(fmt.Sprintf("lv/%d", i), "acked"))
	}
	eventually(t, waitFor, func() error {
		if _, ok := wiped.node().RetainedMessage("lv/19"); !ok {
			return errors.New("the follower has not applied the writes")
		}
		return nil
	})
	// The follower loses its volume and comes back empty; the leader dies.
	wiped.stop(true)
	if err := os.RemoveAll(wiped.dir); err != nil {
		t.Fatal(err)
	}
	lead.stop(true)
	if err := wiped.start(); err != nil {
		t.Fatal(err)
	}
	if err := stale.start(); err != nil {
		t.Fatal(err)
	}
	// Stale n2 may ask for votes as long as it likes: no leader.
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		for _, tn := range []*testNode{stale, wiped} {
			if tn.node().raft.State() == raft.Leader {
				t.Fatalf("%s became leader with the leader of the committed writes down and %s empty", tn.id, wiped.id)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := lead.start(); err != nil {
		t.Fatal(err)
	}
	c.leader()
	want := map[string]string{"lv/before": "x"}
	for i := range 20 {
		want[fmt.Sprintf("lv/%d", i)] = "acked"
	}
	c.waitRetained(want)
}

// TestRollingRestartKeepsVotersOdd: a voter restarting (it left, and comes
// back well within RemoveLeftAfter) does not count as gone: the non-voter
// waiting for an odd count stays a non-voter. Counting it gone at once
// promoted the waiting node, and four voters remained after the restart
// (found by review).
func TestRollingRestartKeepsVotersOdd(t *testing.T) {
	c := newTestCluster(t, 3)
	departed := newDepartures(c, time.Minute)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	c.startNew("n4")
	waitConfig(t, lead, []string{"n1", "n2", "n3"}, []string{"n4"})
	var gone *testNode
	for _, id := range []string{"n1", "n2", "n3"} {
		if id != lead.id {
			gone = c.node(id)
			break
		}
	}
	gone.stop(false)
	departed.leave(gone.id)
	time.Sleep(time.Second) // the pod restarts
	waitConfig(t, lead, []string{"n1", "n2", "n3"}, []string{"n4"})
	if err := gone.start(); err != nil {
		t.Fatal(err)
	}
	departed.back(gone.id)
	time.Sleep(time.Second)
	waitConfig(t, c.leader(), []string{"n1", "n2", "n3"}, []string{"n4"})
}

// TestScaleDownToFourDemotesOne: five voters, one leaves for good: after
// its removal four voters would remain, so one is demoted to a non-voter
// (three voters survive one failure like four, with a smaller quorum).
func TestScaleDownToFourDemotesOne(t *testing.T) {
	c := newTestCluster(t, 5)
	departed := newDepartures(c, 500*time.Millisecond)
	all := []string{"n1", "n2", "n3", "n4", "n5"}
	c.startNew(all...)
	lead := c.leader()
	waitConfig(t, lead, all, nil)
	var gone string
	for _, id := range all {
		if id != lead.id {
			gone = id
		}
	}
	c.node(gone).stop(false)
	departed.leave(gone)
	eventually(t, waitFor, func() error {
		st := c.leader().node().Status()
		if len(st.Voters) != 3 || len(st.NonVoters) != 1 {
			return fmt.Errorf("voters %d, non-voters %d; want 3 and 1", len(st.Voters), len(st.NonVoters))
		}
		return nil
	})
}

// departures is a fake membership's list of nodes that left gracefully
// (Config.Departed), for the scale-down tests.
type departures struct {
	mu sync.Mutex
	m  map[string]time.Time
}

// newDepartures makes c's nodes read d, with removeAfter as their
// RemoveLeftAfter and a short StabilizationTime.
func newDepartures(c *testCluster, removeAfter time.Duration) *departures {
	d := &departures{m: map[string]time.Time{}}
	c.mutate = func(cfg *Config) {
		cfg.StabilizationTime = 200 * time.Millisecond
		cfg.RemoveLeftAfter = removeAfter
		cfg.Departed = d.snapshot
	}
	return d
}

func (d *departures) snapshot() map[string]time.Time {
	d.mu.Lock()
	defer d.mu.Unlock()
	return maps.Clone(d.m)
}

// leave records id as gone gracefully now; back, as alive again.
func (d *departures) leave(id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.m[id] = time.Now()
}

func (d *departures) back(id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.m, id)
}

// TestBootstrapOnlyCandidateGetsNoVoteFromAnEmptyVoter: n1 bootstrapped
// the cluster and was down for its whole life since (its log holds the
// bootstrap configuration only), n3 lost its volume after helping commit
// writes, and n2 holds them. An empty voter lets bootstrap-only candidates
// through so that a new cluster can elect its first leader; here n2's log
// shows the cluster is past that, so n3 must refuse n1 too: n1 and n3
// would otherwise elect n1 and n2's committed writes would be overwritten.
// n2 is started unable to campaign (an hour's election timeout), so that
// only n1 asks; then restarted normally, it is elected and nothing is lost.
func TestBootstrapOnlyCandidateGetsNoVoteFromAnEmptyVoter(t *testing.T) {
	c := newTestCluster(t, 3)
	var passive atomic.Bool
	c.mutate = func(cfg *Config) {
		if cfg.NodeID == "n2" && passive.Load() {
			cfg.HeartbeatTimeout, cfg.ElectionTimeout = time.Hour, time.Hour
		}
	}
	n1, n2, n3, want := staleAndWiped(t, c)
	passive.Store(true)
	for _, tn := range []*testNode{n2, n3} {
		if err := tn.start(); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, waitFor, func() error {
		if !n3.node().votesStrict.Load() {
			return errors.New("n3 has not seen that n2's log is past the bootstrap")
		}
		return nil
	})
	if err := n1.start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if n1.node().raft.State() == raft.Leader {
			t.Fatal("n1, holding only the bootstrap configuration, was elected with the empty n3's vote")
		}
		time.Sleep(20 * time.Millisecond)
	}
	n2.stop(false)
	passive.Store(false)
	if err := n2.start(); err != nil {
		t.Fatal(err)
	}
	c.leader()
	c.waitRetained(want)
}

// staleAndWiped runs n1, n2, n3 until 20 retained writes are committed
// everywhere, stops all three (SIGKILL), then gives n3 an empty data dir
// and n1 one whose log holds only the bootstrap configuration; n2 keeps
// the writes. It returns the nodes, stopped, and the writes.
func staleAndWiped(t *testing.T, c *testCluster) (n1, n2, n3 *testNode, want map[string]string) {
	t.Helper()
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	ctx := ctxT(t, waitFor)
	want = map[string]string{}
	for i := range 20 {
		applyRetry(t, ctx, lead.node(), setRetained(fmt.Sprintf("bo/%d", i), "acked"))
		want[fmt.Sprintf("bo/%d", i)] = "acked"
	}
	c.waitRetained(want)
	var servers []raft.Server
	for _, s := range lead.node().Status().Voters {
		servers = append(servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(s.ID), Address: raft.ServerAddress(s.Address)})
	}
	for _, tn := range c.up() {
		tn.stop(true)
	}
	n1, n2, n3 = c.node("n1"), c.node("n2"), c.node("n3")
	for _, dir := range []string{n1.dir, n3.dir} {
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
	}
	bootstrapOnly(t, n1.dir, servers)
	return n1, n2, n3, want
}

// bootstrapOnly writes a data dir whose log holds nothing but the
// bootstrap configuration, as a node leaves it that bootstrapped and
// stopped before it received anything.
func bootstrapOnly(t *testing.T, dir string, servers []raft.Server) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig()
	if cfg.LogStore == "" {
		cfg.LogStore = LogStoreBolt
	}
	store, err := openLogStore(dir, cfg.LogStore)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	snaps, err := raft.NewFileSnapshotStore(dir, 1, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	_, trans := raft.NewInmemTransport("")
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(filepath.Base(dir))
	if err := raft.BootstrapCluster(rc, store, store, snaps, trans,
		raft.Configuration{Servers: servers}); err != nil {
		t.Fatal(err)
	}
}
