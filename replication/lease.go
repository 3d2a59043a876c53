package replication

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
)

// The read lease lets the leader name a read index without a heartbeat
// round (VerifyLeader) while no other leader can exist. Experimental and
// off by default (Config.ReadLease): DESIGN.md says why.
// The argument, in full in DESIGN.md ("The read lease"):
//
//   - A follower of hashicorp/raft v1.8.0 refuses votes and pre-votes while
//     it knows a leader (raft.go requestVote, requestPreVote), unless the
//     request is a leadership transfer, and forgets the leader only when
//     HeartbeatTimeout has passed since its last contact (runFollower), when
//     it restarts, or on the leader's TimeoutNow (a transfer).
//   - A successful AppendEntries (heartbeats included) sent at time t in
//     term T means the follower set this node as its leader and its last
//     contact to a time after t.
//   - So once followers that, with this node, make a majority of the voters
//     acknowledged requests of the current term sent at or after t, no other
//     node can win an election before t + HeartbeatTimeout: every majority
//     holds one of them (or this node, which votes for nobody while it
//     leads). The lease ends at t + HeartbeatTimeout/2, leaving half of it
//     for clock-rate drift.
//   - The three ways a follower forgets its leader early are closed: a node
//     refuses every vote for the lease's length after it starts (voteGate);
//     a leader stops using its lease in the term in which it begins a
//     transfer (Node.transferLeadership); and a TimeoutNow, which carries
//     no term in raft and may arrive late, is tagged with that term by the
//     sender and honoured only from the receiver's leader in that term.
//   - Heartbeats do not count, nor requests that carry no entry of the
//     leader's term (raftTransport.AppendEntries); a candidate started by a
//     TimeoutNow answers no AppendEntries of its term, and a transfer vote
//     from a candidate whose log is behind is refused before raft, which
//     would forget its leader on the vote's higher term (voteGate).
type readLease struct {
	dur time.Duration // 0: no lease, every read index takes a heartbeat round

	mu   sync.Mutex
	acks map[raft.ServerID]leaseAck
	// blocked: the term in which this node began a leadership transfer.
	blocked atomic.Uint64
	// started: when this node started; it votes only a lease's length
	// later (voteGate).
	started time.Time
}

type leaseAck struct {
	term uint64
	sent time.Time // carries the monotonic clock
}

func newReadLease(dur time.Duration) *readLease {
	return &readLease{dur: max(dur, 0), acks: map[raft.ServerID]leaseAck{}, started: time.Now()}
}

// acked records that peer accepted an AppendEntries of term sent at sent.
func (l *readLease) acked(peer raft.ServerID, term uint64, sent time.Time) {
	l.mu.Lock()
	if a, ok := l.acks[peer]; !ok || term > a.term || term == a.term && sent.After(a.sent) {
		l.acks[peer] = leaseAck{term: term, sent: sent}
	}
	l.mu.Unlock()
}

// holds reports whether self, leader of term, holds the lease at now:
// voters (the latest configuration's) that acknowledged a request of term
// sent within the lease's length make a majority with self.
func (l *readLease) holds(self raft.ServerID, term uint64, voters []raft.ServerID, now time.Time) bool {
	if l.dur <= 0 || len(voters) == 0 || l.blocked.Load() == term {
		return false
	}
	n := 0
	l.mu.Lock()
	for _, v := range voters {
		if v == self {
			n++
			continue
		}
		if a, ok := l.acks[v]; ok && a.term == term && now.Sub(a.sent) < l.dur {
			n++
		}
	}
	l.mu.Unlock()
	return n >= len(voters)/2+1
}

// block ends the lease for term: a leadership transfer lets followers
// vote while they still know this node as their leader.
func (l *readLease) block(term uint64) { l.blocked.Store(term) }

// votesRefused reports whether this node must not vote yet: it started
// less than the lease's length ago, so it may have acknowledged a leader
// whose lease still runs and has forgotten it.
func (l *readLease) votesRefused(now time.Time) bool { return now.Sub(l.started) < l.dur }

// transferLeadership starts a leadership transfer. The lease ends first:
// the transfer's target asks for votes that followers grant although they
// still know this node as their leader.
func (n *Node) transferLeadership() raft.Future {
	n.lease.block(n.raft.CurrentTerm())
	return n.raft.LeadershipTransfer()
}

// transferAccepted: a TimeoutNow tagged with term, from node from, may
// start an election here only if from is this node's leader and term is
// its current term: the sender gave up its lease in that term before it
// sent the request, and no later leader's lease can be undone by it.
func (n *Node) transferAccepted(from raft.ServerID, term uint64) bool {
	r := n.raftReady.Load()
	if r == nil {
		return false
	}
	_, leader := r.LeaderWithID()
	return leader == from && leader != "" && r.CurrentTerm() == term
}

// raftState is raft's state and current term, for the vote gate (known
// false before raft exists).
// lastEntry is the index and term of the last entry of raft's log, or of
// the snapshot when the log was compacted up to it (raft's getLastEntry).
func (n *Node) lastEntry() (uint64, uint64, bool) {
	r := n.raftReady.Load()
	if r == nil {
		return 0, 0, false
	}
	logs, snaps := n.logs, n.snaps
	idx := r.LastIndex()
	var l raft.Log
	if err := logs.GetLog(idx, &l); err == nil {
		return idx, l.Term, true
	}
	if metas, err := snaps.List(); err == nil && len(metas) > 0 && metas[0].Index == idx {
		return idx, metas[0].Term, true
	}
	return 0, 0, false
}

func (n *Node) raftState() (raft.RaftState, uint64, bool) {
	r := n.raftReady.Load()
	if r == nil {
		return raft.Follower, 0, false
	}
	return r.State(), r.CurrentTerm(), true
}
