package hooks

import (
	"slices"
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
// So the new connection's first publish waits until every older
// connection of its client id on this node is done, that is its reader
// ended (OnDisconnect) and then its pipe handed back what it held, and
// then until the lane wrote that, mochi's own will of the old connection
// included (it joins the pipe's after-list first). Every older one, not
// only the one taken over: a connection in between that published nothing
// is done at once, and the first one's pipe may still be busy (found by
// review: A's backlog, B connects and leaves, C's "new" landed before A's
// "online").
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
	mu sync.Mutex
	// byID: each client id's connections not done yet, oldest first;
	// byClient: the same, by connection.
	byID     map[string][]*connRun
	byClient map[*mqtt.Client]*connRun
}

// connRun is a connection until it is done.
type connRun struct {
	id   string
	done chan struct{} // closed when it is done
}

// takeoverWait is what a connection's first publish waits for: the older
// connections of its client id not done when it was established. It holds
// their done channels, not the connections, which mochi may then free.
type takeoverWait struct {
	done []chan struct{}
}

func (r *readers) init() {
	r.byID = map[string][]*connRun{}
	r.byClient = map[*mqtt.Client]*connRun{}
}

// started records cl and returns what its first publish must wait for:
// nil when no older connection of its client id is left.
func (r *readers) started(cl *mqtt.Client) *takeoverWait {
	r.mu.Lock()
	defer r.mu.Unlock()
	if cl.Closed() {
		// Taken over already by a newer connection, which waits for
		// the connections before this one; this one reads nothing.
		return nil
	}
	older := r.byID[cl.ID]
	var tw *takeoverWait
	if len(older) > 0 {
		tw = &takeoverWait{done: make([]chan struct{}, len(older))}
		for i, c := range older {
			tw.done[i] = c.done
		}
	}
	c := &connRun{id: cl.ID, done: make(chan struct{})}
	r.byID[cl.ID] = append(older, c)
	r.byClient[cl] = c
	return tw
}

// ended records that cl is done: its reader ended and its pipe is empty.
func (r *readers) ended(cl *mqtt.Client) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.byClient[cl]
	if c == nil {
		return
	}
	delete(r.byClient, cl)
	list := slices.DeleteFunc(r.byID[c.id], func(o *connRun) bool { return o == c })
	if len(list) == 0 {
		delete(r.byID, c.id)
	} else {
		r.byID[c.id] = list
	}
	close(c.done)
}

// OnSessionEstablished records the connection, and the older ones of its
// client id on this node not done yet, for its first publish to wait for
// (afterTakenOver).
func (h *Pipeline) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	if cl.Net.Inline {
		return
	}
	if tw := h.readers.started(cl); tw != nil {
		h.newPipe(cl).waitFor.Store(tw)
	}
}

// afterTakenOver waits until the older connections in tw are done and the
// client's retained writes queued by then are written, or the write
// timeout passes.
func (h *Pipeline) afterTakenOver(cl *mqtt.Client, tw *takeoverWait) {
	start := time.Now()
	t := time.NewTimer(h.s.cfg.Timeout)
	defer t.Stop()
	ok := true
	for _, done := range tw.done {
		if ok = waitOrStop(done, t.C, h.s.base.Done()); !ok {
			break
		}
	}
	if ok && h.s.retained != nil {
		written := make(chan struct{})
		h.s.retained.AfterWrites(cl.ID, func() { close(written) })
		ok = waitOrStop(written, t.C, h.s.base.Done())
	}
	if !ok && h.s.base.Err() == nil {
		h.s.log.Warn("takeover: an older connection's publishes were not all written in time; the new connection's may overtake them",
			"client", cl.ID, "waited", time.Since(start).Round(time.Millisecond))
	}
}

// waitOrStop waits for done and reports whether it came before expired or
// stop.
func waitOrStop(done <-chan struct{}, expired <-chan time.Time, stop <-chan struct{}) bool {
	select {
	case <-done:
		return true
	case <-expired:
	case <-stop:
	}
	return false
}
