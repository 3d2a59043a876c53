package hooks

import (
	"context"
	"slices"
	"time"

	"github.com/mqtt-ha/broker/replication"
)

// releaseDeadOwners (leader only) releases the client-id ownership entries
// of nodes that have not been alive for DeadAfter. A node releases its own
// entries when its clients disconnect, but a node that crashed never does,
// and without this the ownership table would grow with every client id
// that was ever connected to a crashed node. The release is conditional on
// the epoch (ReleaseOwner), so a claim made meanwhile by a live node is
// never touched. A node that was only paused keeps serving its clients; the
// next claim of one of their ids elsewhere still takes it over.
func (h *Sessions) releaseDeadOwners() {
	now := time.Now()
	// alive: per node, whether its ids stay this round (alive, or first
	// seen dead in this round).
	alive := map[string]bool{}
	owners := h.repl.Owners()
	// Sorted only among the ids to release (the first 1,000 of them go in
	// this round's entry): sorting every owner on every round cost the
	// leader a sort of the whole table per tick.
	var dead []string
	for id, o := range owners {
		if o.Node == h.cfg.Self {
			continue
		}
		a, known := alive[o.Node]
		if !known {
			a = h.cfg.Alive(o.Node)
			if a {
				delete(h.ownerDead, o.Node)
			} else if _, ok := h.ownerDead[o.Node]; !ok {
				h.ownerDead[o.Node] = now
				a = true // first seen dead now: from the next round on
			}
			alive[o.Node] = a
		}
		if !a && now.Sub(h.ownerDead[o.Node]) >= h.cfg.DeadAfter {
			dead = append(dead, id)
		}
	}
	slices.Sort(dead)
	var b replication.Batch
	for _, id := range dead[:min(len(dead), 1000)] { // the rest next round: bounded entries
		o := owners[id]
		b.Commands = append(b.Commands, &replication.ReleaseOwner{ClientID: id, Node: o.Node, Epoch: o.Epoch})
	}
	if len(b.Commands) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), h.cfg.Timeout)
	defer cancel()
	if _, err := h.repl.Apply(ctx, &b); err != nil {
		h.log.Warn("releasing client ids of dead nodes failed", "count", len(b.Commands), "error", err)
		return
	}
	h.log.Info("released the client ids of dead nodes", "count", len(b.Commands))
}
