package replication

import (
	"context"
	"fmt"
	"time"
)

// CmdDeparture records in the log that a server left gracefully (At > 0,
// Unix ms) or came back (At 0). Skippable: a node that predates it only
// keeps its own, local view of who left (what every node had before).
const CmdDeparture CommandType = cmdSkippable | 25

// Departure is the replicated record of a graceful leave, so that any
// leader, also one elected or restarted after the leave, knows which
// servers left on purpose (removeDeparted). The leaving node writes it
// before it stops; a leader that sees a member leave writes it too (in
// case the leaving node could not). The server clears its own record once
// it runs again (not the leader on seeing it: the leaving node is still
// visible while it writes its record); the leader clears records of
// servers no longer in the configuration. At is informational: how long a
// server has been away is measured by each leader on its own clock, from
// when it first saw the server missing (a record may be old, or written
// with a skewed clock).
//
//	str server | varint at
type Departure struct {
	Server string
	At     int64 // Unix ms of the leave, the writer's clock; 0 clears
}

// Type implements Command.
func (*Departure) Type() CommandType { return CmdDeparture }

func (c *Departure) appendPayload(b []byte) []byte {
	return appendVarint(appendString(b, c.Server), c.At)
}

func (c *Departure) validate() error {
	if c.Server == "" || c.At < 0 {
		return fmt.Errorf("%w: departure: server %q at %d", ErrInvalidCommand, c.Server, c.At)
	}
	return nil
}

func decodeDeparture(r *reader) *Departure {
	return &Departure{Server: r.str(), At: r.varint()}
}

func (s *state) applyDeparture(c *Departure, res *Result) {
	at, ok := s.departed[c.Server]
	switch {
	case c.At == 0 && ok:
		delete(s.departed, c.Server)
		res.Changed = true
	case c.At != 0 && at != c.At:
		s.departed[c.Server] = c.At
		res.Changed = true
	}
	if c.At != 0 {
		s.departOwed(c.Server)
	}
}

// recDeparture is a snapshot record: str server | varint at (skippable:
// an older node falls back to its local view of who left).
const recDeparture byte = 0x83

// Departures returns the servers recorded as departed and the writer's
// time of the leave, as of this node's applied state.
func (n *Node) Departures() map[string]time.Time {
	n.fsm.mu.RLock()
	defer n.fsm.mu.RUnlock()
	out := make(map[string]time.Time, len(n.fsm.st.departed))
	for id, at := range n.fsm.st.departed {
		out[id] = time.UnixMilli(at)
	}
	return out
}

// RecordDeparture writes that this node is leaving gracefully: any leader,
// also one elected after this node is gone, then removes it from the
// configuration if it stays away for RemoveLeftAfter (a scale-down), while
// a restart clears the record when the node is back. Best effort within
// ctx: without a quorum it cannot be written, and leaders fall back to
// what membership showed them.
func (n *Node) RecordDeparture(ctx context.Context) error {
	n.leaving.Store(true) // not to be cleared by clearOwnDeparture
	if _, err := n.Apply(ctx, &Departure{Server: n.cfg.NodeID, At: time.Now().UnixMilli()}); err != nil {
		return fmt.Errorf("record departure: %w", err)
	}
	return nil
}

// absentFor tracks, on this leader's clock and for its current term only,
// since when each server of cfg has been missing from membership, and
// returns the servers that left on purpose (a replicated record, or this
// node's membership saw the leave) with the time to count their absence
// from: when this leader first missed them, or the leave its own
// membership saw, whichever is earlier.
func (n *Node) absentFor(servers []string, visible map[string]bool) map[string]time.Time {
	now, term := time.Now(), n.raft.CurrentTerm()
	recorded := n.Departures()
	var local map[string]time.Time
	if n.cfg.Departed != nil {
		local = n.cfg.Departed()
	}
	n.memberMu.Lock()
	defer n.memberMu.Unlock()
	if n.absentTerm != term {
		clear(n.absent)
		n.absentTerm = term
	}
	in := make(map[string]bool, len(servers))
	out := make(map[string]time.Time)
	for _, id := range servers {
		in[id] = true
		if visible[id] {
			delete(n.absent, id)
			continue
		}
		since, ok := n.absent[id]
		if !ok {
			since = now
			n.absent[id] = now
		}
		_, rec := recorded[id]
		left, saw := local[id]
		switch {
		case saw && left.Before(since):
			out[id] = left
		case saw:
			out[id] = since
		case rec:
			out[id] = since
		}
	}
	for id := range n.absent {
		if !in[id] {
			delete(n.absent, id)
		}
	}
	return out
}

// syncDepartures runs on the leader after membership changes were made:
// it records leaves that membership showed it but the log lacks, and
// clears records of servers no longer in the configuration (removed). One
// write per round at most, like the configuration changes.
func (n *Node) syncDepartures(ctx context.Context, inConfig, visible map[string]bool) {
	recorded := n.Departures()
	var local map[string]time.Time
	if n.cfg.Departed != nil {
		local = n.cfg.Departed()
	}
	var cmds []Command
	for id := range recorded {
		if !inConfig[id] {
			cmds = append(cmds, &Departure{Server: id})
		}
	}
	for id, since := range local {
		if _, ok := recorded[id]; !ok && inConfig[id] && !visible[id] {
			cmds = append(cmds, &Departure{Server: id, At: since.UnixMilli()})
		}
	}
	if len(cmds) == 0 {
		return
	}
	var c Command = &Batch{Commands: cmds}
	if len(cmds) == 1 {
		c = cmds[0]
	}
	if _, err := n.Apply(ctx, c); err != nil {
		n.log.Warn("recording departures failed", "changes", len(cmds), "err", err)
	}
}

// clearOwnDeparture removes this node's leave record once it runs again as
// a member (a restart, not a scale-down), unless it is leaving now.
func (n *Node) clearOwnDeparture() {
	if n.leaving.Load() || !n.HasState() {
		return
	}
	if _, ok := n.Departures()[n.cfg.NodeID]; !ok {
		return
	}
	if addr, _ := n.raft.LeaderWithID(); addr == "" {
		return // no leader known yet: next round
	}
	ctx, cancel := context.WithTimeout(n.life, n.cfg.IOTimeout)
	defer cancel()
	if _, err := n.Apply(ctx, &Departure{Server: n.cfg.NodeID}); err != nil {
		n.log.Debug("clearing this node's leave record failed; next round", "err", err)
		return
	}
	n.log.Info("back after a graceful leave: cleared its record")
}
