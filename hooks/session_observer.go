package hooks

import (
	"sync/atomic"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/replication"
)

// The raft observer: this node's reaction to committed session changes,
// and its mirror of every persistent session's subscriptions.

// Apply is the raft observer for session changes (log order, on raft's
// FSM goroutine: it must not block).
func (h *Sessions) Apply(ch replication.SessionChange) {
	switch ch.Kind {
	case replication.SessionSubscribed:
		if s, ok := h.repl.SessionHead(ch.ClientID); ok {
			for _, f := range ch.Filters {
				if sub, ok := s.Subscriptions[f]; ok {
					h.index(ch.ClientID, sub)
				}
			}
		}
	case replication.SessionUnsubscribed:
		for _, f := range ch.Filters {
			h.unindex(ch.ClientID, f)
		}
	case replication.SessionDeleted:
		h.unindexAll(ch.ClientID)
	case replication.WillCleared:
		// A claim of this node whose write's reply did not say so
		// (wills.go): its live copies are owed now.
		if ch.At != 0 {
			if c, ok := h.claims.Take(ch.ClientID, ch.At); ok {
				go c.Publish()
			}
		}
	case replication.WillOwedPublished:
		// The leader's claim, or a clean CONNECT's PublishWill (filed
		// under the client id) that found the will owed.
		if ch.At != 0 {
			if c, ok := h.claims.Take(owedClaimKey(ch.ClientID, ch.Opened), ch.At); ok {
				go c.Publish()
			} else if c, ok := h.claims.Take(ch.ClientID, ch.At); ok {
				go c.Publish()
			}
		}
	case replication.WillOwed:
		h.log.Debug("will owed by a replaced connection", "client", ch.ClientID, "owner", ch.Owner, "index", ch.Index)
	case replication.WillOwedDue:
		h.pokeWills()
	case replication.QueueAppended:
		h.mu.Lock()
		c := h.live[ch.ClientID]
		h.mu.Unlock()
		if c != nil {
			c.pump.poke()
		}
	case replication.SessionOpened:
		// One line per open, so that a chaos run's node logs say which
		// open made a session present (clean-start-session-present).
		h.log.Debug("session opened", "client", ch.ClientID, "owner", ch.Owner, "index", ch.Index, "present", ch.Present)
		h.mu.Lock()
		c := h.live[ch.ClientID]
		if ch.Owner == h.cfg.Self && ch.At != 0 && h.opening[ch.ClientID] == ch.At && h.openSeen[ch.ClientID] == 0 {
			h.openSeen[ch.ClientID] = ch.Index // the first of its tries to commit
		}
		h.mu.Unlock()
		if ch.Owner == h.cfg.Self && ch.At != 0 && !ch.Present {
			h.undoAbandoned(ch.ClientID, ch.At)
		}
		if c != nil && c.opened.Load() != ch.Index && c.opened.Load() != 0 && ch.Owner != h.cfg.Self {
			// Resumed on another node: this connection is stale.
			h.drop(c, packets.ErrSessionTakenOver)
		}
	case replication.SessionClosed:
		h.mu.Lock()
		c := h.live[ch.ClientID]
		m := h.mirrors[ch.ClientID]
		h.mu.Unlock()
		if m != nil && m.opened.Load() != 0 {
			if s, ok := h.repl.SessionHead(ch.ClientID); ok && s.OpenedIndex == m.opened.Load() {
				// A clean session's mirror is only ever closed by the
				// leader on this node's behalf (this node was declared
				// dead): its will is the leader's to publish now, and the
				// client must learn it was declared gone.
				m.closedByLeader.Store(true)
				h.drop(m, packets.ErrAdministrativeAction)
			}
		}
		if c != nil {
			if s, ok := h.repl.SessionHead(ch.ClientID); ok && !s.Connected && s.OpenedIndex == c.opened.Load() {
				// Closed by the leader on our behalf (this node was
				// declared dead, e.g. paused): the client must reconnect
				// so that its session is open again.
				h.drop(c, packets.ErrAdministrativeAction)
			}
		}
		if ch.Will != nil {
			h.pokeWills()
		}
	}
}

func (h *Sessions) drop(c *sessConn, code packets.Code) {
	h.log.Info("disconnecting a connection whose session moved on in the log", "client", c.id, "reason", code.Reason)
	if c.pump != nil {
		c.pump.stop()
	}
	atomic.StoreUint32(&c.cl.Properties.Will.Flag, 0)
	go func() {
		if c.cl.Properties.ProtocolVersion == 5 {
			_ = h.server.DisconnectClient(c.cl, code)
		} else {
			c.cl.Stop(code)
		}
	}()
}

// Resync rebuilds the subscription mirror from the log (after a snapshot
// restore, including at start-up) and wakes every pump.
func (h *Sessions) Resync() {
	idx, subs := mqtt.NewTopicsIndex(), map[string]map[string]struct{}{}
	for _, s := range h.repl.Sessions() {
		full, ok := h.repl.SessionHead(s.ClientID)
		if !ok {
			continue
		}
		for _, sub := range full.Subscriptions {
			indexInto(idx, subs, s.ClientID, sub)
		}
	}
	h.idxMu.Lock()
	h.idx.Store(idx)
	h.idxSubs = subs
	h.idxMu.Unlock()
	h.mu.Lock()
	for _, c := range h.live {
		c.pump.poke()
	}
	h.mu.Unlock()
}

func (h *Sessions) index(id string, sub replication.Subscription) {
	h.idxMu.Lock()
	defer h.idxMu.Unlock()
	indexInto(h.idx.Load(), h.idxSubs, id, sub)
}

func indexInto(idx *mqtt.TopicsIndex, subs map[string]map[string]struct{}, id string, sub replication.Subscription) {
	if isSharedFilter(sub.Filter) {
		return
	}
	idx.Subscribe(id, packets.Subscription{Filter: sub.Filter, Qos: sub.QoS, NoLocal: sub.NoLocal,
		RetainAsPublished: sub.RetainAsPublished, RetainHandling: sub.RetainHandling, Identifier: int(sub.Identifier)})
	fs := subs[id]
	if fs == nil {
		fs = map[string]struct{}{}
		subs[id] = fs
	}
	fs[sub.Filter] = struct{}{}
}

func (h *Sessions) unindex(id, filter string) {
	h.idxMu.Lock()
	defer h.idxMu.Unlock()
	h.idx.Load().Unsubscribe(filter, id)
	delete(h.idxSubs[id], filter)
}

func (h *Sessions) unindexAll(id string) {
	h.idxMu.Lock()
	defer h.idxMu.Unlock()
	for f := range h.idxSubs[id] {
		h.idx.Load().Unsubscribe(f, id)
	}
	delete(h.idxSubs, id)
}
