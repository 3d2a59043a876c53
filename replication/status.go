package replication

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
)

// Server is one entry of the raft configuration.
type Server struct {
	ID      string `json:"id"`
	Address string `json:"address"`
}

// Status is a point-in-time view of this node's raft state (for /api/cluster
// and `broker cluster status`).
type Status struct {
	NodeID     string `json:"node_id"`
	Address    string `json:"address"`
	State      string `json:"state"` // Follower, Candidate, Leader, Shutdown; "not started"/"closed"
	LeaderID   string `json:"leader_id"`
	LeaderAddr string `json:"leader_addr"`
	Term       uint64 `json:"term"`
	// CommitIndex is the highest index known committed (on a follower: as
	// of the leader's last message). AppliedIndex is the highest index
	// handed to the state machine.
	CommitIndex       uint64 `json:"commit_index"`
	AppliedIndex      uint64 `json:"applied_index"`
	LastLogIndex      uint64 `json:"last_log_index"`
	LastSnapshotIndex uint64 `json:"last_snapshot_index"`
	// LastContact is when a follower last heard from the leader (zero on
	// the leader).
	LastContact time.Time `json:"last_contact,omitzero"`
	// HasQuorumContact: on the leader, its lease is valid (it steps down
	// when it cannot reach a quorum for LeaderLeaseTimeout); on a follower,
	// it heard from a leader within HeartbeatTimeout.
	HasQuorumContact bool     `json:"has_quorum_contact"`
	Voters           []Server `json:"voters"`
	NonVoters        []Server `json:"non_voters"`
	HasState         bool     `json:"has_state"`
	Restores         uint64   `json:"restores"`
	Retained         int      `json:"retained"`
	Owners           int      `json:"owners"`
	// Ready is the Ready() verdict: "" when ready, else why not.
	Ready string `json:"ready"`
}

// Status returns the node's raft state.
func (n *Node) Status() Status {
	st := Status{NodeID: n.cfg.NodeID, Address: n.cfg.Advertise, Restores: n.fsm.Restores()}
	st.Retained, st.Owners = n.fsm.counts()
	switch n.state.Load() {
	case stateNew:
		st.State = "not started"
		st.Ready = ErrClosed.Error()
		return st
	case stateClosed:
		st.State = "closed"
		st.Ready = ErrClosed.Error()
		return st
	}
	r := n.raft
	st.State = r.State().String()
	addr, id := r.LeaderWithID()
	st.LeaderID, st.LeaderAddr = string(id), string(addr)
	st.Term = r.CurrentTerm()
	st.CommitIndex = r.CommitIndex()
	st.AppliedIndex = r.AppliedIndex()
	st.LastLogIndex = r.LastIndex()
	st.HasState = n.HasState()
	if s, err := parseUint(r.Stats()["last_snapshot_index"]); err == nil {
		st.LastSnapshotIndex = s
	}
	if r.State() == raft.Leader {
		st.HasQuorumContact = true
	} else if lc := r.LastContact(); !lc.IsZero() {
		st.LastContact = lc
		st.HasQuorumContact = st.LeaderID != "" && time.Since(lc) <= n.cfg.HeartbeatTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if cfg, err := n.configuration(ctx); err == nil {
		for _, s := range cfg.Servers {
			e := Server{ID: string(s.ID), Address: string(s.Address)}
			if s.Suffrage == raft.Voter {
				st.Voters = append(st.Voters, e)
			} else {
				st.NonVoters = append(st.NonVoters, e)
			}
		}
	}
	if err := n.Ready(); err != nil {
		st.Ready = err.Error()
	}
	return st
}

func parseUint(s string) (uint64, error) {
	var v uint64
	_, err := fmt.Sscan(s, &v)
	return v, err
}

// Ready returns nil when this node is fit to serve: it is running, it is in
// the raft configuration (voter or non-voter), a leader is known (a
// follower heard from it within 2 x HeartbeatTimeout), and its state
// machine has caught up: it applied everything it knows to be committed
// and, on a follower, its applied index is within CatchUpThreshold entries
// of the leader's commit index (asked over the RPC, cached for
// HeartbeatTimeout), because a follower still catching up only knows the
// commit index of the entries it already received. Otherwise the error says
// why (ErrClosed, ErrNotMember, ErrNoLeader, ErrNotCaughtUp). Wire it into
// /readyz.
func (n *Node) Ready() error {
	if !n.running() {
		return ErrClosed
	}
	r := n.raft
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	cfg, err := n.configuration(ctx)
	if err != nil {
		return err
	}
	if _, ok := findServer(cfg, n.cfg.NodeID); !ok {
		return fmt.Errorf("%w: %d servers configured", ErrNotMember, len(cfg.Servers))
	}
	if addr, _ := r.LeaderWithID(); addr == "" {
		return ErrNoLeader
	}
	if r.State() != raft.Leader {
		if since := time.Since(r.LastContact()); since > 2*n.cfg.HeartbeatTimeout {
			return fmt.Errorf("%w: no contact with the leader for %v", ErrNoLeader, since.Round(time.Millisecond))
		}
	}
	applied, commit := r.AppliedIndex(), r.CommitIndex()
	if applied < commit || commit == 0 {
		return fmt.Errorf("%w: applied %d of %d committed", ErrNotCaughtUp, applied, commit)
	}
	if r.State() == raft.Leader {
		return nil
	}
	lc, err := n.leaderCommit(ctx)
	if err != nil {
		return fmt.Errorf("%w: asking the leader for its commit index: %w", ErrNoLeader, err)
	}
	if applied+n.cfg.CatchUpThreshold < lc {
		return fmt.Errorf("%w: applied %d, leader committed %d", ErrNotCaughtUp, applied, lc)
	}
	return nil
}

// leaderCommit returns the leader's commit index, cached for
// HeartbeatTimeout so that frequent probes cost the leader little.
func (n *Node) leaderCommit(ctx context.Context) (uint64, error) {
	n.readyMu.Lock()
	defer n.readyMu.Unlock()
	if time.Since(n.readyAt) < n.cfg.HeartbeatTimeout {
		return n.readyCommit, nil
	}
	addr, _ := n.raft.LeaderWithID()
	if addr == "" {
		return 0, ErrNoLeader
	}
	st, err := n.fetchPeerStatus(ctx, string(addr))
	if err != nil {
		return 0, err
	}
	n.readyCommit, n.readyAt = st.CommitIndex, time.Now()
	return st.CommitIndex, nil
}

// newGauges are the per-node gauges read at scrape time.
func (n *Node) newGauges() []prometheus.Collector {
	const ns, sub = "broker", "replication"
	g := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help}, f)
	}
	r := n.raft
	return []prometheus.Collector{
		g("is_leader", "1 if this node is the raft leader.", func() float64 {
			if r.State() == raft.Leader {
				return 1
			}
			return 0
		}),
		g("term", "Current raft term.", func() float64 { return float64(r.CurrentTerm()) }),
		g("commit_index", "Highest log index known committed.", func() float64 { return float64(r.CommitIndex()) }),
		g("applied_index", "Highest log index applied to the state machine.", func() float64 { return float64(r.AppliedIndex()) }),
		g("last_log_index", "Last log index stored locally.", func() float64 { return float64(r.LastIndex()) }),
		g("retained_messages", "Retained messages in the replicated state.", func() float64 {
			a, _ := n.fsm.counts()
			return float64(a)
		}),
		g("owned_clients", "Client ids with a recorded owner.", func() float64 {
			_, b := n.fsm.counts()
			return float64(b)
		}),
	}
}

// IsLeader reports whether this node is the raft leader now.
func (n *Node) IsLeader() bool { return n.running() && n.raft.State() == raft.Leader }

// HasLeader reports whether this node knows a raft leader (a write can be
// attempted; it may still fail).
func (n *Node) HasLeader() bool {
	if !n.running() {
		return false
	}
	addr, _ := n.raft.LeaderWithID()
	return addr != ""
}
