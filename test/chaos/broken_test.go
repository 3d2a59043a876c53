package chaos

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho/session/state"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestCheckerCatchesBrokenBuild runs a short scenario against a broker built
// with -tags chaos_broken, which acknowledges retained QoS 1/2 writes
// without replicating them, and QoS 1/2 publishes to persistent sessions
// before their commit (hooks/brokenbuild_on.go), and passes only if the
// checker reports the lost acknowledged writes and messages. It shows that
// the campaign's checker fails a broker that acknowledges before commit,
// not only synthetic histories (checker_test.go).
//
// The scenario is the campaign's ending without the fault phase: one
// writer acknowledges writes on every retained topic through one node;
// messages for an offline persistent session are published through a
// follower while the leader and the other follower are paused (no quorum);
// every node is SIGKILLed and restarted (restart-all); fresh subscribers
// read the retained values on every node and the persistent subscriber
// resumes and drains its session. The broken build kept the retained
// values only in the memory of the nodes and acknowledged messages that
// could never be committed, so after the restart both are gone, every
// time. The same scenario against the normal build (the "correct" subtest)
// must find nothing (it acknowledges none of the messages published
// without a quorum), so the violations are the bug, not the scenario.
func TestCheckerCatchesBrokenBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a broker cluster")
	}
	began := time.Now()
	bin := filepath.Join(t.TempDir(), "broker-chaos-broken")
	args := []string{"build", "-tags", "chaos_broken", "-o", bin, "github.com/mqtt-ha/broker/cmd/broker"}
	if out, err := exec.Command("go", args...).CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	t.Logf("built the chaos_broken broker in %s", time.Since(began).Round(time.Millisecond))

	t.Run("correct", func(t *testing.T) {
		// The control: the same scenario against the normal build finds
		// nothing, so what the broken build fails on is the bug.
		ops, finals, res := restartScenario(t, "")
		if w := writerOps(ops); countOK(w) != len(w) {
			t.Fatalf("%d of %d retained writes acknowledged; want all: %v", countOK(w), len(w), w)
		}
		if p := quorumlessOps(ops); countOK(p) != 0 {
			t.Errorf("the normal build acknowledged %d of %d publishes made without a quorum: %v", countOK(p), len(p), p)
		}
		t.Logf("normal build: session messages expected %d, delivered %d, lost %d; %d violation(s)",
			res.Sessions.Expected, res.Sessions.Delivered, res.Sessions.Lost, len(res.Violations))
		for _, v := range res.Failing() {
			t.Errorf("violation on the normal build: %s", v)
		}
		if len(res.Violations) > 0 {
			t.Logf("final reads: %v", finals)
		}
	})
	t.Run("broken", func(t *testing.T) {
		ops, finals, res := restartScenario(t, bin)
		partitioned := res.Partition.Minority[OK]+res.Partition.Minority[Failed]+res.Partition.Minority[Unknown] > 0
		t.Logf("broken build: retained writes ok/failed/unknown %d/%d/%d, final reads %v, lost %d, divergent %d; session messages expected %d, delivered %d, lost %d; %d violation(s)",
			res.RetainOps[OK], res.RetainOps[Failed], res.RetainOps[Unknown], finals, res.Lost, res.Divergent,
			res.Sessions.Expected, res.Sessions.Delivered, res.Sessions.Lost, len(res.Violations))
		for _, v := range res.Violations {
			t.Logf("reported (expected): %s", v)
		}
		// The broken build acknowledges every write (it does not wait for
		// a quorum); if it did not, the scenario proved nothing.
		retained := retainOps(ops)
		if countOK(retained) != len(retained) {
			t.Fatalf("the broken build acknowledged %d of %d retained writes; want all: %v", countOK(retained), len(retained), retained)
		}
		if !hasViolation(res, "acked-retained-lost") || res.Lost == 0 {
			t.Fatalf("the checker did not report the acknowledged writes the chaos_broken build lost: lost=%d violations=%v finals=%v",
				res.Lost, res.Violations, finals)
		}
		// The session part: every publish made without a quorum was
		// acknowledged, and lost with the nodes.
		if p := quorumlessOps(ops); countOK(p) != len(p) {
			t.Fatalf("the broken build acknowledged %d of %d publishes made without a quorum; want all: %v", countOK(p), len(p), p)
		}
		if !hasViolation(res, "session-acked-lost") || res.Sessions.Lost == 0 {
			t.Fatalf("the checker did not report the session messages the chaos_broken build acknowledged and lost: %+v, violations %v",
				res.Sessions, res.Violations)
		}
		if partitioned && !hasViolation(res, "minority-acked") {
			t.Fatalf("the checker did not report the writes the chaos_broken build acknowledged on a node cut off from the majority: %v", res.Violations)
		}
		if !partitioned {
			t.Logf("partition part skipped: %s", netnsUnavailable())
		}
	})
	t.Logf("%s in all", time.Since(began).Round(time.Millisecond))
}

// restartScenario is the campaign's ending without the fault phase, on a
// fresh three-node cluster running bin (brokerBin when empty): a
// persistent subscriber subscribes through node1 and goes offline; one
// writer sends two values to every retained topic through node1; when the
// network lab is available node3 is cut off for a moment while a probe
// writes through it (the broken build acknowledges those at once: the
// checker must report minority-acked); messages for the offline session are
// published without a quorum (publishWithoutQuorum); then the cluster is
// SIGKILLed and restarted, a fresh subscriber reads every node, the
// persistent subscriber resumes on another node and drains its session,
// and the checker runs over the history, the reads and the fault log.
func restartScenario(t *testing.T, bin string) ([]Op, []FinalRead, CheckResult) {
	t.Helper()
	cp := &campaign{t: t, down: map[string]bool{}, unavailable: map[string]time.Duration{}, conns: map[string][]*testutil.Client{}}
	var lab *netLab
	if netnsUnavailable() == "" {
		var err error
		if lab, err = newNetLab(t, 3); err != nil {
			t.Fatalf("network lab: %v", err)
		}
	}
	cp.c = startClusterLab(t, bin, 3, lab)

	// A persistent subscriber takes both session topics through node1 and
	// goes offline: what is published for it from now on is queued.
	st := state.NewInMemory()
	if err := cp.offlineSubscriber(st); err != nil {
		t.Fatalf("persistent subscriber: %v", err)
	}

	// Writes: two acknowledged values per topic, all through node1.
	node := cp.c.nodes[0]
	c, err := cp.connect("writer1", node, 0)
	if err != nil {
		t.Fatal(err)
	}
	seq := 1
	for round := 0; round < 2; round++ {
		for i := 0; i < retainTopics; i++ {
			topic := fmt.Sprintf("chaos/ret/%d", i)
			op := Op{Kind: KindRetain, Client: "writer1", Node: node.ID, Topic: topic, Value: fmt.Sprintf("writer1-%d", seq), Start: time.Now()}
			seq++
			op.Outcome, op.Err = publish(c, topic, true, op.Value)
			op.End = time.Now()
			cp.h.Add(op)
		}
	}
	if lab != nil {
		if err := cp.cutAndWrite(2, 2, 750*time.Millisecond); err != nil {
			t.Fatal(err)
		}
	}
	// Messages for the offline session while no quorum can form: the
	// leader and one follower are paused and stay paused until restart-all
	// kills them.
	if err := cp.publishWithoutQuorum(4, 1500*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	cp.closeAll()

	// The campaign's ending: a full-cluster SIGKILL and restart, then a
	// fresh subscriber on every node.
	if err := cp.restartAll(); err != nil {
		t.Fatalf("full-cluster restart: %v", err)
	}
	finals, err := cp.finalReads()
	if err != nil {
		t.Fatalf("final reads: %v", err)
	}

	// The subscriber resumes its session (clean start off, same paho
	// state) and drains it: a marker published now is queued behind every
	// message the log holds for it.
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		cp.persistentSubscriber(ctx, sessionSub{id: "sess-sub1", filters: sessFilters, parse: sessionReceipt, st: st, subscribed: true},
			rand.New(rand.NewSource(1)))
	}()
	took, drainErr := cp.drainSessions([]string{"sess-sub1"})
	stop()
	<-done
	cp.closeAll()
	if drainErr != nil {
		t.Fatalf("session drain: %v", drainErr)
	}
	t.Logf("session drained in %s", took.Round(time.Millisecond))

	ops := cp.h.Ops()
	return ops, finals, Check(ops, finals, cp.faults)
}

// offlineSubscriber connects sess-sub1 to node1 with a persistent session
// (clean start), subscribes to sessFilters and disconnects normally: the
// session stays, offline, and queues what matches.
func (cp *campaign) offlineSubscriber(st *state.State) error {
	const id = "sess-sub1"
	n := cp.c.nodes[0]
	start := time.Now()
	c, err := cp.connectWith(n, connectOptions{ClientOptions: testutil.ClientOptions{ID: id, CleanStart: true, SessionExpiry: sessExpiry, Session: st}})
	if err != nil {
		return err
	}
	defer c.Close()
	cp.h.Add(Op{Kind: KindSessConnect, Client: id, Node: n.ID, Start: start, End: time.Now(), Outcome: OK,
		CleanStart: true, Expiry: sessExpiry, SessionPresent: c.Connack.SessionPresent, SubConn: 1})
	if !cp.subscribeSession(v5Conn(c), id, n, sessFilters, 1) {
		return fmt.Errorf("%s: subscription refused", id)
	}
	return nil
}

// publishWithoutQuorum pauses (SIGSTOP) the raft leader and one follower,
// then publishes count messages for the persistent subscriber through the
// other follower, alternately QoS 1 and QoS 2, concurrently, each waiting
// up to timeout for its acknowledgement. No quorum can form, so nothing
// published now can be committed: the normal build cannot acknowledge it,
// the broken build acknowledges it at once. The paused nodes are left
// paused (restart-all kills them), so the broken build's pending entries
// die with them: it has lost what it acknowledged, deterministically.
func (cp *campaign) publishWithoutQuorum(count int, timeout time.Duration) error {
	// Every node agrees on the leader (node3 may just have rejoined after
	// the cut).
	leader := ""
	if err := poll(healTimeout, func() error {
		leader = ""
		for _, n := range cp.c.nodes {
			v, err := n.view()
			if err != nil {
				return err
			}
			if v.Raft.LeaderID == "" || (leader != "" && v.Raft.LeaderID != leader) {
				return fmt.Errorf("%s sees leader %q", n.ID, v.Raft.LeaderID)
			}
			leader = v.Raft.LeaderID
		}
		return nil
	}); err != nil {
		return fmt.Errorf("no agreed leader: %w", err)
	}
	var via *Node
	var paused []*Node
	for _, n := range cp.c.nodes {
		if n.ID != leader && via == nil {
			via = n
		} else {
			paused = append(paused, n)
		}
	}
	const id = "sess-pub1"
	c, err := cp.connect(id, via, 0)
	if err != nil {
		return err
	}
	start := time.Now()
	for _, n := range paused {
		cp.setDown(n, true)
		if err := n.signal(syscall.SIGSTOP); err != nil {
			return err
		}
	}
	var wg sync.WaitGroup
	for seq := 1; seq <= count; seq++ {
		qos := byte(1 + (seq+1)%2)
		topic := sessTopicQ1
		if qos == 2 {
			topic = sessTopicQ2
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			op := Op{Kind: KindSessPub, Client: id, Node: via.ID, Topic: topic, QoS: qos, Publisher: id, Seq: seq, PubConn: 1,
				Value: fmt.Sprintf("%s:%d", id, seq), Start: time.Now()}
			op.Outcome, op.Err = publishQoS(c, topic, qos, false, op.Value, timeout)
			op.End = time.Now()
			cp.h.Add(op)
		}()
	}
	wg.Wait()
	for _, n := range paused {
		cp.record(faultEvent{Kind: FaultPause, Node: n.ID, Start: start}, nil)
	}
	return nil
}

// cutAndWrite cuts node i off, sends writes retained values through it
// (each waiting up to timeout for its PUBACK), and heals the cut; the
// partition goes into the fault log.
func (cp *campaign) cutAndWrite(i, writes int, timeout time.Duration) error {
	n := cp.c.nodes[i]
	if err := cp.c.lab.cut(i); err != nil {
		return err
	}
	f := faultEvent{Kind: FaultPartition, Node: n.ID, Start: time.Now()}
	c, err := cp.connect("minority-probe", n, 0)
	for k := 1; err == nil && k <= writes; k++ {
		op := Op{Kind: KindRetain, Client: "minority-probe", Node: n.ID, Topic: probeTopic, Value: fmt.Sprintf("minority-probe-%d", k), Start: time.Now()}
		op.Outcome, op.Err = publishWithin(c, probeTopic, true, op.Value, timeout)
		op.End = time.Now()
		cp.h.Add(op)
	}
	healErr := cp.c.lab.heal(i)
	f.End = time.Now()
	cp.record(f, errors.Join(err, healErr))
	return errors.Join(err, healErr)
}

// retainOps are the retained writes of a history.
func retainOps(ops []Op) []Op {
	var w []Op
	for _, o := range ops {
		if o.Kind == KindRetain {
			w = append(w, o)
		}
	}
	return w
}

// quorumlessOps are the publishes publishWithoutQuorum made.
func quorumlessOps(ops []Op) []Op {
	var p []Op
	for _, o := range ops {
		if o.Kind == KindSessPub && o.Publisher == "sess-pub1" {
			p = append(p, o)
		}
	}
	return p
}

// writerOps are the ops of the scenario's writer (not the minority probe).
func writerOps(ops []Op) []Op {
	var w []Op
	for _, o := range ops {
		if o.Client == "writer1" {
			w = append(w, o)
		}
	}
	return w
}

func countOK(ops []Op) int {
	n := 0
	for _, o := range ops {
		if o.Outcome == OK {
			n++
		}
	}
	return n
}
