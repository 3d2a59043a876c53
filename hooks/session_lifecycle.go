package hooks

import (
	"context"
	"math"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/replication"
)

// The MQTT session lifecycle rules the Sessions hook applies to the
// replicated sessions (DESIGN.md guarantee 8), whichever node the client
// uses:
//
//   - A clean CONNECT (3.1.1 clean session 1, MQTT 5 clean start 1)
//     discards the client's session (MQTT-3.1.2-4). With MQTT 5 session
//     expiry > 0 the SessionOpen itself has CleanStart; otherwise the
//     connection is served by mochi alone, and discardSession deletes the
//     replicated one.
//   - MQTT 5 clean start 0 with session expiry 0 resumes an existing
//     session (session present 1, its queue delivered) and ends it with
//     the connection (MQTT-3.1.2-23: the session lasts while the network
//     connection does).
//   - DISCONNECT's session expiry replaces CONNECT's (MQTT 5 3.14.2.2.2);
//     0 ends the session now. mochi refuses a non-zero one after CONNECT's
//     0 (protocol error 0x82) before the hooks see it.
//   - A session whose expiry has passed is not resumed even if the
//     leader's sweep has not removed it yet: session present 0.

// cleanDiscardTimeout bounds how long a clean CONNECT waits for the
// discard of the old session before CONNACK. A clean session must be
// served without a quorum (guarantee 5), so it never waits longer; the
// delete is then retried in the background.
const cleanDiscardTimeout = 2 * time.Second

// resumesWithoutExpiry reports whether an MQTT 5 CONNECT with clean start 0
// and session expiry 0 finds a session to resume in the log. Without a
// raft leader it cannot be resumed (nor stored) and is served as a clean
// session.
func (h *Sessions) resumesWithoutExpiry(cl *mqtt.Client, pk packets.Packet) bool {
	if cl.Properties.ProtocolVersion != 5 || pk.Connect.Clean || cl.Properties.Props.SessionExpiryInterval != 0 {
		return false
	}
	if _, ok := h.repl.Session(cl.ID); !ok {
		return false
	}
	return h.repl.HasLeader()
}

// discardSession deletes id's replicated session for a clean CONNECT that
// keeps no session in the log. It deletes only the session this node sees
// (IfOpened), so a session opened later, by a connection after this one,
// is never touched. With a leader it waits (at most cleanDiscardTimeout)
// so that CONNACK follows the discard and nothing more is queued for the
// old session; otherwise, or on failure, the delete is retried in the
// background: a conditional delete is safe to apply late.
func (h *Sessions) discardSession(id string) {
	s, ok := h.repl.Session(id)
	if !ok {
		return
	}
	del := &replication.SessionDelete{ClientID: id, IfOpened: s.OpenedIndex}
	if h.repl.HasLeader() {
		ctx, cancel := context.WithTimeout(h.base, cleanDiscardTimeout)
		_, err := h.repl.Apply(ctx, del)
		cancel()
		if err == nil {
			h.log.Debug("clean connect discarded the persistent session", "client", id)
			return
		}
		h.log.Warn("clean connect: session discard not committed in time; retrying in the background", "client", id, "error", err)
	}
	h.submit(sessOp{cmd: func() replication.Command { return del }})
}

// capExpiry applies the server's maximum session expiry to a client's.
func (h *Sessions) capExpiry(e uint32) uint32 {
	e = min(e, h.server.Options.Capabilities.MaximumSessionExpiryInterval)
	if e == math.MaxUint32 {
		return replication.NeverExpires
	}
	return e
}

// expiredAt reports whether a disconnected session's expiry passed at now
// (Unix ms). Unlike the sweep's test it ignores a will not yet published:
// a resume must not find the session either way.
func expiredAt(s replication.Session, now int64) bool {
	return !s.Connected && s.DisconnectedAt > 0 && s.ExpiryInterval != replication.NeverExpires &&
		now >= s.DisconnectedAt+int64(s.ExpiryInterval)*1000
}

// expiredSessionDelete returns the conditional delete of id's session if
// it has expired (a resume then starts a new one), else nil.
func (h *Sessions) expiredSessionDelete(id string, now int64) replication.Command {
	if s, ok := h.repl.Session(id); ok && expiredAt(s, now) {
		return &replication.SessionDelete{ClientID: id, IfOpened: s.OpenedIndex}
	}
	return nil
}

// closeCommands is what ends a persistent connection in the log: the close
// with the expiry DISCONNECT set, the will cleared after a DISCONNECT
// (MQTT-3.1.2-10), and the session deleted when its expiry is 0 and no
// will is left to publish (with a will the leader publishes it, then the
// sweep removes the session).
func (h *Sessions) closeCommands(cl *mqtt.Client, c *sessConn, err error) replication.Command {
	opened := c.opened.Load()
	closeCmd := &replication.SessionClose{ClientID: c.id, Owner: h.cfg.Self, IfOpened: opened,
		At: time.Now().UnixMilli()}
	expiry := c.expiry
	if cl.Properties.ProtocolVersion == 5 && cl.Properties.Props.SessionExpiryIntervalFlag {
		if e := h.capExpiry(cl.Properties.Props.SessionExpiryInterval); e != c.expiry {
			closeCmd.SetExpiry, closeCmd.ExpiryInterval = true, e
			expiry = e
		}
	}
	var cmds []replication.Command
	if err == nil {
		cmds = append(cmds, &replication.ClearWill{ClientID: c.id})
	}
	cmds = append(cmds, closeCmd)
	if expiry == 0 && opened != 0 && (err == nil || !c.will) {
		cmds = append(cmds, &replication.SessionDelete{ClientID: c.id, IfOpened: opened})
	}
	if len(cmds) == 1 {
		return closeCmd
	}
	return &replication.Batch{Commands: cmds}
}
