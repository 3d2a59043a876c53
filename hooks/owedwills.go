package hooks

import (
	"strconv"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/mqtt-ha/broker/replication"
)

// Owed wills (replication/owed_will.go): a CONNECT that replaces a
// connection the log shows connected on another node moves that
// connection's will aside, owed by it, rather than deleting it. The old
// node settles it when the connection ends: its own close (SessionClose
// addressed to the connection's OpenedIndex; with WillPublished for a
// DISCONNECT) does, as for a session's will. Here are the other ways:
//
//   - a connection that ends without writing anything, because the
//     graceful stop told it to go or because it was taken over, settles
//     it here (settleOwed): no will after a stop (guarantee 4); after a
//     takeover, the will is due if the takeover ended the session and
//     discarded if the session continued, as TakeoverWill does on one
//     node;
//   - an owed will of this node with no connection here is settled by the
//     stale sweep (closeStaleOwed): discarded if this node knows its
//     connection owed no will (it ended with DISCONNECT or by the stop,
//     or its CONNECT was refused: willless), or if it is from a run of
//     this node that stopped gracefully; due otherwise (the connection
//     dropped and its close could not be written, the node crashed);
//   - the leader closes the owed wills of dead nodes after DeadAfter, as
//     their sessions, and publishes the due ones (publishDueOwed).

// willlessFor is how long a node remembers a connection that ended owing
// no will: longer than any write of its close is retried.
const willlessFor = 10 * time.Minute

// willlessKey names a connection of this node by its open's At (unique
// per node, session.OpenClock).
type willlessKey struct {
	id string
	at int64
}

// noWillOwed records that c, whose will is in the log, ended owing none
// (DISCONNECT, the graceful stop, a refused CONNECT), for closeStale and
// closeStaleOwed: its close may not reach the log (cut off for longer
// than the session writer retries).
func (h *Sessions) noWillOwed(c *sessConn) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if c.openAt == 0 || !c.will && !c.mirror { // c.mirror: under mu
		return // no will of it in the log
	}
	h.willless[willlessKey{c.id, c.openAt}] = time.Now()
}

// owedClaimKey is the key of an owed will's claim in h.claims, apart from
// the claims of the client's current session and of its other owed wills
// (a client id has no U+0000, MQTT-1.5.4-2).
func owedClaimKey(id string, opened uint64) string {
	return id + "\x00owed\x00" + strconv.FormatUint(opened, 10)
}

// settleOwed settles the will owed by c's connection, ending now without a
// close of its own: discarded when the graceful stop told the client to go
// or the takeover let the session continue, due otherwise.
func (h *Sessions) settleOwed(c *sessConn, cl *mqtt.Client) {
	opened := c.opened.Load()
	if opened == 0 {
		return
	}
	w, ok := h.repl.OwedWill(c.id, opened)
	if !ok || w.Owner != h.cfg.Self || w.Closed {
		return
	}
	due := w.EndsSession && !h.stoppingNow(cl)
	h.submit(sessOp{cmd: func() replication.Command { return h.owedSettlement(w, due) }})
}

// owedSettlement is this node's close of the connection that owes w: the
// will is due, or discarded (WillPublished).
func (h *Sessions) owedSettlement(w replication.OwedWill, due bool) replication.Command {
	return &replication.SessionClose{ClientID: w.ClientID, Owner: h.cfg.Self, IfOpened: w.Opened,
		At: time.Now().UnixMilli(), WillPublished: !due}
}

type owedKey struct {
	id     string
	opened uint64
}

// closeStaleOwed settles, once seen twice, the wills this node owes for
// connections it no longer has (as closeStale does for sessions; called
// by it, so not during a graceful stop or the restart grace).
func (h *Sessions) closeStaleOwed() {
	now := time.Now()
	h.mu.Lock()
	for k, at := range h.willless {
		if now.Sub(at) > willlessFor {
			delete(h.willless, k)
		}
	}
	h.mu.Unlock()
	seen := map[owedKey]bool{}
	for _, w := range h.repl.OwedWills() {
		if w.Owner != h.cfg.Self || w.Closed || h.isLive(w.ClientID, w.Opened) {
			continue
		}
		k := owedKey{w.ClientID, w.Opened}
		seen[k] = true
		if !h.staleOwed[k] {
			continue
		}
		delete(seen, k)
		h.mu.Lock()
		_, willless := h.willless[willlessKey{w.ClientID, w.OpenedAt}]
		h.mu.Unlock()
		// A connection of a run that stopped gracefully was told to go.
		earlierRun := h.cfg.RestartedAfterStop && w.Opened <= h.repl.StartIndex()
		due := !willless && !earlierRun
		h.submit(sessOp{cmd: func() replication.Command { return h.owedSettlement(w, due) }})
	}
	h.staleOwed = seen
}

// closeDeadOwed closes the owed wills of nodes gone for goneAfter (gone
// reports that, as closeDeadOwners keeps it).
func (h *Sessions) closeDeadOwed(gone func(owner string) bool) []replication.Command {
	var cmds []replication.Command
	now := time.Now().UnixMilli()
	for _, w := range h.repl.OwedWills() {
		if w.Closed || w.Owner == h.cfg.Self || !gone(w.Owner) {
			continue
		}
		cmds = append(cmds, &replication.SessionClose{ClientID: w.ClientID, Owner: w.Owner, IfOpened: w.Opened, At: now})
	}
	return cmds
}

// publishDueOwed claims and publishes the owed wills that are due (their
// connection closed), as publishDueWills does for sessions' wills.
func (h *Sessions) publishDueOwed() {
	for _, w := range h.repl.OwedWills() {
		if !w.Closed || h.cfg.HoldWillClaims != nil && h.cfg.HoldWillClaims(w.ClientID) {
			continue
		}
		id, key, will := w.ClientID, owedClaimKey(w.ClientID, w.Opened), w.Will
		claim := h.claimWill(id, w.Opened)
		h.expectClaim(key, claim.At, func() {
			if h.cfg.AfterWillClaim != nil && !h.cfg.AfterWillClaim(id) {
				return
			}
			h.publishWill(id, &will)
		})
		h.applyClaim(key, claim)
	}
}
