package chaos

import (
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestCheckerCatchesBrokenBuild runs a short scenario against a broker built
// with -tags chaos_broken, which acknowledges retained QoS 1/2 writes
// without replicating them (hooks/brokenbuild_on.go), and passes only if the
// checker reports the lost acknowledged writes. It shows that the campaign's
// checker fails a broker that acknowledges before commit, not only synthetic
// histories (checker_test.go).
//
// The scenario is the campaign's retained check without the fault phase:
// one writer acknowledges writes on every retained topic through one node,
// every node is SIGKILLed and restarted (restart-all), and fresh subscribers
// read the retained values on every node. The broken build kept the values
// only in the memory of the nodes, so after the restart they are gone on
// every node, every time. The same scenario against the normal build (the
// "correct" subtest) must find nothing, so the violation is the bug, not the
// scenario.
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
		for _, v := range res.Violations {
			t.Errorf("violation on the normal build: %s", v)
		}
		if len(res.Violations) > 0 {
			t.Logf("final reads: %v", finals)
		}
	})
	t.Run("broken", func(t *testing.T) {
		ops, finals, res := restartScenario(t, bin)
		partitioned := res.Partition.Minority[OK]+res.Partition.Minority[Failed]+res.Partition.Minority[Unknown] > 0
		t.Logf("broken build: %d retained writes ok/failed/unknown %d/%d/%d, final reads %v, lost %d, divergent %d, %d violation(s)",
			len(ops), res.RetainOps[OK], res.RetainOps[Failed], res.RetainOps[Unknown], finals, res.Lost, res.Divergent, len(res.Violations))
		for _, v := range res.Violations {
			t.Logf("reported (expected): %s", v)
		}
		// The broken build acknowledges every write (it does not wait for
		// a quorum); if it did not, the scenario proved nothing.
		if res.RetainOps[OK] != len(ops) {
			t.Fatalf("the broken build acknowledged %d of %d retained writes; want all: %v", res.RetainOps[OK], len(ops), ops)
		}
		if !hasViolation(res, "acked-retained-lost") || res.Lost == 0 {
			t.Fatalf("the checker did not report the acknowledged writes the chaos_broken build lost: lost=%d violations=%v finals=%v",
				res.Lost, res.Violations, finals)
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

// restartScenario is the campaign's retained check without the fault phase,
// on a fresh three-node cluster running bin (brokerBin when empty): one
// writer sends two values to every retained topic through node1; when the
// network lab is available node3 is cut off for a moment while a probe
// writes through it (the broken build acknowledges those at once: the
// checker must report minority-acked); then the cluster is SIGKILLed and
// restarted, a fresh subscriber reads every node, and the checker runs over
// the history, the reads and the fault log.
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

	ops := cp.h.Ops()
	return ops, finals, Check(ops, finals, cp.faults)
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
