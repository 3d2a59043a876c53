package session

import "github.com/mqtt-ha/broker/replication"

// ClaimWill is the command that claims (and publishes in the log) the
// will of id's session opened at index opened, at at (Unix ms; unique per
// attempt, see Claims). maxQueued is max_queued_messages (0 none).
func ClaimWill(id string, opened uint64, at int64, maxQueued int) *replication.PublishWill {
	return &replication.PublishWill{ClientID: id, IfOpened: opened, At: at, MaxQueued: uint32(max(maxQueued, 0))}
}

// WillDue reports whether the will of s, a closed session, is due at now
// (Unix ms): its delay, or the session's expiry if sooner, has passed
// since the session was closed. False if s has no will.
func WillDue(s replication.Session, now int64) bool {
	if s.Will == nil {
		return false
	}
	delay := int64(s.Will.DelaySeconds)
	if s.ExpiryInterval != replication.NeverExpires {
		delay = min(delay, int64(s.ExpiryInterval))
	}
	return now >= s.DisconnectedAt+delay*1000
}

// EndingWill is the PublishWill a CONNECT with clean start writes before
// its open when it ends a session s (found: the client has one) whose will
// has no delay: fenced to the session it read, the log applies it only if
// that session is disconnected by then and its will not yet claimed by
// the leader. A single broker had published that will at the disconnect
// already; without this the open discarded it whenever it committed
// between the old connection's close and the leader's claim (a client
// that drops and reconnects at once elsewhere; the chaos suite, seeds
// 576349558 and 652052877). A session still connected when it applies
// (its close, or a DISCONNECT, not written yet) is left to the open as
// before. A delayed will that is not due yet is cancelled by the new
// connection, as Mosquitto does (MQTT-3.1.3-9); one already due (its delay,
// or its session's expiry if sooner, has passed since the close) is
// published like one without delay (found by review). Nil when none
// applies.
func EndingWill(s replication.Session, found, cleanStart bool, at int64, maxQueued int) *replication.PublishWill {
	if !found || !cleanStart || s.Will == nil {
		return nil
	}
	if s.Will.DelaySeconds > 0 && (s.Connected || !WillDue(s, at)) {
		return nil // the FSM's PublishWill does not look at the delay
	}
	return ClaimWill(s.ClientID, s.OpenedIndex, at, maxQueued)
}

// Takeover describes a CONNECT that takes over the client's live
// connection on this node (hooks/session_takeover.go).
type Takeover struct {
	ClientID string
	// Session is the client's session as the log holds it now (the zero
	// Session if there is none).
	Session replication.Session
	Self    string // this node
	// Opened is the OpenedIndex of the live connection being taken over.
	Opened     uint64
	CleanStart bool  // the new CONNECT's
	At         int64 // Unix ms, the claim's At
	MaxQueued  int   // max_queued_messages, 0 none
}

// TakeoverWill returns the TakeoverWill that publishes the will of the
// connection being taken over, or nil when none is due (MQTT-3.1.4-3 with
// 3.1.2.5, as Mosquitto 2.0): the log must hold that very connection (the
// session connected, owned here, opened by it) with a will without delay
// (a delayed will is cancelled by the new connection, MQTT-3.1.3-9), and
// the takeover must end the session (clean start, or session expiry 0);
// a session that continues keeps its will unpublished.
func TakeoverWill(t Takeover) *replication.TakeoverWill {
	s := t.Session
	ends := t.CleanStart || s.ExpiryInterval == 0
	if !s.Connected || s.Owner != t.Self || s.OpenedIndex != t.Opened || s.Will == nil ||
		s.Will.DelaySeconds > 0 || !ends {
		return nil
	}
	return &replication.TakeoverWill{ClientID: t.ClientID, IfOpened: s.OpenedIndex, At: t.At,
		MaxQueued: uint32(max(t.MaxQueued, 0)), EndsSession: ends}
}
