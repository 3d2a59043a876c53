package replication

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
)

// Group commit. Every write on the leader (local or forwarded) goes through
// one batcher goroutine that turns whatever is queued into ONE log entry (a
// Batch when there is more than one command). raft.Apply blocks while the
// leader loop is busy writing (and fsyncing) the previous entry, and that
// is exactly when the queue fills up, so batches grow with load by
// themselves: throughput is fsync rate x batch size, and an idle node
// proposes a lone command at once. While an entry is still in flight the
// batcher also lingers up to BatchLinger for stragglers.

// applyReq is one caller's commands; they stay contiguous in the entry.
type applyReq struct {
	ctx   context.Context // the caller's: a request it gave up on is not proposed
	cmds  []Command
	enc   [][]byte // EncodeCommand of each command
	size  int      // encoded bytes
	batch bool     // the caller sent a Batch: reply with Results
	// chunks counts blob chunks: an entry carries at most one, so that
	// no entry is much larger than a chunk (raft sends up to
	// MaxAppendEntries entries per message).
	chunks int
	done   chan applyReply
}

// entry is the request's own log-entry encoding (for forwarding): the lone
// command, or a Batch.
func (r *applyReq) entry() []byte {
	if !r.batch && len(r.enc) == 1 {
		return r.enc[0]
	}
	return appendBatch(nil, r.enc)
}

// appendBatch appends a Batch entry made of already encoded commands; it is
// byte-identical to EncodeCommand(&Batch{...}) of the same commands.
func appendBatch(b []byte, enc [][]byte) []byte {
	b = append(b, byte(CmdBatch))
	b = appendUvarint(b, uint64(len(enc)))
	for _, e := range enc {
		b = appendBytes(b, e)
	}
	return b
}

type applyReply struct {
	res Result
	err error
}

// errRetry marks a proposal that certainly did not enter the log because
// this node is not (or no longer) the leader: the caller may safely try
// the new leader.
var errRetry = errors.New("not proposed")

// proposer is the part of *raft.Raft the batcher uses (a fake in tests).
type proposer interface {
	State() raft.RaftState
	Apply(cmd []byte, timeout time.Duration) raft.ApplyFuture
}

type batcher struct {
	r        proposer
	m        *metrics
	maxCmds  int
	maxBytes int
	linger   time.Duration

	reqs     chan *applyReq
	stop     chan struct{}
	inflight atomic.Int64
	wg       sync.WaitGroup
}

func newBatcher(r proposer, cfg *Config, m *metrics) *batcher {
	return &batcher{
		r: r, m: m, maxCmds: cfg.MaxBatchCommands, maxBytes: cfg.MaxBatchBytes, linger: cfg.BatchLinger,
		reqs: make(chan *applyReq, cfg.MaxBatchCommands), stop: make(chan struct{}),
	}
}

func (b *batcher) start() {
	b.wg.Add(1)
	go b.loop()
}

// close stops the loop, fails queued requests and waits for in-flight
// proposals to resolve (raft's shutdown resolves them).
func (b *batcher) close() {
	close(b.stop)
	b.wg.Wait()
	for {
		select {
		case r := <-b.reqs:
			r.done <- applyReply{err: ErrClosed}
		default:
			return
		}
	}
}

// submit queues req and waits for its reply or ctx.
func (b *batcher) submit(ctx context.Context, req *applyReq) (Result, error) {
	req.ctx = ctx
	select {
	case b.reqs <- req:
	case <-b.stop:
		return Result{}, ErrClosed
	case <-ctx.Done():
		return Result{}, fmt.Errorf("%w: queued for proposal: %w", ErrTimeout, ctx.Err())
	}
	select {
	case rep := <-req.done:
		return rep.res, rep.err
	case <-ctx.Done():
		return Result{}, fmt.Errorf("%w: %w: waiting for commit: %w", ErrTimeout, ErrUnknownOutcome, ctx.Err())
	case <-b.stop:
		// close() answers everything it saw; this catches a request that
		// slipped into the queue after close drained it.
		select {
		case rep := <-req.done:
			return rep.res, rep.err
		default:
			return Result{}, fmt.Errorf("%w: %w", ErrClosed, ErrUnknownOutcome)
		}
	}
}

func (b *batcher) loop() {
	defer b.wg.Done()
	var carry *applyReq
	for {
		first := carry
		carry = nil
		if first == nil {
			select {
			case first = <-b.reqs:
			case <-b.stop:
				return
			}
		}
		batch := []*applyReq{first}
		cmds, size, chunks := len(first.cmds), first.size, first.chunks
		// fits adds r to the batch if it fits, else keeps it for the next.
		fits := func(r *applyReq) bool {
			if cmds+len(r.cmds) > b.maxCmds || size+r.size > b.maxBytes || chunks+r.chunks > 1 {
				carry = r
				return false
			}
			batch = append(batch, r)
			cmds, size, chunks = cmds+len(r.cmds), size+r.size, chunks+r.chunks
			return true
		}
		var timer *time.Timer
	collect:
		for cmds < b.maxCmds && size < b.maxBytes {
			select {
			case r := <-b.reqs:
				if !fits(r) {
					break collect
				}
				continue
			default:
			}
			// Nothing queued. Linger only while an earlier entry is in
			// flight: then waiting costs no latency that the caller would
			// not pay anyway, and the next entry carries more.
			if b.linger <= 0 || b.inflight.Load() == 0 {
				break
			}
			if timer == nil {
				timer = time.NewTimer(b.linger)
			}
			select {
			case r := <-b.reqs:
				if !fits(r) {
					break collect
				}
			case <-timer.C:
				break collect
			case <-b.stop:
				break collect
			}
		}
		if timer != nil {
			timer.Stop()
		}
		b.propose(batch, cmds)
	}
}

// wait returns f's error, or ErrClosed with an unknown outcome once the
// batcher stops and f has no answer. raft v1.8 never answers a future
// whose commit it handed to its FSM goroutine just before Shutdown
// (hashicorp/raft#498: runFSM returns without draining its queue), and
// close waits for this goroutine: waiting on f.Error() alone hung a
// leader's shutdown under load (CI, TestApplyAcrossLeaderCrash). The
// goroutine left blocked on such a future is the price; it holds one
// future until the process exits.
func (b *batcher) wait(f raft.Future) error {
	errc := make(chan error, 1)
	go func() { errc <- f.Error() }()
	select {
	case err := <-errc:
		return err
	case <-b.stop:
	}
	// close runs after raft's Shutdown returned: every answer raft will
	// give has been given, but the goroutine above may not have run yet.
	select {
	case err := <-errc:
		return err
	case <-time.After(100 * time.Millisecond):
		return fmt.Errorf("%w: %w", ErrClosed, ErrUnknownOutcome)
	}
}

// propose encodes the batch as one entry and hands it to raft; a goroutine
// per entry waits for the commit and completes every caller with its own
// slice of the results.
func (b *batcher) propose(batch []*applyReq, n int) {
	// Callers that gave up while queued have been told "timeout, outcome
	// unknown"; proposing their commands anyway would only add stale
	// writes (a storm of them after a quorum loss heals).
	live := batch[:0]
	for _, r := range batch {
		if r.ctx != nil && r.ctx.Err() != nil {
			n -= len(r.cmds)
			continue
		}
		live = append(live, r)
	}
	batch = live
	if n == 0 {
		return
	}
	var entry []byte
	if n == 1 {
		entry = batch[0].enc[0]
	} else {
		all := make([][]byte, 0, n)
		size := 0
		for _, r := range batch {
			all = append(all, r.enc...)
			size += r.size
		}
		entry = appendBatch(make([]byte, 0, size+8+3*n), all)
	}
	if b.r.State() != raft.Leader {
		fail(batch, fmt.Errorf("%w: %w", errRetry, ErrNotLeader))
		return
	}
	start := time.Now()
	f := b.r.Apply(entry, 0)
	b.inflight.Add(1)
	b.m.batchSize.Observe(float64(n))
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		defer b.inflight.Add(-1)
		err := b.wait(f)
		if err != nil {
			fail(batch, mapRaftError(err))
			return
		}
		b.m.commitLatency.Observe(time.Since(start).Seconds())
		res, ok := f.Response().(Result)
		if !ok {
			fail(batch, fmt.Errorf("replication: unexpected FSM response %T", f.Response()))
			return
		}
		results := []Result{res}
		if n > 1 {
			results = res.Results
		}
		off := 0
		for _, r := range batch {
			rep := applyReply{}
			if r.batch {
				rep.res = Result{Index: res.Index, Results: results[off : off+len(r.cmds) : off+len(r.cmds)]}
				for _, sr := range rep.res.Results {
					rep.res.Changed = rep.res.Changed || sr.Changed
				}
			} else {
				rep.res = results[off]
				rep.err = rep.res.Err
			}
			off += len(r.cmds)
			r.done <- rep
		}
	}()
}

func fail(batch []*applyReq, err error) {
	for _, r := range batch {
		r.done <- applyReply{err: err}
	}
}

// mapRaftError translates raft's errors into ours, keeping raft's as cause.
func mapRaftError(err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		// Rejected before it was appended: safe to retry elsewhere.
		return fmt.Errorf("%w: %w: %w", errRetry, ErrNotLeader, err)
	case errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, raft.ErrAbortedByRestore):
		return fmt.Errorf("%w: %w", ErrUnknownOutcome, err)
	case errors.Is(err, raft.ErrRaftShutdown):
		return fmt.Errorf("%w: %w: %w", ErrClosed, ErrUnknownOutcome, err)
	case errors.Is(err, raft.ErrEnqueueTimeout):
		return fmt.Errorf("%w: %w", ErrTimeout, err)
	}
	return fmt.Errorf("%w: %w", ErrUnknownOutcome, err)
}
