package replication

import (
	"context"
	"slices"
	"time"
)

// Read APIs for persistent sessions. They read this node's applied state
// (a follower may lag the leader by a few entries) and return deep copies.

// Session returns a deep copy of clientID's session.
func (f *FSM) Session(clientID string) (Session, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	e, ok := f.st.sessions[clientID]
	if !ok {
		return Session{}, false
	}
	return e.export(), true
}

// SessionHead is Session without the queued messages (Queue is nil): what
// the hooks read on every connect, subscription and close. Copying a long
// queue's payloads each time made a resume cost grow with the backlog.
func (f *FSM) SessionHead(clientID string) (Session, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	e, ok := f.st.sessions[clientID]
	if !ok {
		return Session{}, false
	}
	return e.exportHead(), true
}

// Sessions summarises every session, sorted by client id.
func (f *FSM) Sessions() []SessionSummary {
	return f.sessionSummaries(func(*Session) bool { return true })
}

// SessionsOwnedBy summarises the sessions whose owner is node (connected
// or not), sorted by client id: what a survivor adopts, and whose wills it
// publishes, when node is declared dead.
func (f *FSM) SessionsOwnedBy(node string) []SessionSummary {
	return f.sessionSummaries(func(s *Session) bool { return s.Owner == node })
}

func (f *FSM) sessionSummaries(keep func(*Session) bool) []SessionSummary {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]SessionSummary, 0, len(f.st.sessions))
	for _, id := range f.st.sortedSessions() {
		if e := f.st.sessions[id]; keep(&e.Session) {
			out = append(out, e.summary())
		}
	}
	return out
}

// Queue returns copies of clientID's queued messages with Seq >= fromSeq,
// in Seq order, at most limit of them (limit <= 0: all). The hooks page
// through a long queue with fromSeq = last Seq + 1.
func (f *FSM) Queue(clientID string, fromSeq uint64, limit int) []QueuedMessage {
	f.mu.RLock()
	defer f.mu.RUnlock()
	e, ok := f.st.sessions[clientID]
	if !ok {
		return nil
	}
	// The queue is in Seq order: start at fromSeq without scanning (the
	// delivery pump pages through long queues message by message).
	i, _ := slices.BinarySearchFunc(e.Queue, fromSeq, func(m QueuedMessage, seq uint64) int { return cmpU64(m.Seq, seq) })
	var out []QueuedMessage
	for _, m := range e.Queue[i:] {
		if limit > 0 && len(out) >= limit {
			break
		}
		out = append(out, copyQueued(m))
	}
	return out
}

// expiredSessions returns up to limit disconnected sessions whose expiry
// passed at now, in client-id order.
func (f *FSM) expiredSessions(now time.Time, limit int) []expiredSession {
	f.mu.RLock()
	defer f.mu.RUnlock()
	ms := now.UnixMilli()
	var out []expiredSession
	for id, e := range f.st.sessions {
		if sessionExpired(&e.Session, ms) {
			out = append(out, expiredSession{ClientID: id, OpenedIndex: e.OpenedIndex})
			if len(out) >= limit {
				break
			}
		}
	}
	return out
}

// Session returns a deep copy of clientID's persistent session as of this
// node's applied state.
func (n *Node) Session(clientID string) (Session, bool) { return n.fsm.Session(clientID) }

// SessionHead is Session without the queued messages (see FSM.SessionHead);
// Queue pages through them.
func (n *Node) SessionHead(clientID string) (Session, bool) { return n.fsm.SessionHead(clientID) }

// Sessions summarises every persistent session (owner, state, queue
// depth), sorted by client id: /api/sessions, and resync after OnRestore.
func (n *Node) Sessions() []SessionSummary { return n.fsm.Sessions() }

// SessionsOwnedBy summarises the sessions owned by node.
func (n *Node) SessionsOwnedBy(node string) []SessionSummary { return n.fsm.SessionsOwnedBy(node) }

// Queue returns clientID's queued messages from fromSeq on, in Seq order,
// at most limit (<= 0: all).
func (n *Node) Queue(clientID string, fromSeq uint64, limit int) []QueuedMessage {
	return n.fsm.Queue(clientID, fromSeq, limit)
}

// sweepSessions deletes sessions disconnected for longer than their expiry
// interval. The time is the leader's, read here at proposal, never in
// Apply; each delete is conditional on the session not having been
// reopened since (IfOpened), so a client that reconnects while the delete
// is in flight keeps its session.
func (n *Node) sweepSessions() {
	exp := n.fsm.expiredSessions(time.Now(), 1000)
	if len(exp) == 0 {
		return
	}
	b := &Batch{Commands: make([]Command, len(exp))}
	for i, e := range exp {
		b.Commands[i] = &SessionDelete{ClientID: e.ClientID, IfOpened: e.OpenedIndex}
	}
	ctx, cancel := context.WithTimeout(n.life, n.cfg.IOTimeout)
	defer cancel()
	res, err := n.Apply(ctx, b)
	if err != nil {
		n.log.Warn("deleting expired sessions failed", "count", len(exp), "err", err)
		return
	}
	for _, r := range res.Results {
		if r.Changed {
			n.expired.Add(1)
		}
	}
	n.log.Debug("deleted expired sessions", "count", len(exp))
}

// ExpiredSessions counts the sessions this node deleted as expired (the
// leader's sweep): Mosquitto's $SYS/broker/clients/expired, per node.
func (n *Node) ExpiredSessions() int64 { return n.expired.Load() }

// StoredBytes sums the payload bytes of the retained messages and of the
// messages queued for persistent sessions, large ones by their size
// (Mosquitto's $SYS/broker/store/messages/bytes; a message queued for
// several sessions counts once per session here). It walks the state
// under the read lock, without copying.
func (n *Node) StoredBytes() int64 { return n.fsm.storedBytes() }

func (f *FSM) storedBytes() int64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var total int64
	for _, m := range f.st.retained {
		total += payloadBytes(m.Payload, m.Blob)
	}
	for _, e := range f.st.sessions {
		for _, q := range e.Queue {
			total += payloadBytes(q.Payload, q.Blob)
		}
	}
	return total
}

func payloadBytes(p []byte, b *BlobRef) int64 {
	if b != nil {
		return b.Size
	}
	return int64(len(p))
}
