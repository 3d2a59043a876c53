package replication

import (
	"sync"

	"github.com/hashicorp/raft"
)

// pipeline wraps raft's pipelined replication to one follower
// (raft.NetworkTransport's netPipeline) so that it cannot deadlock.
//
// hashicorp/raft v1.8.0 deadlocks without it. Its pipeline decodes each
// response on a goroutine of its own and then waits to hand the response
// over on an unbuffered channel (at the default MaxRPCsInFlight), which
// raft's decoder (pipelineDecode) reads. When a follower refuses an
// AppendEntries, raft's decoder stops reading. The transport's goroutine
// then waits forever to hand over the next response, so it no longer takes
// new requests, and raft's sender, in the middle of its next AppendEntries,
// waits forever for it to. The sender would only notice that the decoder
// stopped between two requests; it never replicates to that follower again,
// and raft's Shutdown waits for it forever. The ten-minute chaos campaign
// found this (a node whose SIGTERM never finished); grafana/pyroscope hit
// it too (PR 5518).
//
// pipeline takes every response off the transport as soon as it is
// decoded and queues it for raft's decoder, so the transport's goroutine
// always goes back to the wire. A request then waits only for the
// response to an earlier one (or for the transport's I/O timeout), the
// sender gets back to its loop, sees that the decoder stopped, and closes
// the pipeline. The queue holds at most what was sent before the sender
// noticed: requests are still bounded by MaxRPCsInFlight at the wire.
//
// It also records, for the read lease, the AppendEntries the follower
// accepted (raftTransport.AppendEntries does the same for the requests
// raft sends one at a time).
type pipeline struct {
	inner raft.AppendPipeline
	id    raft.ServerID
	lease *readLease

	out       chan raft.AppendFuture
	done      chan struct{}
	closeOnce sync.Once
	closeErr  error
	wg        sync.WaitGroup
}

func newPipeline(inner raft.AppendPipeline, id raft.ServerID, lease *readLease) *pipeline {
	p := &pipeline{inner: inner, id: id, lease: lease, out: make(chan raft.AppendFuture), done: make(chan struct{})}
	p.wg.Add(1)
	go p.relay()
	return p
}

// AppendEntries implements raft.AppendPipeline.
func (p *pipeline) AppendEntries(args *raft.AppendEntriesRequest, resp *raft.AppendEntriesResponse) (raft.AppendFuture, error) {
	return p.inner.AppendEntries(args, resp)
}

// Consumer implements raft.AppendPipeline.
func (p *pipeline) Consumer() <-chan raft.AppendFuture { return p.out }

// Close implements raft.AppendPipeline.
func (p *pipeline) Close() error {
	p.closeOnce.Do(func() {
		close(p.done)
		p.closeErr = p.inner.Close()
		p.wg.Wait()
	})
	return p.closeErr
}

// relay moves decoded responses from the transport to raft, queueing them
// while raft does not read.
func (p *pipeline) relay() {
	defer p.wg.Done()
	in := p.inner.Consumer()
	var queue []raft.AppendFuture
	for {
		var out chan raft.AppendFuture
		var head raft.AppendFuture
		if len(queue) > 0 {
			out, head = p.out, queue[0]
		}
		select {
		case f := <-in:
			p.observe(f)
			queue = append(queue, f)
		case out <- head:
			queue[0] = nil
			queue = queue[1:]
		case <-p.done:
			return
		}
	}
}

// observe records an accepted AppendEntries for the read lease, under the
// same rule as raftTransport.AppendEntries (renewsLease).
func (p *pipeline) observe(f raft.AppendFuture) {
	if f.Error() != nil {
		return
	}
	if args := f.Request(); renewsLease(args, f.Response()) {
		p.lease.acked(p.id, args.Term, f.Start())
	}
}
