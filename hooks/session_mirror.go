package hooks

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/internal/session"
	"github.com/mqtt-ha/broker/replication"
)

// A clean session's will is mirrored in the log (a SessionOpen with expiry
// 0 and a SetWill), so that a survivor can publish it when this node dies.
// One rule keeps it from being published twice: once the mirror is in the
// log, mochi's own copy is cleared, and the will is published only through
// a conditional claim in the log (PublishWill, which the leader makes once
// the mirror is closed, by this node when the connection drops or on this
// node's behalf when it is declared dead). Whoever closes the mirror
// first, the claim happens once. Only when the log cannot be written (no
// quorum) does this node publish the will itself, at disconnect; on a
// minority side that can repeat a will the majority already published for
// a node it declared dead.
//
// Before, mochi published the will locally and the mirror was only
// deleted, which published it twice whenever the leader had already
// closed the mirror and this node did not know yet: a node catching up
// (observers run after a whole batch), one that installed a snapshot (no
// events), one resumed after a pause, or one cut off by a partition.

// mirrorOpenTimeout bounds the mirror's write before CONNACK. A clean
// session must be served without a quorum (guarantee 5), so it never waits
// longer; without the mirror, mochi keeps the will and publishes it.
const mirrorOpenTimeout = 2 * time.Second

// openMirror writes c's mirror (which also discards any older session of
// the client id: the SessionOpen has clean start) before CONNACK and, once
// it is in the log, clears mochi's copy of the will. It reports whether
// the mirror was written; if not, the will stays mochi's.
func (h *Sessions) openMirror(c *sessConn, cl *mqtt.Client, pk packets.Packet, arrival int64) bool {
	openAt := h.nextOpenAt(time.Now().UnixMilli())
	c.openAt = openAt
	defer h.markOpening(cl.ID, openAt)()
	// Apply waits for a leader (a node just restarted learns it within an
	// election) but fails fast on a side that has had none for a while.
	ctx, cancel := context.WithTimeout(h.base, mirrorOpenTimeout)
	defer cancel()
	open, _, tw, res, err := h.applyOpen(ctx, cl, pk, 0, openAt, arrival, nil)
	tw.published(h, res, err)
	if err != nil {
		// A late commit is harmless: the mirror then stays until the leader
		// finds its owner gone, or the client reconnects (clean start).
		// PrepareStop tries again before a graceful stop.
		h.log.Warn("will of a clean session not mirrored in the log; published by this node only", "client", c.id, "error", err)
		c.unmirrored = open
		return false
	}
	h.mirrored(c, cl, res.Index)
	return true
}

// lateMirror finds, for a connection whose mirror write failed with an
// unknown outcome (c.unmirrored), that mirror in the log if it committed
// after all: the session this node opened with the same At.
func (h *Sessions) lateMirror(c *sessConn) (replication.Session, bool) {
	at := session.OpenAtOf(c.unmirrored)
	s, ok := h.repl.SessionHead(c.id)
	if at == 0 || !ok || s.Owner != h.cfg.Self || s.OpenedAt != at {
		return replication.Session{}, false
	}
	return s, true
}

// adoptLateMirror makes c, whose mirror write timed out but committed
// after all (s), a mirrored connection: mochi's copy of the will is
// cleared first, then the mirror recorded, so that when the connection
// ends the will goes through the log (the leader's claim queues it for
// persistent sessions too, which mochi's own publication would miss) and
// once.
func (h *Sessions) adoptLateMirror(c *sessConn, s replication.Session) {
	atomic.StoreUint32(&c.cl.Properties.Will.Flag, 0)
	h.mirrored(c, c.cl, s.OpenedIndex)
	h.mu.Lock()
	c.mirror = true
	if h.conns[c.cl] == c && h.mirrors[c.id] == nil {
		h.mirrors[c.id] = c
	}
	h.mu.Unlock()
	h.log.Info("clean session's will mirror committed late; adopted", "client", c.id)
}

// mirrored records that c's mirror is in the log at index and takes the
// will from mochi.
func (h *Sessions) mirrored(c *sessConn, cl *mqtt.Client, index uint64) {
	c.opened.Store(index)
	if sw, ok := h.setWill(cl).(*replication.SetWill); ok {
		w := sw.Will
		c.mirrorWill.Store(&w)
	}
	atomic.StoreUint32(&cl.Properties.Will.Flag, 0)
}

// endMirror ends c's mirror when its connection ends. DISCONNECT discards
// the will (MQTT-3.1.2-10), so the mirror is deleted; any other end closes
// it, and the leader then claims and publishes the will once
// (publishDueWills). If the close certainly cannot be written (no leader),
// this node publishes the will itself (closeMirror).
func (h *Sessions) endMirror(c *sessConn, err error) {
	opened := c.opened.Load()
	if opened == 0 && c.unmirrored != nil {
		// A mirror that committed late and was not adopted yet (see
		// adoptLateMirror): end it like an adopted one.
		if s, ok := h.lateMirror(c); ok {
			opened = s.OpenedIndex
		}
	}
	if opened == 0 {
		return // not mirrored: mochi had the will
	}
	if err == nil {
		// The close discards a will owed by this connection too (a
		// CONNECT elsewhere replaced it: replication/owed_will.go).
		h.submit(sessOp{cmd: func() replication.Command {
			return &replication.Batch{Commands: []replication.Command{
				&replication.SessionClose{ClientID: c.id, Owner: h.cfg.Self, IfOpened: opened, At: time.Now().UnixMilli(), WillPublished: true},
				&replication.SessionDelete{ClientID: c.id, IfOpened: opened}}}
		}})
		return
	}
	closeCmd := &replication.SessionClose{ClientID: c.id, Owner: h.cfg.Self, IfOpened: opened, At: time.Now().UnixMilli()}
	go h.closeMirror(c, closeCmd)
}

// closeMirror writes a dropped clean session's close until it is
// committed. The close is conditional (IfOpened), so retrying it is safe,
// and once it is in the log the leader claims and publishes the will
// exactly once. This node publishes the will itself only when no attempt
// can have been proposed (no leader at each try): an attempt whose outcome
// is unknown may be committed, and the leader's claim would then publish
// the will a second time, so after one the close is retried until it
// succeeds (the will is then late rather than twice).
//
// A will published here without a quorum reaches this side's clean
// subscribers only: persistent sessions and the retained store need the
// log. So the close is still retried, now with this node's own claim in
// the same entry (PublishWill: queued for persistent sessions, retained
// where asked, no second live copy) once the quorum is back. Before, the
// stale-session sweep closed the mirror then and the leader's claim sent
// the live copies a second time. (If the client opens a new session
// elsewhere first, its open leaves the will owed by this connection, and
// this close, redirected to it, makes it due: owedwills.go.)
func (h *Sessions) closeMirror(c *sessConn, closeCmd *replication.SessionClose) {
	unknown := false
	var cmd replication.Command = closeCmd
	published := false
	for {
		ctx, cancel := context.WithTimeout(context.Background(), h.cfg.Timeout)
		_, err := h.repl.Apply(ctx, cmd)
		cancel()
		switch {
		case err == nil:
			if !published {
				h.pokeWills()
			}
			return
		case errors.Is(err, replication.ErrInvalidCommand), errors.Is(err, replication.ErrClosed):
			h.log.Warn("clean session's will mirror not closed", "client", c.id, "error", err)
			return
		case !published && !unknown && errors.Is(err, replication.ErrNoLeader) && !errors.Is(err, replication.ErrUnknownOutcome) &&
			c.mirrorWill.Load() != nil && !c.willTaken.Load():
			h.log.Warn("clean session's will mirror not closed in the log (no quorum); publishing the will here, and in the log once it is back", "client", c.id, "error", err)
			h.publishWill(c.id, c.mirrorWill.Load())
			published = true
			cmd = &replication.Batch{Commands: []replication.Command{closeCmd, h.claimWill(c.id, closeCmd.IfOpened)}}
		}
		unknown = unknown || !errors.Is(err, replication.ErrNoLeader) || errors.Is(err, replication.ErrUnknownOutcome)
		select {
		case <-h.stop:
			return
		case <-time.After(500 * time.Millisecond):
		}
	}
}
