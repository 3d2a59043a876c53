package replication

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
)

// Owed wills: the will of a connection that a new CONNECT on another node
// replaced while the log still showed it connected.
//
// The node of the new CONNECT cannot tell from the log whether the old
// connection is live, has dropped (its will due), or has sent DISCONNECT
// (its will discarded): its node has not written the close yet, maybe
// because it is cut off from the leader. Before, the new SessionOpen
// deleted the will with the old session, and a client that dropped and
// came back at once, with clean start, on another node lost its will
// (chaos, will-missing). Now the CONNECT's SessionOpen moves the will aside
// (OweWill), keyed by the old connection's OpenedIndex, and whoever
// learns how that connection ended settles it with the commands that
// settle a session's will, addressed to the same OpenedIndex:
//
//   - SessionClose with WillPublished from the old node (DISCONNECT; its
//     graceful stop told the client to go; it published the will itself
//     without a quorum) discards it;
//   - any other SessionClose from the old node (the connection ended
//     without DISCONNECT), or from the leader on its behalf (the old node
//     is dead), makes it due, and PublishWill then publishes it (queued,
//     retained) and removes it, as for a session;
//   - a Departure of its owner discards the ones not closed yet (a node
//     that leaves gracefully told its clients to go: DESIGN.md guarantee
//     4), and an owner that departed owes none.
//
// SessionClose and PublishWill address an OpenedIndex, which names one
// connection: the current session if it is still the one opened there,
// otherwise the owed will of that connection. SessionClose also names the
// owner, so only the old node (or the leader for it) settles the will: a
// SessionDelete or ClaimWill on that index, which the new connection's
// node may retry, never touches an owed will. A DISCONNECT therefore
// writes its close with WillPublished (session.CloseCommands, endMirror):
// the old node may not know yet that its connection was replaced. Only wills without a delay are owed (a new connection
// cancels a delayed will, MQTT-3.1.3-9, as for a takeover on one node).

// CmdSessionOpenOwe (28) is a fenced SessionOpen with OweWill; log format
// version 5.
const CmdSessionOpenOwe CommandType = 28

// OwedWill is a will owed by a replaced connection (see above).
type OwedWill struct {
	ClientID string
	// Opened is the OpenedIndex of the connection that owes it, OpenedAt
	// its open's At (by which its node knows its own connection).
	Opened   uint64
	OpenedAt int64
	// Owner is the node that held that connection.
	Owner string
	// EndsSession: the open that replaced the connection ended its session
	// (clean start, or the old session had expiry 0). A connection dropped
	// because of it owes its will then, as a connection taken over on one
	// node does (TakeoverWill); otherwise the session continued and the
	// new connection cancelled the will.
	EndsSession bool
	// Closed: the connection ended without DISCONNECT (SessionClose); the
	// will is due. ClosedAt is the close's At.
	Closed   bool
	ClosedAt int64
	Will     Will
	// Replaced is the index of the entry that moved the will aside: in
	// log order, the connection ended there. Recorded from log format 7
	// on (0 for a will owed before the log recorded it).
	Replaced uint64
	// Superseded: the will's topic got a newer retained write (or clear)
	// after Replaced, so publishing the will leaves the retained value
	// alone (see "Late owed wills" below). From log format 7 on.
	Superseded bool
}

type owedKey struct {
	id     string
	opened uint64
}

// CmdOweWill (29) is OweWill; log format version 5.
const CmdOweWill CommandType = 29

// OweWill is the owed will of a clean CONNECT served without a session in
// the log (hooks: discardSession), which deletes the old session with
// SessionDelete rather than replacing it with a SessionOpen: in the same
// entry, right before a SessionDelete with the same IfOpened, it moves
// the will aside as a SessionOpen with OweWill does. Both are conditional
// on the same OpenedIndex, which OweWill does not change, so they apply
// together or not at all. Owner is the node of the new connection.
//
//	str client_id | uvarint if_opened | str owner
type OweWill struct {
	ClientID string
	IfOpened uint64
	Owner    string
}

var _ Command = (*OweWill)(nil)

// Type implements Command.
func (*OweWill) Type() CommandType { return CmdOweWill }

func (c *OweWill) appendPayload(b []byte) []byte {
	return appendString(appendUvarint(appendString(b, c.ClientID), c.IfOpened), c.Owner)
}

func (c *OweWill) validate() error {
	if c.ClientID == "" || c.IfOpened == 0 || c.Owner == "" {
		return invalid(c.Type(), "empty client id, if_opened or owner")
	}
	return nil
}

func (s *state) applyOweWill(c *OweWill, res *Result, evs []event) []event {
	e := s.sessions[c.ClientID]
	if e == nil || e.OpenedIndex != c.IfOpened {
		return evs
	}
	n := len(evs)
	evs = s.oweWill(c.ClientID, e, c.Owner, true, res.Index, evs)
	res.Changed = len(evs) > n
	return evs
}

// oweWill moves the will of e, which a connection of newOwner is about to
// replace (ends: and end the session), aside as owed by e's connection, if
// e is connected on another node that has not departed, with a will
// without delay. The will is then no longer e's.
func (s *state) oweWill(id string, e *sessionEntry, newOwner string, ends bool, idx uint64, evs []event) []event {
	if e == nil || !e.Connected || e.Owner == newOwner || e.Will == nil || e.Will.DelaySeconds > 0 {
		return evs
	}
	if _, gone := s.departed[e.Owner]; gone {
		return evs // it told its clients to go: no will is owed
	}
	e = s.mutableSession(id)
	k := owedKey{id, e.OpenedIndex}
	w := OwedWill{ClientID: id, Opened: e.OpenedIndex, OpenedAt: e.OpenedAt, Owner: e.Owner,
		EndsSession: ends || e.ExpiryInterval == 0, Will: *e.Will}
	if s.format >= 7 {
		w.Replaced = idx
	}
	s.dropOwed(k) // a lone OweWill can owe again on the same index
	s.owed[k] = w
	if w.Will.Retain {
		s.owedRetained[w.Will.Topic] = append(s.owedRetained[w.Will.Topic], k)
	}
	e.Will = nil
	return append(evs, event{session: &SessionChange{Kind: WillOwed, ClientID: id, Owner: e.Owner, Index: idx}})
}

// owedOf returns the owed will a command addressed to the connection
// opened at opened settles: only when the session is no longer that
// connection (the session's own will comes first).
func (s *state) owedOf(id string, opened uint64) (OwedWill, bool) {
	if opened == 0 || len(s.owed) == 0 {
		return OwedWill{}, false
	}
	if e := s.sessions[id]; e != nil && e.OpenedIndex == opened {
		return OwedWill{}, false
	}
	w, ok := s.owed[owedKey{id, opened}]
	return w, ok
}

// closeOwed applies a SessionClose to an owed will; ok reports that c was
// addressed to one.
func (s *state) closeOwed(c *SessionClose, res *Result, evs []event) ([]event, bool) {
	w, ok := s.owedOf(c.ClientID, c.IfOpened)
	if !ok {
		return evs, false
	}
	if w.Owner != c.Owner || w.Closed {
		return evs, true
	}
	res.Changed = true
	if c.WillPublished {
		// DISCONNECT, a graceful stop, or the owner published it itself
		// (no quorum): nothing is owed.
		s.dropOwed(owedKey{c.ClientID, c.IfOpened})
		return evs, true
	}
	w.Closed, w.ClosedAt = true, c.At
	s.owed[owedKey{c.ClientID, c.IfOpened}] = w
	return append(evs, event{session: &SessionChange{Kind: WillOwedDue, ClientID: c.ClientID, Owner: w.Owner,
		Will: copyWill(&w.Will), Index: res.Index}}), true
}

// publishOwed applies a PublishWill to a due owed will; ok reports that c
// was addressed to one.
func (s *state) publishOwed(c *PublishWill, res *Result, evs []event) ([]event, bool) {
	w, ok := s.owedOf(c.ClientID, c.IfOpened)
	if !ok {
		return evs, false
	}
	if !w.Closed {
		return evs, true
	}
	s.dropOwed(owedKey{c.ClientID, c.IfOpened})
	res.Changed = true
	evs = append(evs, event{session: &SessionChange{Kind: WillOwedPublished, ClientID: c.ClientID, Owner: w.Owner, At: c.At,
		Opened: w.Opened, Index: res.Index}})
	retain := w.Will.Retain && !w.Superseded
	if retain {
		s.supersedeOwed(w.Will.Topic, w.Replaced)
	}
	return s.publishWill(c.ClientID, &w.Will, c.At, c.MaxQueued, retain, res, evs), true
}

// departOwed discards the owed wills of server not closed yet (Departure).
func (s *state) departOwed(server string) {
	for k, w := range s.owed {
		if w.Owner == server && !w.Closed {
			s.dropOwed(k)
		}
	}
}

// Late owed wills (log format 7). An owed will is published when its
// node writes the close, which can be long after the connection ended:
// the node was cut off. In log order its connection ended at Replaced,
// when a newer connection took the client id, so its retained value
// belongs there, and a retained write or clear of its topic applied since
// is newer and wins: publishing the will then queues its copies but
// leaves the retained value alone, as on one Mosquitto, where the will
// was stored before the newer connection's writes. Otherwise a client
// that came back elsewhere, published "online" and dropped again got its
// new "offline" replaced by the old connection's (chaos seed 20261209,
// retained-will-missing). Applied writes mark the owed wills of their
// topic Superseded (supersedeOwed), through the owedRetained index; an
// owed will's own write counts from its Replaced, so it supersedes only
// wills owed before it. Expiry sweeps (RetainClear with IfIndex) clear a
// value written before and are no news.

// supersedeOwed marks the owed wills with a retained will on topic owed
// before index before: those a retained write is newer than. An applied
// write passes allOwed (every pending owed will was owed before it, in
// its own entry too), an owed will its Replaced. Before format 7 it does
// nothing, on every replica alike.
func (s *state) supersedeOwed(topic string, before uint64) {
	ks := s.owedRetained[topic]
	if s.format < 7 || len(ks) == 0 {
		return
	}
	kept := ks[:0]
	for _, k := range ks {
		w, ok := s.owed[k]
		if !ok || w.Will.Topic != topic {
			continue // not indexed under topic (dropOwed keeps it so; defensive)
		}
		if w.Replaced >= before {
			kept = append(kept, k)
			continue
		}
		w.Superseded = true
		s.owed[k] = w
	}
	if len(kept) == 0 {
		delete(s.owedRetained, topic)
		return
	}
	clear(ks[len(kept):])
	s.owedRetained[topic] = kept
}

// allOwed makes supersedeOwed mark every owed will of the topic.
const allOwed = ^uint64(0)

// dropOwed removes an owed will and its index entry.
func (s *state) dropOwed(k owedKey) {
	w, ok := s.owed[k]
	if !ok {
		return
	}
	delete(s.owed, k)
	ks := s.owedRetained[w.Will.Topic]
	if i := slices.Index(ks, k); i >= 0 {
		ks = slices.Delete(ks, i, i+1)
		if len(ks) == 0 {
			delete(s.owedRetained, w.Will.Topic)
		} else {
			s.owedRetained[w.Will.Topic] = ks
		}
	}
}

// indexOwed rebuilds owedRetained from owed (after a restore).
func (s *state) indexOwed() {
	s.owedRetained = make(map[string][]owedKey)
	for _, k := range s.sortedOwed() {
		if w := s.owed[k]; w.Will.Retain && !w.Superseded {
			s.owedRetained[w.Will.Topic] = append(s.owedRetained[w.Will.Topic], k)
		}
	}
}

func (s *state) sortedOwed() []owedKey {
	return slices.SortedFunc(maps.Keys(s.owed), func(a, b owedKey) int {
		return cmp.Or(cmp.Compare(a.id, b.id), cmp.Compare(a.opened, b.opened))
	})
}

// OwedWills returns the owed wills, sorted by client id and index.
func (n *Node) OwedWills() []OwedWill { return n.fsm.OwedWills() }

// OwedWills returns the owed wills, sorted by client id and index.
func (f *FSM) OwedWills() []OwedWill {
	f.mu.RLock()
	defer f.mu.RUnlock()
	st := f.st
	out := make([]OwedWill, 0, len(st.owed))
	for _, k := range st.sortedOwed() {
		w := st.owed[k]
		w.Will = *copyWill(&w.Will)
		out = append(out, w)
	}
	return out
}

// OwedWill returns the will owed by id's connection opened at opened.
func (n *Node) OwedWill(id string, opened uint64) (OwedWill, bool) { return n.fsm.OwedWill(id, opened) }

// OwedWill returns the will owed by id's connection opened at opened.
func (f *FSM) OwedWill(id string, opened uint64) (OwedWill, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	w, ok := f.st.owed[owedKey{id, opened}]
	if ok {
		w.Will = *copyWill(&w.Will)
	}
	return w, ok
}

// OwedWillsSupported reports whether every server applies OweWill (log
// format version 5); until then the hooks do not propose it.
func (n *Node) OwedWillsSupported() bool { return n.logVers.min.Load() >= 5 }

// Snapshot record of an owed will (not skippable: a node that cannot keep
// owed wills must not load a state that has some).
//
//	str client_id | uvarint opened | varint opened_at | str owner |
//	bool ends_session | bool closed | varint closed_at | will (as in SetWill)
const recOwedWill byte = 8

func appendOwedRecord(b []byte, w *OwedWill) []byte {
	b = appendString(b, w.ClientID)
	b = appendUvarint(b, w.Opened)
	b = appendVarint(b, w.OpenedAt)
	b = appendString(b, w.Owner)
	b = appendBool(b, w.EndsSession)
	b = appendBool(b, w.Closed)
	b = appendVarint(b, w.ClosedAt)
	return appendWill(b, &w.Will)
}

func readOwedRecord(r *reader, st *state) error {
	w := OwedWill{ClientID: r.str(), Opened: r.uvarint(), OpenedAt: r.varint(), Owner: r.str(), EndsSession: r.bool(),
		Closed: r.bool(), ClosedAt: r.varint(), Will: r.will()}
	if err := r.end(); err != nil {
		return fmt.Errorf("owed will record: %w", err)
	}
	k := owedKey{w.ClientID, w.Opened}
	if w.ClientID == "" || w.Opened == 0 || w.Owner == "" {
		return fmt.Errorf("%w: owed will record %q: empty client id, index or owner", errCorrupt, w.ClientID)
	}
	if _, dup := st.owed[k]; dup {
		return fmt.Errorf("%w: duplicate owed will record %q %d", errCorrupt, w.ClientID, w.Opened)
	}
	st.owed[k] = w
	return nil
}

func cloneOwedIndex(m map[string][]owedKey) map[string][]owedKey {
	out := make(map[string][]owedKey, len(m))
	for t, ks := range m {
		out[t] = slices.Clone(ks)
	}
	return out
}

// Snapshot record of an owed will's format 7 fields, right after its
// record 8 when either is set (not skippable; only after record 11).
//
//	str client_id | uvarint opened | uvarint replaced | bool superseded
const recOwedLate byte = 12

func appendOwedLateRecord(b []byte, w *OwedWill) []byte {
	b = appendUvarint(appendString(b, w.ClientID), w.Opened)
	return appendBool(appendUvarint(b, w.Replaced), w.Superseded)
}

func readOwedLateRecord(r *reader, st *state) error {
	k := owedKey{r.str(), r.uvarint()}
	replaced, superseded := r.uvarint(), r.bool()
	if err := r.end(); err != nil {
		return fmt.Errorf("owed will format 7 record: %w", err)
	}
	w, ok := st.owed[k]
	if !ok || st.format < 7 || replaced != 0 && replaced < k.opened {
		return fmt.Errorf("%w: owed will format 7 record %q %d: no such owed will, no log format 7, or replaced at %d",
			errCorrupt, k.id, k.opened, replaced)
	}
	w.Replaced, w.Superseded = replaced, superseded
	st.owed[k] = w
	return nil
}
