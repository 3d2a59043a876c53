package replication

import "slices"

// PublishWill claims ClientID's will for publication, like ClaimWill (only
// if the session is still the one opened at IfOpened, is disconnected and
// holds a will; Result.Changed says it was claimed), and in the same apply
// publishes it to the replicated state:
//
//   - queued (QoS 1/2, DropNewest under MaxQueued, 0 for no limit) for
//     every session with a matching subscription, as an Enqueue from the
//     hooks would queue it: QoS min(will, highest matching subscription),
//     every matching subscription identifier, retain kept when a matching
//     subscription has retain-as-published, nothing for the will's own
//     session when a matching subscription has no-local, nothing for
//     shared subscriptions (not durable);
//   - if the will is retained, stored as the retained value of its topic
//     (cleared when the payload is empty).
//
// So a will is never claimed without its persistent copies and its
// retained value, whatever happens to the claiming node after the commit.
// Live delivery (connected clean sessions, QoS 0 copies) stays with the
// claiming node, best effort. At (Unix ms, the claimer's clock) is the
// Created time of the copies and starts the will's message expiry.
//
//	str client_id | uvarint if_opened | varint at | uvarint max_queued
type PublishWill struct {
	ClientID  string
	IfOpened  uint64
	At        int64
	MaxQueued uint32
}

var _ Command = (*PublishWill)(nil)

// Type implements Command.
func (*PublishWill) Type() CommandType { return CmdPublishWill }

func (c *PublishWill) appendPayload(b []byte) []byte {
	b = appendString(b, c.ClientID)
	b = appendUvarint(b, c.IfOpened)
	b = appendVarint(b, c.At)
	return appendUvarint(b, uint64(c.MaxQueued))
}

func (c *PublishWill) validate() error {
	if c.ClientID == "" || c.IfOpened == 0 {
		return invalid(c.Type(), "empty client id or if_opened")
	}
	return nil
}

// TakeoverWill publishes, like PublishWill, the will of ClientID's
// connection that a new CONNECT takes over: only if the session is still
// the one opened at IfOpened and still connected (its connection is the
// one being taken over), holds a will with delay 0, and EndsSession: the
// takeover ends the old session (the new CONNECT has clean start, or the
// old session had expiry 0). That is what Mosquitto 2.0 does: a taken-over
// connection's will is published when its session ends with it, not when
// the session continues on the new connection, and not before a will
// delay. The hooks put it in the same entry as the new connection's
// SessionOpen or SessionDelete, before it.
//
//	str client_id | uvarint if_opened | varint at | uvarint max_queued | bool ends_session
type TakeoverWill struct {
	ClientID    string
	IfOpened    uint64
	At          int64
	MaxQueued   uint32
	EndsSession bool
}

var _ Command = (*TakeoverWill)(nil)

// Type implements Command.
func (*TakeoverWill) Type() CommandType { return CmdTakeoverWill }

func (c *TakeoverWill) appendPayload(b []byte) []byte {
	b = (&PublishWill{ClientID: c.ClientID, IfOpened: c.IfOpened, At: c.At, MaxQueued: c.MaxQueued}).appendPayload(b)
	return appendBool(b, c.EndsSession)
}

func (c *TakeoverWill) validate() error {
	if c.ClientID == "" || c.IfOpened == 0 {
		return invalid(c.Type(), "empty client id or if_opened")
	}
	return nil
}

// decodeWillCommand decodes the will commands added after the session
// commands; ok is false for another type.
func decodeWillCommand(t CommandType, r *reader) (Command, bool) {
	switch t {
	case CmdPublishWill:
		return &PublishWill{ClientID: r.str(), IfOpened: r.uvarint(), At: r.varint(), MaxQueued: r.u32()}, true
	case CmdTakeoverWill:
		return &TakeoverWill{ClientID: r.str(), IfOpened: r.uvarint(), At: r.varint(), MaxQueued: r.u32(), EndsSession: r.bool()}, true
	case CmdOweWill:
		return &OweWill{ClientID: r.str(), IfOpened: r.uvarint(), Owner: r.str()}, true
	}
	return nil, false
}

func (s *state) applyPublishWill(c *PublishWill, res *Result, evs []event) []event {
	if evs, ok := s.publishOwed(c, res, evs); ok {
		return evs
	}
	e := s.sessions[c.ClientID]
	if e == nil || e.Will == nil || e.Connected || e.OpenedIndex != c.IfOpened {
		return evs
	}
	return s.publishWillOf(c.ClientID, c.At, c.MaxQueued, res, evs)
}

func (s *state) applyTakeoverWill(c *TakeoverWill, res *Result, evs []event) []event {
	e := s.sessions[c.ClientID]
	if e == nil || e.Will == nil || !e.Connected || e.OpenedIndex != c.IfOpened || e.Will.DelaySeconds > 0 || !c.EndsSession {
		return evs
	}
	return s.publishWillOf(c.ClientID, c.At, c.MaxQueued, res, evs)
}

// publishWillOf clears the will of session id and publishes it to the
// replicated state (queued copies, retained value); res.Changed says so.
func (s *state) publishWillOf(id string, at int64, maxQueued uint32, res *Result, evs []event) []event {
	e := s.mutableSession(id)
	w := *e.Will
	e.Will = nil
	res.Changed = true
	evs = append(evs, event{session: &SessionChange{Kind: WillCleared, ClientID: id, Owner: e.Owner, At: at, Index: res.Index}})
	if w.Retain {
		s.supersedeOwed(w.Topic, allOwed)
	}
	return s.publishWill(id, &w, at, maxQueued, w.Retain, res, evs)
}

// publishWill publishes w, the will of client id, to the replicated
// state: queued copies, and the retained value if retain (the caller
// supersedes the owed wills it is newer than: supersedeOwed).
func (s *state) publishWill(id string, w *Will, at int64, maxQueued uint32, retain bool, res *Result, evs []event) []event {
	var expires int64
	if w.ExpirySeconds > 0 {
		expires = at + int64(w.ExpirySeconds)*1000
	}
	if retain {
		evs = s.retainWill(w, at, expires, res.Index, evs)
	}
	if w.QoS == 0 {
		return evs // QoS 0 copies are live deliveries only
	}
	enq := &Enqueue{Topic: w.Topic, Payload: w.Payload, Properties: w.Properties, Expires: expires, Created: at,
		MaxQueued: maxQueued, Policy: DropNewest}
	for _, sid := range s.sortedSessions() {
		if t, ok := willTarget(s.sessions[sid], w, id); ok {
			enq.Targets = append(enq.Targets, t)
		}
	}
	if len(enq.Targets) == 0 {
		return evs
	}
	sub := Result{Index: res.Index}
	evs = s.applyEnqueue(enq, &sub, evs)
	res.Seqs, res.Dropped = sub.Seqs, sub.Dropped
	return evs
}

func (s *state) retainWill(w *Will, at, expires int64, idx uint64, evs []event) []event {
	if len(w.Payload) == 0 {
		if _, ok := s.retained[w.Topic]; !ok {
			return evs
		}
		delete(s.retained, w.Topic)
		return append(evs, event{retained: &RetainedChange{Topic: w.Topic, Cleared: true, Index: idx}})
	}
	p := w.Properties
	m := RetainedMessage{Topic: w.Topic, Payload: w.Payload, QoS: w.QoS, PayloadFormat: p.PayloadFormat,
		ContentType: p.ContentType, ResponseTopic: p.ResponseTopic, CorrelationData: p.CorrelationData,
		UserProperties: p.UserProperties, Expires: expires, Created: at, Index: idx}
	s.retained[w.Topic] = m
	return append(evs, event{retained: &RetainedChange{Topic: w.Topic, Msg: m, Index: idx}})
}

// willTarget merges the subscriptions of session e that match the will
// (mochi's Subscription.Merge: highest QoS, every identifier, no-local if
// any); ok is false when the session gets no QoS 1/2 copy.
func willTarget(e *sessionEntry, w *Will, origin string) (QueueTarget, bool) {
	var qos byte
	var noLocal, rap, matched bool
	var ids []uint32
	for _, sub := range e.Subscriptions {
		if isSharedFilter(sub.Filter) || !matchFilter(sub.Filter, w.Topic) {
			continue
		}
		matched = true
		qos = max(qos, sub.QoS)
		noLocal = noLocal || sub.NoLocal
		rap = rap || sub.RetainAsPublished
		if sub.Identifier > 0 {
			ids = append(ids, sub.Identifier)
		}
	}
	qos = min(qos, w.QoS)
	if !matched || qos == 0 || (noLocal && e.ClientID == origin) {
		return QueueTarget{}, false
	}
	slices.Sort(ids)
	return QueueTarget{ClientID: e.ClientID, QoS: qos, Retain: w.Retain && rap, SubscriptionIDs: ids}, true
}
