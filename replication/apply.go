package replication

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// Apply commits cmd through raft and returns its result once the entry is
// committed and applied on the leader. On a follower the command is
// forwarded to the leader; while no leader is known Apply waits for one
// (through an election) until ctx ends, unless the node has been without a
// leader for longer than a normal election takes, in which case it fails
// at once with ErrNoLeader: writes fail fast on a minority side.
//
// Errors: ErrNoLeader / ErrNotLeader (not committed), ErrTimeout (ctx ended;
// also ErrUnknownOutcome if it had been proposed), ErrUnknownOutcome,
// ErrTooLarge, ErrInvalidCommand (also for a domain error reported by the
// state machine, with the Result), ErrClosed. All are wrapped with %w.
//
// A Batch is applied atomically in one entry and its Result carries one
// Result per command in Results (Apply's error is then nil even when some
// of them carry an Err).
func (n *Node) Apply(ctx context.Context, cmd Command) (Result, error) {
	start := time.Now()
	res, path, err := n.apply(ctx, cmd)
	n.m.applyLatency.WithLabelValues(path).Observe(time.Since(start).Seconds())
	if err != nil {
		n.m.applyErrors.WithLabelValues(errReason(err)).Inc()
	}
	return res, err
}

// fastFailAfter is how long a node may be without a leader before Apply
// stops waiting for one: longer than an election normally takes.
func (n *Node) fastFailAfter() time.Duration {
	return 2*n.cfg.HeartbeatTimeout + 2*n.cfg.ElectionTimeout
}

func (n *Node) apply(ctx context.Context, cmd Command) (Result, string, error) {
	path := "leader"
	req, err := n.newReq(cmd)
	if err != nil || req == nil {
		return Result{}, path, err
	}
	var entry []byte // the forwarded encoding, built on first use
	var lastErr error
	for attempt := 0; ; attempt++ {
		if !n.running() {
			return Result{}, path, ErrClosed
		}
		if err := ctx.Err(); err != nil {
			return Result{}, path, timeoutErr(ctx, lastErr)
		}
		if attempt > 0 {
			// Wait for a leader change, briefly, or the deadline.
			t := time.NewTimer(min(time.Duration(attempt)*10*time.Millisecond, 100*time.Millisecond))
			select {
			case <-n.leaderChanged():
			case <-t.C:
			case <-ctx.Done():
			case <-n.stop:
			}
			t.Stop()
			if ctx.Err() != nil {
				return Result{}, path, timeoutErr(ctx, lastErr)
			}
		}
		if n.raft.State() == raft.Leader {
			path = "leader"
			req.done = make(chan applyReply, 1)
			res, err := n.batch.submit(ctx, req)
			if errors.Is(err, errRetry) {
				lastErr = err
				continue
			}
			return res, path, err
		}
		addr, id := n.raft.LeaderWithID()
		if addr == "" || id == raft.ServerID(n.cfg.NodeID) {
			lastErr = ErrNoLeader
			if since := n.noLeaderSince.Load(); since != 0 && time.Since(time.Unix(0, since)) > n.fastFailAfter() {
				return Result{}, path, fmt.Errorf("%w (for %v)", ErrNoLeader, time.Since(time.Unix(0, since)).Round(time.Millisecond))
			}
			continue
		}
		path = "forwarded"
		if entry == nil {
			entry = req.entry()
		}
		res, err := n.forwardApply(ctx, string(addr), entry, req.batch)
		switch {
		case err == nil:
			return res, path, nil
		case retrySafe(err):
			lastErr = err // not delivered, or delivered but not proposed
			continue
		case ctx.Err() != nil:
			return Result{}, path, fmt.Errorf("%w: %w: forwarded to %s: %w", ErrTimeout, ErrUnknownOutcome, addr, err)
		case errors.Is(err, ErrInvalidCommand), errors.Is(err, ErrTooLarge), errors.Is(err, ErrReopened):
			return res, path, err // committed with a domain error (a fence), or refused before proposing
		case errors.Is(err, ErrTimeout), errors.Is(err, ErrUnknownOutcome):
			return Result{}, path, fmt.Errorf("forwarded to %s: %w", addr, err)
		default:
			return Result{}, path, fmt.Errorf("%w: forwarded to %s: %w", ErrUnknownOutcome, addr, err)
		}
	}
}

// retrySafe reports whether a forwarded call certainly did not propose
// anything: it was not delivered, or the remote was not (or no longer) the
// leader, or it was shutting down before proposing (ErrClosed without
// ErrUnknownOutcome).
func retrySafe(err error) bool {
	return errors.Is(err, errNotSent) || errors.Is(err, ErrNotLeader) || errors.Is(err, ErrNoLeader) ||
		(errors.Is(err, ErrClosed) && !errors.Is(err, ErrUnknownOutcome))
}

// timeoutErr is the error for an Apply whose ctx ended while it was not
// (yet) proposed.
func timeoutErr(ctx context.Context, last error) error {
	if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("replication: apply: %w", ctx.Err())
	}
	if last == nil {
		return fmt.Errorf("%w: %w", ErrTimeout, ctx.Err())
	}
	return fmt.Errorf("%w: %w", ErrTimeout, last)
}

// newReq validates and encodes cmd. A nil request with a nil error means
// there is nothing to do (an empty Batch).
func (n *Node) newReq(cmd Command) (*applyReq, error) {
	if cmd == nil {
		return nil, fmt.Errorf("%w: nil command", ErrInvalidCommand)
	}
	cmds, batch := []Command{cmd}, false
	if b, ok := cmd.(*Batch); ok {
		if err := b.validate(); err != nil {
			return nil, err
		}
		if len(b.Commands) == 0 {
			return nil, nil
		}
		cmds, batch = b.Commands, true
	}
	req := &applyReq{cmds: cmds, batch: batch, enc: make([][]byte, len(cmds))}
	for i, c := range cmds {
		if err := c.validate(); err != nil {
			return nil, err
		}
		req.enc[i] = EncodeCommand(c)
		if len(req.enc[i]) > n.cfg.MaxCommandBytes {
			return nil, fmt.Errorf("%w: %v of %d bytes, limit %d", ErrTooLarge, c.Type(), len(req.enc[i]), n.cfg.MaxCommandBytes)
		}
		req.size += len(req.enc[i])
		if _, ok := c.(*BlobChunk); ok {
			req.chunks++
		}
	}
	if req.chunks > 1 {
		// One chunk per entry keeps entries small (see batcher.go).
		return nil, fmt.Errorf("%w: batch of %d blob chunks, at most one per entry", ErrInvalidCommand, req.chunks)
	}
	if req.size > n.cfg.MaxBatchBytes {
		return nil, fmt.Errorf("%w: batch of %d bytes, limit %d", ErrTooLarge, req.size, n.cfg.MaxBatchBytes)
	}
	return req, nil
}

// applyOnLeader is the leader side of a forwarded Apply: one attempt, no
// forwarding onwards (no loops between nodes that disagree on the leader).
func (n *Node) applyOnLeader(ctx context.Context, cmds []Command, batch bool) (Result, error) {
	if !n.running() {
		return Result{}, ErrClosed
	}
	if n.raft.State() != raft.Leader {
		return Result{}, fmt.Errorf("%w: %s is %v", ErrNotLeader, n.cfg.NodeID, n.raft.State())
	}
	var req *applyReq
	var err error
	if batch {
		req, err = n.newReq(&Batch{Commands: cmds})
	} else if len(cmds) == 1 {
		req, err = n.newReq(cmds[0])
	} else {
		err = fmt.Errorf("%w: forwarded entry without commands", ErrInvalidCommand)
	}
	if err != nil || req == nil {
		return Result{}, err
	}
	req.done = make(chan applyReply, 1)
	res, err := n.batch.submit(ctx, req)
	if errors.Is(err, errRetry) {
		// Strip errRetry (local only): ErrNotLeader tells the follower.
		return Result{}, fmt.Errorf("%w: lost leadership before proposing", ErrNotLeader)
	}
	return res, err
}

// forwardApply sends an encoded entry to the leader at addr.
func (n *Node) forwardApply(ctx context.Context, addr string, entry []byte, batch bool) (Result, error) {
	body := appendUvarint(nil, timeoutMs(ctx))
	body = appendBytes(body, entry)
	resp, err := n.rpcc.call(ctx, addr, rpcApply, body)
	if err != nil {
		return Result{}, err
	}
	r := reader{b: resp}
	if err := r.error(); err != nil {
		return Result{}, err
	}
	res := r.result(0)
	if err := r.end(); err != nil {
		return Result{}, fmt.Errorf("%w: reply from %s: %w", ErrUnknownOutcome, addr, err)
	}
	if !batch {
		return res, res.Err
	}
	return res, nil
}

// RemoveServer removes server id from the raft configuration (graceful
// leave, or the admin's remove-node). It runs on the leader, forwarded if
// needed. The leader will not re-add id while it stays visible in Peers;
// once it disappears from membership and comes back, it is added again.
// Removing the leader itself first transfers leadership.
func (n *Node) RemoveServer(ctx context.Context, id string) error {
	if id == "" {
		return fmt.Errorf("%w: empty server id", ErrInvalidCommand)
	}
	var lastErr error
	for attempt := 0; ; attempt++ {
		if !n.running() {
			return ErrClosed
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
		if ctx.Err() != nil {
			return timeoutErr(ctx, lastErr)
		}
		if n.raft.State() == raft.Leader {
			err := n.removeOnLeader(ctx, id)
			if errors.Is(err, ErrNotLeader) {
				lastErr = err
				continue
			}
			return err
		}
		addr, _ := n.raft.LeaderWithID()
		if addr == "" {
			lastErr = ErrNoLeader
			continue
		}
		body := appendUvarint(nil, timeoutMs(ctx))
		body = appendString(body, id)
		resp, err := n.rpcc.call(ctx, string(addr), rpcRemove, body)
		if err == nil {
			r := reader{b: resp}
			err = r.error()
		}
		if err != nil && retrySafe(err) {
			lastErr = err
			continue
		}
		if err != nil {
			return fmt.Errorf("replication: remove %s via %s: %w", id, addr, err)
		}
		return nil
	}
}

// removeOnLeader removes id and remembers it as removed (tombstone).
func (n *Node) removeOnLeader(ctx context.Context, id string) error {
	if !n.running() {
		return ErrClosed
	}
	if n.raft.State() != raft.Leader {
		return fmt.Errorf("%w: %s", ErrNotLeader, n.cfg.NodeID)
	}
	n.memberMu.Lock()
	n.tombstones[id] = struct{}{}
	n.memberMu.Unlock()
	if id == n.cfg.NodeID {
		// A leader that removes itself would shut its raft down mid-flight;
		// hand over first and let the new leader do it.
		if err := waitFuture(ctx, n.transferLeadership()); err != nil {
			return fmt.Errorf("replication: transfer leadership before removing self: %w", err)
		}
		return fmt.Errorf("%w: transferred leadership to remove self", ErrNotLeader)
	}
	cfg, err := n.configuration(ctx)
	if err != nil {
		return err
	}
	if _, ok := findServer(cfg, id); !ok {
		return nil
	}
	timeout := time.Until(deadlineOr(ctx, time.Now().Add(n.cfg.IOTimeout)))
	if err := waitFuture(ctx, n.raft.RemoveServer(raft.ServerID(id), 0, timeout)); err != nil {
		return fmt.Errorf("replication: remove server %s: %w", id, mapRaftError(err))
	}
	n.m.membership.WithLabelValues("remove").Inc()
	n.log.Info("removed server from the configuration", "server", id)
	return nil
}

// Leave removes this node from the configuration, handing leadership over
// first if it is the leader. It refuses (ErrLastVoter) when this node is
// the only voter. Call Close afterwards. A node that left and restarts with
// its data dir is re-added by the leader once it is visible again.
func (n *Node) Leave(ctx context.Context) error {
	if !n.running() {
		return ErrClosed
	}
	cfg, err := n.configuration(ctx)
	if err != nil {
		return err
	}
	if _, ok := findServer(cfg, n.cfg.NodeID); !ok {
		return nil
	}
	if len(n.otherVoters()) == 0 {
		return fmt.Errorf("%w: %s is the only voter; leaving would destroy the cluster", ErrLastVoter, n.cfg.NodeID)
	}
	if n.raft.State() == raft.Leader {
		if err := waitFuture(ctx, n.transferLeadership()); err != nil {
			return fmt.Errorf("replication: leave: transfer leadership: %w", err)
		}
	}
	if err := n.RemoveServer(ctx, n.cfg.NodeID); err != nil {
		return fmt.Errorf("replication: leave: %w", err)
	}
	n.left.Store(true)
	n.log.Info("left the raft configuration")
	return nil
}

func deadlineOr(ctx context.Context, d time.Time) time.Time {
	if dl, ok := ctx.Deadline(); ok && dl.Before(d) {
		return dl
	}
	return d
}

// configuration returns the latest configuration known locally.
func (n *Node) configuration(ctx context.Context) (raft.Configuration, error) {
	f := n.raft.GetConfiguration()
	if err := waitFuture(ctx, f); err != nil {
		return raft.Configuration{}, fmt.Errorf("replication: get configuration: %w", err)
	}
	return f.Configuration(), nil
}

func findServer(cfg raft.Configuration, id string) (raft.Server, bool) {
	for _, s := range cfg.Servers {
		if string(s.ID) == id {
			return s, true
		}
	}
	return raft.Server{}, false
}

// otherVoters lists the voters other than this node.
func (n *Node) otherVoters() []raft.Server {
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return nil
	}
	var out []raft.Server
	for _, s := range f.Configuration().Servers {
		if s.Suffrage == raft.Voter && string(s.ID) != n.cfg.NodeID {
			out = append(out, s)
		}
	}
	return out
}

// WaitApplied waits until this node and every peer that membership sees
// alive have applied the log up to index, or ctx ends (then it returns
// ctx's error; a dead or partitioned peer does not hold the caller longer
// than that). A write acknowledged only after WaitApplied is visible to
// reads on every live node: hooks.Sessions waits so before SUBACK, so a
// publish on any node after SUBACK matches the new subscription.
func (n *Node) WaitApplied(ctx context.Context, index uint64) error {
	var wg sync.WaitGroup
	errs := make(chan error, 1)
	wait := func(applied func() (uint64, error)) {
		defer wg.Done()
		for {
			a, err := applied()
			if err == nil && a >= index {
				return
			}
			select {
			case <-ctx.Done():
				select {
				case errs <- ctx.Err():
				default:
				}
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}
	wg.Add(1)
	go wait(func() (uint64, error) { return n.fsm.synced.Load(), nil })
	for _, p := range n.peers() {
		if p.ID == n.cfg.NodeID {
			continue
		}
		addr := p.Addr
		wg.Add(1)
		go wait(func() (uint64, error) {
			st, err := n.fetchPeerStatus(ctx, addr)
			return st.AppliedIndex, err
		})
	}
	wg.Wait()
	select {
	case err := <-errs:
		return err
	default:
		return nil
	}
}

// WaitAppliedLocal waits until this node has applied the log up to index
// (a write forwarded to the leader returns once the leader applied it;
// this node's state machine may still lag), or ctx ends.
func (n *Node) WaitAppliedLocal(ctx context.Context, index uint64) error {
	return n.WaitSynced(ctx, index)
}

// TransferLeadership hands leadership to the most up-to-date other voter
// and returns the new leader's id. Only the leader can: elsewhere the
// error names it.
func (n *Node) TransferLeadership(ctx context.Context) (string, error) {
	if !n.running() {
		return "", ErrClosed
	}
	if n.raft.State() != raft.Leader {
		_, id := n.raft.LeaderWithID()
		return "", fmt.Errorf("%w: %s is not the leader; ask %s", ErrNotLeader, n.cfg.NodeID, cmp.Or(string(id), "(none known)"))
	}
	if len(n.otherVoters()) == 0 {
		return "", fmt.Errorf("%w: no other voter to hand leadership to", ErrLastVoter)
	}
	if err := waitFuture(ctx, n.transferLeadership()); err != nil {
		return "", fmt.Errorf("replication: leadership transfer: %w", err)
	}
	for {
		if _, id := n.raft.LeaderWithID(); id != "" && string(id) != n.cfg.NodeID {
			return string(id), nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("replication: leadership transferred, new leader not known yet: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
