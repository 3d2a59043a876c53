package replication

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Peer is one node as the membership layer (memberlist) currently sees it.
// The caller gossips these fields in node metadata.
type Peer struct {
	// ID is the node id (the raft server id).
	ID string
	// Addr is the node's raft address: advertise host and cluster port (a
	// stable DNS name in Kubernetes).
	Addr string
	// BootstrapExpect is the node's --bootstrap-expect (0: join only).
	BootstrapExpect int
	// HasState reports whether the node has raft state (HasState(dir)
	// before Start, Node.HasState() after).
	HasState bool
}

// Config configures a Node. Sanitize fills defaults; Validate reports what
// cannot be defaulted. Durations are raft's defaults unless noted.
type Config struct {
	// NodeID is the raft server id: stable for the node's lifetime (the
	// pod name in a StatefulSet). Required.
	NodeID string
	// Advertise is the raft server address peers dial, "host:port": the
	// advertise host and the cluster port. A DNS name is fine (and the
	// right choice in Kubernetes: a pod whose IP changes needs no
	// reconfiguration). Required.
	Advertise string
	// DataDir holds the log store (raft.db or wal/) and snapshots/.
	// Required.
	DataDir string
	// LogStore is the kind of log store a new data dir gets: LogStoreBolt
	// (default) or LogStoreWAL (logstore.go). A data dir that holds the
	// other kind is refused (ErrLogStoreMismatch).
	LogStore string
	// BootstrapExpect is the number of voters to wait for before the first
	// election (see DESIGN.md). 0: never bootstrap, only join. It must be
	// the same on every node and is ignored once the node has state.
	BootstrapExpect int
	// Peers returns the nodes membership currently sees, including this
	// one (whose entry this package overrides with its own truth). Called
	// from a background loop every ReconcileInterval; must be cheap and
	// must not block. Nil means "only this node".
	Peers func() []Peer

	// Listener yields connections to this node's cluster port that carry
	// replication traffic (the caller's demultiplexer already consumed its
	// protocol byte). The Node owns it from Start and closes it in Close.
	Listener net.Listener
	// Dial connects to another node's cluster port for replication
	// traffic (the caller's demultiplexer writes its protocol byte). It
	// must honour ctx's deadline.
	Dial func(ctx context.Context, addr string) (net.Conn, error)

	// OnRetained is called after every applied retained set or clear, on
	// raft's FSM goroutine, in log order, on every node. It must not block
	// for long and must not call Node.Apply (which waits for that
	// goroutine).
	OnRetained func(RetainedChange)
	// OnOwner is called after every applied ownership change, like
	// OnRetained.
	OnOwner func(OwnerChange)
	// OnSession is called after every applied change of a persistent
	// session (opened, closed, deleted, subscriptions, queue appended,
	// acked, dropped, released, will), like OnRetained. The hooks use it
	// to mirror sessions into the local broker; it is not wired yet.
	OnSession func(SessionChange)
	// OnRestore is called after the state was replaced from a snapshot
	// (at start-up when a snapshot exists, and when the leader sends one).
	// No OnRetained/OnOwner/OnSession calls are made for a restore: resync
	// from Node.Retained(), Node.Owners() and Node.Sessions().
	OnRestore func()

	// Raft timing.
	// ReadLease lets the leader name read indexes without a heartbeat
	// round while it holds a lease of HeartbeatTimeout/2 (lease.go).
	// Off by default: a hole remains (DESIGN.md, "The read lease").
	ReadLease bool
	// Pipeline turns raft's pipelined replication on, through the wrapper
	// that removes its deadlock (pipeline.go). Off by default: on a
	// 2-core machine, where CPU binds, it lowered durable throughput.
	Pipeline           bool
	HeartbeatTimeout   time.Duration
	ElectionTimeout    time.Duration
	LeaderLeaseTimeout time.Duration
	// CommitTimeout is how long raft's replication to a follower waits for
	// new entries before it sends an AppendEntries anyway. Followers learn
	// of commits from commit notices (commitnotice.go), so it only bounds
	// a lost notice and paces the read lease's renewals: 50 ms, where 5 ms
	// kept an idle three-node cluster at about 0.15 of a core. With
	// Pipeline on there are no notices, and it stays 5 ms.
	CommitTimeout    time.Duration
	MaxAppendEntries int
	// Snapshots: checked every SnapshotInterval, taken when
	// SnapshotThreshold entries accumulated; TrailingLogs entries are kept
	// after a snapshot so a briefly lagging follower needs no snapshot.
	SnapshotInterval  time.Duration
	SnapshotThreshold uint64
	TrailingLogs      uint64
	SnapshotRetain    int
	// LogCacheSize is the number of recent entries kept in memory.
	LogCacheSize int

	// Group commit: concurrent Apply calls are collected into one Batch
	// entry of at most MaxBatchCommands commands and MaxBatchBytes bytes.
	// While an earlier entry is still being committed the batcher lingers
	// up to BatchLinger for more (0: never linger); an idle node proposes
	// at once.
	MaxBatchCommands int
	MaxBatchBytes    int
	BatchLinger      time.Duration
	// MaxCommandBytes caps one command's encoding (the replicated-size cap
	// on retained messages; the MQTT packet limit is separate). Larger
	// commands fail with ErrTooLarge.
	MaxCommandBytes int

	// Membership: every ReconcileInterval the leader adds visible peers
	// that are not in the configuration as non-voters, and promotes a
	// non-voter whose log is within CatchUpThreshold entries of the
	// leader's for StabilizationTime.
	ReconcileInterval time.Duration
	StabilizationTime time.Duration
	CatchUpThreshold  uint64
	// Departed returns the nodes membership saw leave gracefully, with
	// when (nil: none). The leader removes a server that left and has not
	// come back for RemoveLeftAfter (a scale-down), one per round, never
	// taking the voters below MinVoters; a rolling restart comes back
	// sooner. Negative RemoveLeftAfter disables it.
	Departed        func() map[string]time.Time
	RemoveLeftAfter time.Duration
	MinVoters       int
	// ExpirySweepInterval: how often the leader clears expired retained
	// messages (conditional clears) and deletes persistent sessions
	// disconnected for longer than their expiry interval (conditional
	// deletes). Negative disables.
	ExpirySweepInterval time.Duration
	// BlobGrace: the leader drops a blob nothing refers to once it has
	// seen it so, and not growing, for this long (an upload whose
	// publisher gave up; a message every session acknowledged). Checked
	// with the expiry sweep. It must outlast a publisher's write timeout.
	BlobGrace time.Duration

	// Transport.
	DialTimeout time.Duration
	// IOTimeout bounds one raft RPC's I/O (scaled up for snapshots).
	IOTimeout time.Duration
	// HandshakeTimeout bounds reading the sub-protocol byte of an inbound
	// connection.
	HandshakeTimeout time.Duration
	MaxPool          int
	// ShutdownTransferTimeout bounds the leadership transfer Close does
	// when this node is the leader.
	ShutdownTransferTimeout time.Duration

	// Logger receives logs (component=replication, node=<id>); raft's own
	// logs are routed into it. Nil discards.
	Logger *slog.Logger
	// Registerer receives the broker_replication_* metrics; nil keeps them
	// private.
	Registerer prometheus.Registerer

	// asOldLogFormat makes the node answer rpcLogVersion as a node of log
	// format 1 does (tests of features.go only).
	asOldLogFormat bool
}

// Sanitize fills zero fields with defaults.
func (c *Config) Sanitize() {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	defInt := func(i *int, v int) {
		if *i == 0 {
			*i = v
		}
	}
	defU64 := func(i *uint64, v uint64) {
		if *i == 0 {
			*i = v
		}
	}
	if c.LogStore == "" {
		c.LogStore = LogStoreBolt
	}
	def(&c.HeartbeatTimeout, time.Second)
	def(&c.ElectionTimeout, time.Second)
	def(&c.LeaderLeaseTimeout, 500*time.Millisecond)
	if c.Pipeline {
		def(&c.CommitTimeout, 5*time.Millisecond)
	}
	def(&c.CommitTimeout, 50*time.Millisecond)
	defInt(&c.MaxAppendEntries, 32) // x a 256 KiB blob chunk: 8 MiB per message at most
	def(&c.SnapshotInterval, 2*time.Minute)
	defU64(&c.SnapshotThreshold, 8192)
	defU64(&c.TrailingLogs, 10240)
	defInt(&c.SnapshotRetain, 2)
	defInt(&c.LogCacheSize, 512)
	defInt(&c.MaxBatchCommands, 512)
	defInt(&c.MaxBatchBytes, 8<<20)
	def(&c.BatchLinger, time.Millisecond)
	if c.BatchLinger < 0 {
		c.BatchLinger = 0
	}
	defInt(&c.MaxCommandBytes, 1<<20)
	def(&c.ReconcileInterval, time.Second)
	def(&c.StabilizationTime, 5*time.Second)
	defU64(&c.CatchUpThreshold, 256)
	def(&c.RemoveLeftAfter, 2*time.Minute)
	defInt(&c.MinVoters, 3)
	def(&c.ExpirySweepInterval, 30*time.Second)
	def(&c.BlobGrace, time.Minute)
	def(&c.DialTimeout, 5*time.Second)
	def(&c.IOTimeout, 10*time.Second)
	def(&c.HandshakeTimeout, 5*time.Second)
	defInt(&c.MaxPool, 3)
	def(&c.ShutdownTransferTimeout, 3*time.Second)
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Validate reports configuration errors, each wrapping ErrInvalidConfig.
func (c *Config) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidConfig, fmt.Sprintf(format, args...))
	}
	switch {
	case c.NodeID == "":
		return bad("NodeID is required")
	case c.DataDir == "":
		return bad("DataDir is required")
	case c.LogStore != LogStoreBolt && c.LogStore != LogStoreWAL:
		return bad("LogStore %q: want %q or %q", c.LogStore, LogStoreBolt, LogStoreWAL)
	case c.Listener == nil:
		return bad("Listener is required")
	case c.Dial == nil:
		return bad("Dial is required")
	case c.BootstrapExpect < 0:
		return bad("BootstrapExpect %d is negative", c.BootstrapExpect)
	case c.BootstrapExpect > 1 && c.Peers == nil:
		return bad("BootstrapExpect %d needs Peers", c.BootstrapExpect)
	case c.ElectionTimeout < c.HeartbeatTimeout:
		return bad("ElectionTimeout %v < HeartbeatTimeout %v", c.ElectionTimeout, c.HeartbeatTimeout)
	case c.LeaderLeaseTimeout > c.HeartbeatTimeout:
		return bad("LeaderLeaseTimeout %v > HeartbeatTimeout %v", c.LeaderLeaseTimeout, c.HeartbeatTimeout)
	case c.LogStore == LogStoreWAL && c.MaxBatchBytes > maxWALEntry:
		return bad("MaxBatchBytes %d: raft-wal reads no entry over %d bytes", c.MaxBatchBytes, maxWALEntry)
	case c.MaxCommandBytes > c.MaxBatchBytes:
		return bad("MaxCommandBytes %d > MaxBatchBytes %d", c.MaxCommandBytes, c.MaxBatchBytes)
	}
	host, port, err := net.SplitHostPort(c.Advertise)
	if err != nil {
		return bad("Advertise %q: %v", c.Advertise, err)
	}
	if p, err := strconv.Atoi(port); host == "" || err != nil || p <= 0 || p > 65535 {
		return bad("Advertise %q needs a host and a non-zero port", c.Advertise)
	}
	return nil
}
