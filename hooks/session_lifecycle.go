package hooks

import (
	"context"
	"errors"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/internal/session"
	"github.com/mqtt-ha/broker/replication"
)

// The MQTT session lifecycle rules the Sessions hook applies to the
// replicated sessions (DESIGN.md guarantee 8), whichever node the client
// uses:
//
//   - A clean CONNECT (3.1.1 clean session 1, MQTT 5 clean start 1)
//     discards the client's session (MQTT-3.1.2-4). With MQTT 5 session
//     expiry > 0 the SessionOpen itself has CleanStart; otherwise the
//     connection is served by mochi alone, and discardSession deletes the
//     replicated one.
//   - MQTT 5 clean start 0 with session expiry 0 resumes an existing
//     session (session present 1, its queue delivered) and ends it with
//     the connection (MQTT 5 3.1.2.11.2: with expiry 0 the session ends
//     when the network connection closes).
//   - DISCONNECT's session expiry replaces CONNECT's (MQTT 5 3.14.2.2.2);
//     0 ends the session now. mochi refuses a non-zero one after CONNECT's
//     0 (protocol error 0x82) before the hooks see it.
//   - A session whose expiry has passed is not resumed even if the
//     leader's sweep has not removed it yet: session present 0.

// cleanDiscardTimeout bounds how long a clean CONNECT waits for the
// discard of the old session before CONNACK. A clean session must be
// served without a quorum (guarantee 5), so it never waits longer; the
// delete is then retried in the background.
const cleanDiscardTimeout = 2 * time.Second

// resumesWithoutExpiry reports whether an MQTT 5 CONNECT with clean start 0
// and session expiry 0 finds a session to resume in the log. Without a
// raft leader it cannot be resumed (nor stored) and is served as a clean
// session.
func (h *Sessions) resumesWithoutExpiry(cl *mqtt.Client, pk packets.Packet) bool {
	if !session.MayResumeWithoutExpiry(cl.Properties.ProtocolVersion, pk.Connect.Clean, cl.Properties.Props.SessionExpiryInterval) {
		return false
	}
	if _, ok := h.repl.SessionHead(cl.ID); !ok {
		return false
	}
	return h.repl.HasLeader()
}

// discardSession deletes id's replicated session for a clean CONNECT that
// keeps no session in the log, and reports whether the CONNECT may be
// served (false: refuse it, see below). It deletes only the session this node sees
// (IfOpened), so a session opened later, by a connection after this one,
// is never touched. With a leader it waits (at most cleanDiscardTimeout)
// so that CONNACK follows the discard and nothing more is queued for the
// old session. Without a quorum, or when the delete's outcome stays
// unknown, the CONNECT is refused; an unknown delete is finished in the
// background (a conditional delete is safe to apply late).
func (h *Sessions) discardSession(id string) bool {
	// One bound for both steps. The barrier waits for a leader (a node
	// just restarted learns it within an election) but fails fast on a
	// side that has had none for a while.
	ctx, cancel := context.WithTimeout(h.base, cleanDiscardTimeout)
	defer cancel()
	// See every session opened before this CONNECT, on any node. A node
	// behind the log might not know the session yet: when a leader gave
	// the read index but this node could not apply up to it in time, the
	// CONNECT is refused rather than served over a session a resume
	// elsewhere would still find. When no leader answered at all (none
	// known, or the one known is cut off from this node: the first
	// seconds of a partition, before an election fails), this side has
	// no quorum and ids unknown here are served (guarantee 5); a session
	// opened elsewhere in the last moments before the cut may then
	// survive the clean start (documented in the README's known gaps).
	var err error
	if h.cfg.CleanBarrierErr != nil {
		err = h.cfg.CleanBarrierErr(id)
	}
	if err == nil {
		err = h.repl.SessionsBarrier(ctx)
	}
	if err != nil {
		if !noQuorum(err) && !noReadIndexInTime(err) {
			h.log.Warn("clean connect: this node could not catch up with the log in time; connection refused", "client", id, "error", err)
			return false
		}
		h.log.Info("clean connect without a read barrier (no leader answered): discarding the session this node knows of, if any",
			"client", id, "error", err)
	}
	s, ok := h.repl.SessionHead(id)
	if !ok {
		return true
	}
	h.log.Debug("clean connect discards the persistent session", "client", id, "opened", s.OpenedIndex)
	del := &replication.SessionDelete{ClientID: id, IfOpened: s.OpenedIndex}
	// The delete is conditional, so it is retried within the bound when
	// its outcome is unknown (the leader died while committing it): a
	// resume elsewhere right after this CONNACK must not find the session.
	// The takeover will is built again for each try (a new At): a retry
	// answering "unchanged" then says nothing about an earlier try, whose
	// live copies stay owed until its commit shows up (wills.go).
	var owe replication.Command = del
	if h.repl.OwedWillsSupported() {
		// A will of a connection elsewhere is owed by it, not deleted
		// with the session (replication/owed_will.go).
		owe = &replication.Batch{Commands: []replication.Command{
			&replication.OweWill{ClientID: id, IfOpened: s.OpenedIndex, Owner: h.cfg.Self}, del}}
	}
	for {
		tw := h.endingWill(id, true, time.Now().UnixMilli())
		cmd := tw.withTakeover(owe)
		var res replication.Result
		if res, err = h.repl.Apply(ctx, cmd); err == nil {
			tw.published(h, res, nil)
			h.log.Debug("clean connect discarded the persistent session", "client", id, "changed", res.Changed, "index", res.Index)
			return res.Changed || h.noSessionAt(ctx, id, res.Index)
		}
		if ctx.Err() != nil || errors.Is(err, replication.ErrInvalidCommand) || noQuorum(err) {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
	if noQuorum(err) {
		// Nothing was proposed. Serving the clean session would leave the
		// persistent one for the next resume to find (MQTT-3.1.2-4), so
		// this client id waits for a quorum; ids without a persistent
		// session are served without one (guarantee 5, the early return
		// above).
		h.log.Warn("clean connect without a raft quorum cannot discard the persistent session; connection refused", "client", id, "error", err)
		return false
	}
	// The log is there but the discard did not get through in time (the
	// leader died while committing it, or this node is stopping): refuse
	// the CONNECT (MQTT 5 0x88, 3.1.1 server unavailable) rather than
	// serve a clean session over a session a resume would still find. The
	// delete may have committed; finishing it in the background makes the
	// outcome definite.
	h.submit(sessOp{cmd: func() replication.Command { return owe }})
	h.log.Warn("clean connect: session discard not committed in time; connection refused", "client", id, "error", err)
	return false
}

// noSessionAt reports whether id has no session once this node has applied
// the log up to index: a clean CONNECT whose conditional discard changed
// nothing is served only then. The discard names the session this node
// saw; without a read barrier (no leader answered it) that view can be
// stale, so a session opened before this CONNECT by an earlier connection
// would survive the clean start when a leader accepted the discard after
// all. A session opened by a later connection of the id is not told apart
// from that: the CONNECT is refused either way (the later connection
// takes this one over anyway).
func (h *Sessions) noSessionAt(ctx context.Context, id string, index uint64) bool {
	if err := h.repl.WaitAppliedLocal(ctx, index); err != nil {
		h.log.Warn("clean connect: discard committed but not applied here in time; connection refused", "client", id, "error", err)
		return false
	}
	s, ok := h.repl.SessionHead(id)
	if ok {
		h.log.Warn("clean connect: a session this node did not see survived the discard; connection refused",
			"client", id, "opened", s.OpenedIndex, "discard", index)
	}
	return !ok
}

// noQuorum reports whether err says that a write was not proposed because
// no leader is known (a side without a quorum), as opposed to a write whose
// outcome is unknown.
// noReadIndexInTime: no leader gave a read index during the whole bound
// (asked again and again: an error that passes, like a leader stopping in
// a rolling restart, does not count).
func noReadIndexInTime(err error) bool {
	return errors.Is(err, replication.ErrNoReadIndex) && errors.Is(err, replication.ErrTimeout)
}

func noQuorum(err error) bool {
	return errors.Is(err, replication.ErrNoLeader) && !errors.Is(err, replication.ErrUnknownOutcome)
}

// disconnectGrace is how long a resuming CONNECT waits for a live
// connection of the same client on this node to end by itself before
// taking it over (its DISCONNECT may still be being processed: 100 ms was
// too short on a loaded 2-core machine).
const disconnectGrace = 500 * time.Millisecond

// awaitDisconnectInFlight: a client that sends DISCONNECT and reconnects
// at once uses two connections, read by two goroutines, so the new CONNECT
// can be processed before the DISCONNECT. The session would then be taken
// over as it was (resumed, where the DISCONNECT may have ended it, e.g.
// with session expiry 0), and the DISCONNECT applied to nothing. A
// resuming CONNECT therefore gives a live previous connection here up to
// disconnectGrace to end; one that does not is taken over as before (a
// half-open connection, or two instances sharing a client id).
func (h *Sessions) awaitDisconnectInFlight(id string) {
	old, ok := h.server.Clients.Get(id)
	if !ok || old.Closed() || old.Net.Inline {
		return
	}
	deadline := time.Now().Add(disconnectGrace)
	t := time.NewTicker(2 * time.Millisecond)
	defer t.Stop()
	for !old.Closed() && time.Now().Before(deadline) {
		select {
		case <-t.C:
		case <-h.base.Done():
			return
		}
	}
}

// previousCloseTimeout bounds how long a CONNECT waits for the close of
// the same client's previous connection on this node to be written (one
// replicated write; seconds under load, so the bound is the write timeout's
// order, not a round trip's).
const previousCloseTimeout = 5 * time.Second

// awaitPreviousClose waits (briefly) until the close of this client's
// previous persistent connection on this node, if it just ended, is in
// the log. A client that sends DISCONNECT (say with session expiry 0) and
// reconnects at once must find the session as that DISCONNECT left it;
// the close is written asynchronously, and without this wait the new
// SessionOpen could overtake it: the session would be resumed, and the
// late close then ignored as stale. old is the live connection of the id
// here, if any; one still open is being taken over, not closed: no wait.
//
// Across nodes there is no such ordering: a reconnect elsewhere within
// milliseconds of DISCONNECT may still overtake the close.
func (h *Sessions) awaitPreviousClose(id string, old *sessConn) {
	h.mu.Lock()
	prev := h.closing[id]
	h.mu.Unlock()
	if prev == nil && old != nil && old.cl.Closed() {
		prev = old // ended, its OnDisconnect not run yet
	}
	if prev == nil || prev.closeDone == nil {
		return
	}
	ctx, cancel := context.WithTimeout(h.base, previousCloseTimeout)
	defer cancel()
	select {
	case <-prev.closeDone:
	case <-ctx.Done():
		h.log.Debug("previous connection's close not written in time; opening anyway", "client", id)
		return
	}
	// Committed is not applied here: on a follower the CONNECT would
	// still read the session the close deleted, fence its open to it and
	// be refused as a resume of a deleted session (TestPahoSessionExpiry,
	// one node: a DISCONNECT with expiry 0, then a resume at once, failed
	// three runs in four).
	if idx := prev.closeIndex.Load(); idx > 0 {
		if err := h.repl.WaitAppliedLocal(ctx, idx); err != nil {
			h.log.Debug("previous connection's close not applied here in time; opening anyway", "client", id, "error", err)
		}
	}
}

// awaitMochiSessionEnd waits (at most previousCloseTimeout) until mochi
// has removed the ended session of this client's previous connection here,
// when that session ended with its connection (MQTT 5 expiry 0, 3.1.1
// clean session 1) but mochi's connection goroutine has not yet deleted
// it. For a CONNECT with clean start 0 that mochi serves alone, mochi would
// otherwise inherit that session (subscriptions and all) and answer
// session present 1 to a client that reconnects at once.
func (h *Sessions) awaitMochiSessionEnd(id string) {
	old, ok := h.server.Clients.Get(id)
	if !ok || !old.Closed() {
		return // none, or a live connection being taken over
	}
	// Only the fields set at CONNECT: copying all of Properties would read
	// the Will that mochi clears as the old connection ends (CI: a race).
	v, expiry, clean := old.Properties.ProtocolVersion, old.Properties.Props.SessionExpiryInterval, old.Properties.Clean
	if !session.EndsWithConnection(v, expiry, clean) {
		return
	}
	deadline := time.Now().Add(previousCloseTimeout)
	t := time.NewTicker(2 * time.Millisecond)
	defer t.Stop()
	for time.Now().Before(deadline) {
		if cur, ok := h.server.Clients.Get(id); !ok || cur != old {
			return
		}
		select {
		case <-t.C:
		case <-h.base.Done():
			return
		}
	}
	h.log.Debug("previous connection's session still in mochi; it may be inherited", "client", id)
}

// closeWritten records that c's close is in the log (or was not needed).
func (h *Sessions) closeWritten(c *sessConn) {
	if c.closeDone != nil {
		c.closeOnce.Do(func() { close(c.closeDone) })
	}
	h.mu.Lock()
	if h.closing[c.id] == c {
		delete(h.closing, c.id)
	}
	h.mu.Unlock()
}

// expiredSessionDelete returns the conditional delete of id's session if
// it has expired (a resume then starts a new one), else nil.
func (h *Sessions) expiredSessionDelete(id string, now int64) replication.Command {
	if s, ok := h.repl.SessionHead(id); ok {
		return session.ExpiredDelete(id, s, now)
	}
	return nil
}

// closeCommands is what ends a persistent connection in the log
// (session.CloseCommands).
func (h *Sessions) closeCommands(cl *mqtt.Client, c *sessConn, err error) replication.Command {
	return session.CloseCommands(session.Close{ClientID: c.id, Owner: h.cfg.Self, Opened: c.opened.Load(),
		At: time.Now().UnixMilli(), Expiry: c.expiry, ProtocolVersion: cl.Properties.ProtocolVersion,
		ExpirySet: cl.Properties.Props.SessionExpiryIntervalFlag, ExpiryProp: cl.Properties.Props.SessionExpiryInterval,
		MaxExpiry: h.server.Options.Capabilities.MaximumSessionExpiryInterval, Disconnect: err == nil, Will: c.will})
}
