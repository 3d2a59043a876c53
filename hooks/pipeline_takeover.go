package hooks

import (
	"context"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Takeovers on this node keep the client's order.
//
// mochi disconnects the connection a new CONNECT of its client id takes
// over (inheritClientSession) before it sends the CONNACK, but the old
// connection's reader may still be handling a packet, and its pipe may
// still hold publishes (a QoS 1 commit in flight, a retained write queued
// behind it). Their retained writes then joined the client's lane after
// the new connection's first ones, and the old connection's value stayed
// retained (TestTakeoverAfterOldConnectionsWrites). Mosquitto handles the
// old connection's packets before the takeover, so the new connection's
// writes come last there.
//
// So the new connection's first publish waits until the old connection
// is done, that is its reader ended (OnDisconnect) and then its pipe handed
// back what it held, and then until the lane wrote that, mochi's own will
// of the old connection included (it joins the pipe's after-list first).
// The old reader usually ends before the new connection is established
// (mochi closes it in inheritClientSession), so a connection counts as
// live until its pipe is empty too, not only until OnDisconnect (a first
// version waited only for live readers, and a three-node cluster still
// lost the order, about 1 takeover in 10). The wait is at the first
// PUBLISH, not at CONNACK, so that the new connection's session, pump
// and routes are set up meanwhile and a connection that only subscribes
// never waits; it is bounded by the write timeout, as a pipe that cannot
// commit must not hold the new connection up for longer than a publish
// may take.
//
// A persistent session's will that the takeover publishes in the new
// CONNECT's entry (TakeoverWill) must come after the old connection's
// writes as well: Sessions.OnSessionEstablish waits for what the old
// connection had queued when the CONNECT arrived (AfterQueued), before the
// open's own time budget starts.
type readers struct {
	mu   sync.Mutex
	cond sync.Cond // broadcast when a reader ends, or a waiter's deadline passes
	// live: connections not done (OnSessionEstablished until their pipe
	// is empty after OnDisconnect); latest: the newest of each client id.
	live   map[*mqtt.Client]struct{}
	latest map[string]*mqtt.Client
}

func (r *readers) init() {
	r.cond.L = &r.mu
	r.live = map[*mqtt.Client]struct{}{}
	r.latest = map[string]*mqtt.Client{}
}

// started records cl and returns the connection of its client id that is
// not done yet (one being taken over), or nil.
func (r *readers) started(cl *mqtt.Client) *mqtt.Client {
	r.mu.Lock()
	defer r.mu.Unlock()
	if cl.Closed() {
		// Taken over already, by a connection established before this
		// one got here: it must not become the newest.
		return nil
	}
	prev := r.latest[cl.ID]
	r.latest[cl.ID] = cl
	r.live[cl] = struct{}{}
	if _, ok := r.live[prev]; ok && prev != cl {
		return prev
	}
	return nil
}

// ended records that cl is done: its reader ended and its pipe is empty.
func (r *readers) ended(cl *mqtt.Client) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.live[cl]; !ok {
		return
	}
	delete(r.live, cl)
	if r.latest[cl.ID] == cl {
		delete(r.latest, cl.ID)
	}
	r.cond.Broadcast()
}

// await waits until cl is done or ctx ends; it reports whether it is.
func (r *readers) await(ctx context.Context, cl *mqtt.Client) bool {
	stop := context.AfterFunc(ctx, func() {
		r.mu.Lock()
		r.cond.Broadcast()
		r.mu.Unlock()
	})
	defer stop()
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		if _, ok := r.live[cl]; !ok {
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		r.cond.Wait()
	}
}

// OnSessionEstablished records the connection, and the one of its client
// id it took over on this node that is not done yet, for its first
// publish to wait for (afterTakenOver).
func (h *Pipeline) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	if cl.Net.Inline {
		return
	}
	if prev := h.readers.started(cl); prev != nil {
		h.newPipe(cl).waitFor.Store(prev)
	}
}

// afterTakenOver waits until prev, the connection cl took over, is done
// and its retained writes are written, or the write timeout passes.
func (h *Pipeline) afterTakenOver(cl, prev *mqtt.Client) {
	start := time.Now()
	deadline := start.Add(h.s.cfg.Timeout)
	ctx, cancel := context.WithDeadline(h.s.base, deadline)
	defer cancel()
	if h.readers.await(ctx, prev) && h.s.awaitClientWrites(prev, cl.ID, deadline) {
		return
	}
	h.s.log.Warn("takeover: the old connection's publishes were not all written in time; the new connection's may overtake them",
		"client", cl.ID, "waited", time.Since(start).Round(time.Millisecond))
}
