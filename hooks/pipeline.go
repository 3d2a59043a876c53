package hooks

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/internal/gopool"
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
// One exception: on a one-node broker whose log is applied, a message
// that finds its pipe idle and matches no persistent session goes through
// on the reader, as a QoS 0 one does (inline): it has nothing to commit.
//
// Messages that cannot go into a shared Batch entry (retained ones, which
// Retained.OnPublish writes, and large payloads, written as blobs) are
// handed back without a verdict: the hooks then write them as before, on
// the worker's goroutine, one at a time and in order with the others.
//
// While a pipe holds messages, the connection's QoS 0 publishes queue
// behind them (nothing to write; they keep their place), so that one
// publisher's messages are delivered, and retained, in the order sent,
// whatever their QoS, as Mosquitto does. A QoS 2 PUBLISH resent while its
// first copy is still in the pipe is handed back after it, for the hooks.
//
// Known deviation: answers mochi gives before OnPublish (PUBACK 0x87 for a
// publish the ACL refuses on MQTT 5, PUBREC 0x91 for a packet id in use)
// can overtake acknowledgements still in the pipe. Only refused messages
// are affected; clients match acknowledgements by packet id.
//
// The pipe holds at most the server's Receive Maximum of queued messages;
// beyond that OnPublish blocks, which stops the read loop and pushes back
// through TCP (MQTT 5 clients stop by themselves at Receive Maximum
// unacknowledged messages; MQTT 3.1.1 clients have no such limit).
type Pipeline struct {
	mqtt.HookBase
	s *Sessions

	// mu orders a pipe's removal (OnDisconnect, the worker's exit)
	// against its creation; pipes is read without it.
	mu    sync.Mutex
	pipes sync.Map // *mqtt.Client -> *pubPipe

	// workers run the pipes' workers: a worker hands a message back
	// through a whole mochi publish, and a new goroutine for every batch
	// (one message, for a publisher that waits for each PUBACK) spent 9 %
	// of a node's CPU growing its stack.
	workers *gopool.Pool

	// readers orders a takeover on this node after the old connection's
	// publishes (pipeline_takeover.go).
	readers readers
}

// pipeWorkerIdle is how long an idle pipe worker goroutine is kept.
const pipeWorkerIdle = 10 * time.Second

// maxSpare is the largest queue array a pipe keeps for reuse (pubPipe.spare).
const maxSpare = 4

// pubPipe is one connection's queue of publishes.
type pubPipe struct {
	mu    sync.Mutex
	space sync.Cond // signalled when the worker takes the queue
	queue []pubItem
	// spare is the array of the batch the worker finished last, emptied:
	// the queue's next array, so that a publisher waiting for each
	// acknowledgement does not allocate a queue (a pubItem holds an
	// 800-byte packet) for every message. Set by the worker only, and
	// only for small arrays (maxSpare): the pipe lives as long as its
	// connection, and a burst's array (up to Receive Maximum items, about
	// 1 MB) must not stay with it (found by review).
	spare   []pubItem
	running bool // a worker owns the queue (and the pipe holds messages)
	closed  bool // the connection ended: nothing waits for space
	// after runs once the pipe is empty (AfterPublishes).
	after []func()
	// queued and handed count the messages queued on the pipe and those
	// handed back; marks run once handed reaches their count
	// (AfterQueued).
	queued, handed uint64
	marks          []pipeMark
	// waitFor: the older connections of this client id on this node not
	// done when this one was established; the first publish waits for
	// them (pipeline_takeover.go).
	waitFor atomic.Pointer[takeoverWait]
	// qos2 counts the QoS 2 packet ids in the pipe (queued or being
	// committed), to tell a resend of one of them (pubItem.resend).
	qos2 map[uint16]int

	// inl marks the publish inline let through (Pipeline.inline).
	inl atomic.Pointer[inlined]

	// cur is the message being handed back (set and cleared by the
	// worker, around InjectPacket on its own goroutine).
	cur atomic.Pointer[pubVerdict]
}

// pubItem is a queued publish.
type pubItem struct {
	pk packets.Packet
	// conn is the publisher's Sessions state when the PUBLISH arrived
	// (nil: none); the connection may end before the commit.
	conn *sessConn
	// resend: a QoS 2 PUBLISH whose packet id is still in the pipe (the
	// client resent it before its PUBREC). It is handed back for the hooks
	// to write, after the first copy: by then mochi knows the id and
	// answers the resend itself, or, if the first copy was refused, the
	// resend is written as a new message.
	resend bool
}

// pubVerdict is the outcome of one message's commit, for the hooks'
// second pass (Sessions.OnPublish).
type pubVerdict struct {
	id   uint16
	data *byte // the payload's backing array: identifies this very packet
	// hooks: not written by the pipeline (retained, large, resent): the
	// hooks write it themselves, as without a pipeline.
	hooks bool
	qos2  bool // the command was a QoS2Publish (res.Changed false: duplicate)
	res   replication.Result
	err   error // not committed: refuse it
}

func (v *pubVerdict) is(pk packets.Packet) bool {
	return v.id == pk.PacketID && v.data == unsafe.SliceData(pk.Payload)
}

// NewPipeline returns the hook for s; register it before every hook with
// an OnPublish but after the one that refuses publishes (auth).
func NewPipeline(s *Sessions) *Pipeline {
	p := &Pipeline{s: s, workers: gopool.New(pipeWorkerIdle)}
	p.readers.init()
	s.pipeline = p
	return p
}

// ID implements mqtt.Hook.
func (h *Pipeline) ID() string { return "publish-pipeline" }

// Provides implements mqtt.Hook.
func (h *Pipeline) Provides(b byte) bool {
	return b == mqtt.OnPublish || b == mqtt.OnDisconnect || b == mqtt.OnSessionEstablished
}

// OnPublish queues a client's QoS 1/2 PUBLISH on its pipe, and a QoS 0
// one while the pipe holds messages (it must not overtake them, in
// delivery or as a retained value); it lets the pipe's own hand-back
// through.
func (h *Pipeline) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.Ignore || cl.Net.Inline || h.s.repl == nil || ackBeforeCommit {
		return pk, nil
	}
	var p *pubPipe
	if v, ok := h.pipes.Load(cl); ok {
		p = v.(*pubPipe)
		if v := p.cur.Load(); v != nil && v.is(pk) {
			return pk, nil // the hand-back
		}
		// Load first: a Swap on every publish would write a cache line
		// the pipe's worker reads.
		if p.waitFor.Load() != nil {
			if tw := p.waitFor.Swap(nil); tw != nil {
				h.afterTakenOver(cl, tw)
			}
		}
	}
	if (p == nil || !p.busy()) && (pk.FixedHeader.Qos == 0 || h.inline(cl, &p, pk)) {
		return pk, nil
	}
	if p == nil {
		p = h.newPipe(cl)
	}
	// The topic alias was resolved into TopicName; on the hand-back mochi
	// would set the alias again and could undo a newer mapping.
	pk.Properties.TopicAliasFlag, pk.Properties.TopicAlias = false, 0
	if len(pk.Payload) == 0 {
		pk.Payload = make([]byte, 0, 1) // a backing array of its own (pubVerdict.is)
	}
	it := pubItem{pk: pk}
	if pk.FixedHeader.Qos > 0 {
		it.conn = h.s.conn(cl)
	}
	limit := max(int(h.s.server.Options.Capabilities.ReceiveMaximum), 1)
	p.mu.Lock()
	for len(p.queue) >= limit && !p.closed {
		p.space.Wait()
	}
	if pk.FixedHeader.Qos == 2 {
		it.resend = p.qos2[pk.PacketID] > 0
		p.qos2[pk.PacketID]++
	}
	p.queue = append(p.queue, it)
	p.queued++
	start := !p.running
	p.running = true
	p.mu.Unlock()
	if pk.FixedHeader.Qos > 0 {
		h.s.m.pipelined.Inc()
	}
	if start {
		h.workers.Go(func() { h.run(cl, p) })
	}
	return pk, packets.ErrRejectPacket
}

// inline reports whether a QoS 1/2 PUBLISH that finds its pipe idle can
// go through the hooks on the reader, as without a pipeline: when this
// node's sessions are current without a round trip or a wait
// (replication.SessionsCurrent: a one-node broker, its log applied) and
// the message has nothing to commit (no persistent session matches it).
// The pipe's hand-off to a worker goroutine cost a one-node broker more
// CPU per QoS 1 message than the rest of the hooks together. Never a
// wait on the reader: a node behind its log sends the message to the
// pipe, whose barrier waits off the read loop (found by review: PINGRESP
// and the refusal came a write timeout late when the reader took the
// barrier itself). Sessions.OnPublish then takes the message as checked
// (inlined).
func (h *Pipeline) inline(cl *mqtt.Client, pp **pubPipe, pk packets.Packet) bool {
	if pk.FixedHeader.Retain || len(pk.Payload) == 0 || len(pk.Payload) > replication.BlobThreshold || !h.s.repl.SessionsCurrent() {
		return false
	}
	if cmd, _ := h.s.publishCommand(cl, h.s.conn(cl), pk); cmd != nil {
		return false
	}
	if *pp == nil {
		*pp = h.newPipe(cl) // for the mark; the connection's pipe from now on
	}
	(*pp).inl.Store(&inlined{id: pk.PacketID, data: unsafe.SliceData(pk.Payload)})
	return true
}

// inlined marks the publish Pipeline.inline let through, for
// Sessions.OnPublish (on the same reader, next).
type inlined struct {
	id   uint16
	data *byte
}

// takeInlined reports whether pk is the publish inline let through on
// cl, and clears the mark.
func (h *Pipeline) takeInlined(cl *mqtt.Client, pk packets.Packet) bool {
	v, ok := h.pipes.Load(cl)
	if !ok {
		return false
	}
	p := v.(*pubPipe)
	m := p.inl.Load()
	if m == nil || m.id != pk.PacketID || m.data != unsafe.SliceData(pk.Payload) {
		return false
	}
	p.inl.CompareAndSwap(m, nil)
	return true
}

// AfterPublishes runs fn once every publish of cl's pipe was handed back
// (and so went through the other hooks): at once when the pipe is empty,
// else on its worker when it is. A clean session's retained will must
// not be written before the client's last retained writes
// (Retained.replicateWill): mochi publishes the will as soon as the read
// loop ends, while the pipe may still hold the client's last publishes.
func (h *Pipeline) AfterPublishes(cl *mqtt.Client, fn func()) {
	if v, ok := h.pipes.Load(cl); ok {
		p := v.(*pubPipe)
		p.mu.Lock()
		if p.running {
			p.after = append(p.after, fn)
			p.mu.Unlock()
			return
		}
		p.mu.Unlock()
	}
	fn()
}

// pipeMark is an AfterQueued call: fn runs once at messages were handed
// back.
type pipeMark struct {
	at uint64
	fn func()
}

// AfterQueued runs fn once every publish queued on cl's pipe so far was
// handed back, whatever is queued after: at once when the pipe is empty,
// else on its worker. Unlike AfterPublishes it does not wait for a pipe
// that a live connection keeps busy.
func (h *Pipeline) AfterQueued(cl *mqtt.Client, fn func()) {
	if v, ok := h.pipes.Load(cl); ok {
		p := v.(*pubPipe)
		p.mu.Lock()
		if p.running {
			p.marks = append(p.marks, pipeMark{at: p.queued, fn: fn})
			p.mu.Unlock()
			return
		}
		p.mu.Unlock()
	}
	fn()
}

// Busy returns how many connections' pipes hold publishes (tests,
// diagnostics).
func (h *Pipeline) Busy() int {
	n := 0
	h.pipes.Range(func(_, v any) bool {
		if v.(*pubPipe).busy() {
			n++
		}
		return true
	})
	return n
}

// busy reports whether the pipe holds messages.
func (p *pubPipe) busy() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.running
}

func (h *Pipeline) newPipe(cl *mqtt.Client) *pubPipe {
	h.mu.Lock()
	defer h.mu.Unlock()
	if v, ok := h.pipes.Load(cl); ok {
		return v.(*pubPipe)
	}
	p := &pubPipe{qos2: map[uint16]int{}}
	p.space.L = &p.mu
	h.pipes.Store(cl, p)
	return p
}

// OnDisconnect forgets the connection's pipe, or leaves that to its
// worker, which finishes what was queued (nobody gets those
// acknowledgements any more; the commits stand, as for a publisher that
// drops before its PUBACK).
func (h *Pipeline) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	h.AfterPublishes(cl, func() { h.readers.ended(cl) })
	h.mu.Lock()
	defer h.mu.Unlock()
	v, ok := h.pipes.Load(cl)
	if !ok {
		return
	}
	p := v.(*pubPipe)
	p.mu.Lock()
	p.closed = true
	p.space.Broadcast()
	if !p.running {
		h.pipes.Delete(cl)
	}
	p.mu.Unlock()
}

// verdict is the commit outcome of pk if the pipeline is handing it back.
func (h *Pipeline) verdict(cl *mqtt.Client, pk packets.Packet) *pubVerdict {
	if v, ok := h.pipes.Load(cl); ok {
		if v := v.(*pubPipe).cur.Load(); v != nil && v.is(pk) {
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
		p.queue, p.spare = p.spare, nil
		if len(batch) == 0 && len(p.after) > 0 {
			// Still running meanwhile: what they wait for is done, and
			// the pipe is not forgotten before they ran.
			after := p.after
			p.after = nil
			p.mu.Unlock()
			h.mu.Unlock()
			for _, fn := range after {
				fn()
			}
			continue
		}
		if len(batch) == 0 {
			p.running = false
			if p.closed {
				h.pipes.Delete(cl)
			}
			marks := p.marks // none: each ran once its messages were handed back
			p.marks = nil
			p.mu.Unlock()
			h.mu.Unlock()
			for _, m := range marks {
				m.fn()
			}
			return
		}
		p.space.Broadcast()
		p.mu.Unlock()
		h.mu.Unlock()
		h.s.m.pipelineBatches.Inc()
		h.process(cl, p, batch)
		p.mu.Lock()
		p.handed += uint64(len(batch))
		var due []func()
		for len(p.marks) > 0 && p.marks[0].at <= p.handed {
			due = append(due, p.marks[0].fn)
			p.marks = p.marks[1:]
		}
		p.mu.Unlock()
		for _, fn := range due {
			fn()
		}
		if cap(batch) <= maxSpare {
			clear(batch) // the packets and payloads are mochi's now
			p.mu.Lock()
			p.spare = batch[:0]
			p.mu.Unlock()
		}
	}
}

// process commits and hands back one batch, in order.
func (h *Pipeline) process(cl *mqtt.Client, p *pubPipe, batch []pubItem) {
	verdicts := make([]*pubVerdict, len(batch))
	for i, it := range batch {
		verdicts[i] = &pubVerdict{id: it.pk.PacketID, data: unsafe.SliceData(it.pk.Payload),
			hooks: it.resend || it.pk.FixedHeader.Retain || len(it.pk.Payload) > replication.BlobThreshold}
	}
	// One barrier for the batch: every message in it arrived before.
	bctx, cancel := context.WithTimeout(h.s.base, h.s.cfg.Timeout)
	barrier := h.s.repl.SessionsBarrier(bctx)
	cancel()
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
			h.commit(cl, batch[i:j], verdicts[i:j])
		}
		h.handBack(cl, p, batch[i:j], verdicts[i:j])
		i = j
	}
}

// commit writes the commands of a run of messages as one entry and puts
// each message's result in its verdict.
func (h *Pipeline) commit(cl *mqtt.Client, run []pubItem, verdicts []*pubVerdict) {
	var cmds []replication.Command
	var at []int // the verdict of each command
	for i, it := range run {
		if it.pk.FixedHeader.Qos == 0 {
			continue // nothing to write: it only keeps its place
		}
		cmd, qos2 := h.s.publishCommand(cl, it.conn, it.pk)
		if cmd == nil {
			continue
		}
		verdicts[i].qos2 = qos2
		cmds = append(cmds, cmd)
		at = append(at, i)
	}
	if len(cmds) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(h.s.base, h.s.cfg.Timeout)
	defer cancel()
	if len(cmds) == 1 {
		res, err := h.s.repl.Apply(ctx, cmds[0])
		verdicts[at[0]].res, verdicts[at[0]].err = res, err
		return
	}
	res, err := h.s.repl.Apply(ctx, &replication.Batch{Commands: cmds})
	if err == nil && len(res.Results) != len(cmds) {
		err = fmt.Errorf("publish batch: %d results for %d commands", len(res.Results), len(cmds))
	}
	for k, i := range at {
		switch {
		case err != nil:
			verdicts[i].err = err
		case res.Results[k].Err != nil: // as Apply returns it for a lone command
			verdicts[i].err = res.Results[k].Err
		default:
			verdicts[i].res = res.Results[k]
		}
	}
}

// handBack gives messages back to mochi in order, each with its verdict.
func (h *Pipeline) handBack(cl *mqtt.Client, p *pubPipe, run []pubItem, verdicts []*pubVerdict) {
	info := h.s.server.Info
	for i, it := range run {
		p.cur.Store(verdicts[i])
		err := h.s.server.InjectPacket(cl, it.pk)
		p.cur.Store(nil)
		if err == nil {
			// InjectPacket counted the message as received again.
			atomic.AddInt64(&info.PacketsReceived, -1)
			atomic.AddInt64(&info.MessagesReceived, -1)
		}
		if it.pk.FixedHeader.Qos == 2 {
			p.mu.Lock()
			if p.qos2[it.pk.PacketID]--; p.qos2[it.pk.PacketID] <= 0 {
				delete(p.qos2, it.pk.PacketID)
			}
			p.mu.Unlock()
		}
	}
}
