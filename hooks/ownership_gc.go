package hooks

import (
	"context"
	"maps"
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
	alive := map[string]bool{}
	var b replication.Batch
	owners := h.repl.Owners()
	for _, id := range slices.Sorted(maps.Keys(owners)) {
		o := owners[id]
		if o.Node == h.cfg.Self {
			continue
		}
		a, known := alive[o.Node]
		if !known {
			a = h.cfg.Alive(o.Node)
			alive[o.Node] = a
		}
		if a {
			delete(h.ownerDead, o.Node)
			continue
		}
		since, ok := h.ownerDead[o.Node]
		if !ok {
			h.ownerDead[o.Node] = now
			continue
		}
		if now.Sub(since) >= h.cfg.DeadAfter {
			b.Commands = append(b.Commands, &replication.ReleaseOwner{ClientID: id, Node: o.Node, Epoch: o.Epoch})
		}
		if len(b.Commands) >= 1000 {
			break // the rest next round: bounded entries
		}
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
