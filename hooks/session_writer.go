package hooks

import (
	"context"
	"errors"
	"time"

	"github.com/mqtt-ha/broker/replication"
)

// Asynchronous writes: acks, QoS 2 steps and closes, batched into entries.

// writeRetryFor bounds how long a batch of asynchronous writes is retried.
const writeRetryFor = 10 * time.Second

func (h *Sessions) submit(op sessOp) {
	h.pending.Add(1)
	select {
	case h.ops <- op:
	default:
		h.pending.Add(-1)
		h.m.opsDropped.Inc()
		h.log.Warn("session write queue full; write dropped")
	}
}

// writer proposes queued writes, everything waiting in one entry (acks of
// many clients and sessions become one commit).
func (h *Sessions) writer() {
	for {
		var batch []sessOp
		select {
		case <-h.stop:
			return
		case op := <-h.ops:
			batch = append(batch, op)
		}
	drain:
		for len(batch) < 4096 {
			select {
			case op := <-h.ops:
				batch = append(batch, op)
			default:
				break drain
			}
		}
		h.write(batch)
		h.pending.Add(-int64(len(batch)))
	}
}

func (h *Sessions) write(batch []sessOp) {
	var cmds []replication.Command
	var owners []int // index in batch of each command
	for i, op := range batch {
		c := op.cmd()
		if b, ok := c.(*replication.Batch); ok {
			// Batches do not nest: flatten; the op's done gets the
			// result of its first command.
			for _, sub := range b.Commands {
				cmds = append(cmds, sub)
				owners = append(owners, i)
			}
		} else if c != nil {
			cmds = append(cmds, c)
			owners = append(owners, i)
		}
	}
	if len(cmds) == 0 {
		return
	}
	var cmd replication.Command = &replication.Batch{Commands: cmds}
	if len(cmds) == 1 {
		cmd = cmds[0]
	}
	var res replication.Result
	var err error
	// Every write here is idempotent or conditional, so a retry after an
	// unknown outcome is safe; give up after writeRetryFor (a minority
	// side) and let redelivery and the maintenance loop repair. The bound
	// is on time, not attempts: attempts that each ran into the write
	// timeout kept a PUBREC's connection waiting over 20 s (CI, loaded).
	deadline := time.Now().Add(writeRetryFor)
	for attempt := 0; attempt < 20 && time.Now().Before(deadline); attempt++ {
		until := time.Now().Add(h.cfg.Timeout)
		if until.After(deadline) {
			until = deadline
		}
		ctx, cancel := context.WithDeadline(context.Background(), until)
		res, err = h.repl.Apply(ctx, cmd)
		cancel()
		if err == nil || errors.Is(err, replication.ErrInvalidCommand) {
			break
		}
		select {
		case <-h.stop:
			return
		case <-time.After(500 * time.Millisecond):
		}
	}
	if err != nil {
		h.log.Warn("session writes not replicated", "count", len(cmds), "error", err)
		h.m.writesFailed.Inc()
		h.writesFailed.Add(1)
	}
	for j, i := range owners {
		if batch[i].done == nil || (j > 0 && owners[j-1] == i) {
			continue
		}
		r := res
		if len(cmds) > 1 && j < len(res.Results) {
			r = res.Results[j]
			r.Index = res.Index
		}
		batch[i].done(r, err)
	}
}

// WritesFailed is the number of asynchronous write batches given up
// (broker_sessions_writes_failed_total).
func (h *Sessions) WritesFailed() uint64 { return h.writesFailed.Load() }

// Flush waits until the asynchronous writes queued so far are proposed
// (graceful shutdown), or ctx ends.
func (h *Sessions) Flush(ctx context.Context) {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for h.pending.Load() > 0 {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
