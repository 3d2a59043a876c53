package hooks

import (
	"context"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/internal/session"
	"github.com/mqtt-ha/broker/replication"
)

// Maintenance: every node closes its own stale sessions; the leader closes
// the sessions of dead nodes and publishes due wills.

func (h *Sessions) pokeWills() {
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

// maintain runs on every node. Each node closes the sessions the log says
// it holds but that have no connection here (left over from before a
// restart); the leader also closes the sessions of dead nodes and
// publishes wills that are due.
func (h *Sessions) maintain() {
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
		case <-h.wake:
		}
		h.closeStale()
		h.expireClaims()
		if h.repl.IsLeader() {
			h.closeDeadOwners()
			h.publishDueWills()
			h.releaseDeadOwners()
		}
		if h.cfg.AfterMaintain != nil {
			h.cfg.AfterMaintain()
		}
	}
}

// closeStale closes sessions owned by this node and marked connected with
// no connection here, once seen twice (a connection being established has
// its SessionOpen committed before it is registered). Not while this node
// stops gracefully: the connections the stop ended leave their sessions
// open for the leave grace (wills.go), and closing them would make their
// wills due although the clients reconnect elsewhere.
func (h *Sessions) closeStale() {
	if !h.repl.HasLeader() || h.inRestartGrace() || h.stopping.active.Load() {
		return
	}
	seen := map[string]uint64{}
	for _, s := range h.repl.SessionsOwnedBy(h.cfg.Self) {
		if !s.Connected || h.isLive(s.ClientID, s.OpenedIndex) {
			continue
		}
		seen[s.ClientID] = s.OpenedIndex
		if h.stale[s.ClientID] == s.OpenedIndex {
			id, opened := s.ClientID, s.OpenedIndex
			// A connection that owed no will (its CONNECT was refused
			// after an open committed) leaves none due.
			willless := false
			if full, ok := h.repl.SessionHead(id); ok {
				h.mu.Lock()
				_, willless = h.willless[willlessKey{id, full.OpenedAt}]
				h.mu.Unlock()
			}
			h.submit(sessOp{cmd: func() replication.Command {
				return &replication.SessionClose{ClientID: id, Owner: h.cfg.Self, IfOpened: opened, At: time.Now().UnixMilli(),
					WillPublished: willless}
			}})
			delete(seen, s.ClientID)
		}
	}
	h.stale = seen
	h.closeStaleOwed()
}

func (h *Sessions) isLive(id string, opened uint64) bool {
	h.mu.Lock()
	if c := h.live[id]; c != nil && c.opened.Load() == opened {
		h.mu.Unlock()
		return true
	}
	var late []*sessConn
	for _, c := range h.conns {
		if c.id != id {
			continue
		}
		if c.opened.Load() == opened || (c.opened.Load() == 0 && c.unmirrored == nil) {
			h.mu.Unlock()
			return true
		}
		if c.opened.Load() == 0 && c.unmirrored != nil {
			late = append(late, c)
		}
	}
	openingAt := h.opening[id]
	h.mu.Unlock()
	// A CONNECT still writing its open (retrying after an unknown
	// outcome) may have opened this session already.
	if openingAt != 0 {
		if s, ok := h.repl.SessionHead(id); ok && s.Owner == h.cfg.Self && s.OpenedAt == openingAt && s.OpenedIndex == opened {
			return true
		}
	}
	// A clean session's mirror that committed after its write timed out
	// belongs to a connection that is still here.
	for _, c := range late {
		if s, ok := h.lateMirror(c); ok && s.OpenedIndex == opened {
			if !c.cl.Closed() {
				h.adoptLateMirror(c, s)
			}
			return true
		}
	}
	return false
}

// closeDeadOwners closes, on their owner's behalf, the sessions of nodes
// that have not been alive for DeadAfter; their wills then become due.
func (h *Sessions) closeDeadOwners() {
	now := time.Now()
	var b replication.Batch
	owners := map[string]bool{}
	// gone reports whether owner has been dead long enough, and notes
	// since when it is (h.dead) once per round.
	gone := func(owner string) bool {
		dead, known := owners[owner]
		if !known {
			dead = !h.cfg.Alive(owner)
			owners[owner] = dead
			if !dead {
				delete(h.dead, owner)
			} else if _, ok := h.dead[owner]; !ok {
				h.dead[owner] = now
			}
		}
		return dead && now.Sub(h.dead[owner]) >= h.goneAfter(owner)
	}
	for _, s := range h.repl.Sessions() {
		if !s.Connected || s.Owner == h.cfg.Self || s.Owner == session.ImportOwner {
			continue
		}
		if gone(s.Owner) {
			b.Commands = append(b.Commands, &replication.SessionClose{ClientID: s.ClientID, Owner: s.Owner,
				IfOpened: s.OpenedIndex, At: now.UnixMilli()})
		}
	}
	b.Commands = append(b.Commands, h.closeDeadOwed(gone)...)
	if len(b.Commands) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), h.cfg.Timeout)
	defer cancel()
	if _, err := h.repl.Apply(ctx, &b); err != nil {
		h.log.Warn("closing sessions of a dead node failed", "count", len(b.Commands), "error", err)
		return
	}
	h.log.Info("closed the sessions of dead nodes", "count", len(b.Commands))
}

// publishDueWills claims and publishes every will whose delay (or session
// expiry, if sooner) has passed since its session was closed.
func (h *Sessions) publishDueWills() {
	now := time.Now().UnixMilli()
	for _, s := range h.repl.Sessions() {
		if s.Connected || !s.HasWill {
			continue
		}
		full, ok := h.repl.SessionHead(s.ClientID)
		if !ok || !session.WillDue(full, now) || h.cfg.HoldWillClaims != nil && h.cfg.HoldWillClaims(s.ClientID) {
			continue
		}
		id, will := s.ClientID, full.Will
		claim := h.claimWill(id, full.OpenedIndex)
		h.expectClaim(id, claim.At, func() {
			if h.cfg.AfterWillClaim != nil && !h.cfg.AfterWillClaim(id) {
				return
			}
			h.publishWill(id, will)
		})
		h.applyClaim(id, claim)
	}
	h.publishDueOwed()
}

// applyClaim writes claim and settles its expectation under key.
func (h *Sessions) applyClaim(key string, claim *replication.PublishWill) {
	ctx, cancel := context.WithTimeout(context.Background(), h.cfg.Timeout)
	res, err := h.repl.Apply(ctx, claim)
	cancel()
	if err == nil {
		h.enqueued(res) // copies dropped by full queues are counted and logged
	}
	// Unchanged: reconnected, or claimed by someone else meanwhile.
	h.settleClaim(key, claim.At, res.Changed, err)
}

func (h *Sessions) publishWill(id string, w *replication.Will) {
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: w.QoS, Retain: w.Retain},
		TopicName:   w.Topic,
		Payload:     w.Payload,
		Properties: packets.Properties{MessageExpiryInterval: w.ExpirySeconds,
			PayloadFormat: w.Properties.PayloadFormat, PayloadFormatFlag: w.Properties.PayloadFormat != 0,
			ContentType: w.Properties.ContentType, ResponseTopic: w.Properties.ResponseTopic,
			CorrelationData: w.Properties.CorrelationData},
	}
	for _, u := range w.Properties.UserProperties {
		pk.Properties.User = append(pk.Properties.User, packets.UserProperty{Key: u.Key, Val: u.Value})
	}
	if pk.FixedHeader.Qos > 0 {
		pk.PacketID = 1
	}
	if err := h.server.InjectPacket(h.willCl, pk); err != nil {
		h.log.Warn("will not published", "client", id, "topic", w.Topic, "error", err)
		return
	}
	h.m.wills.Inc()
	h.log.Info("published the will of a disconnected session", "client", id, "topic", w.Topic)
}
