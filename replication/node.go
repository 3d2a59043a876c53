package replication

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
)

const (
	snapDir     = "snapshots" // created by raft's FileSnapshotStore under DataDir
	blobDirName = "blobs"     // blob files (blob.go), rebuilt at every start
	boltOpenTO  = 2 * time.Second
)

// Lifecycle states.
const (
	stateNew int32 = iota
	stateRunning
	stateClosed
)

// Node is one replica: a raft server over a bolt log, the state machine, the
// group-commit batcher, the forwarding RPC, and the background loop that
// bootstraps and manages membership.
type Node struct {
	cfg Config
	log *slog.Logger
	fsm *FSM
	m   *metrics
	// startIndex is the last log index when this run started: every entry
	// this run appends comes after it (StartIndex).
	startIndex atomic.Uint64

	// mu serialises Start and Close. Lock order: mu, then FSM.mu,
	// readyMu, batcher/rpc/demux internals, memberMu, leaderMu.
	mu    sync.Mutex
	state atomic.Int32
	raft  *raft.Raft
	trans *raft.NetworkTransport
	// heartbeats guards raft's heartbeat handler (see heartbeatGuard).
	heartbeats *heartbeatGuard
	// logVers: the newest log format every server applies (features.go).
	logVers logVersions

	blobSweep blobSweep // manageLoop only
	store     logStore
	logs      raft.LogStore // the cached log store raft uses
	snaps     raft.SnapshotStore
	reads     readRounds                // coalesced ReadBarrier rounds
	lease     *readLease                // read indexes without a heartbeat round (lease.go)
	notice    *commitNotice             // commits told to followers at once (commitnotice.go)
	raftReady atomic.Pointer[raft.Raft] // n.raft, for the transport's goroutines
	demux     *demux
	rpcc      *rpcClient
	batch     *batcher
	gauges    []prometheus.Collector
	observer  *raft.Observer
	stop      chan struct{}
	life      context.Context // cancelled at shutdown
	expired   atomic.Int64    // sessions deleted by this node's expiry sweeps
	lifeStop  context.CancelFunc
	wg        sync.WaitGroup

	hadState atomic.Bool // raft state existed at Start, or was created since
	// votesHeld: this node started without raft state and has neither
	// bootstrapped nor caught up with a leader yet: it grants no votes
	// (transport.go, voteGate).
	votesHeld atomic.Bool
	// votesStrict: while votes are held, also refuse candidates whose log
	// holds only the bootstrap configuration. Set at start; cleared only
	// while every peer with state shows no log past the bootstrap (a new
	// cluster electing its first leader), and for good once one does (the
	// cluster has committed writes this node may have helped commit
	// before it lost its data).
	votesStrict atomic.Bool
	// votesPast: a peer showed a log past the bootstrap configuration.
	votesPast atomic.Bool
	// votesDecided: releaseVotes has seen peers (manage loop only).
	votesDecided bool
	bootDone     atomic.Bool   // bootstrap is no longer a question for this node
	left         atomic.Bool   // Leave removed this node
	leaving      atomic.Bool   // RecordDeparture: stopping for good or for a restart
	ticks        atomic.Uint64 // manage loop iterations (tests wait on it)

	leaderMu      sync.Mutex
	leaderCh      chan struct{} // closed and replaced on every leader change
	noLeaderSince atomic.Int64  // unix nanos since no leader is known, 0 if one is

	memberMu   sync.Mutex
	tombstones map[string]struct{}  // removed ids not to re-add while visible
	caughtUp   map[string]time.Time // non-voter id -> caught up since
	// absent: servers of the configuration this leader has not seen in
	// membership since then (its own clock), for absentTerm only: a new
	// term starts counting afresh (removeDeparted).
	absent     map[string]time.Time
	absentTerm uint64
	lastPlan   string // previous tick's bootstrap plan (settling)

	readyMu     sync.Mutex // guards the leader commit index cached by Ready
	readyCommit uint64
	readyAt     time.Time

	notMember rateLimit // "has state but not in the configuration" log
	planLog   rateLimit
	// conflictLog: "a member claims the id of a live server" (membership.go).
	conflictLog rateLimit
	// keepLog, oddLog: a departed voter kept for MinVoters, a caught-up
	// non-voter kept for an odd voter count (membership.go).
	keepLog rateLimit
	oddLog  rateLimit
}

// New validates cfg and returns a Node that is not started. It does no I/O.
func New(cfg Config) (*Node, error) {
	cfg.Sanitize()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger.With("component", "replication", "node", cfg.NodeID)
	m := newMetrics()
	life, lifeStop := context.WithCancel(context.Background())
	n := &Node{
		life: life, lifeStop: lifeStop,
		cfg: cfg, log: log, m: m,
		stop:        make(chan struct{}),
		leaderCh:    make(chan struct{}),
		tombstones:  make(map[string]struct{}),
		absent:      make(map[string]time.Time),
		caughtUp:    make(map[string]time.Time),
		notMember:   rateLimit{every: time.Minute},
		planLog:     rateLimit{every: 10 * time.Second},
		conflictLog: rateLimit{every: time.Minute},
		keepLog:     rateLimit{every: time.Minute},
		oddLog:      rateLimit{every: time.Minute},
	}
	n.fsm = newFSM(observers{onRetained: cfg.OnRetained, onOwner: cfg.OnOwner,
		onSession: cfg.OnSession, onRestore: cfg.OnRestore}, m, log)
	n.fsm.st.store = newBlobStore(filepath.Join(cfg.DataDir, blobDirName))
	return n, nil
}

// HasState reports whether dir holds raft state (a log, a term or a
// snapshot), without creating anything where there is no store (opening
// a WAL runs its recovery, as Start would). Call it before Start (bolt allows
// one process at a time); afterwards use Node.HasState.
func HasState(dir string) (bool, error) {
	snaps, err := os.ReadDir(filepath.Join(dir, snapDir))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("replication: read snapshots: %w", err)
	}
	if len(snaps) > 0 {
		return true, nil
	}
	kind, err := existingLogStore(dir)
	if err != nil || kind == "" {
		return false, err
	}
	store, err := openStoreOfKind(dir, kind, true)
	if err != nil {
		return false, fmt.Errorf("replication: %w", err)
	}
	defer store.Close()
	ok, err := raft.HasExistingState(store, store, raft.NewDiscardSnapshotStore())
	if err != nil {
		return false, fmt.Errorf("replication: %w", err)
	}
	return ok, nil
}

// Start opens the log, stable and snapshot stores under DataDir, starts raft
// on the caller's listener and the background loops. The node then
// bootstraps (BootstrapExpect) or waits to be added by the leader. ctx
// bounds start-up only.
func (n *Node) Start(ctx context.Context) (err error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.state.Load() != stateNew {
		return fmt.Errorf("%w: Start called twice or after Close", ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	cfg := &n.cfg
	var cleanup []func()
	defer func() {
		if err != nil {
			for i := len(cleanup) - 1; i >= 0; i-- {
				cleanup[i]()
			}
			// The listener is closed now: this Node cannot start again.
			n.state.Store(stateClosed)
			n.lifeStop()
		}
	}()
	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return fmt.Errorf("replication: data dir: %w", err)
	}
	// Blob files are rebuilt from the snapshot and the log raft restores.
	if err := n.fsm.st.store.reset(); err != nil {
		return err
	}
	store, err := openLogStore(cfg.DataDir, cfg.LogStore)
	if err != nil {
		return fmt.Errorf("replication: open log store: %w", err)
	}
	cleanup = append(cleanup, func() { _ = store.Close() })
	logs, err := newLogCache(cfg.LogCacheSize, store)
	if err != nil {
		return fmt.Errorf("replication: log cache: %w", err)
	}
	hlog := newHclog(n.log, "")
	snaps, err := raft.NewFileSnapshotStoreWithLogger(cfg.DataDir, cfg.SnapshotRetain, hlog.Named("snapshot"))
	if err != nil {
		return fmt.Errorf("replication: snapshot store: %w", err)
	}
	had, err := raft.HasExistingState(logs, store, snaps)
	if err != nil {
		return fmt.Errorf("replication: %w", err)
	}
	n.hadState.Store(had)
	n.bootDone.Store(had)
	n.votesHeld.Store(!had)
	n.votesStrict.Store(!had) // relaxed only once peers show a new cluster

	maxFrame := cfg.MaxBatchBytes + maxRPCFrameSlack
	// After the demux's close (cleanups run last first), which ends a
	// notice being sent; the transport's Close does not.
	cleanup = append(cleanup, func() { n.notice.close() })
	n.demux = newDemux(cfg, n.log, func(c net.Conn) { (&rpcServer{n: n, maxFrame: maxFrame}).serveConn(c) })
	cleanup = append(cleanup, n.demux.close)
	n.rpcc = newRPCClient(n.demux, maxFrame)
	cleanup = append(cleanup, n.rpcc.close)
	trans := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream: &streamLayer{d: n.demux}, MaxPool: cfg.MaxPool, Timeout: cfg.IOTimeout,
		Logger: hlog.Named("net"),
	})
	if !cfg.Pipeline {
		n.notice = newCommitNotice(trans.AppendEntries, n.raftReady.Load, n.m.commitNotices.Inc)
	}
	cleanup = append(cleanup, func() { trans.CloseStreams(); _ = trans.Close() })

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.NodeID)
	rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	rc.ElectionTimeout = cfg.ElectionTimeout
	rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	rc.CommitTimeout = cfg.CommitTimeout
	rc.MaxAppendEntries = cfg.MaxAppendEntries
	rc.SnapshotInterval = cfg.SnapshotInterval
	rc.SnapshotThreshold = cfg.SnapshotThreshold
	rc.TrailingLogs = cfg.TrailingLogs
	// A removed node stays a (non-voting, never electing) follower rather
	// than shutting raft down underneath the Node, so that it keeps
	// answering Status/Ready and can be re-added.
	rc.ShutdownOnRemove = false
	rc.NoLegacyTelemetry = true
	rc.Logger = hlog
	if err := raft.ValidateConfig(rc); err != nil {
		return fmt.Errorf("%w: raft: %w", ErrInvalidConfig, err)
	}
	// NewRaft restores the latest snapshot into the FSM (OnRestore fires).
	n.heartbeats = &heartbeatGuard{}
	var leaseDur time.Duration
	if cfg.ReadLease {
		leaseDur = cfg.HeartbeatTimeout / 2
	}
	n.lease = newReadLease(leaseDur)
	gate := newVoteGate(&n.votesHeld, &n.votesStrict, n.lease, n.transferAccepted, n.stop)
	gate.state = n.raftState
	gate.lastEntry = n.lastEntry
	r, err := raft.NewRaft(rc, n.fsm, logs, store, snaps, raftTransport{trans, n.heartbeats, gate, n.lease, cfg.Pipeline, n.notice})
	if err != nil {
		return fmt.Errorf("replication: start raft: %w", err)
	}
	n.raft, n.trans, n.store, n.logs, n.snaps = r, trans, store, logs, snaps
	n.startIndex.Store(r.LastIndex())
	n.raftReady.Store(r)
	cleanup = append(cleanup, func() { _ = r.Shutdown().Error(); n.heartbeats.close() })

	n.gauges = n.newGauges()
	if err := n.m.register(cfg.Registerer, n.gauges...); err != nil {
		return err
	}

	obsCh := make(chan raft.Observation, 64)
	n.observer = raft.NewObserver(obsCh, false, func(o *raft.Observation) bool {
		_, ok := o.Data.(raft.LeaderObservation)
		return ok
	})
	r.RegisterObserver(n.observer)
	n.noLeaderSince.Store(time.Now().UnixNano())
	n.batch = newBatcher(r, cfg, n.m)
	n.batch.start()
	n.demux.start()
	n.logVers.known = map[raft.ServerID]uint32{}
	n.logVers.wake = make(chan struct{}, 1)
	n.logVers.min.Store(1)
	n.wg.Add(4)
	go n.commitNoticeLoop()
	go n.observeLoop(obsCh)
	go n.manageLoop()
	go n.logVersionLoop()
	n.state.Store(stateRunning)
	n.log.Info("replication started", "advertise", cfg.Advertise, "data_dir", cfg.DataDir,
		"has_state", had, "bootstrap_expect", cfg.BootstrapExpect)
	return nil
}

// Close stops the node. A leader first hands leadership to another voter
// (bounded by ShutdownTransferTimeout) so the cluster does not wait out an
// election timeout. Close does NOT leave the configuration (a restart keeps
// the voter set; see Leave). Idempotent.
func (n *Node) Close() error { return n.shutdown(true) }

// kill stops the node without a leadership transfer, as close to a crash as
// the process allows (tests).
func (n *Node) kill() error { return n.shutdown(false) }

func (n *Node) shutdown(graceful bool) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.state.Swap(stateClosed) != stateRunning {
		return nil
	}
	if graceful && n.raft.State() == raft.Leader && len(n.otherVoters()) > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), n.cfg.ShutdownTransferTimeout)
		if err := waitFuture(ctx, n.transferLeadership()); err != nil {
			n.log.Warn("leadership transfer before shutdown failed", "err", err)
		}
		cancel()
	}
	close(n.stop)
	n.lifeStop()
	n.wg.Wait()
	n.raft.DeregisterObserver(n.observer)
	var errs []error
	if err := n.raft.Shutdown().Error(); err != nil {
		errs = append(errs, fmt.Errorf("raft shutdown: %w", err))
	}
	n.heartbeats.close() // before the store closes
	n.batch.close()
	n.rpcc.close()
	n.trans.CloseStreams()
	_ = n.trans.Close()
	n.demux.close() // ends a notice being sent
	n.notice.close()
	if err := n.store.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close log store: %w", err))
	}
	n.m.unregister(n.cfg.Registerer, n.gauges...)
	n.log.Info("replication stopped")
	if len(errs) > 0 {
		return fmt.Errorf("replication: close: %w", errors.Join(errs...))
	}
	return nil
}

func (n *Node) running() bool { return n.state.Load() == stateRunning }

// observeLoop follows leader changes: metrics, logs, and waking Apply calls
// that wait for a leader.
func (n *Node) observeLoop(ch chan raft.Observation) {
	defer n.wg.Done()
	for {
		select {
		case o := <-ch:
			lo, ok := o.Data.(raft.LeaderObservation)
			if !ok {
				continue
			}
			n.m.leaderChanges.Inc()
			if lo.LeaderID == "" {
				n.noLeaderSince.CompareAndSwap(0, time.Now().UnixNano())
				n.log.Info("no leader")
			} else {
				n.noLeaderSince.Store(0)
				n.log.Info("leader changed", "leader", string(lo.LeaderID), "leader_addr", string(lo.LeaderAddr))
			}
			n.leaderMu.Lock()
			close(n.leaderCh)
			n.leaderCh = make(chan struct{})
			n.leaderMu.Unlock()
		case <-n.stop:
			return
		}
	}
}

// leaderChanged returns a channel closed at the next leader change.
func (n *Node) leaderChanged() <-chan struct{} {
	n.leaderMu.Lock()
	defer n.leaderMu.Unlock()
	return n.leaderCh
}

// HasState reports whether this node has raft state: it had some at Start,
// or has bootstrapped or been sent entries since. Gossip it as Peer.HasState.
func (n *Node) HasState() bool {
	if n.hadState.Load() {
		return true
	}
	if n.state.Load() == stateNew {
		ok, _ := HasState(n.cfg.DataDir)
		return ok
	}
	if r := n.raft; r != nil && (r.LastIndex() > 0 || r.CurrentTerm() > 0) {
		n.hadState.Store(true)
		return true
	}
	return false
}

// ID returns the node id.
func (n *Node) ID() string { return n.cfg.NodeID }

// Retained returns a copy of every retained message, sorted by topic
// (initial load, and resync after OnRestore). Expired messages not swept
// yet are included: filter with RetainedMessage.Expired.
func (n *Node) Retained() []RetainedMessage { return n.fsm.Retained() }

// RetainedMessage returns the retained message of topic.
func (n *Node) RetainedMessage(topic string) (RetainedMessage, bool) {
	return n.fsm.RetainedMessage(topic)
}

// Owner returns the owner of clientID as of this node's applied state.
func (n *Node) Owner(clientID string) (Owner, bool) { return n.fsm.Owner(clientID) }

// StartIndex is the last index of the local log when this run started:
// an open at or before it was written by an earlier run of this node.
func (n *Node) StartIndex() uint64 { return n.startIndex.Load() }

// Owners returns a copy of the client-id ownership table.
func (n *Node) Owners() map[string]Owner { return n.fsm.Owners() }

// waitFuture waits for a raft future or ctx. Raft futures have no channel,
// so a goroutine waits; raft resolves every future by shutdown at the
// latest, so it cannot leak for long.
func waitFuture(ctx context.Context, f raft.Future) error {
	ch := make(chan error, 1)
	go func() { ch <- f.Error() }()
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return fmt.Errorf("%w: %w", ErrTimeout, ctx.Err())
	}
}

// rpcContext bounds a forwarded call by the caller's remaining deadline
// (ms, relative so that clocks need not agree), by IOTimeout, and by this
// node's shutdown.
func (n *Node) rpcContext(ms uint64) (context.Context, context.CancelFunc) {
	d := n.cfg.IOTimeout
	if ms > 0 && time.Duration(ms)*time.Millisecond < d {
		d = time.Duration(ms) * time.Millisecond
	}
	return context.WithTimeout(n.life, d)
}

// commitNoticeLoop wakes the commit notifier whenever this node applies
// (on the leader, entries apply once committed).
func (n *Node) commitNoticeLoop() {
	defer n.wg.Done()
	if n.notice == nil {
		return
	}
	_, moved := n.fsm.syncedState()
	for {
		select {
		case <-moved:
		case <-n.stop:
			return
		}
		// The next channel before the kick: a move in between still wakes.
		_, moved = n.fsm.syncedState()
		if n.raft.State() == raft.Leader {
			n.notice.committed()
		}
	}
}
