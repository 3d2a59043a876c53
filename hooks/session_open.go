package hooks

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/internal/session"
	"github.com/mqtt-ha/broker/replication"
)

// Writing a CONNECT's SessionOpen: the fenced open, what it does when the
// fence refuses it, and its retries (OnSessionEstablish).

// markOpening records that a CONNECT here is writing the SessionOpen with
// At at: until it is done (the returned func), the session it may already
// have opened (a try whose outcome was unknown) is live, not stale.
func (h *Sessions) markOpening(id string, at int64) func() {
	h.mu.Lock()
	h.opening[id] = at
	delete(h.openSeen, id)
	h.mu.Unlock()
	return func() {
		h.mu.Lock()
		if h.opening[id] == at {
			delete(h.opening, id)
			delete(h.openSeen, id)
		}
		h.mu.Unlock()
	}
}

// openCommands is SessionOpen (with At at), plus SetWill when the CONNECT
// has a will, preceded by the delete of an expired session it would
// otherwise resume; pos is the index of SessionOpen's result in a Batch
// (session.OpenCommands). Once every server applies it, the open is fenced
// to the session state read here (replication.SessionOpen.Fenced) and
// carries the will itself.
func (h *Sessions) openCommands(cl *mqtt.Client, pk packets.Packet, expiry uint32, at int64, fence *openFence) (cmd replication.Command, pos int, tw *takenOver) {
	now := time.Now().UnixMilli()
	o := session.Open{ClientID: cl.ID, ProtocolVersion: cl.Properties.ProtocolVersion,
		Expiry: expiry, Owner: h.cfg.Self, At: at, CleanStart: pk.Connect.Clean, Fenced: h.repl.OpenFence(),
		OweWill: h.repl.OwedWillsSupported(), HasAsOf: h.repl.OpenAsOfSupported()}
	if fence != nil {
		o.IfOpened, o.AsOf = fence.ifOpened, fence.asOf
	} else {
		// The index first: the state read next is at least that recent.
		o.AsOf = h.repl.SyncedIndex()
		if s, ok := h.repl.SessionHead(cl.ID); ok {
			o.IfOpened = s.OpenedIndex
		}
	}
	if tw = h.endingWill(cl.ID, pk.Connect.Clean, now); tw != nil {
		o.Takeover = tw.cmds
	}
	if !o.CleanStart && !o.HasAsOf {
		o.Expired = h.expiredSessionDelete(cl.ID, now) // in the open's entry (applyOpen: its own write as of format 6)
	}
	if atomic.LoadUint32(&cl.Properties.Will.Flag) == 1 {
		o.Will = h.setWill(cl).(*replication.SetWill)
	}
	cmd, pos = session.OpenCommands(o)
	return cmd, pos, tw
}

// openFence is the state a CONNECT's first open read (SessionOpen's
// IfOpened and AsOf), to which its retries are fenced too.
type openFence struct{ ifOpened, asOf uint64 }

// fenceOf is the state cmd's open is fenced to.
func fenceOf(cmd replication.Command) openFence {
	if o := session.OpenOf(cmd); o != nil {
		return openFence{o.IfOpened, o.AsOf}
	}
	return openFence{}
}

// applyOpen writes a CONNECT's open (openCommands). When the fence
// refuses it (the session was opened or deleted since this node read it),
// it catches up to the refusing entry and decides:
//   - a connection on another node that claimed the client id after this
//     CONNECT arrived (arrival, Unix ms; the owner's Since) is newer: it
//     wins, as the later CONNECT does on one broker, and this CONNECT is
//     refused (ErrReopened). Opening again would undo the newer
//     connection's work (a clean start's delete) for a CONNECT the client
//     may have given up on (found by review);
//   - otherwise the change is older than this CONNECT (this node had not
//     applied it yet: a DISCONNECT's delete, a resume that ended): it
//     opens again on what it now reads.
//
// fence, if not nil, is the session state the first write is fenced to
// (a retry's: see OnSessionEstablish); otherwise it reads it.
func (h *Sessions) applyOpen(ctx context.Context, cl *mqtt.Client, pk packets.Packet, expiry uint32, at, arrival int64, fence *openFence) (cmd replication.Command, pos int, tw *takenOver, res replication.Result, err error) {
	for {
		if !pk.Connect.Clean && h.repl.OpenAsOfSupported() {
			// The delete of an expired session the CONNECT would resume
			// is a write of its own, before the open reads: an open
			// fenced as of an index counts every touch after it, in its
			// own entry too, which the leader's group commit shares with
			// other clients' requests (found by review: an exemption for
			// the open's own entry let a clean CONNECT's delete or claim
			// coalesced into it through).
			if del := h.expiredSessionDelete(cl.ID, time.Now().UnixMilli()); del != nil {
				r, derr := h.repl.Apply(ctx, del)
				if derr == nil {
					derr = h.repl.WaitAppliedLocal(ctx, r.Index)
				}
				if derr != nil {
					return nil, 0, nil, r, fmt.Errorf("deleting the expired session first: %w", derr)
				}
				fence = nil // read after the delete
			}
		}
		cmd, pos, tw = h.openCommands(cl, pk, expiry, at, fence)
		fence = nil
		err = nil
		if h.cfg.BeforeOpenWrite != nil {
			err = h.cfg.BeforeOpenWrite(cl.ID, cmd)
		}
		if err == nil {
			res, err = h.repl.Apply(ctx, cmd)
		}
		if h.cfg.AfterOpenWrite != nil {
			err = h.cfg.AfterOpenWrite(cl.ID, err)
		}
		if err = session.OpenErr(cmd, res, err); !errors.Is(err, replication.ErrReopened) || res.Index == 0 {
			return cmd, pos, tw, res, err // (no index to catch up to: never spin)
		}
		if werr := h.repl.WaitAppliedLocal(ctx, res.Index); werr != nil {
			return cmd, pos, tw, res, fmt.Errorf("%w (catching up: %w)", err, werr)
		}
		if why := h.openOvertaken(cl.ID); why != "" {
			// An earlier try of this CONNECT committed, and a newer
			// CONNECT has deleted or taken its session since.
			return cmd, pos, tw, res, fmt.Errorf("%w: %s", err, why)
		}
		r := session.Refused{CleanStart: pk.Connect.Clean, Self: h.cfg.Self, Arrival: arrival}
		if o := session.OpenOf(cmd); o != nil {
			r.Read = o.IfOpened
		}
		_, r.SessionNow = h.repl.SessionHead(cl.ID)
		r.Owner, r.OwnerFound = h.repl.Owner(cl.ID)
		if prev := openResult(res, pos).Prev; !r.OwnerFound && prev.Node != "" {
			// Refused as of its read (replication/touched.go): the last
			// claim of the id since, released by now. A connection
			// elsewhere that came after this CONNECT and went (a clean
			// one, whose session ended with it) still wins.
			r.Owner, r.OwnerFound = prev, true
		}
		if again, why := session.Reopen(r); !again {
			return cmd, pos, tw, res, fmt.Errorf("%w: %s", err, why)
		}
	}
}

// openResult is the SessionOpen's own result in res (at: its position in
// a Batch).
func openResult(res replication.Result, at int) replication.Result {
	if at < len(res.Results) {
		return res.Results[at]
	}
	return res
}

// openOvertaken reports why the CONNECT writing opening[id] lost its
// session to a newer one: an earlier try of it committed (openSeen) and
// the session is no longer that open. "" if not (or not known here).
func (h *Sessions) openOvertaken(id string) string {
	h.mu.Lock()
	seen := h.openSeen[id]
	h.mu.Unlock()
	if seen == 0 {
		return ""
	}
	if s, ok := h.repl.SessionHead(id); !ok {
		return "the session an earlier try opened was deleted since (a newer clean start)"
	} else if s.OpenedIndex != seen {
		return "the session an earlier try opened was taken since (a newer connection)"
	}
	return ""
}

// nextOpenAt is the At of a new SessionOpen (session.OpenClock).
func (h *Sessions) nextOpenAt(now int64) int64 { return h.openClock.Next(now) }

// abandonedFor is how long a node remembers the opens of CONNECTs it
// refused: a forwarded open commits within a leader's term or never.
const abandonedFor = time.Minute

// abandonOpen records that the CONNECT whose open has At at was refused:
// tries of it may still be on their way to the leader. Call it while the
// CONNECT is still marked opening: a try this node has applied already
// (openSeen) is undone at once (found by review: its commit was seen
// before the refusal, so no later one would undo it).
func (h *Sessions) abandonOpen(id string, at int64) {
	now := time.Now()
	h.mu.Lock()
	if now.Sub(h.abandonedPruned) > abandonedFor/4 {
		h.abandonedPruned = now
		for k, t := range h.abandoned {
			if now.Sub(t) > abandonedFor {
				delete(h.abandoned, k)
			}
		}
	}
	h.abandoned[willlessKey{id, at}] = now
	seen := h.opening[id] == at && h.openSeen[id] != 0
	h.mu.Unlock()
	if seen {
		h.undoAbandoned(id, at)
	}
}

// undoAbandoned deletes a session that an open of a refused CONNECT
// created when it committed late (the observer calls it for every open
// of this node that found no session). The log refuses such an open once
// the client id changed since it read (replication/touched.go); one that
// commits before anything else happened to the id would still leave a
// session behind, which the client's next resume would find although its
// last CONNECT was refused, or clean. A late open that resumed an
// existing session is left to the stale sweep, which closes it.
func (h *Sessions) undoAbandoned(id string, at int64) {
	k := willlessKey{id, at}
	h.mu.Lock()
	_, ok := h.abandoned[k]
	delete(h.abandoned, k)
	h.mu.Unlock()
	if !ok {
		return
	}
	h.log.Info("a refused CONNECT's open committed late; deleting the session it created", "client", id)
	h.submit(sessOp{cmd: func() replication.Command {
		s, ok := h.repl.SessionHead(id)
		if !ok || s.Owner != h.cfg.Self || s.OpenedAt != at || s.OpenedPresent {
			return nil // gone, opened again since, or a resume (left to the stale sweep)
		}
		return &replication.SessionDelete{ClientID: id, IfOpened: s.OpenedIndex}
	}})
}
