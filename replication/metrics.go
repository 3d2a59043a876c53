package replication

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the broker_replication_* series. Label values are bounded
// (path, reason), never a topic, client id or node id.
type metrics struct {
	commitLatency    prometheus.Histogram
	applyLatency     *prometheus.HistogramVec
	batchSize        prometheus.Histogram
	appliedEntries   prometheus.Counter
	appliedCommands  prometheus.Counter
	applyErrors      *prometheus.CounterVec
	snapshotBytes    prometheus.Gauge
	snapshotDuration prometheus.Histogram
	leaderChanges    prometheus.Counter
	commitNotices    prometheus.Counter
	membership       *prometheus.CounterVec
	barrierLatency   prometheus.Histogram
	barrierErrors    *prometheus.CounterVec
	readIndexes      *prometheus.CounterVec
	blobBytes        prometheus.Counter
	collectors       []prometheus.Collector
}

func newMetrics() *metrics {
	const ns, sub = "broker", "replication"
	m := &metrics{
		commitLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "commit_latency_seconds",
			Help:    "Time from proposing a log entry on the leader until it is committed and applied.",
			Buckets: prometheus.ExponentialBuckets(0.0002, 2, 16),
		}),
		applyLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "apply_duration_seconds",
			Help:    "Node.Apply latency as seen by the caller, by path (leader, forwarded).",
			Buckets: prometheus.ExponentialBuckets(0.0002, 2, 16),
		}, []string{"path"}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "batch_commands",
			Help:    "Commands per proposed log entry (group commit batch size).",
			Buckets: prometheus.ExponentialBuckets(1, 2, 12),
		}),
		appliedEntries: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "applied_entries_total",
			Help: "Log entries applied to the state machine.",
		}),
		appliedCommands: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "applied_commands_total",
			Help: "Commands applied to the state machine (a batch entry counts each of its commands).",
		}),
		applyErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "apply_errors_total",
			Help: "Node.Apply failures by reason.",
		}, []string{"reason"}),
		snapshotBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "snapshot_bytes",
			Help: "Size of the last persisted snapshot.",
		}),
		snapshotDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "snapshot_duration_seconds",
			Help:    "Time to persist a snapshot.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}),
		leaderChanges: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "leader_changes_total",
			Help: "Leader changes observed by this node (including 'no leader').",
		}),
		commitNotices: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "commit_notices_total",
			Help: "AppendEntries without entries this node sent as leader only to tell a follower of a commit at once, instead of after CommitTimeout (commitnotice.go).",
		}),
		membership: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "membership_changes_total",
			Help: "Configuration changes made by this node as leader, by action.",
		}, []string{"action"}),
		barrierLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "read_barrier_duration_seconds",
			Help:    "Node.ReadBarrier latency: a read index from the leader, then applying up to it here.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		barrierErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "read_barrier_errors_total",
			Help: "Node.ReadBarrier failures by reason.",
		}, []string{"reason"}),
		readIndexes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "leader_read_indexes_total",
			Help: "Read indexes this node named as leader, by how leadership was confirmed: sole_voter (a one-voter cluster: no round), lease (no round) or heartbeat_round. Counted per read index, which on a follower is per shared round of its callers and on a sole voter per barrier call.",
		}, []string{"confirmed_by"}),
		blobBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "blob_written_bytes_total",
			Help: "Bytes of large payloads this node wrote to the log as blobs (PutBlob).",
		}),
	}
	m.collectors = []prometheus.Collector{
		m.commitLatency, m.applyLatency, m.batchSize, m.appliedEntries, m.appliedCommands,
		m.applyErrors, m.snapshotBytes, m.snapshotDuration, m.leaderChanges, m.commitNotices, m.membership,
		m.barrierLatency, m.barrierErrors, m.readIndexes, m.blobBytes,
	}
	return m
}

// register adds the collectors (and the node's gauges) to reg. A nil reg
// keeps them private.
func (m *metrics) register(reg prometheus.Registerer, extra ...prometheus.Collector) error {
	if reg == nil {
		return nil
	}
	for _, c := range append(m.collectors, extra...) {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				return fmt.Errorf("%w: metrics already registered (one Node per Registerer): %w", ErrInvalidConfig, err)
			}
			return fmt.Errorf("replication: register metrics: %w", err)
		}
	}
	return nil
}

func (m *metrics) unregister(reg prometheus.Registerer, extra ...prometheus.Collector) {
	if reg == nil {
		return
	}
	for _, c := range append(m.collectors, extra...) {
		reg.Unregister(c)
	}
}

// errReason maps an Apply error to a bounded label value.
func errReason(err error) string {
	switch {
	case errors.Is(err, ErrTimeout):
		return "timeout"
	case errors.Is(err, ErrNoLeader):
		return "no_leader"
	case errors.Is(err, ErrNotLeader):
		return "not_leader"
	case errors.Is(err, ErrUnknownOutcome):
		return "unknown_outcome"
	case errors.Is(err, ErrClosed):
		return "closed"
	case errors.Is(err, ErrTooLarge):
		return "too_large"
	case errors.Is(err, ErrInvalidCommand):
		return "invalid"
	}
	return "other"
}
