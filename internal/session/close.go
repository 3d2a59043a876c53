package session

import (
	"math"

	"github.com/mqtt-ha/broker/replication"
)

// Persistent reports whether a CONNECT asks for a session that outlives
// the connection: MQTT 5 with session expiry > 0, 3.1.1 with clean
// session 0.
func Persistent(version byte, expiry uint32, clean bool) bool {
	if version == 5 {
		return expiry > 0
	}
	return !clean
}

// MayResumeWithoutExpiry reports whether a CONNECT is an MQTT 5 clean
// start 0 with session expiry 0: it resumes an existing session (when the
// log has one and a leader) and ends it with the connection (MQTT 5
// 3.1.2.11.2).
func MayResumeWithoutExpiry(version byte, clean bool, expiry uint32) bool {
	return version == 5 && !clean && expiry == 0
}

// EndsWithConnection reports whether a connection's session ended with it
// (MQTT 5 expiry 0, 3.1.1 clean session 1), so that mochi drops it.
func EndsWithConnection(version byte, expiry uint32, clean bool) bool {
	return (version == 5 && expiry == 0) || (version < 5 && clean)
}

// CapExpiry applies the server's maximum session expiry (limit) to a
// client's.
func CapExpiry(e, limit uint32) uint32 {
	e = min(e, limit)
	if e == math.MaxUint32 {
		return replication.NeverExpires
	}
	return e
}

// ExpiryOf is the session expiry to store for a CONNECT: the client's
// (MQTT 5) or the server's maximum (3.1.1), capped by the server's
// maximum.
func ExpiryOf(version byte, expiry, limit uint32) uint32 {
	e := limit
	if version == 5 {
		e = min(expiry, limit)
	}
	if e == math.MaxUint32 {
		return replication.NeverExpires
	}
	return e
}

// ExpiredAt reports whether a disconnected session's expiry passed at now
// (Unix ms). Unlike the sweep's test it ignores a will not yet published:
// a resume must not find the session either way.
func ExpiredAt(s replication.Session, now int64) bool {
	return !s.Connected && s.DisconnectedAt > 0 && s.ExpiryInterval != replication.NeverExpires &&
		now >= s.DisconnectedAt+int64(s.ExpiryInterval)*1000
}

// ExpiredDelete returns the conditional delete of id's session s if it
// has expired at now (a resume then starts a new one), else nil.
func ExpiredDelete(id string, s replication.Session, now int64) replication.Command {
	if ExpiredAt(s, now) {
		return &replication.SessionDelete{ClientID: id, IfOpened: s.OpenedIndex}
	}
	return nil
}

// Close describes the end of a persistent connection (one not taken over
// and not ended by a graceful stop: those leave the session as it is).
type Close struct {
	ClientID string
	Owner    string // this node
	Opened   uint64 // OpenedIndex of the connection's SessionOpen, 0 unknown
	At       int64  // Unix ms
	// Expiry is the session expiry stored at CONNECT (ExpiryOf).
	Expiry uint32
	// ProtocolVersion and the connection's session expiry property as it
	// ends (CONNECT's, replaced by DISCONNECT's: MQTT 5 3.14.2.2.2),
	// uncapped; ExpirySet is its flag.
	ProtocolVersion byte
	ExpirySet       bool
	ExpiryProp      uint32
	MaxExpiry       uint32 // the server's maximum session expiry
	// Disconnect: the client sent DISCONNECT (mochi's OnDisconnect error
	// is nil).
	Disconnect bool
	Will       bool // the CONNECT had a will (held by the log)
}

// CloseCommands is what ends a persistent connection in the log: the
// close with the expiry DISCONNECT set, the will cleared after a
// DISCONNECT (MQTT-3.1.2-10), and the session deleted when its expiry is 0
// and no will is left to publish (with a will the leader publishes it,
// then the sweep removes the session).
//
// The will is cleared by a ClaimWill fenced to this connection's open,
// after the close (it takes a disconnected session), never by ClearWill:
// a DISCONNECT written after the client connected again elsewhere (its
// new open committed first) cleared the NEW connection's will, which then
// never fired. The claim's result is ignored: this will is not published.
func CloseCommands(c Close) replication.Command {
	// A DISCONNECT discards the will (MQTT-3.1.2-10), also one a CONNECT
	// elsewhere left owed by this connection (replication/owed_will.go).
	closeCmd := &replication.SessionClose{ClientID: c.ClientID, Owner: c.Owner, IfOpened: c.Opened, At: c.At,
		WillPublished: c.Disconnect && c.Opened != 0}
	expiry := c.Expiry
	if c.ProtocolVersion == 5 && c.ExpirySet {
		if e := CapExpiry(c.ExpiryProp, c.MaxExpiry); e != c.Expiry {
			closeCmd.SetExpiry, closeCmd.ExpiryInterval = true, e
			expiry = e
		}
	}
	var cmds []replication.Command
	if c.Disconnect && c.Opened == 0 {
		// The open's index is unknown (an unfenced close): so is the fence.
		cmds = append(cmds, &replication.ClearWill{ClientID: c.ClientID})
	}
	cmds = append(cmds, closeCmd)
	if c.Disconnect && c.Opened != 0 {
		cmds = append(cmds, &replication.ClaimWill{ClientID: c.ClientID, IfOpened: c.Opened})
	}
	if expiry == 0 && c.Opened != 0 && (c.Disconnect || !c.Will) {
		cmds = append(cmds, &replication.SessionDelete{ClientID: c.ClientID, IfOpened: c.Opened})
	}
	if len(cmds) == 1 {
		return closeCmd
	}
	return &replication.Batch{Commands: cmds}
}
