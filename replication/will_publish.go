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

// decodeWillCommand decodes the will commands added after the session
// commands; ok is false for another type.
func decodeWillCommand(t CommandType, r *reader) (Command, bool) {
	if t != CmdPublishWill {
		return nil, false
	}
	return &PublishWill{ClientID: r.str(), IfOpened: r.uvarint(), At: r.varint(), MaxQueued: r.u32()}, true
}

func (s *state) applyPublishWill(c *PublishWill, res *Result, evs []event) []event {
	e := s.sessions[c.ClientID]
	if e == nil || e.Will == nil || e.Connected || e.OpenedIndex != c.IfOpened {
		return evs
	}
	w := *e.Will
	e = s.mutableSession(c.ClientID)
	e.Will = nil
	res.Changed = true
	evs = append(evs, event{session: &SessionChange{Kind: WillCleared, ClientID: c.ClientID, Owner: e.Owner, Index: res.Index}})
	var expires int64
	if w.ExpirySeconds > 0 {
		expires = c.At + int64(w.ExpirySeconds)*1000
	}
	if w.Retain {
		evs = s.retainWill(&w, c.At, expires, res.Index, evs)
	}
	if w.QoS == 0 {
		return evs // QoS 0 copies are live deliveries only
	}
	enq := &Enqueue{Topic: w.Topic, Payload: w.Payload, Properties: w.Properties, Expires: expires, Created: c.At,
		MaxQueued: c.MaxQueued, Policy: DropNewest}
	for _, id := range s.sortedSessions() {
		if t, ok := willTarget(s.sessions[id], &w, c.ClientID); ok {
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
