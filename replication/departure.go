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
// servers left on purpose and since when (removeDeparted). The leaving
// node writes it before it stops; a leader that sees a member leave writes
// it too (in case the leaving node could not); the leader clears it when
// the server is visible again or no longer in the configuration.
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
}

// recDeparture is a snapshot record: str server | varint at (skippable:
// an older node falls back to its local view of who left).
const recDeparture byte = 0x83

// Departures returns the servers recorded as departed and since when, as
// of this node's applied state.
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
	if _, err := n.Apply(ctx, &Departure{Server: n.cfg.NodeID, At: time.Now().UnixMilli()}); err != nil {
		return fmt.Errorf("record departure: %w", err)
	}
	return nil
}

// departures merges the replicated records with what membership showed
// this node (Config.Departed): the earlier leave wins, because both
// describe the same absence.
func (n *Node) departures() map[string]time.Time {
	left := n.Departures()
	if n.cfg.Departed == nil {
		return left
	}
	for id, since := range n.cfg.Departed() {
		if at, ok := left[id]; !ok || since.Before(at) {
			left[id] = since
		}
	}
	return left
}

// syncDepartures runs on the leader after membership changes were made:
// it records leaves that membership showed it but the log lacks, and
// clears records of servers that are visible again (a restart, not a
// scale-down) or no longer in the configuration (removed). One write per
// round at most, like the configuration changes.
func (n *Node) syncDepartures(ctx context.Context, inConfig, visible map[string]bool) {
	recorded := n.Departures()
	var local map[string]time.Time
	if n.cfg.Departed != nil {
		local = n.cfg.Departed()
	}
	var cmds []Command
	for id := range recorded {
		if visible[id] || !inConfig[id] {
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
