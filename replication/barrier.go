package replication

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// ReadBarrier returns once this node's state (and the observers fed from
// it) holds every entry that was committed before the call began: reads
// made after it see every write acknowledged before it, on any node. This
// is Raft's ReadIndex (dissertation §6.4): the leader confirms it is still
// the leader with a round of heartbeats and names an index covering
// everything committed so far; this node waits until it has applied that
// far. It costs one round trip to the leader and no log write; concurrent
// callers share one round.
//
// hooks.Sessions calls it before it matches a QoS 1/2 publish against the
// persistent subscriptions, so a node that is behind the log (restarted,
// paused, on the minority side) never acknowledges a message for which it
// missed a subscription (replication/DESIGN.md, "Acknowledging a publish").
//
// Without a leader it waits for one like Apply does (and fails fast with
// ErrNoLeader on a node that has been without one for longer than an
// election takes); it fails with ErrTimeout when ctx ends.
func (n *Node) ReadBarrier(ctx context.Context) error {
	return n.barrier(ctx, false)
}

// SessionsBarrier is ReadBarrier for the persistent sessions only: once it
// returns, this node's state holds every entry committed before the call
// that opened or deleted a session or changed its subscriptions. It is as
// safe as ReadBarrier for matching a publish or for finding the session a
// clean CONNECT must discard, and cheaper: such entries are rarer than
// others, so this node usually holds them already and does not wait for
// the entries committed just before (its own publisher's previous message,
// which a follower learns is committed only with the leader's next
// message).
func (n *Node) SessionsBarrier(ctx context.Context) error {
	return n.barrier(ctx, true)
}

func (n *Node) barrier(ctx context.Context, subsOnly bool) error {
	start := time.Now()
	var ri readIndexes
	err := errNotSole
	if n.running() && n.raft.State() == raft.Leader && n.soleVoter() {
		// Nothing to ask and no round to share: the leader's own read
		// index without a round trip. On an error (the term moved) the
		// rounds below retry.
		ri, err = n.leaderReadIndex(ctx)
	}
	if err != nil {
		ri, err = n.readIndex(ctx)
	}
	if err != nil && !errors.Is(err, ErrClosed) {
		err = fmt.Errorf("%w: %w", ErrNoReadIndex, err)
	}
	if err == nil {
		idx := ri.read
		if subsOnly {
			idx = ri.subs
		}
		err = n.WaitSynced(ctx, idx)
	}
	n.m.barrierLatency.Observe(time.Since(start).Seconds())
	if err != nil {
		n.m.barrierErrors.WithLabelValues(errReason(err)).Inc()
	}
	return err
}

var errNotSole = errors.New("not the sole voter")

// WaitSynced waits until this node's state holds the log up to index (see
// FSM.synced), or ctx ends.
func (n *Node) WaitSynced(ctx context.Context, index uint64) error {
	for {
		s, moved := n.fsm.syncedState()
		if s >= index {
			return nil
		}
		select {
		case <-moved:
		case <-ctx.Done():
			return fmt.Errorf("%w: applied %d of %d here: %w", ErrTimeout, s, index, ctx.Err())
		case <-n.stop:
			return ErrClosed
		}
	}
}

// readRoundTimeout bounds one read-index round; a caller whose round
// failed asks again (readIndex) until its own deadline.
const readRoundTimeout = time.Second

// readRound is one read-index request shared by every caller that joined
// it before it started.
type readRound struct {
	done chan struct{}
	idx  readIndexes
	err  error
}

// readIndexes is what the leader answers: read covers every entry
// committed before the request; subs (<= read) covers every entry among
// them that changed a subscription.
type readIndexes struct {
	read, subs uint64
}

// readRounds coalesces read-index requests: at most one is in flight, and
// callers arriving meanwhile join the next one (never the one in flight,
// whose index may predate their call).
type readRounds struct {
	mu      sync.Mutex
	next    *readRound
	running bool
}

// readIndex returns an index covering every entry committed before the
// call, retrying through leader changes until ctx ends.
func (n *Node) readIndex(ctx context.Context) (readIndexes, error) {
	var lastErr error
	for attempt := 0; ; attempt++ {
		if !n.running() {
			return readIndexes{}, ErrClosed
		}
		if attempt > 0 {
			t := time.NewTimer(min(time.Duration(attempt)*10*time.Millisecond, 100*time.Millisecond))
			select {
			case <-n.leaderChanged():
			case <-t.C:
			case <-ctx.Done():
			case <-n.stop:
			}
			t.Stop()
		}
		if err := ctx.Err(); err != nil {
			return readIndexes{}, timeoutErr(ctx, lastErr)
		}
		idx, err := n.joinReadRound(ctx)
		if err == nil {
			return idx, nil
		}
		lastErr = err
		// Anything but a closed node or a malformed exchange may pass
		// with the next leader or connection (a leader stopping in a
		// rolling restart answers with a reset): ask again until ctx ends.
		if errors.Is(err, ErrClosed) || errors.Is(err, ErrInvalidCommand) || errors.Is(err, errCorrupt) {
			return readIndexes{}, err
		}
		if errors.Is(err, ErrNoLeader) {
			if since := n.noLeaderSince.Load(); since != 0 && time.Since(time.Unix(0, since)) > n.fastFailAfter() {
				return readIndexes{}, fmt.Errorf("%w (for %v)", ErrNoLeader, time.Since(time.Unix(0, since)).Round(time.Millisecond))
			}
		}
	}
}

func (n *Node) joinReadRound(ctx context.Context) (readIndexes, error) {
	rr := &n.reads
	rr.mu.Lock()
	if rr.next == nil {
		rr.next = &readRound{done: make(chan struct{})}
	}
	r := rr.next
	if !rr.running {
		rr.running = true
		go n.runReadRounds()
	}
	rr.mu.Unlock()
	select {
	case <-r.done:
		return r.idx, r.err
	case <-ctx.Done():
		return readIndexes{}, timeoutErr(ctx, nil)
	}
}

func (n *Node) runReadRounds() {
	rr := &n.reads
	for {
		rr.mu.Lock()
		r := rr.next
		rr.next = nil
		if r == nil {
			rr.running = false
			rr.mu.Unlock()
			return
		}
		rr.mu.Unlock()
		// A round must not outlive its leader: callers that arrive while
		// it runs wait for the next one, so a round stuck on a leader that
		// was just cut off would hold every barrier up for IOTimeout.
		changed := n.leaderChanged()
		ctx, cancel := context.WithTimeout(n.life, min(n.cfg.IOTimeout, readRoundTimeout))
		go func() {
			select {
			case <-changed:
				cancel()
			case <-ctx.Done():
			}
		}()
		r.idx, r.err = n.fetchReadIndex(ctx)
		cancel()
		close(r.done)
	}
}

// fetchReadIndex asks the leader (this node or another) for read indexes.
func (n *Node) fetchReadIndex(ctx context.Context) (readIndexes, error) {
	if n.raft.State() == raft.Leader {
		return n.leaderReadIndex(ctx)
	}
	addr, id := n.raft.LeaderWithID()
	if addr == "" || id == raft.ServerID(n.cfg.NodeID) {
		return readIndexes{}, ErrNoLeader
	}
	body, err := n.rpcc.call(ctx, string(addr), rpcReadIndex, appendUvarint(nil, timeoutMs(ctx)))
	if err != nil {
		if ctx.Err() != nil {
			return readIndexes{}, fmt.Errorf("%w: read index from %s: %w", ErrTimeout, addr, err)
		}
		return readIndexes{}, fmt.Errorf("read index from %s: %w", addr, err)
	}
	r := reader{b: body}
	if err := r.error(); err != nil {
		return readIndexes{}, err
	}
	ri := readIndexes{read: r.uvarint(), subs: r.uvarint()}
	if err := r.end(); err != nil {
		return readIndexes{}, fmt.Errorf("%w: read index reply: %w", errCorrupt, err)
	}
	return ri, nil
}

// leaderReadIndex is the leader's side. The index is read first, then
// leadership is confirmed: if this node still holds its read lease, or is
// still the leader after a heartbeat round, no other leader can have
// committed anything it lacks.
//
// The index is the commit index once this leader has applied an entry of
// its own term (so its commit index covers every earlier term), else its
// last index (which holds every committed entry, by Leader Completeness).
// Either is then moved down past entries the FSM never sees (no-ops), so
// that WaitSynced on any node ends at it. The leader then applies up to it
// itself, so that its own record of the last subscription change covers
// it.
func (n *Node) leaderReadIndex(ctx context.Context) (readIndexes, error) {
	term := n.raft.CurrentTerm()
	idx := n.raft.LastIndex()
	if n.fsm.syncedTerm.Load() == term {
		idx = n.raft.CommitIndex()
	}
	var by string
	switch {
	case n.raft.State() == raft.Leader && n.soleVoter():
		by = "sole_voter"
	case n.leaseHeld(term):
		by = "lease"
	default:
		f := n.raft.VerifyLeader()
		errc := make(chan error, 1)
		go func() { errc <- f.Error() }()
		select {
		case err := <-errc:
			if err != nil {
				return readIndexes{}, fmt.Errorf("%w: %w", ErrNotLeader, err)
			}
		case <-ctx.Done():
			return readIndexes{}, fmt.Errorf("%w: verifying leadership: %w", ErrTimeout, ctx.Err())
		}
		by = "heartbeat_round"
	}
	if n.raft.CurrentTerm() != term {
		// Leadership was lost and won again between reading the index and
		// confirming it: the index belongs to the old term. Ask again.
		return readIndexes{}, fmt.Errorf("%w: term changed during the read index", ErrNotLeader)
	}
	n.m.readIndexes.WithLabelValues(by).Inc()
	ri := readIndexes{read: n.lastFSMEntry(idx)}
	if err := n.WaitSynced(ctx, ri.read); err != nil {
		return readIndexes{}, err
	}
	ri.subs = min(n.fsm.subsChanged.Load(), ri.read)
	return ri, nil
}

// SessionsCurrent reports whether a SessionsBarrier called now would pass
// at once, without a round trip or a wait: this node leads as the only
// voter and has applied everything committed. False says nothing (call
// SessionsBarrier); it never blocks, so a connection's reader may ask.
func (n *Node) SessionsCurrent() bool {
	if !n.running() || n.raft.State() != raft.Leader || !n.soleVoter() {
		return false
	}
	term := n.raft.CurrentTerm()
	if n.fsm.syncedTerm.Load() != term {
		return false // no entry of its own term applied: the commit index may be behind
	}
	idx := n.lastFSMEntry(n.raft.CommitIndex())
	synced, _ := n.fsm.syncedState()
	return synced >= idx && n.raft.CurrentTerm() == term
}

// soleVoter reports whether this node is the only voter of the latest
// configuration in its log. Such a leader stays the leader until it
// appends a configuration change itself (no one else can win a vote
// without it, and it never loses contact with a quorum), so its commit
// index is the cluster's without a heartbeat round; the term check in
// leaderReadIndex covers its stepping down meanwhile. A one-node
// broker's QoS 1 publishes took a round through raft's leader loop for
// every batch (4.5 % of its CPU).
func (n *Node) soleVoter() bool {
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return false
	}
	self, voters := false, 0
	for _, s := range f.Configuration().Servers {
		if s.Suffrage == raft.Voter {
			voters++
			self = self || s.ID == raft.ServerID(n.cfg.NodeID)
		}
	}
	return self && voters == 1
}

// leaseHeld reports whether this node leads term and holds the read lease
// (lease.go) now.
func (n *Node) leaseHeld(term uint64) bool {
	if n.lease == nil || n.lease.dur <= 0 || n.raft.State() != raft.Leader {
		return false
	}
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return false
	}
	var voters []raft.ServerID
	for _, s := range f.Configuration().Servers {
		if s.Suffrage == raft.Voter {
			voters = append(voters, s.ID)
		}
	}
	return n.lease.holds(raft.ServerID(n.cfg.NodeID), term, voters, time.Now())
}

// lastFSMEntry returns the highest index <= idx of an entry raft hands to
// the FSM (a command or a configuration change), or idx when it cannot
// tell (the entries were compacted into a snapshot).
func (n *Node) lastFSMEntry(idx uint64) uint64 {
	var l raft.Log
	for i, steps := idx, 0; i > 0 && steps < 64; i, steps = i-1, steps+1 {
		if err := n.logs.GetLog(i, &l); err != nil {
			return idx
		}
		if l.Type == raft.LogCommand || l.Type == raft.LogConfiguration {
			return i
		}
	}
	return idx
}
