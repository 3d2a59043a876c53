package hooks

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"github.com/mqtt-ha/broker/replication"
)

// Ordered retained writes: a client's retained writes commit in the order
// it sent them, as on one Mosquitto, where the last one sent is the one
// retained.
//
// QoS 0 retained writes are not waited for (mochi's read loop goes on),
// QoS 1/2 ones are (PUBACK after the commit), and a clean session's
// retained will that mochi publishes (replicateWill) is not either. Each
// of those used to run on a goroutine of its own, so a burst of QoS 0
// writes committed in any order: a client that set one topic 300 times
// left the 238th value retained (TestRetainedQoS0BurstKeepsLastValue),
// and a client's "online" could commit after its own will's "offline"
// (TestWillAfterClientsLastRetainedWrites). A will comes after the
// client's last publishes, which the publish pipeline may still hold when
// the connection drops: mochi's own waits for the pipe
// (Pipeline.AfterPublishes), and the close that makes a will in the log
// due waits for the pipe and then the lane (AfterWrites,
// Sessions.afterClientWrites).
//
// Now every retained write goes through its client id's lane: one
// goroutine at a time writes what is queued there, in order, in as few
// entries as it can (a Batch of the small ones, at most laneBatch; a
// large payload, a blob, on its own), so a burst costs about one commit
// per round trip, not one per message. A queued write that nobody waits
// for is dropped when a newer write of its topic joins the lane before it
// was written: only the newer value could ever be read. A lane holds at
// most laneMax writes and laneMaxBytes of payloads (always at least one
// write); beyond that OnPublish waits, which stops the client's read loop
// and pushes back through TCP, as the pipeline does. Without the byte
// bound a client could queue laneMax retained writes of the maximum
// packet size (256 MiB by default), none of them waited for.
//
// When the node stops, a publish waiting for room gives up (the write
// fails), so that the stop is not held up by a lane that cannot drain.
//
// A connection that takes another over on this node publishes nothing
// until the old one's publishes went through its pipe and lane, and a
// will the takeover publishes waits for them too (pipeline_takeover.go).
//
// Not covered: a batch whose outcome was unknown (a timeout) may still
// commit after the next one, if its forward reaches the leader late.

const (
	laneMax   = 1024
	laneBatch = 256
	// laneMaxBytes bounds the payloads a lane holds queued (those being
	// written not counted).
	laneMaxBytes = 64 << 20
	// laneBatchBytes bounds a batch's payloads (an entry carries at most
	// replication.Config.MaxBatchBytes).
	laneBatchBytes = 1 << 20
)

// retainWrite is one retained write of a client.
type retainWrite struct {
	topic   string
	cmd     replication.Command
	payload []byte
	// done receives the write's outcome (buffered); nil: nobody waits.
	done chan error
	// failed, if set, is called with a failure nobody waits for.
	failed func(error)
	// then, with no cmd, is a marker (AfterWrites): called once the
	// writes queued before it are written.
	then func()
}

// retainLane is a client id's queue of retained writes.
type retainLane struct {
	queue   []*retainWrite
	bytes   int  // the queued writes' payloads
	running bool // a goroutine is writing (runLane)
}

// full reports whether the lane has no room for a write of size bytes.
func (l *retainLane) full(size int) bool {
	return len(l.queue) >= laneMax || len(l.queue) > 0 && l.bytes+size > laneMaxBytes
}

// enqueue adds w to the lane of client id, in order, and starts the lane's
// writer if it is idle. It waits while the lane is full, unless the
// node's base context ended (the node is stopping): then it gives up and
// returns false.
func (h *Retained) enqueue(id string, w *retainWrite) bool {
	h.laneMu.Lock()
	defer h.laneMu.Unlock()
	l := h.lanes[id]
	if l == nil {
		l = &retainLane{}
		h.lanes[id] = l
	}
	if i := slices.IndexFunc(l.queue, func(q *retainWrite) bool { return q.cmd != nil && q.topic == w.topic && q.done == nil }); w.cmd != nil && i >= 0 {
		l.bytes -= len(l.queue[i].payload)
		l.queue = slices.Delete(l.queue, i, i+1)
		h.metrics.retainedReplaced()
	}
	if l.full(len(w.payload)) {
		h.metrics.laneWait(1)
		defer h.metrics.laneWait(-1)
	}
	for l.full(len(w.payload)) {
		if h.base.Err() != nil {
			return false
		}
		h.laneSpace.Wait()
		// The lane may have gone idle and been removed meanwhile.
		if cur := h.lanes[id]; cur != l {
			if cur == nil {
				cur = &retainLane{}
				h.lanes[id] = cur
			}
			l = cur
		}
	}
	l.queue = append(l.queue, w)
	l.bytes += len(w.payload)
	if !l.running {
		l.running = true
		go h.runLane(id, l)
	}
	return true
}

// runLane writes the lane's queue until it is empty, then removes the
// lane.
func (h *Retained) runLane(id string, l *retainLane) {
	for {
		h.laneMu.Lock()
		batch := l.queue
		if len(batch) == 0 {
			l.running = false
			delete(h.lanes, id)
			h.laneMu.Unlock()
			return
		}
		l.queue, l.bytes = nil, 0
		h.laneSpace.Broadcast()
		h.laneMu.Unlock()
		h.writeInOrder(batch)
	}
}

// writeInOrder writes batch in order: runs of small writes as one entry
// each, large ones (blobs) alone.
func (h *Retained) writeInOrder(batch []*retainWrite) {
	for i := 0; i < len(batch); {
		if batch[i].cmd == nil {
			batch[i].then()
			i++
			continue
		}
		if len(batch[i].payload) > replication.BlobThreshold {
			h.writeOne(batch[i])
			i++
			continue
		}
		j, size := i, 0
		for j < len(batch) && j-i < laneBatch && batch[j].cmd != nil && len(batch[j].payload) <= replication.BlobThreshold &&
			(j == i || size+len(batch[j].payload) <= laneBatchBytes) {
			size += len(batch[j].payload)
			j++
		}
		if j-i == 1 {
			h.writeOne(batch[i])
		} else {
			h.writeRun(batch[i:j])
		}
		i = j
	}
}

func (h *Retained) writeOne(w *retainWrite) {
	ctx, cancel := context.WithTimeout(context.Background(), durableTimeout(h.timeout, len(w.payload)))
	defer cancel()
	_, err := h.write(ctx, w.cmd, w.payload)
	h.settle(w, err)
}

// writeRun writes small writes as one Batch entry.
func (h *Retained) writeRun(run []*retainWrite) {
	cmds := make([]replication.Command, len(run))
	for i, w := range run {
		cmds[i] = w.cmd
	}
	ctx, cancel := context.WithTimeout(context.Background(), h.timeout)
	defer cancel()
	res, err := h.repl.Apply(ctx, &replication.Batch{Commands: cmds})
	if errors.Is(err, replication.ErrTooLarge) || errors.Is(err, replication.ErrInvalidCommand) {
		// Refused whole for one of its commands, before anything was
		// proposed: each alone, so that only that one fails.
		for _, w := range run {
			h.writeOne(w)
		}
		return
	}
	if err == nil && len(res.Results) != len(cmds) {
		err = fmt.Errorf("retained batch: %d results for %d commands", len(res.Results), len(cmds))
	}
	for i, w := range run {
		e := err
		if e == nil {
			e = res.Results[i].Err
		}
		h.settle(w, e)
	}
}

func (h *Retained) settle(w *retainWrite, err error) {
	if w.done != nil {
		w.done <- err
		return
	}
	if err != nil && w.failed != nil {
		w.failed(err)
	}
}

// writeOrdered writes w in its client's lane and, for a write somebody
// waits for, returns its outcome (ctx ending first: ctx's error; the
// write may still commit). A write that could not join its lane fails
// (w.failed is called for one nobody waits for).
func (h *Retained) writeOrdered(ctx context.Context, id string, w *retainWrite) error {
	if !h.enqueue(id, w) {
		err := fmt.Errorf("%w: retained write: the node is stopping and the client's lane is full", replication.ErrClosed)
		if w.failed != nil {
			w.failed(err)
		}
		return err
	}
	if w.done == nil {
		return nil
	}
	select {
	case err := <-w.done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("%w: retained write: %w", replication.ErrTimeout, ctx.Err())
	}
}

// laneTimeout is how long a waited-for write may take in its lane: the
// writes queued before it come first.
func (h *Retained) laneTimeout(size int) time.Duration {
	return 2 * durableTimeout(h.timeout, size)
}

// AfterWrites runs fn once the retained writes client id has queued so
// far are written (at once if it has none; else on the lane's goroutine,
// so fn must not block). A will published through the log must not come
// before them (Sessions.afterClientWrites).
func (h *Retained) AfterWrites(id string, fn func()) {
	h.laneMu.Lock()
	l := h.lanes[id]
	if l == nil {
		h.laneMu.Unlock()
		fn()
		return
	}
	// Not bounded by laneMax: one per connection end.
	l.queue = append(l.queue, &retainWrite{then: fn})
	h.laneMu.Unlock()
}

// LaneLen returns how many client ids have retained writes queued or being
// written, and how many writes are queued (not yet being written).
func (h *Retained) LaneLen() (lanes, queued int) {
	lanes, queued, _ = h.LaneUse()
	return lanes, queued
}

// LaneWaiting returns how many publishes wait for room in a full lane.
func (h *Retained) LaneWaiting() int64 {
	if h.metrics == nil {
		return 0
	}
	return atomic.LoadInt64(&h.metrics.laneWaiting)
}

// LaneUse is LaneLen with the queued writes' payload bytes.
func (h *Retained) LaneUse() (lanes, queued, bytes int) {
	h.laneMu.Lock()
	defer h.laneMu.Unlock()
	for _, l := range h.lanes {
		queued += len(l.queue)
		bytes += l.bytes
	}
	return len(h.lanes), queued, bytes
}
