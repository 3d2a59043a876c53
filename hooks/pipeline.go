package hooks

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"unsafe"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/replication"
)

// Pipelined durable publishes.
//
// A QoS 1/2 PUBLISH is acknowledged only once what it writes to the log
// (Sessions.publishCommand) is committed. mochi reads a connection's next
// packet only after OnPublish returns, so waiting inside OnPublish allows
// one durable publish per commit and connection (about 140 a second).
// Instead, the Pipeline hook, first in the chain, takes every QoS 1/2
// PUBLISH of a client off mochi's read loop (ErrRejectPacket: no
// acknowledgement, no delivery) and queues it on the connection's pipe. A
// worker takes whatever is queued, passes one sessions barrier for all of
// it (every message in the batch arrived before the barrier began), writes
// the messages' commands as one Batch entry, and then hands each message
// back to mochi in arrival order (InjectPacket on the publisher's own
// client). On that second pass the hooks let it through with the verdict
// of the commit: mochi acknowledges it (or refuses it, as Sessions.refuse
// says) and delivers it. So acknowledgements leave in arrival order and
// only after their commit, the log holds one publisher's messages in
// arrival order, and the read loop keeps reading while commits are in
// flight; group commit still merges the batches of many connections into
// one entry.
//
// Messages that cannot go into a shared Batch entry (retained ones, which
// Retained.OnPublish writes, and large payloads, written as blobs) are
// handed back without a verdict: the hooks then write them as before, on
// the worker's goroutine, one at a time and in order with the others.
//
// The pipe holds at most the server's Receive Maximum of queued messages;
// beyond that OnPublish blocks, which stops the read loop and pushes back
// through TCP (MQTT 5 clients stop by themselves at Receive Maximum
// unacknowledged messages; MQTT 3.1.1 clients have no such limit).
type Pipeline struct {
	mqtt.HookBase
	s *Sessions

	mu    sync.Mutex
	pipes map[*mqtt.Client]*pubPipe
}

// pubPipe is one connection's queue of durable publishes.
type pubPipe struct {
	mu      sync.Mutex
	space   sync.Cond // signalled when the worker takes the queue
	queue   []packets.Packet
	running bool // a worker owns the queue
	closed  bool // the connection ended: nothing waits for space

	// cur is the message being handed back (set and cleared by the
	// worker, around InjectPacket on its own goroutine).
	cur atomic.Pointer[pubVerdict]
}

// pubVerdict is the outcome of one message's commit, for the hooks'
// second pass (Sessions.OnPublish).
type pubVerdict struct {
	id   uint16
	data *byte // the payload's backing array: identifies this very packet
	// hooks: not written by the pipeline (retained, large): the hooks
	// write it themselves, as without a pipeline.
	hooks bool
	qos2  bool // the command was a QoS2Publish (res.Changed false: duplicate)
	res   replication.Result
	err   error // not committed: refuse it
}

func (v *pubVerdict) is(pk packets.Packet) bool {
	return v.id == pk.PacketID && v.data == unsafe.SliceData(pk.Payload)
}

// NewPipeline returns the hook for s; register it before every hook with
// an OnPublish.
func NewPipeline(s *Sessions) *Pipeline {
	p := &Pipeline{s: s, pipes: make(map[*mqtt.Client]*pubPipe)}
	s.pipeline = p
	return p
}

// ID implements mqtt.Hook.
func (h *Pipeline) ID() string { return "publish-pipeline" }

// Provides implements mqtt.Hook.
func (h *Pipeline) Provides(b byte) bool {
	return b == mqtt.OnPublish || b == mqtt.OnDisconnect
}

// OnPublish queues a client's QoS 1/2 PUBLISH on its pipe, or lets the
// pipe's own hand-back through.
func (h *Pipeline) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Qos == 0 || pk.Ignore || cl.Net.Inline || h.s.repl == nil || ackBeforeCommit {
		return pk, nil
	}
	p := h.pipe(cl, true)
	if v := p.cur.Load(); v != nil && v.is(pk) {
		return pk, nil // the hand-back
	}
	// The topic alias was resolved into TopicName; on the hand-back mochi
	// would set the alias again and could undo a newer mapping.
	pk.Properties.TopicAliasFlag, pk.Properties.TopicAlias = false, 0
	if len(pk.Payload) == 0 {
		pk.Payload = make([]byte, 0, 1) // a backing array of its own (pubVerdict.is)
	}
	limit := int(h.s.server.Options.Capabilities.ReceiveMaximum)
	p.mu.Lock()
	for len(p.queue) >= max(limit, 1) && !p.closed {
		p.space.Wait()
	}
	p.queue = append(p.queue, pk)
	start := !p.running
	p.running = true
	p.mu.Unlock()
	h.s.m.pipelined.Inc()
	if start {
		go h.run(cl, p)
	}
	return pk, packets.ErrRejectPacket
}

// OnDisconnect forgets the connection's pipe, or leaves that to its
// worker, which finishes what was queued (nobody gets those
// acknowledgements any more; the commits stand, as for a publisher that
// drops before its PUBACK).
func (h *Pipeline) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	p := h.pipes[cl]
	if p == nil {
		return
	}
	p.mu.Lock()
	p.closed = true
	p.space.Broadcast()
	if !p.running {
		delete(h.pipes, cl)
	}
	p.mu.Unlock()
}

func (h *Pipeline) pipe(cl *mqtt.Client, create bool) *pubPipe {
	h.mu.Lock()
	defer h.mu.Unlock()
	p := h.pipes[cl]
	if p == nil && create {
		p = &pubPipe{}
		p.space.L = &p.mu
		h.pipes[cl] = p
	}
	return p
}

// verdict is the commit outcome of pk if the pipeline is handing it back.
func (h *Pipeline) verdict(cl *mqtt.Client, pk packets.Packet) *pubVerdict {
	if p := h.pipe(cl, false); p != nil {
		if v := p.cur.Load(); v != nil && v.is(pk) {
			return v
		}
	}
	return nil
}

// run is a pipe's worker: it exits when the queue is empty, and forgets
// the pipe if the connection ended meanwhile.
func (h *Pipeline) run(cl *mqtt.Client, p *pubPipe) {
	for {
		h.mu.Lock()
		p.mu.Lock()
		batch := p.queue
		p.queue = nil
		if len(batch) == 0 {
			p.running = false
			if p.closed {
				delete(h.pipes, cl)
			}
			p.mu.Unlock()
			h.mu.Unlock()
			return
		}
		p.space.Broadcast()
		p.mu.Unlock()
		h.mu.Unlock()
		h.process(cl, p, batch)
	}
}

// process commits and hands back one batch, in order.
func (h *Pipeline) process(cl *mqtt.Client, p *pubPipe, batch []packets.Packet) {
	ctx, cancel := context.WithTimeout(h.s.base, h.s.cfg.Timeout)
	defer cancel()
	verdicts := make([]*pubVerdict, len(batch))
	for i, pk := range batch {
		verdicts[i] = &pubVerdict{id: pk.PacketID, data: unsafe.SliceData(pk.Payload),
			hooks: pk.FixedHeader.Retain || len(pk.Payload) > replication.BlobThreshold}
	}
	// One barrier for the batch: every message in it arrived before.
	barrier := h.s.repl.SessionsBarrier(ctx)
	h.s.m.pipelineBatches.Inc()
	// Runs of pipelined messages between those the hooks write: each run
	// is one Batch, committed before the next message is handed back, so
	// the log keeps arrival order.
	for i := 0; i < len(batch); {
		if verdicts[i].hooks {
			h.handBack(cl, p, batch[i:i+1], verdicts[i:i+1])
			i++
			continue
		}
		j := i
		for j < len(batch) && !verdicts[j].hooks {
			j++
		}
		if barrier != nil {
			for _, v := range verdicts[i:j] {
				v.err = barrier
			}
		} else {
			h.commit(ctx, cl, batch[i:j], verdicts[i:j])
		}
		h.handBack(cl, p, batch[i:j], verdicts[i:j])
		i = j
	}
}

// commit writes the commands of a run of messages as one entry and puts
// each message's result in its verdict.
func (h *Pipeline) commit(ctx context.Context, cl *mqtt.Client, run []packets.Packet, verdicts []*pubVerdict) {
	var cmds []replication.Command
	var at []int // the verdict of each command
	for i, pk := range run {
		cmd, qos2 := h.s.publishCommand(cl, pk)
		if cmd == nil {
			continue
		}
		verdicts[i].qos2 = qos2
		cmds = append(cmds, cmd)
		at = append(at, i)
	}
	switch len(cmds) {
	case 0:
		return
	case 1:
		res, err := h.s.repl.Apply(ctx, cmds[0])
		verdicts[at[0]].res, verdicts[at[0]].err = res, err
		return
	}
	res, err := h.s.repl.Apply(ctx, &replication.Batch{Commands: cmds})
	if err == nil && len(res.Results) != len(cmds) {
		err = errors.New("batch result count mismatch")
	}
	for k, i := range at {
		if err != nil {
			verdicts[i].err = err
			continue
		}
		verdicts[i].res = res.Results[k]
	}
}

// handBack gives messages back to mochi in order, each with its verdict.
func (h *Pipeline) handBack(cl *mqtt.Client, p *pubPipe, run []packets.Packet, verdicts []*pubVerdict) {
	info := h.s.server.Info
	for i, pk := range run {
		p.cur.Store(verdicts[i])
		_ = h.s.server.InjectPacket(cl, pk)
		p.cur.Store(nil)
		// InjectPacket counts the message as received again.
		atomic.AddInt64(&info.PacketsReceived, -1)
		atomic.AddInt64(&info.MessagesReceived, -1)
	}
}
