package hooks

import (
	"cmp"
	"errors"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/mqtt-ha/broker/internal/session"
	"github.com/mqtt-ha/broker/replication"
)

// Wills of connections taken over (MQTT-3.1.4-3 with 3.1.2.5: a
// connection closed by a takeover ended without DISCONNECT). As Mosquitto
// 2.0: the will is published when the takeover ends the old session (the
// new CONNECT has clean start, or the old session had expiry 0) and the
// will has no delay; a session that continues on the new connection keeps
// its will unpublished, and a delayed will is cancelled by the new
// connection (MQTT-3.1.3-9).
//
// The will is in the log (a persistent session's SetWill, a clean
// session's mirror), and the new connection's SessionOpen clears it. So
// the CONNECT that takes the connection over publishes it in the same
// entry, before its SessionOpen (or SessionDelete): replication.TakeoverWill
// queues and retains it if the old connection is still the one in the log.
// Live copies then go out from here, best effort, as for a claimed will.
//
// Only a takeover on this node is handled here: the hook knows that the
// old connection is live and has not sent DISCONNECT (it waits for one in
// flight). For a connection on another node the log cannot tell a live
// connection from one whose DISCONNECT is still being written there: the
// new open leaves its will owed by it, and its node settles it
// (owedwills.go).

// takenOver is the will a CONNECT publishes in its own entry (a
// TakeoverWill, or a PublishWill for a session that ended, see
// endingWill), and the will to publish live once it committed.
type takenOver struct {
	// cmds: the TakeoverWill, then the PublishWill for the case where the
	// old connection's close commits first; or the PublishWill alone.
	// The log applies at most one (each clears the will it publishes).
	cmds []replication.Command
	id   string
	at   int64
	will *replication.Will
	old  *sessConn // the connection taken over; nil for a PublishWill
}

// endingWill is the will a CONNECT that ends id's session (clean: clean
// start) publishes in its own entry: the takeover will of a live
// connection on this node (takeoverWill), or else the PublishWill of
// session.EndingWill, whose live copies this node then owes.
func (h *Sessions) endingWill(id string, clean bool, now int64) *takenOver {
	if t := h.takeoverWill(id, clean, now); t != nil {
		// The old connection may end right after these checks, and its
		// close commit first: the TakeoverWill (connected only) then
		// applies to nothing, and the PublishWill takes over.
		if s, ok := h.repl.SessionHead(id); ok {
			if pw := session.EndingWill(s, ok, clean, now, h.cfg.MaxQueued); pw != nil {
				t.cmds = append(t.cmds, pw)
			}
		}
		return t
	}
	// A connection of this id that just ended here writes its close in
	// the background: wait for it (briefly), or this entry could overtake
	// it, find the session still connected and delete the will with it
	// (found by review: a drop, then a clean CONNECT at once on the same
	// node, lost 1-2 wills in 20).
	h.mu.Lock()
	old := h.live[id]
	h.mu.Unlock()
	h.awaitPreviousClose(id, old)
	if clean && !h.repl.OwedWillsSupported() {
		// Once every node keeps owed wills, the open moves the will of a
		// connection elsewhere aside instead of deleting it (owedwills.go).
		h.awaitRemoteClose(id)
	}
	s, ok := h.repl.SessionHead(id)
	cmd := session.EndingWill(s, ok, clean, now, h.cfg.MaxQueued)
	if cmd == nil {
		return nil
	}
	t := &takenOver{cmds: []replication.Command{cmd}, id: id, at: now, will: s.Will}
	h.expectClaim(id, now, func() { h.publishWill(id, t.will) })
	return t
}

// awaitRemoteClose waits (at most disconnectGrace) while the log shows
// id's session, with a will, connected on another node, until every node
// keeps owed wills (a rolling upgrade). A client whose connection there
// just dropped and that connects here at once with clean start finds it
// so until that node has written the close, which is what makes the will
// due: the clean start would delete the session, will and all, before
// (TestClientDropInLameDuckKeepsItsWill lost the will one run in ten once
// the read barrier no longer took a heartbeat round).
func (h *Sessions) awaitRemoteClose(id string) {
	deadline := time.Now().Add(disconnectGrace)
	for {
		s, ok := h.repl.SessionHead(id)
		if !ok || !s.Connected || s.Owner == h.cfg.Self || s.Will == nil || !time.Now().Before(deadline) {
			return
		}
		select {
		case <-time.After(2 * time.Millisecond):
		case <-h.base.Done():
			return
		}
	}
}

// takeoverWill returns the TakeoverWill for id's live connection on this
// node, if it holds a will in the log that a new CONNECT (clean: with
// clean start) makes due now; nil otherwise.
func (h *Sessions) takeoverWill(id string, clean bool, now int64) *takenOver {
	if h.stopping.active.Load() {
		return nil
	}
	old, ok := h.server.Clients.Get(id)
	if !ok || old.Closed() || old.Net.Inline {
		return nil
	}
	h.mu.Lock()
	oc := h.conns[old]
	h.mu.Unlock()
	if oc == nil || oc.opened.Load() == 0 {
		return nil
	}
	s, ok := h.repl.SessionHead(id)
	if !ok {
		return nil
	}
	cmd := session.TakeoverWill(session.Takeover{ClientID: id, Session: s, Self: h.cfg.Self, Opened: oc.opened.Load(),
		CleanStart: clean, At: now, MaxQueued: h.cfg.MaxQueued})
	if cmd == nil {
		return nil
	}
	// A DISCONNECT in flight on the old connection deletes its will
	// (MQTT-3.1.2-10): give it the same grace a resume gives, and when its
	// reader is still busy with earlier packets (a publish waiting for
	// the log), wait until it has handled everything the client sent
	// (bounded by the write timeout); if it has not by then, publish
	// nothing: a will is better lost than published after a DISCONNECT.
	h.awaitDisconnectInFlight(id)
	if !h.awaitReaderIdle(old, time.Now().Add(h.cfg.Timeout)) {
		return nil
	}
	if old.Closed() {
		return nil
	}
	t := &takenOver{cmds: []replication.Command{cmd}, id: id, at: now, will: s.Will, old: oc}
	h.expectClaim(id, now, func() {
		t.old.willTaken.Store(true)
		h.publishWill(id, t.will)
	})
	return t
}

// awaitReaderIdle waits until cl's reader has handled everything the
// client sent so far and waits for more input (WaitingForInput), or cl
// closed; false if neither happened by deadline or the node stops.
func (h *Sessions) awaitReaderIdle(cl *mqtt.Client, deadline time.Time) bool {
	w, ok := cl.Net.Conn.(interface{ WaitingForInput() bool })
	if !ok {
		return true
	}
	for !cl.Closed() && !w.WaitingForInput() {
		if !time.Now().Before(deadline) {
			return false
		}
		select {
		case <-time.After(2 * time.Millisecond):
		case <-h.base.Done():
			return false
		}
	}
	return true
}

// published settles t's claim (wills.go) with the result of the entry
// that holds t's command first: the live copies go out once it committed.
func (t *takenOver) published(h *Sessions, res replication.Result, err error) {
	if t == nil {
		return
	}
	if err != nil || len(res.Results) < len(t.cmds) {
		h.settleClaim(t.id, t.at, false, cmp.Or(err, errNoResult))
		return
	}
	changed := false
	for _, r := range res.Results[:len(t.cmds)] {
		changed = changed || r.Changed
	}
	h.settleClaim(t.id, t.at, changed, nil)
}

var errNoResult = errors.New("no result for the takeover will")

// withTakeover prepends t's commands to cmd.
func (t *takenOver) withTakeover(cmd replication.Command) replication.Command {
	if t == nil {
		return cmd
	}
	cmds := append([]replication.Command(nil), t.cmds...)
	if b, ok := cmd.(*replication.Batch); ok {
		return &replication.Batch{Commands: append(cmds, b.Commands...)} // batches do not nest
	}
	return &replication.Batch{Commands: append(cmds, cmd)}
}
