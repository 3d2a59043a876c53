package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/mqtt-ha/broker/internal/testutil"
)

const (
	shortFaultPhase = 35 * time.Second // without CHAOS_DURATION: ~45 s in all
	healTimeout     = 60 * time.Second // after a fault, the cluster is whole again within this
	settleTimeout   = 30 * time.Second // after the run, nodes agree within this
	publishTimeout  = 5 * time.Second  // no PUBACK within this: outcome unknown
	probeTimeout    = 10 * time.Second // the minority probe waits longer than failFastBound
	longPartition   = 9 * time.Second  // the first partition: longer than failFastBound
	retainTopics    = 4
	retainWriters   = 3
)

// Fault kinds.
const (
	FaultKill       = "kill"        // SIGKILL one node, restart it after a while
	FaultPause      = "pause"       // SIGSTOP one node, SIGCONT after a while
	FaultRolling    = "rolling"     // SIGTERM, restart, wait ready: each node in turn
	FaultRestartAll = "restart-all" // SIGKILL every node at the end, restart them together
	FaultPartition  = "partition"   // cut one node off from the others (network namespaces), then heal
)

// faultEvent is one fault as it happened. For a partition, Start is when
// the cut took effect and End when it was healed; MajorityLeader is when
// the other nodes were first seen agreeing on a leader among themselves
// during the cut (zero: not within the cut).
type faultEvent struct {
	Kind           string    `json:"kind"`
	Node           string    `json:"node"`
	Start          time.Time `json:"start"`
	End            time.Time `json:"end"`
	MajorityLeader time.Time `json:"majority_leader,omitzero"`
	Err            string    `json:"err,omitempty"`
}

type campaign struct {
	drainSeq int // the last drain marker's sequence number (drainSessions)
	// rrReplies counts the replies each requester received (0: clean, 1:
	// persistent): the faults wait for one of each (awaitWorkloads).
	rrReplies [2]atomic.Int64
	// tkoRounds counts each takeover device's rounds whose "new" was
	// acknowledged and read: the faults wait for one of each too.
	tkoRounds [tkoDevices]atomic.Int64
	t         *testing.T
	seed      int64
	c         *cluster
	h         History

	mu          sync.Mutex
	down        map[string]bool
	unavailable map[string]time.Duration
	faults      []faultEvent

	connMu   sync.Mutex
	conns    map[string][]*testutil.Client // client id -> every connection it opened
	conns311 map[string][]*client311       // the same for MQTT 3.1.1 clients

	bg           sync.WaitGroup // workload started by faults (fresh publishers, availability reads)
	availReading bool           // an availability read is running
	freshBursts  int            // fresh publishers started so far

	partitionSkipped string // why there are no partitions ("": there are)
	partitions       int    // partitions done so far
	probeSeq         int    // last minority probe value
}

// Report is the JSON the campaign writes.
type Report struct {
	Seed               int64              `json:"seed"`
	WorkloadStart      time.Time          `json:"workload_start"` // the timeline's origin
	Duration           string             `json:"fault_phase"`
	Elapsed            string             `json:"elapsed"`
	Operations         int                `json:"operations"`
	Faults             map[string]int     `json:"faults"`
	PartitionSkipped   string             `json:"partition_skipped,omitempty"` // why partitions were not injected
	PartitionMethod    string             `json:"partition_method,omitempty"`
	UnavailableSeconds map[string]float64 `json:"unavailable_seconds"`
	Result             CheckResult        `json:"result"`
	LiveConnections    map[string]int     `json:"live_connections_after_settle"`
	SessionDrain       string             `json:"session_drain"` // how the persistent subscribers' drain ended
	// BrokerCounters: session counters of /metrics summed over the nodes
	// before the full-cluster restart (each node's since its last start).
	BrokerCounters map[string]float64 `json:"broker_session_counters"`
	FaultLog       []faultEvent       `json:"fault_log"`
	FinalReads     []FinalRead        `json:"final_reads"`
}

func TestChaos(t *testing.T) {
	phase := shortFaultPhase
	if d := os.Getenv("CHAOS_DURATION"); d != "" {
		var err error
		if phase, err = time.ParseDuration(d); err != nil {
			t.Fatalf("CHAOS_DURATION=%q: %v", d, err)
		}
	}
	seed := time.Now().UnixNano() % 1_000_000_000
	if s := os.Getenv("CHAOS_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseInt(s, 10, 64); err != nil {
			t.Fatalf("CHAOS_SEED=%q: %v", s, err)
		}
	}
	runCampaign(t, seed, phase)
}

// pinnedSeeds found bugs (see the README's Bugs found): each is replayed
// as a regression campaign by TestPinnedSeeds.
var pinnedSeeds = []int64{314082014, 56249839, 20261127, 288808259, 444047167, 772869237, 20261209}

// TestPinnedSeeds replays the pinned seeds. By default (make test) it runs
// one of them, by rotation on the day of the year, with a 10 s fault phase
// (the first faults, one of each kind, run in full): about a minute.
// CHAOS_PINNED=all runs every one, each for CHAOS_PINNED_DURATION (default
// 2m): make chaos-pinned, part of make chaos.
func TestPinnedSeeds(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a broker cluster")
	}
	seeds, phase := pinnedSeeds, 2*time.Minute
	if os.Getenv("CHAOS_PINNED") != "all" {
		seeds, phase = []int64{pinnedSeeds[time.Now().YearDay()%len(pinnedSeeds)]}, 10*time.Second
	} else if d := os.Getenv("CHAOS_PINNED_DURATION"); d != "" {
		var err error
		if phase, err = time.ParseDuration(d); err != nil {
			t.Fatalf("CHAOS_PINNED_DURATION=%q: %v", d, err)
		}
	}
	for _, seed := range seeds {
		t.Run(strconv.FormatInt(seed, 10), func(t *testing.T) { runCampaign(t, seed, phase) })
	}
}

// runCampaign runs one campaign with seed for phase and checks it.
func runCampaign(t *testing.T, seed int64, phase time.Duration) {
	t.Logf("chaos: ===== seed %d ===== (rerun with CHAOS_SEED=%d), fault phase %s", seed, seed, phase)
	began := time.Now()

	cp := &campaign{t: t, seed: seed, down: map[string]bool{}, unavailable: map[string]time.Duration{}, conns: map[string][]*testutil.Client{}}
	// Partitions need every node in its own network namespace; without
	// them the campaign runs on 127.0.0.1 with the other faults.
	var lab *netLab
	if cp.partitionSkipped = netnsUnavailable(); cp.partitionSkipped == "" {
		var err error
		if lab, err = newNetLab(t, 3); err != nil {
			cp.partitionSkipped, lab = "network lab: "+err.Error(), nil
		}
	}
	if lab != nil {
		t.Logf("chaos: every node in its own network namespace (%s, %s.0/24); partitions by %s", strings.Join(lab.nodes, ", "), labNet, lab.method())
	} else {
		t.Logf("chaos: partition: skipped (%s); nodes on 127.0.0.1", cp.partitionSkipped)
	}
	cp.c = startClusterLab(t, "", 3, lab)

	ctx, stopWorkload := context.WithCancel(context.Background())
	workStart := time.Now()
	var wg sync.WaitGroup
	for i := 1; i <= retainWriters; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cp.retainWriter(ctx, fmt.Sprintf("writer%d", i), rand.New(rand.NewSource(seed+int64(i))))
		}()
	}
	var subNode, pubNode sync.Map // "node" -> current node id of the stream clients
	wg.Add(2)
	go func() {
		defer wg.Done()
		cp.streamSubscriber(ctx, "stream-sub", &subNode, &pubNode, rand.New(rand.NewSource(seed+100)))
	}()
	go func() {
		defer wg.Done()
		cp.streamPublisher(ctx, "stream-pub", &pubNode, &subNode, rand.New(rand.NewSource(seed+101)))
	}()

	// Persistent sessions and wills: the subscribers, the will watcher and
	// the will clients outlive the workload (they drain after the fault
	// phase); the publishers and the will spawner stop with it.
	sessCtx, stopSessions := context.WithCancel(context.Background())
	willCtx, stopWills := context.WithCancel(context.Background())
	var sessWG, willWG sync.WaitGroup
	for i, id := range sessSubIDs() {
		sessWG.Add(1)
		go func() {
			defer sessWG.Done()
			cp.persistentSubscriber(sessCtx, sessionSub{id: id, filters: sessFilters, idle: sessIdle, parse: sessionReceipt, v311: id == sessSubV311},
				rand.New(rand.NewSource(seed+200+int64(i))))
		}()
	}
	sessWG.Add(1)
	go func() {
		defer sessWG.Done()
		// Wills come seldom: a short keep-alive, not silence, tells the
		// watcher its node is gone.
		cp.persistentSubscriber(sessCtx, sessionSub{id: willWatcher, filters: []paho.SubscribeOptions{{Topic: willPrefix + "#", QoS: 2}, {Topic: availPrefix + "#", QoS: 2}},
			keepAlive: 2, parse: willReceipt}, rand.New(rand.NewSource(seed+210)))
	}()
	for i := 1; i <= sessPublishers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cp.sessionPublisher(ctx, fmt.Sprintf("sess-pub%d", i), rand.New(rand.NewSource(seed+220+int64(i))))
		}()
	}
	for i, id := range []string{ppubV5, ppubV311} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cp.persistentPublisher(ctx, id, id == ppubV311, rand.New(rand.NewSource(seed+240+int64(i))))
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		cp.willSpawner(ctx, willCtx, &willWG, rand.New(rand.NewSource(seed+230)))
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		cp.availSpawner(ctx, willCtx, &willWG, rand.New(rand.NewSource(seed+250)))
	}()
	for i, id := range []string{switchV5, switchV311} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cp.switcher(ctx, id, id == switchV311, rand.New(rand.NewSource(seed+260+int64(i))))
		}()
	}

	for i, id := range []string{rrClean, rrPersistent} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cp.rrRequester(ctx, id, id == rrPersistent, rand.New(rand.NewSource(seed+270+int64(i))))
		}()
	}
	for k := 1; k <= tkoDevices; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cp.takeoverDevice(ctx, k, rand.New(rand.NewSource(seed+280+int64(k))))
		}()
	}

	cp.awaitWorkloads(workloadWarmup)
	faultErr := cp.injectFaults(phase, rand.New(rand.NewSource(seed)))
	stopWorkload()
	wg.Wait()
	cp.bg.Wait()
	if faultErr != nil {
		t.Errorf("seed %d: %v", seed, faultErr)
	}

	// Settle: the cluster is whole; the persistent subscribers drain their
	// queues and the due wills arrive; then at most one live connection
	// per client id (an abandoned connection on a node that was paused
	// must be taken over once the node resumes).
	if err := cp.c.waitHealthy(healTimeout); err != nil {
		t.Errorf("seed %d: cluster not healthy after the fault phase: %v", seed, err)
	}
	drainTook, drainErr := cp.drainSessions(sessSubIDs())
	drain := fmt.Sprintf("drained in %s", drainTook.Round(time.Millisecond))
	if drainErr != nil {
		drain = fmt.Sprintf("not drained after %s: %v", drainTook.Round(time.Millisecond), drainErr)
	}
	t.Logf("sessions: %s", drain)
	cp.bg.Wait()
	cp.availRead("after the drain")
	live := cp.checkOneConnectionPerClient()
	counters := cp.sessionCounters()
	stopWills() // will clients DISCONNECT: their wills are discarded
	willWG.Wait()
	// A will client may have dropped its connection (no DISCONNECT: its
	// will is due) after the drain above judged the wills and before the
	// stop: drain once more so that the watcher gets it before it stops
	// (CI: an availability client dropped 23 ms before the full restart,
	// its will was published, the watcher had already been stopped).
	if took, err := cp.drainSessions(sessSubIDs()); err != nil {
		drain += fmt.Sprintf("; after the will clients stopped: not drained after %s: %v", took.Round(time.Millisecond), err)
		t.Logf("sessions: after the will clients stopped: not drained after %s: %v", took.Round(time.Millisecond), err)
	}
	stopSessions()
	sessWG.Wait()
	cp.closeAll()

	// A full-cluster restart: every acknowledged retained write survives it.
	if err := cp.restartAll(); err != nil {
		t.Errorf("seed %d: full-cluster restart: %v", seed, err)
	}
	finals, readErr := cp.finalReads()
	if readErr != nil {
		t.Errorf("seed %d: final reads: %v", seed, readErr)
	}
	cp.availRead("after restart-all")

	for _, note := range cp.nodeNotes() {
		cp.h.Add(note)
	}
	ops := cp.h.Ops()
	res := Check(ops, finals, cp.faults)
	rep := Report{Seed: seed, WorkloadStart: workStart, Duration: phase.String(), Elapsed: time.Since(began).Round(time.Second).String(),
		Operations: len(ops), Faults: map[string]int{}, UnavailableSeconds: map[string]float64{},
		PartitionSkipped: cp.partitionSkipped, SessionDrain: drain, BrokerCounters: counters,
		Result: res, LiveConnections: live, FaultLog: cp.faults, FinalReads: finals}
	if lab != nil {
		rep.PartitionMethod = lab.method()
	}
	for _, f := range cp.faults {
		rep.Faults[f.Kind]++
	}
	for id, d := range cp.unavailable {
		rep.UnavailableSeconds[id] = d.Round(10 * time.Millisecond).Seconds()
	}
	cp.writeReport(rep, ops)
	t.Log("chaos summary\n" + summary(rep))
	for _, v := range res.Violations {
		if v.Known != "" {
			// TODO: a known broker bug (the Known* constants in history_test.go);
			// counted, not failing, until hooks/ fixes it.
			t.Logf("seed %d: known issue %s (not failing the run): %s", seed, v.Known, v)
			continue
		}
		t.Errorf("seed %d: violation %s", seed, v)
	}
	for _, miss := range workloadMissing(res, cp.partitionSkipped == "" || partitionsWanted()) {
		t.Errorf("seed %d: a workload did not run: %s", seed, miss)
	}
	if drainErr != nil {
		t.Errorf("seed %d: the final drain failed: %v", seed, drainErr)
	}
	if cp.partitionSkipped != "" && partitionsWanted() && os.Geteuid() == 0 {
		t.Errorf("seed %d: partitions are wanted (CHAOS_NETNS is not 0) and the test runs as root, but the network lab is unavailable: %s", seed, cp.partitionSkipped)
	}
	line := fmt.Sprintf("chaos: ===== seed %d: %d failing violation(s); rerun with CHAOS_SEED=%d =====", seed, len(res.Failing()), seed)
	t.Log(line)
	// go test hides a passing test's log: make test prints this file.
	if p := os.Getenv("CHAOS_SEED_LOG"); p != "" {
		f, err := os.OpenFile(p, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err == nil {
			_, err = fmt.Fprintf(f, "%s (%s, %d operations)\n", line, t.Name(), len(ops))
			err = errors.Join(err, f.Close())
		}
		if err != nil {
			t.Errorf("CHAOS_SEED_LOG: %v", err)
		}
	}
}

// partitionsWanted: unless CHAOS_NETNS=0, a campaign wants partitions.
func partitionsWanted() bool { return os.Getenv("CHAOS_NETNS") != "0" }

// workloadMissing lists the parts of the workload that did not run (their
// counts are zero): a campaign that exercised nothing proves nothing.
func workloadMissing(res CheckResult, partitions bool) []string {
	ss, wl, av, sw, rr, tk := res.Sessions, res.Wills, res.Avail, res.Switch, res.RR, res.Takeover
	checks := []struct {
		what string
		n    int
	}{
		{"acknowledged retained writes", res.RetainOps[OK]},
		{"stream messages received", res.StreamRecv},
		{"session messages owed to persistent subscribers", ss.Expected},
		{"session messages delivered", ss.Delivered},
		{"persistent subscriber resumes", ss.Reconnects},
		{"will connections armed", wl.Armed},
		{"persistent publishers' acknowledged QoS 2 publishes", ss.PersistentQoS2[OK]},
		{"persistent publishers' resumes", ss.PublisherResumes},
		{"acknowledged publishes right after a restart or resume", ss.Fresh[OK]},
		{"MQTT 3.1.1 acknowledged publishes", ss.V311Acked},
		{"messages owed to the MQTT 3.1.1 subscriber", ss.V311Expected},
		{"availability wills due and judged on reads", av.Judged},
		{"switching clients' resumes after a clean session", sw.Judged},
		{"switching clients' queued messages judged", sw.StaleJudged},
		{"graceful stops with the client back in time", wl.GracefulJudged},
		{"request/response rounds judged (clean requester)", rr.Judged - rr.JudgedPersistent},
		{"request/response rounds judged (persistent requester)", rr.JudgedPersistent},
		{"same-node takeover rounds judged", tk.Judged},
	}
	if partitions {
		p := res.Partition
		checks = append(checks, struct {
			what string
			n    int
		}{"retained writes through a cut-off node", p.Minority[OK] + p.Minority[Failed] + p.Minority[Unknown]})
	}
	var miss []string
	for _, c := range checks {
		if c.n == 0 {
			miss = append(miss, c.what+": 0")
		}
	}
	return miss
}

// ---------------------------------------------------------------------------
// Faults

func (cp *campaign) setDown(n *Node, down bool) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	cp.down[n.ID] = down
}

// pick returns a node that is not under a fault, other than avoid when
// possible.
func (cp *campaign) pick(rng *rand.Rand, avoid ...string) *Node {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	var up, any []*Node
	for _, n := range cp.c.nodes {
		skip := false
		for _, a := range avoid {
			skip = skip || a == n.ID
		}
		if skip {
			continue
		}
		any = append(any, n)
		if !cp.down[n.ID] {
			up = append(up, n)
		}
	}
	switch {
	case len(up) > 0:
		return up[rng.Intn(len(up))]
	case len(any) > 0:
		return any[rng.Intn(len(any))]
	default:
		return cp.c.nodes[rng.Intn(len(cp.c.nodes))]
	}
}

func (cp *campaign) record(f faultEvent, err error) {
	if f.End.IsZero() {
		f.End = time.Now()
	}
	if err != nil {
		f.Err = err.Error()
	}
	cp.mu.Lock()
	cp.faults = append(cp.faults, f)
	cp.mu.Unlock()
	extra := ""
	if f.Kind == FaultPartition {
		extra = ", no majority leader seen during the cut"
		if !f.MajorityLeader.IsZero() {
			extra = fmt.Sprintf(", majority leader seen after %s", f.MajorityLeader.Sub(f.Start).Round(time.Millisecond))
		}
	}
	cp.t.Logf("fault %-9s %s %s..%s (%s%s)%s", f.Kind, f.Node, f.Start.Format("15:04:05.000"), f.End.Format("15:04:05.000"), f.End.Sub(f.Start).Round(time.Millisecond), extra, errSuffix(f.Err))
}

func (cp *campaign) addUnavailable(n *Node, since time.Time) {
	cp.mu.Lock()
	cp.unavailable[n.ID] += time.Since(since)
	cp.mu.Unlock()
}

// workloadWarmup bounds how long the faults wait for the workloads
// (awaitWorkloads).
const workloadWarmup = 20 * time.Second

// awaitWorkloads waits, at most d, until each request/response requester
// has received a reply and each takeover device has had tkoWarmRounds
// rounds read (checkTakeover judges a round only without a fault near it
// either). A round is judged only when no fault came within
// rejoinGrace before it, and the faults of a short campaign follow each
// other closer than that: with the first fault at once, a race build
// that was slow to start judged no round at all, and the campaign failed
// for a workload that "did not run" (pinned seed 772869237 in CI: 322
// rounds, every one beside a fault).
func (cp *campaign) awaitWorkloads(d time.Duration) {
	deadline := time.Now().Add(d)
	waiting := func() bool {
		if cp.rrReplies[0].Load() == 0 || cp.rrReplies[1].Load() == 0 {
			return true
		}
		for i := range cp.tkoRounds {
			if cp.tkoRounds[i].Load() < tkoWarmRounds {
				return true
			}
		}
		return false
	}
	for time.Now().Before(deadline) && waiting() {
		time.Sleep(20 * time.Millisecond)
	}
}

// injectFaults runs the seeded schedule for phase: one fault at a time on a
// minority (one node), each followed by a wait until the cluster is whole.
// The first faults are one of each kind in a seeded order (all of them run
// even if that takes longer than phase).
func (cp *campaign) injectFaults(phase time.Duration, rng *rand.Rand) error {
	deadline := time.Now().Add(phase)
	kinds := []string{FaultKill, FaultPause, FaultRolling}
	if cp.c.lab != nil {
		kinds = append(kinds, FaultPartition)
	}
	rng.Shuffle(len(kinds), func(i, j int) { kinds[i], kinds[j] = kinds[j], kinds[i] })
	for i := 0; i < len(kinds) || time.Now().Before(deadline); i++ {
		// Quiet time between faults is part of the schedule, not a wait
		// for a condition.
		time.Sleep(time.Duration(500+rng.Intn(1500)) * time.Millisecond)
		kind := FaultKill
		p := rng.Intn(100)
		switch {
		case i < len(kinds):
			kind = kinds[i]
		case cp.c.lab == nil && p >= 85, cp.c.lab != nil && p >= 90:
			kind = FaultRolling
		case cp.c.lab == nil && p >= 45, cp.c.lab != nil && p >= 60:
			kind = FaultPause
		case cp.c.lab != nil && p >= 35:
			kind = FaultPartition
		}
		ni := rng.Intn(len(cp.c.nodes))
		n := cp.c.nodes[ni]
		hold := time.Duration(500+rng.Intn(3000)) * time.Millisecond
		cut := time.Duration(2000+rng.Intn(4000)) * time.Millisecond
		var err error
		switch kind {
		case FaultKill:
			err = cp.killRestart(n, hold)
		case FaultPause:
			err = cp.pauseResume(n, hold)
		case FaultRolling:
			err = cp.rolling()
		case FaultPartition:
			if cp.partitions == 0 {
				cut = longPartition
			}
			cp.partitions++
			err = cp.partition(ni, cut)
		}
		if err != nil {
			return fmt.Errorf("fault %d (%s on %s): %w", i+1, kind, n.ID, err)
		}
		if err := cp.c.waitHealthy(healTimeout); err != nil {
			return fmt.Errorf("after fault %d (%s on %s) the cluster did not heal: %w", i+1, kind, n.ID, err)
		}
		cp.availReadAsync(fmt.Sprintf("after the heal of fault %d (%s of %s)", i+1, kind, n.ID))
	}
	return nil
}

func (cp *campaign) killRestart(n *Node, hold time.Duration) (err error) {
	f := faultEvent{Kind: FaultKill, Node: n.ID, Start: time.Now()}
	defer func() { cp.record(f, err) }()
	cp.setDown(n, true)
	defer cp.setDown(n, false)
	defer cp.addUnavailable(n, f.Start)
	if err := n.kill(); err != nil {
		return err
	}
	time.Sleep(hold) // downtime: part of the schedule
	return n.restartThen(func() { cp.freshPublish(n, "a restart after SIGKILL") })
}

func (cp *campaign) pauseResume(n *Node, hold time.Duration) (err error) {
	f := faultEvent{Kind: FaultPause, Node: n.ID, Start: time.Now()}
	defer func() { cp.record(f, err) }()
	cp.setDown(n, true)
	defer cp.setDown(n, false)
	defer cp.addUnavailable(n, f.Start)
	if err := n.signal(syscall.SIGSTOP); err != nil {
		return err
	}
	time.Sleep(hold) // paused time: part of the schedule
	if err := n.signal(syscall.SIGCONT); err != nil {
		return err
	}
	cp.freshPublish(n, "SIGCONT")
	return n.waitReady(healTimeout)
}

// partition cuts node i off from the other nodes for hold, then heals it.
// Its clients can still reach it. During the cut a probe client on the cut
// node writes retained values (guarantee 5: they must fail fast), and the
// other nodes are watched until they agree on a leader among themselves
// (from then on their retained writes must succeed).
func (cp *campaign) partition(i int, hold time.Duration) (err error) {
	n := cp.c.nodes[i]
	f := faultEvent{Kind: FaultPartition, Node: n.ID}
	cp.setDown(n, true)
	defer cp.setDown(n, false)
	defer func() { cp.record(f, err) }()
	if err := cp.c.lab.cut(i); err != nil {
		return err
	}
	f.Start = time.Now()
	stop, probeDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(probeDone)
		cp.minorityProbe(stop, n)
	}()
	healAt := f.Start.Add(hold)
	majority := func() error {
		leader := ""
		for _, m := range cp.c.nodes {
			if m == n {
				continue
			}
			v, err := m.view()
			if err != nil {
				return err
			}
			if v.Raft.LeaderID == "" || v.Raft.LeaderID == n.ID || (leader != "" && v.Raft.LeaderID != leader) {
				return fmt.Errorf("%s sees leader %q", m.ID, v.Raft.LeaderID)
			}
			leader = v.Raft.LeaderID
		}
		return nil
	}
	if poll(time.Until(healAt), majority) == nil && time.Now().Before(healAt) {
		f.MajorityLeader = time.Now()
	}
	time.Sleep(time.Until(healAt)) // the rest of the cut: part of the schedule
	// The cut is over as soon as the heal command starts removing it: a
	// write that was waiting for a quorum may then commit, and be
	// acknowledged, before the command returns. End is therefore taken
	// before it (an acknowledgement a few ms "before" a later End was
	// reported as minority-acked; seed 288808259).
	f.End = time.Now()
	healErr := cp.c.lab.heal(i)
	cp.addUnavailable(n, f.Start)
	close(stop)
	<-probeDone
	if healErr != nil {
		return healErr
	}
	return n.waitReady(healTimeout)
}

// minorityProbe writes retained values through node n until stop, waiting
// up to probeTimeout for each answer (longer than failFastBound, so that a
// write that hangs is seen hanging).
func (cp *campaign) minorityProbe(stop <-chan struct{}, n *Node) {
	const id = "minority-probe"
	var c *testutil.Client
	defer func() {
		if c != nil {
			go c.Close()
		}
	}()
	for {
		select {
		case <-stop:
			return
		default:
		}
		if c == nil {
			var err error
			if c, err = cp.connect(id, n, 0); err != nil {
				select {
				case <-stop:
					return
				case <-time.After(100 * time.Millisecond):
				}
				continue
			}
		}
		cp.mu.Lock()
		cp.probeSeq++
		value := fmt.Sprintf("%s-%d", id, cp.probeSeq)
		cp.mu.Unlock()
		op := Op{Kind: KindRetain, Client: id, Node: n.ID, Topic: probeTopic, Value: value, Start: time.Now()}
		op.Outcome, op.Err = publishWithin(c, probeTopic, true, value, probeTimeout)
		op.End = time.Now()
		cp.h.Add(op)
		if op.Outcome == Unknown {
			_ = c.Conn.Close()
			c = nil
		}
		select {
		case <-stop:
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// probeTopic is written only by the minority probe (inside chaos/ret/#, so
// the final retained checks cover it too).
const probeTopic = "chaos/ret/probe"

// rolling restarts each node in turn as a StatefulSet rollout does: SIGTERM,
// start, wait until ready and the cluster is whole, then the next.
func (cp *campaign) rolling() (err error) {
	f := faultEvent{Kind: FaultRolling, Node: "all", Start: time.Now()}
	defer func() { cp.record(f, err) }()
	for _, n := range cp.c.nodes {
		start := time.Now()
		cp.setDown(n, true)
		err := n.stop()
		if err == nil {
			err = n.restartThen(func() { cp.freshPublish(n, "a restart after SIGTERM (rolling)") })
		}
		cp.addUnavailable(n, start)
		cp.setDown(n, false)
		if err != nil {
			return err
		}
		if err := cp.c.waitHealthy(healTimeout); err != nil {
			return fmt.Errorf("after restarting %s: %w", n.ID, err)
		}
	}
	return nil
}

// restartAll kills every node and starts them together (no node alone has
// a quorum, so none is ready before the others are up).
func (cp *campaign) restartAll() (err error) {
	f := faultEvent{Kind: FaultRestartAll, Node: "all", Start: time.Now()}
	defer func() { cp.record(f, err) }()
	for _, n := range cp.c.nodes {
		cp.setDown(n, true)
		if err := n.kill(); err != nil {
			return err
		}
	}
	for _, n := range cp.c.nodes {
		if err := n.launch(); err != nil {
			return err
		}
	}
	for _, n := range cp.c.nodes {
		err := n.waitReady(healTimeout)
		cp.addUnavailable(n, f.Start)
		cp.setDown(n, false)
		if err != nil {
			return err
		}
	}
	return cp.c.waitHealthy(healTimeout)
}

// ---------------------------------------------------------------------------
// Workload

func (cp *campaign) connect(id string, n *Node, buffer int) (*testutil.Client, error) {
	c, err := connectNode(n, testutil.ClientOptions{ID: id, CleanStart: true, Buffer: buffer})
	if err != nil {
		return nil, fmt.Errorf("%s connect to %s: %w", id, n.ID, err)
	}
	cp.connMu.Lock()
	cp.conns[id] = append(cp.conns[id], c)
	cp.connMu.Unlock()
	return c, nil
}

// publish sends a QoS 1 PUBLISH and classifies the outcome.
func publish(c *testutil.Client, topic string, retain bool, payload string) (Outcome, string) {
	return publishWithin(c, topic, retain, payload, publishTimeout)
}

// publishWithin is publish waiting up to timeout for the PUBACK.
func publishWithin(c *testutil.Client, topic string, retain bool, payload string, timeout time.Duration) (Outcome, string) {
	return publishQoS(c, topic, 1, retain, payload, timeout)
}

// publishQoS sends a QoS 1 or 2 PUBLISH and classifies the outcome: ok is
// PUBACK or PUBCOMP with success, failed a failure reason code in PUBACK or
// PUBREC, unknown no answer within timeout or a lost connection.
func publishQoS(c *testutil.Client, topic string, qos byte, retain bool, payload string, timeout time.Duration) (Outcome, string) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	pr, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: qos, Retain: retain, Payload: []byte(payload)})
	switch {
	case pr != nil && pr.ReasonCode >= 0x80:
		// paho returns the PUBACK and an error for a failure reason code:
		// the broker answered, so the outcome is known.
		reason := ""
		if pr.Properties != nil {
			reason = pr.Properties.ReasonString
		}
		return Failed, fmt.Sprintf("reason code 0x%02x %s", pr.ReasonCode, reason)
	case err != nil:
		msg := err.Error()
		select {
		case d := <-c.Disconnects: // the broker closed the connection, and said why
			msg += fmt.Sprintf(" (%s 0x%02x)", serverDisconnect, d.ReasonCode)
		default:
		}
		return Unknown, msg
	}
	return OK, ""
}

// serverDisconnect marks an op's error when the broker sent DISCONNECT.
const serverDisconnect = "server DISCONNECT"

// pace waits d or until ctx ends; it reports whether to go on.
func pace(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

// retainWriter publishes unique retained values to random topics through a
// connection to a random node, moving to another node when a publish fails.
// A connection whose publish got no answer is abandoned, not closed: its
// node (perhaps paused) must drop it once the id connects elsewhere.
func (cp *campaign) retainWriter(ctx context.Context, id string, rng *rand.Rand) {
	var c *testutil.Client
	var node *Node
	last := ""
	for seq := 1; ctx.Err() == nil; {
		if c == nil {
			node = cp.pick(rng, last)
			var err error
			if c, err = cp.connect(id, node, 0); err != nil {
				last = node.ID
				if !pace(ctx, 100*time.Millisecond) {
					return
				}
				continue
			}
		}
		topic := fmt.Sprintf("chaos/ret/%d", rng.Intn(retainTopics))
		value := fmt.Sprintf("%s-%d", id, seq)
		seq++
		op := Op{Kind: KindRetain, Client: id, Node: node.ID, Topic: topic, Value: value, Start: time.Now()}
		op.Outcome, op.Err = publish(c, topic, true, value)
		op.End = time.Now()
		cp.h.Add(op)
		switch op.Outcome {
		case Unknown:
			c, last = nil, node.ID
		case Failed:
			go c.Close()
			c, last = nil, node.ID
		}
		if !pace(ctx, time.Duration(10+rng.Intn(30))*time.Millisecond) {
			return
		}
	}
}

const streamTopic = "chaos/stream"

// streamPublisher publishes sequence-numbered QoS 1 messages from a node
// other than the subscriber's.
func (cp *campaign) streamPublisher(ctx context.Context, id string, mine, other *sync.Map, rng *rand.Rand) {
	var c *testutil.Client
	var node *Node
	epoch := 0
	for seq := 1; ctx.Err() == nil; {
		if c == nil {
			o, _ := other.Load("node")
			avoid, _ := o.(string)
			node = cp.pick(rng, avoid)
			var err error
			if c, err = cp.connect(id, node, 0); err != nil {
				if !pace(ctx, 100*time.Millisecond) {
					return
				}
				continue
			}
			epoch++
			mine.Store("node", node.ID)
		}
		op := Op{Kind: KindStreamPub, Client: id, Node: node.ID, Topic: streamTopic, Publisher: id, Seq: seq, PubConn: epoch, Start: time.Now()}
		op.Outcome, op.Err = publish(c, streamTopic, false, fmt.Sprintf("%s:%d:%d", id, seq, epoch))
		op.End = time.Now()
		seq++
		cp.h.Add(op)
		if op.Outcome != OK {
			_ = c.Conn.Close()
			c = nil
		}
		if !pace(ctx, time.Duration(10+rng.Intn(20))*time.Millisecond) {
			return
		}
	}
}

// streamSubscriber receives the stream on a node other than the
// publisher's, recording every message with its connection epoch; it moves
// when its connection drops or nothing arrives for a while (paused node).
func (cp *campaign) streamSubscriber(ctx context.Context, id string, mine, other *sync.Map, rng *rand.Rand) {
	epoch := 0
	for ctx.Err() == nil {
		o, _ := other.Load("node")
		avoid, _ := o.(string)
		node := cp.pick(rng, avoid)
		c, err := cp.connect(id, node, 100000)
		if err != nil {
			if !pace(ctx, 100*time.Millisecond) {
				return
			}
			continue
		}
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		sa, err := c.Subscribe(sctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: streamTopic, QoS: 1}}})
		cancel()
		if err != nil || len(sa.Reasons) != 1 || sa.Reasons[0] >= 0x80 {
			_ = c.Conn.Close()
			continue
		}
		epoch++
		mine.Store("node", node.ID)
		cp.receive(ctx, c, id, node, epoch)
		_ = c.Conn.Close()
	}
}

func (cp *campaign) receive(ctx context.Context, c *testutil.Client, id string, node *Node, epoch int) {
	idle := time.NewTimer(3 * time.Second)
	defer idle.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.Done():
			return
		case <-idle.C:
			return // nothing for 3 s: the node or the route is gone; move
		case p := <-c.Msgs:
			idle.Reset(3 * time.Second)
			parts := strings.Split(string(p.Payload), ":")
			if len(parts) != 3 {
				cp.t.Errorf("stream: malformed payload %q", p.Payload)
				continue
			}
			seq, _ := strconv.Atoi(parts[1])
			pubConn, _ := strconv.Atoi(parts[2])
			now := time.Now()
			cp.h.Add(Op{Kind: KindStreamRecv, Client: id, Node: node.ID, Topic: p.Topic, Publisher: parts[0],
				Seq: seq, PubConn: pubConn, SubConn: epoch, Start: now, End: now, Outcome: OK})
		}
	}
}

// checkOneConnectionPerClient waits until each client id has at most one
// live connection and returns the counts.
func (cp *campaign) checkOneConnectionPerClient() map[string]int {
	counts := map[string]int{}
	err := poll(settleTimeout, func() error {
		cp.connMu.Lock()
		defer cp.connMu.Unlock()
		var bad []string
		for id := range cp.conns {
			counts[id] = 0
		}
		for id := range cp.conns311 {
			counts[id] = 0
		}
		for id, n := range counts {
			for _, c := range cp.conns[id] {
				select {
				case <-c.Done():
				default:
					n++
				}
			}
			for _, c := range cp.conns311[id] {
				select {
				case <-c.Done():
				default:
					n++
				}
			}
			counts[id] = n
			if n > 1 {
				bad = append(bad, fmt.Sprintf("%s has %d live connections", id, n))
			}
		}
		if len(bad) > 0 {
			sort.Strings(bad)
			return fmt.Errorf("%s", strings.Join(bad, "; "))
		}
		return nil
	})
	if err != nil {
		cp.t.Errorf("seed %d: at most one live connection per client id: %v", cp.seed, err)
	}
	return counts
}

func (cp *campaign) closeAll() {
	cp.connMu.Lock()
	defer cp.connMu.Unlock()
	for _, cs := range cp.conns {
		for _, c := range cs {
			_ = c.Conn.Close()
		}
	}
	for _, cs := range cp.conns311 {
		for _, c := range cs {
			_ = c.conn.Close()
		}
	}
}

// finalReads reads the retained values on every node with a fresh
// subscriber, retrying until the nodes agree or settleTimeout passes (the
// last reading is checked either way).
func (cp *campaign) finalReads() ([]FinalRead, error) {
	var finals []FinalRead
	attempt := 0
	err := poll(settleTimeout, func() error {
		attempt++
		finals = finals[:0]
		for _, n := range cp.c.nodes {
			vals, err := readRetained(n, fmt.Sprintf("reader-%s-%d", n.ID, attempt))
			if err != nil {
				return err
			}
			finals = append(finals, FinalRead{Node: n.ID, Values: vals})
		}
		for _, f := range finals[1:] {
			if fmt.Sprint(f.Values) != fmt.Sprint(finals[0].Values) {
				return fmt.Errorf("%s serves %v, %s serves %v", finals[0].Node, finals[0].Values, f.Node, f.Values)
			}
		}
		return nil
	})
	if err != nil && len(finals) != len(cp.c.nodes) {
		return finals, err
	}
	return finals, nil
}

// readRetained subscribes to chaos/ret/# and a marker topic, then publishes
// to the marker: the node sends a subscription's retained messages before it
// handles the next packet, so the marker comes after every retained value.
func readRetained(n *Node, id string) (map[string]string, error) {
	return readRetainedFilter(n, id, "chaos/ret/#")
}

// ---------------------------------------------------------------------------
// Output

func summary(r Report) string {
	var b strings.Builder
	w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintf(w, "seed\t%d\n", r.Seed)
	fmt.Fprintf(w, "fault phase / elapsed\t%s / %s\n", r.Duration, r.Elapsed)
	fmt.Fprintf(w, "operations\t%d\n", r.Operations)
	fmt.Fprintf(w, "retained writes ok/failed/unknown\t%d/%d/%d\n", r.Result.RetainOps[OK], r.Result.RetainOps[Failed], r.Result.RetainOps[Unknown])
	fmt.Fprintf(w, "stream published ok/failed/unknown\t%d/%d/%d\n", r.Result.StreamPubs[OK], r.Result.StreamPubs[Failed], r.Result.StreamPubs[Unknown])
	fmt.Fprintf(w, "stream received\t%d\n", r.Result.StreamRecv)
	for _, k := range sortedKeys(r.Faults) {
		fmt.Fprintf(w, "faults: %s\t%d\n", k, r.Faults[k])
	}
	if r.PartitionSkipped != "" {
		fmt.Fprintf(w, "partition\tskipped (%s)\n", r.PartitionSkipped)
	} else {
		pr := r.Result.Partition
		fmt.Fprintf(w, "partition: minority retained writes ok/failed/unknown\t%d/%d/%d\n", pr.Minority[OK], pr.Minority[Failed], pr.Minority[Unknown])
		fmt.Fprintf(w, "partition: minority writes judged for fail-fast (<= %s)\t%d (slowest failure %.1f s)\n", failFastBound, pr.MinorityJudged, pr.MinorityMaxFail)
		fmt.Fprintf(w, "partition: majority writes after its leader ok/failed/unknown\t%d/%d/%d\n", pr.Majority[OK], pr.Majority[Failed], pr.Majority[Unknown])
		fmt.Fprintf(w, "partition: majority writes lost to a takeover (0x8E, info)\t%d\n", pr.MajorityTakenOver)
	}
	ss, wl := r.Result.Sessions, r.Result.Wills
	fmt.Fprintf(w, "session published qos1 ok/failed/unknown\t%d/%d/%d\n", ss.PublishedQoS1[OK], ss.PublishedQoS1[Failed], ss.PublishedQoS1[Unknown])
	fmt.Fprintf(w, "session published qos2 ok/failed/unknown\t%d/%d/%d\n", ss.PublishedQoS2[OK], ss.PublishedQoS2[Failed], ss.PublishedQoS2[Unknown])
	fmt.Fprintf(w, "session messages acked-for-subscriber/delivered/lost\t%d/%d/%d\n", ss.Expected, ss.Delivered, ss.Lost)
	fmt.Fprintf(w, "session receipts (DUP set)\t%d (%d)\n", ss.Received, ss.Redelivered)
	fmt.Fprintf(w, "session duplicated qos1 (allowed) / qos2\t%d / %d\n", ss.DuplicatedQoS1, ss.DuplicatedQoS2)
	fmt.Fprintf(w, "session reordered\t%d\n", ss.Reordered)
	fmt.Fprintf(w, "session resumes / session not present\t%d / %d\n", ss.Reconnects, ss.NotPresent)
	fmt.Fprintf(w, "session drain\t%s\n", r.SessionDrain)
	fmt.Fprintf(w, "will connections / armed\t%d / %d\n", wl.Connections, wl.Armed)
	fmt.Fprintf(w, "wills expected (kill) / may fire (pause, cut) / rolling\t%d / %d / %d\n", wl.Expected, wl.MayFire, wl.Rolling)
	fmt.Fprintf(w, "wills received / delivered / duplicated / missing\t%d / %d / %d / %d\n", wl.Received, wl.Delivered, wl.Duplicated, wl.Missing)
	fmt.Fprintf(w, "wills without a fault (info)\t%d\n", wl.Unexpected)
	fmt.Fprintf(w, "graceful stops judged (client back within %s) / will published\t%d / %d\n", graceReconnect, wl.GracefulJudged, wl.OnGracefulStop)
	fmt.Fprintf(w, "persistent publishers qos2 ok/failed/unknown\t%d/%d/%d\n", ss.PersistentQoS2[OK], ss.PersistentQoS2[Failed], ss.PersistentQoS2[Unknown])
	fmt.Fprintf(w, "persistent publishers resumes / completed after resume\t%d / %d\n", ss.PublisherResumes, ss.CompletedAfterResume)
	fmt.Fprintf(w, "fresh (after restart/resume) ok/failed/unknown\t%d/%d/%d\n", ss.Fresh[OK], ss.Fresh[Failed], ss.Fresh[Unknown])
	fmt.Fprintf(w, "fresh owed / lost\t%d / %d\n", ss.FreshExpected, ss.FreshLost)
	fmt.Fprintf(w, "mqtt 3.1.1: publishes acked / owed to 3.1.1 subscriber / delivered\t%d / %d / %d\n", ss.V311Acked, ss.V311Expected, ss.V311Delivered)
	av, sw := r.Result.Avail, r.Result.Switch
	fmt.Fprintf(w, "availability online ok/failed/unknown\t%d/%d/%d\n", av.Online[OK], av.Online[Failed], av.Online[Unknown])
	fmt.Fprintf(w, "availability dropped by client / reads / judged / not served\t%d / %d / %d / %d\n", av.Dropped, av.Reads, av.Judged, av.NotServed)
	fmt.Fprintf(w, "switch published ok/failed/unknown\t%d/%d/%d\n", sw.Published[OK], sw.Published[Failed], sw.Published[Unknown])
	fmt.Fprintf(w, "switch clean ok / resumes judged / present / stale judged / stale received\t%d / %d / %d / %d / %d\n", sw.CleanOK, sw.Judged, sw.Present, sw.StaleJudged, sw.Stale)
	rr := r.Result.RR
	fmt.Fprintf(w, "request/response rounds / judged (persistent, qos0) / received / lost\t%d / %d (%d, %d) / %d / %d\n", rr.Rounds, rr.Judged, rr.JudgedPersistent, rr.JudgedQoS0, rr.Received, rr.Lost)
	fmt.Fprintf(w, "request/response not judged: suback / publish / fault / connection (reply received anyway)\t%d / %d / %d / %d (%d)\n",
		rr.NotJudged["suback"], rr.NotJudged["publish"], rr.NotJudged["fault"], rr.NotJudged["connection"], rr.NotJudgedReceived)
	tk := r.Result.Takeover
	fmt.Fprintf(w, "same-node takeover rounds / judged / node reads judged (not judged) / old value served\t%d / %d / %d (%d) / %d\n",
		tk.Rounds, tk.Judged, tk.NodeReads, tk.ReadsNotJudged, tk.OldValue)
	fmt.Fprintf(w, "same-node takeover not judged: old / new / slow / fault / read\t%d / %d / %d / %d / %d\n",
		tk.NotJudged["old"], tk.NotJudged["new"], tk.NotJudged["slow"], tk.NotJudged["fault"], tk.NotJudged["read"])
	for _, k := range sortedKeys(r.BrokerCounters) {
		fmt.Fprintf(w, "broker %s\t%g\n", k, r.BrokerCounters[k])
	}
	fmt.Fprintf(w, "lost (acked retained)\t%d\n", r.Result.Lost)
	fmt.Fprintf(w, "divergent retained topics\t%d\n", r.Result.Divergent)
	fmt.Fprintf(w, "reordered (stream)\t%d\n", r.Result.Reordered)
	fmt.Fprintf(w, "duplicated (stream, allowed)\t%d\n", r.Result.Duplicated)
	fmt.Fprintf(w, "late after publisher reconnect (info)\t%d\n", r.Result.CrossConnBack)
	for _, k := range sortedKeys(r.UnavailableSeconds) {
		fmt.Fprintf(w, "unavailable s: %s\t%.1f\n", k, r.UnavailableSeconds[k])
	}
	maxLive := 0
	for _, n := range r.LiveConnections {
		maxLive = max(maxLive, n)
	}
	fmt.Fprintf(w, "max live connections per client id\t%d\n", maxLive)
	for _, k := range sortedKeys(r.Result.KnownIssues) {
		fmt.Fprintf(w, "known issue (counted, TODO fix): %s\t%d\n", k, r.Result.KnownIssues[k])
	}
	fmt.Fprintf(w, "violations (failing)\t%d\n", len(r.Result.Failing()))
	_ = w.Flush()
	return b.String()
}

// writeReport writes the JSON report ($CHAOS_REPORT or the test's temp
// dir), the full history next to it as JSON lines and the timeline plot
// as SVG.
func (cp *campaign) writeReport(r Report, ops []Op) {
	path := os.Getenv("CHAOS_REPORT")
	if path == "" {
		path = filepath.Join(cp.t.TempDir(), "chaos-report.json")
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		cp.t.Errorf("encode report: %v", err)
		return
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		cp.t.Errorf("write report %s: %v", path, err)
		return
	}
	hist := strings.TrimSuffix(path, filepath.Ext(path)) + "-history.jsonl"
	var b strings.Builder
	enc := json.NewEncoder(&b)
	for _, o := range ops {
		_ = enc.Encode(o)
	}
	if err := os.WriteFile(hist, []byte(b.String()), 0o644); err != nil {
		cp.t.Errorf("write history %s: %v", hist, err)
		return
	}
	svg := strings.TrimSuffix(path, filepath.Ext(path)) + "-timeline.svg"
	var plot strings.Builder
	title := fmt.Sprintf("chaos seed %d: fault phase %s, %d operations, %d violation(s)", r.Seed, r.Duration, r.Operations, len(r.Result.Violations))
	if err := renderTimeline(&plot, title, ops, r.FaultLog, r.WorkloadStart); err != nil {
		cp.t.Errorf("render timeline: %v", err)
		return
	}
	if err := os.WriteFile(svg, []byte(plot.String()), 0o644); err != nil {
		cp.t.Errorf("write timeline %s: %v", svg, err)
		return
	}
	cp.t.Logf("report: %s, history: %s, timeline: %s", path, hist, svg)
}
