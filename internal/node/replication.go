package node

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"path/filepath"
	"time"

	"github.com/mqtt-ha/broker/hooks"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mqtt-ha/broker/cluster"
	"github.com/mqtt-ha/broker/replication"
)

// appMeta is what each node gossips for raft bootstrap: its
// --bootstrap-expect and whether it holds raft state. Format: version 1,
// uvarint expect, one byte has-state.
func encodeAppMeta(expect int, hasState bool) []byte {
	b := binary.AppendUvarint([]byte{1}, uint64(expect))
	if hasState {
		return append(b, 1)
	}
	return append(b, 0)
}

func decodeAppMeta(b []byte) (expect int, hasState, ok bool) {
	if len(b) < 3 || b[0] != 1 {
		return 0, false, false
	}
	v, n := binary.Uvarint(b[1:])
	// A has-state byte other than 0 or 1 is refused, not read as "no
	// state": that guess could let a bootstrap ignore existing state.
	if n <= 0 || len(b) != 1+n+1 || v > 1<<16 || b[1+n] > 1 {
		return 0, false, false
	}
	return int(v), b[1+n] == 1, true
}

func (n *Node) raftDir() string { return filepath.Join(n.cfg.DataDir, "raft") }

// startReplication runs after the cluster has bound its port (the raft
// address includes it) and before MQTT serves, so that clients only ever
// see the replicated retained state.
func (n *Node) startReplication(ctx context.Context) error {
	mux := n.cluster.Mux()
	ln, err := mux.Listen(cluster.ProtoRaft)
	if err != nil {
		return fmt.Errorf("raft listener: %w", err)
	}
	_, port, _ := net.SplitHostPort(mux.Addr().String())
	n.raftAddr = net.JoinHostPort(n.cfg.AdvertiseHost, port)
	cfg := replication.Config{
		NodeID:          n.cfg.NodeID,
		Advertise:       n.raftAddr,
		DataDir:         n.raftDir(),
		BootstrapExpect: n.cfg.BootstrapExpect,
		Peers:           n.raftPeers,
		Departed:        n.departedPeers,
		RemoveLeftAfter: n.cfg.RemoveLeftAfter,
		MinVoters:       n.cfg.MinVoters,
		Listener:        ln,
		Dial: func(ctx context.Context, addr string) (net.Conn, error) {
			c, err := mux.Dial(ctx, addr, cluster.ProtoRaft)
			if err != nil {
				return nil, err
			}
			return c, nil
		},
		OnRetained: n.retainedHook.Apply,
		OnRestore: func() {
			n.retainedHook.Resync()
			n.sessionsHook.Resync()
		},
		OnOwner:   n.ownershipHook.Apply,
		OnSession: n.sessionsHook.Apply,
		// Expired sessions (and retained messages) go within 2 s.
		ExpirySweepInterval: 2 * time.Second,
		ReadLease:           n.cfg.ReadLease,
		Pipeline:            n.cfg.RaftPipeline,
		LogStore:            n.cfg.RaftLogStore,
		Logger:              n.cfg.Logger,
		Registerer:          n.reg,
	}
	if n.cfg.ReplicationTuning != nil {
		n.cfg.ReplicationTuning(&cfg)
	}
	n.repl, err = replication.New(cfg)
	if err != nil {
		return fmt.Errorf("replication: %w", err)
	}
	n.retainedHook.SetReplication(n.repl)
	n.ownershipHook.SetReplication(n.repl, n.stopped)
	n.sessionsHook.SetReplication(n.repl, n.stopped)
	n.reg.MustRegister(queueDepthCollector{n.repl})
	if err := n.repl.Start(ctx); err != nil {
		return fmt.Errorf("start replication: %w", err)
	}
	n.addReadiness("replication", n.repl.Ready)
	go n.announceRaftState()
	return nil
}

// departedPeers lists the members that left gracefully (not failed), with
// when: the leader removes them from raft once they stay away (scale-down).
func (n *Node) departedPeers() map[string]time.Time {
	out := map[string]time.Time{}
	for _, m := range n.cluster.Status().Members {
		if m.State == "left" {
			out[m.ID] = m.Since
		}
	}
	return out
}

// raftPeers lists what membership sees, for bootstrap and for the leader's
// reconciliation. Members whose metadata is missing or unreadable (another
// version, not started) are left out rather than guessed at.
func (n *Node) raftPeers() []replication.Peer {
	var ps []replication.Peer
	for _, m := range n.cluster.Status().Members {
		if m.Self {
			ps = append(ps, replication.Peer{ID: n.cfg.NodeID, Addr: n.raftAddr,
				BootstrapExpect: n.cfg.BootstrapExpect, HasState: n.repl.HasState()})
			continue
		}
		if m.State != "alive" {
			continue
		}
		expect, has, ok := decodeAppMeta(m.AppMeta)
		if !ok || m.ClusterAddr == "" {
			continue
		}
		ps = append(ps, replication.Peer{ID: m.ID, Addr: m.ClusterAddr, BootstrapExpect: expect, HasState: has})
	}
	return ps
}

// announceRaftState gossips the has-state flag when it changes (after the
// bootstrap or the first replicated entry), so peers that are still
// waiting to bootstrap see that a cluster already exists.
func (n *Node) announceRaftState() {
	last := n.initialHasState
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-n.stopped:
			return
		case <-t.C:
		}
		if has := n.repl.HasState(); has != last {
			if err := n.cluster.SetAppMeta(encodeAppMeta(n.cfg.BootstrapExpect, has)); err != nil {
				n.log.Warn("cannot gossip raft state", "error", err)
				continue
			}
			last = has
		}
	}
}

// ClusterInfo is /api/cluster: membership and routes, plus raft.
type ClusterInfo struct {
	cluster.Status
	Raft replication.Status `json:"raft"`
}

// ClusterStatus is the node's view of the cluster, for /api/cluster.
func (n *Node) ClusterStatus() ClusterInfo {
	ci := ClusterInfo{Status: n.cluster.Status()}
	if n.repl != nil {
		ci.Raft = n.repl.Status()
	}
	return ci
}

// memberAlive reports whether membership sees node as alive.
func (n *Node) memberAlive(node string) bool {
	for _, m := range n.cluster.Status().Members {
		if m.ID == node {
			return m.State == "alive"
		}
	}
	return false
}

// queueDepthCollector exports the distribution of persistent-session queue
// depths (queued plus in flight) as a histogram, read from the log at
// scrape time: the same on every node, never one series per client.
type queueDepthCollector struct{ r *replication.Node }

var queueDepthDesc = prometheus.NewDesc("broker_sessions_queue_depth",
	"Persistent sessions by queue depth (messages queued or in flight), cluster-wide from the replicated state.", nil, nil)

var queueDepthBuckets = []float64{0, 1, 10, 100, 1000, 10000}

func (queueDepthCollector) Describe(ch chan<- *prometheus.Desc) { ch <- queueDepthDesc }

func (c queueDepthCollector) Collect(ch chan<- prometheus.Metric) {
	counts := make(map[float64]uint64, len(queueDepthBuckets))
	var n uint64
	var sum float64
	for _, s := range c.r.Sessions() {
		d := float64(s.QueueDepth)
		n++
		sum += d
		for _, b := range queueDepthBuckets {
			if d <= b {
				counts[b]++
			}
		}
	}
	ch <- prometheus.MustNewConstHistogram(queueDepthDesc, n, sum, counts)
}

// sysCluster is the cluster part of $SYS (hooks.Sys).
func (n *Node) sysCluster() hooks.SysCluster {
	st := n.cluster.Status()
	out := hooks.SysCluster{Self: n.cfg.NodeID, Nodes: st.AliveMembers, SharedHere: n.clusterHook.SharedSubscriptions()}
	if n.repl == nil {
		return out
	}
	rs := n.repl.Status()
	out.Leader, out.Retained = rs.LeaderID, rs.Retained
	out.StoredBytes, out.ExpiredHere = n.repl.StoredBytes(), n.repl.ExpiredSessions()
	for _, s := range n.repl.Sessions() {
		out.Sessions++
		out.Queued += s.QueueDepth
		if s.Connected {
			out.Connected++
		} else if s.Owner == n.cfg.NodeID {
			out.DisconnectedHere++
		}
	}
	return out
}
