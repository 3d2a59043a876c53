package hooks

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/internal/session"
	"github.com/mqtt-ha/broker/replication"
)

// Wills the leader publishes (persistent sessions, and the clean sessions
// of nodes that are gone: see Sessions.publishDueWills).
//
// The claim is the publication: replication.PublishWill clears the will
// and, in the same log entry, queues it for every matching persistent
// session and stores it as the retained value when it is retained. What
// is left to the claiming node afterwards is best effort: the live copies
// for connected clean sessions and QoS 0 subscribers, here and (through
// the cluster hook) on the other nodes. If the leader dies between the
// commit and that live publication, those copies are lost, never the
// queued ones nor the retained value. The will publisher's own publish is
// therefore skipped by the hooks that would write it to the log again
// (Sessions.OnPublish, Retained.OnPublish).

// claimWill is the command that claims (and publishes in the log) the will
// of the session opened at index opened.
func (h *Sessions) claimWill(id string, opened uint64) *replication.PublishWill {
	return session.ClaimWill(id, opened, time.Now().UnixMilli(), h.cfg.MaxQueued)
}

// The live copies of a claimed will follow the claim's commit, not its
// write's reply: h.claims (session.Claims) records what this node owes.
//
// At is a millisecond clock: two nodes claiming the same will in the same
// millisecond with the same At would both publish the live copies (the
// queued and retained ones are in the log once). The leader claims the
// will of a disconnected session, the owner that of a connected one
// (takeover), and a clean CONNECT anywhere that of the session it ends
// (endingWill): the leader and such a CONNECT claiming in the same
// millisecond is the known way to get a will's live copies twice (found by
// review, not fixed: the claim would need the claimer's id).

// expectClaim records that this node writes the claim of id's will at At
// at, and what to publish once it is committed.
func (h *Sessions) expectClaim(id string, at int64, publish func()) {
	h.claims.Expect(id, at, time.Now(), publish)
}

// settleClaim pays id's claim at at when its write's result says it
// changed the state, and forgets it when the result says it changed
// nothing. After an error it stays owed until its commit shows up (Apply)
// or session.ClaimDebtTTL passes.
func (h *Sessions) settleClaim(id string, at int64, changed bool, err error) {
	if err != nil {
		h.log.Info("will claim's outcome unknown; its live copies go out if it commits", "client", id, "error", err)
	}
	if c, ok := h.claims.Settle(id, at, changed, err); ok {
		c.Publish()
	}
}

// expireClaims drops claims that never committed.
func (h *Sessions) expireClaims() { h.claims.Expire(time.Now(), session.ClaimDebtTTL) }

// isWillPublisher reports whether cl is the inline client that publishes
// the wills claimed in the log.
func isWillPublisher(cl *mqtt.Client) bool {
	return cl.Net.Inline && cl.ID == willClientID
}

// Graceful stops (DESIGN.md guarantee 4: a graceful stop fires no will of
// a client that reconnects elsewhere).
//
// A node that stops gracefully (SIGTERM) disconnects its clients (MQTT 5:
// 0x8B) and leaves the sessions open in the log, owned by it: persistent
// sessions as they are, and clean sessions' will mirrors too, whose will
// mochi would otherwise publish at once (PrepareStop clears it in mochi
// and the mirror keeps it). The leader sees the node as left, not dead,
// and closes those sessions on its behalf only after LeaveGrace; a client
// that reconnects anywhere before that opens its session again (or, clean,
// ends the old mirror), so its will never fires. One that does not come
// back is then treated as a disconnect without DISCONNECT: its will is
// published after its will delay (or when the session expires, if sooner;
// a clean session's at once), counted from the end of the grace.
//
// A node that restarts after a graceful stop (rolling restart) finds its
// old sessions in the log without connections: it closes them only after
// LeaveGrace from its start, for the same reason. After a crash it closes
// them at once (closeStale), as before.
//
// mochi alone publishes every will on Close (its DisconnectClient makes
// the read loop fail, and sendLWT runs); here, the cluster takes the place
// of the single broker's restart: the session continues elsewhere.

// defaultLeaveGrace is long enough for clients' reconnect back-off in a
// rolling restart (paho and Home Assistant retry within seconds).
const defaultLeaveGrace = 30 * time.Second

type stopState struct {
	started time.Time
	// kept are the clean sessions whose will PrepareStop took from mochi
	// (guarded by Sessions.mu).
	kept map[*sessConn]bool
	// active: PrepareStop was called.
	active atomic.Bool
	// told are the connections the stop has disconnected (TellStop, just
	// before their DISCONNECT 0x8B): such a connection ends because of the
	// stop whatever error its read loop saw (a client that closes its
	// socket on 0x8B makes it EOF). One that ends before it is told, in
	// the lame duck, dropped on its own: its will is due as usual (chaos
	// seed 621146620: a client that dropped 16 ms into a rolling restart
	// and came back with a clean session within the leave grace lost its
	// will).
	told sync.Map // *mqtt.Client -> struct{}
}

func (h *Sessions) initStop() {
	if h.cfg.LeaveGrace <= 0 {
		h.cfg.LeaveGrace = defaultLeaveGrace
	}
	h.stopping = stopState{started: time.Now(), kept: map[*sessConn]bool{}}
}

// PrepareStop is called when the node starts a graceful stop, before it
// disconnects its clients: clean sessions whose will is mirrored in the
// log keep it there (the leader publishes it if the client does not come
// back within LeaveGrace), and mochi must not publish it now.
func (h *Sessions) PrepareStop() {
	h.stopping.active.Store(true)
	h.mirrorLeftovers()
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, c := range h.mirrors {
		if c.opened.Load() == 0 || c.closedByLeader.Load() {
			continue // not in the log (yet): mochi publishes it
		}
		// mochi's copy was cleared when the mirror was written
		// (session_mirror.go); clearing it again costs nothing.
		atomic.StoreUint32(&c.cl.Properties.Will.Flag, 0)
		h.stopping.kept[c] = true
	}
}

// mirrorLeftovers writes, before a graceful stop, the mirrors of clean
// sessions whose will could not be written at CONNECT (no leader yet, a
// node just restarted): otherwise mochi would publish their wills as it
// disconnects them, although they reconnect elsewhere. Bounded; the
// clients are still connected here, so no newer session of theirs exists.
func (h *Sessions) mirrorLeftovers() {
	h.mu.Lock()
	var todo []*sessConn
	for _, c := range h.conns {
		if c.unmirrored != nil && !c.managed && c.opened.Load() == 0 {
			todo = append(todo, c)
		}
	}
	h.mu.Unlock()
	if len(todo) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), mirrorOpenTimeout)
	defer cancel()
	for _, c := range todo {
		if o, ok := h.repl.Owner(c.id); ok && o.Node != h.cfg.Self {
			// A newer connection elsewhere claimed the client id (this
			// one is about to be dropped): a mirror written against
			// today's state would end its session (found by review).
			continue
		}
		res, err := h.repl.Apply(ctx, c.unmirrored)
		err = session.OpenErr(c.unmirrored, res, err)
		if errors.Is(err, replication.ErrReopened) && res.Index != 0 {
			// The open was fenced to the state of its CONNECT, and the
			// session changed since (a clean CONNECT's discard after the
			// mirror failed). The client is still connected here, so no
			// newer connection of it exists: open on today's state.
			if open := h.refenced(ctx, c.unmirrored, c.id, res.Index); open != nil {
				res, err = h.repl.Apply(ctx, open)
			}
		}
		if err != nil {
			h.log.Warn("clean session's will not mirrored before the stop; mochi publishes it", "client", c.id, "error", err)
			continue
		}
		h.mirrored(c, c.cl, res.Index)
		h.mu.Lock()
		c.mirror = true
		h.mirrors[c.id] = c
		h.mu.Unlock()
	}
}

// refenced is cmd's fenced SessionOpen alone (its will inside), fenced
// again to the session state this node reads once it has applied index;
// nil if cmd holds none or the node cannot catch up.
func (h *Sessions) refenced(ctx context.Context, cmd replication.Command, id string, index uint64) replication.Command {
	cmds := []replication.Command{cmd}
	if b, ok := cmd.(*replication.Batch); ok {
		cmds = b.Commands
	}
	for _, c := range cmds {
		o, ok := c.(*replication.SessionOpen)
		if !ok || !o.Fenced {
			continue
		}
		if h.repl.WaitAppliedLocal(ctx, index) != nil {
			return nil
		}
		cp := *o
		cp.IfOpened = 0
		if cp.HasAsOf {
			// As of today too: the connection's own claim since touched
			// the client id (found by review, and by chaos: wills of
			// clean sessions published at a graceful stop).
			cp.AsOf = h.repl.SyncedIndex()
		}
		if s, ok := h.repl.SessionHead(id); ok {
			cp.IfOpened = s.OpenedIndex
		}
		return &cp
	}
	return nil
}

// TellStop is called by a stopping node just before it disconnects cl.
func (h *Sessions) TellStop(cl *mqtt.Client) { h.stopping.told.Store(cl, struct{}{}) }

// stoppingNow reports whether a connection ending now ends because this
// node stops gracefully (its session continues elsewhere).
func (h *Sessions) stoppingNow(cl *mqtt.Client) bool {
	if _, ok := h.stopping.told.Load(cl); ok {
		return true
	}
	return errors.Is(cl.StopCause(), packets.ErrServerShuttingDown)
}

// goneAfter is how long the sessions of owner, no longer alive, stay open
// before the leader closes them on its behalf.
func (h *Sessions) goneAfter(owner string) time.Duration {
	if h.cfg.Left != nil && h.cfg.Left(owner) {
		return h.cfg.LeaveGrace
	}
	return h.cfg.DeadAfter
}

// inRestartGrace reports whether this node, restarted after a graceful
// stop, still leaves the sessions of its previous run open.
func (h *Sessions) inRestartGrace() bool {
	return h.cfg.RestartedAfterStop && time.Since(h.stopping.started) < h.cfg.LeaveGrace
}

// endMirrorOf ends a clean session's will mirror left in the log by an
// earlier connection of id (its node stopped gracefully): the client is
// back, with a clean session and no will, so that will must not fire.
// Connections with a will replace it in their SessionOpen (clean start).
func (h *Sessions) endMirrorOf(id string) {
	h.mu.Lock()
	local := h.mirrors[id] != nil
	h.mu.Unlock()
	if local || h.repl == nil {
		return
	}
	s, ok := h.repl.SessionHead(id)
	if !ok || s.ExpiryInterval != 0 || len(s.Subscriptions) != 0 || s.Will == nil {
		return
	}
	opened := s.OpenedIndex
	h.submit(sessOp{cmd: func() replication.Command {
		return &replication.SessionDelete{ClientID: id, IfOpened: opened}
	}})
}
