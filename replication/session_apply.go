package replication

import (
	"fmt"
	"slices"
	"sort"
)

// applySession applies a validated session command (deterministic, like
// applyCommand: no clock, no map iteration order). ok is false for a type
// that is not a session command.
func (s *state) applySession(cmd Command, res *Result, evs []event) ([]event, bool) {
	idx := res.Index
	emit := func(c SessionChange) {
		c.Index = idx
		evs = append(evs, event{session: &c})
	}
	noSession := func(id string) {
		res.Err = fmt.Errorf("%w: %w: %v %q", ErrInvalidCommand, ErrNoSession, cmd.Type(), id)
	}
	switch c := cmd.(type) {
	case *SessionOpen:
		e := s.sessions[c.ClientID]
		retry := e != nil && c.At != 0 && e.Owner == c.Owner && e.OpenedAt == c.At
		if c.HasAsOf && s.touchFrom == 0 {
			s.touchFrom = idx
		}
		if c.Fenced && !retry {
			var cur uint64
			if e != nil {
				cur = e.OpenedIndex
			}
			if cur != c.IfOpened {
				res.Err = fmt.Errorf("%w: %v %q opened at %d, not %d", ErrReopened, c.Type(), c.ClientID, cur, c.IfOpened)
				return evs, true
			}
			if c.HasAsOf && cur == 0 {
				if t, why := s.openTouched(c.ClientID, c.AsOf); why != "" {
					res.Err = fmt.Errorf("%w: %v %q %s", ErrReopened, c.Type(), c.ClientID, why)
					res.Prev = t.owner
					return evs, true
				}
			}
		}
		if !retry && c.OweWill {
			evs = s.oweWill(c.ClientID, e, c.Owner, c.CleanStart, idx, evs)
		}
		e = s.mutableSession(c.ClientID)
		if retry {
			// The owner retried after an unknown outcome and the first try
			// committed: same answer, and a clean start must not discard
			// the session its own first try created.
			res.Present = e.OpenedPresent
		}
		if e != nil && c.CleanStart && !retry {
			// Clean start: the old session ends here, with everything it
			// held; observers see a delete then an open.
			delete(s.sessions, c.ClientID)
			s.touch(c.ClientID, idx, nil)
			emit(SessionChange{Kind: SessionDeleted, ClientID: c.ClientID, Owner: e.Owner, Will: copyWill(e.Will)})
			e = nil
		}
		if !retry {
			res.Present = e != nil
		}
		if e == nil {
			e = &sessionEntry{Session: Session{ClientID: c.ClientID, NextSeq: 1, Subscriptions: map[string]Subscription{}}}
			s.sessions[c.ClientID] = e
		}
		e.ProtocolVersion, e.ExpiryInterval, e.Owner = c.ProtocolVersion, c.ExpiryInterval, c.Owner
		e.Connected, e.DisconnectedAt = true, 0
		if !retry {
			// A retry keeps the first try's index: the owner may have
			// learnt either, and fences (IfOpened) must not break when a
			// late first try commits after the retry.
			e.OpenedIndex = idx
		}
		// Without an At there is no retry to answer (and no snapshot
		// record for it: replicas must agree).
		e.OpenedAt, e.OpenedPresent = c.At, res.Present && c.At != 0
		// A will belongs to one connection; a resumed session's old (maybe
		// delayed) will is cancelled by the reconnect (MQTT-3.1.3-9).
		e.Will = nil
		res.Changed = true
		emit(SessionChange{Kind: SessionOpened, ClientID: c.ClientID, Owner: c.Owner, Present: res.Present, At: c.At})
		if c.Will != nil {
			w := *c.Will
			e.Will = &w
			emit(SessionChange{Kind: WillSet, ClientID: c.ClientID, Owner: e.Owner, Will: copyWill(&w)})
		}
	case *SessionClose:
		if evs, ok := s.closeOwed(c, res, evs); ok {
			return evs, true
		}
		e := s.sessions[c.ClientID]
		if e == nil || e.Owner != c.Owner || !e.Connected || (c.IfOpened != 0 && e.OpenedIndex != c.IfOpened) {
			return evs, true // stale: closed, reopened or taken over since
		}
		e = s.mutableSession(c.ClientID)
		e.Connected, e.DisconnectedAt = false, c.At
		if c.SetExpiry {
			e.ExpiryInterval = c.ExpiryInterval
		}
		if c.WillPublished {
			e.Will = nil
		}
		res.Changed = true
		emit(SessionChange{Kind: SessionClosed, ClientID: c.ClientID, Owner: e.Owner, Will: copyWill(e.Will)})
	case *SessionDelete:
		e := s.sessions[c.ClientID]
		if e == nil || (c.IfOpened != 0 && e.OpenedIndex != c.IfOpened) {
			return evs, true
		}
		delete(s.sessions, c.ClientID)
		s.touch(c.ClientID, idx, nil)
		res.Changed = true
		emit(SessionChange{Kind: SessionDeleted, ClientID: c.ClientID, Owner: e.Owner, Will: copyWill(e.Will)})
	case *Subscribe:
		e := s.mutableSession(c.ClientID)
		if e == nil {
			noSession(c.ClientID)
			return evs, true
		}
		filters := make([]string, len(c.Subscriptions))
		for i, sub := range c.Subscriptions {
			e.Subscriptions[sub.Filter] = sub
			filters[i] = sub.Filter
		}
		res.Changed = true
		emit(SessionChange{Kind: SessionSubscribed, ClientID: c.ClientID, Owner: e.Owner, Filters: filters})
	case *Unsubscribe:
		e := s.mutableSession(c.ClientID)
		if e == nil {
			noSession(c.ClientID)
			return evs, true
		}
		var removed []string
		for _, f := range c.Filters {
			if _, ok := e.Subscriptions[f]; ok {
				delete(e.Subscriptions, f)
				removed = append(removed, f)
			}
		}
		if len(removed) > 0 {
			res.Changed = true
			emit(SessionChange{Kind: SessionUnsubscribed, ClientID: c.ClientID, Owner: e.Owner, Filters: removed})
		}
	case *Enqueue:
		evs = s.applyEnqueue(c, res, evs)
	case *QoS2Publish:
		evs = s.applyQoS2Publish(c, res, evs)
	case *Ack:
		e := s.sessions[c.ClientID]
		if e == nil {
			return evs, true // deleted meanwhile: nothing left to ack
		}
		acked := ackedSeqs(e.Queue, c)
		if len(acked) == 0 {
			return evs, true
		}
		e = s.mutableSession(c.ClientID)
		e.Queue = removeAcked(e.Queue, acked)
		res.Changed = true
		emit(SessionChange{Kind: QueueAcked, ClientID: c.ClientID, Owner: e.Owner, Seqs: acked})
	case *QueueRelease:
		e := s.sessions[c.ClientID]
		if e == nil {
			return evs, true
		}
		i, found := slices.BinarySearchFunc(e.Queue, c.Seq, func(m QueuedMessage, seq uint64) int {
			return cmpU64(m.Seq, seq)
		})
		if !found || (e.Queue[i].Released && e.Queue[i].PacketID == c.PacketID) {
			return evs, true
		}
		e = s.mutableSession(c.ClientID)
		e.Queue[i].Released, e.Queue[i].PacketID = true, c.PacketID
		res.Changed = true
		emit(SessionChange{Kind: QueueReleased, ClientID: c.ClientID, Owner: e.Owner, Seqs: []uint64{c.Seq}})
	case *QoS2Received:
		e := s.mutableSession(c.ClientID)
		if e == nil {
			noSession(c.ClientID)
			return evs, true
		}
		i, found := slices.BinarySearch(e.AwaitingRelease, c.PacketID)
		if !found {
			e.AwaitingRelease = slices.Insert(e.AwaitingRelease, i, c.PacketID)
			res.Changed = true
		}
	case *QoS2Released:
		e := s.sessions[c.ClientID]
		if e == nil {
			return evs, true
		}
		if i, found := slices.BinarySearch(e.AwaitingRelease, c.PacketID); found {
			e = s.mutableSession(c.ClientID)
			e.AwaitingRelease = slices.Delete(e.AwaitingRelease, i, i+1)
			res.Changed = true
		}
	case *SetWill:
		e := s.mutableSession(c.ClientID)
		if e == nil {
			noSession(c.ClientID)
			return evs, true
		}
		w := c.Will
		e.Will = &w
		res.Changed = true
		emit(SessionChange{Kind: WillSet, ClientID: c.ClientID, Owner: e.Owner, Will: copyWill(&w)})
	case *ClearWill:
		e := s.sessions[c.ClientID]
		if e == nil || e.Will == nil {
			return evs, true
		}
		e = s.mutableSession(c.ClientID)
		e.Will = nil
		res.Changed = true
		emit(SessionChange{Kind: WillCleared, ClientID: c.ClientID, Owner: e.Owner})
	case *ClaimWill:
		e := s.sessions[c.ClientID]
		if e == nil || e.Will == nil || e.Connected || e.OpenedIndex != c.IfOpened {
			return evs, true
		}
		e = s.mutableSession(c.ClientID)
		e.Will = nil
		res.Changed = true
		emit(SessionChange{Kind: WillCleared, ClientID: c.ClientID, Owner: e.Owner})
	case *PublishWill:
		evs = s.applyPublishWill(c, res, evs)
	case *TakeoverWill:
		evs = s.applyTakeoverWill(c, res, evs)
	case *OweWill:
		evs = s.applyOweWill(c, res, evs)
	default:
		return evs, false
	}
	return evs, true
}

// ackedSeqs returns the seqs of the messages in q (sorted by Seq) that c
// acknowledges, in order. Every delivered message is acknowledged by its
// own Ack (hooks' pump), so this runs once per message: it searches the
// queue instead of scanning it.
func ackedSeqs(q []QueuedMessage, c *Ack) []uint64 {
	k := sort.Search(len(q), func(i int) bool { return q[i].Seq > c.UpTo })
	acked := make([]uint64, 0, k+len(c.Seqs))
	for _, m := range q[:k] {
		acked = append(acked, m.Seq)
	}
	for _, seq := range c.Seqs {
		if seq <= c.UpTo {
			continue
		}
		if _, found := slices.BinarySearchFunc(q[k:], seq, func(m QueuedMessage, seq uint64) int { return cmpU64(m.Seq, seq) }); found {
			acked = append(acked, seq)
		}
	}
	if tail := acked[k:]; len(tail) > 1 {
		slices.Sort(tail)
		acked = acked[:k+len(slices.Compact(tail))]
	}
	return acked
}

// removeAcked removes acked (sorted, all in q) from q, a thawed entry's
// own queue, in place: the oldest messages are usually the ones
// acknowledged, which is a re-slice. Removed elements are cleared so
// that their payloads can be collected.
func removeAcked(q []QueuedMessage, acked []uint64) []QueuedMessage {
	if n := len(acked); q[n-1].Seq == acked[n-1] {
		// acked is a sorted subset of q's seqs ending at q[n-1]: the
		// first n.
		clear(q[:n])
		return q[n:]
	}
	return slices.DeleteFunc(q, func(m QueuedMessage) bool {
		_, found := slices.BinarySearch(acked, m.Seq)
		return found
	})
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// applyEnqueue queues one message for every target with a session, in
// Targets order, enforcing MaxQueued per session.
func (s *state) applyEnqueue(c *Enqueue, res *Result, evs []event) []event {
	res.Seqs = make([]uint64, len(c.Targets))
	for i, t := range c.Targets {
		e := s.mutableSession(t.ClientID)
		if e == nil {
			continue // expired or deleted since the proposer matched it
		}
		if c.MaxQueued > 0 && len(e.Queue) >= int(c.MaxQueued) {
			var evicted []uint64
			if c.Policy == DropOldest {
				// Evict the oldest unreleased messages until there is room
				// (more than one if the limit was lowered since).
				for len(e.Queue) >= int(c.MaxQueued) {
					v := slices.IndexFunc(e.Queue, func(m QueuedMessage) bool { return !m.Released })
					if v < 0 {
						break
					}
					evicted = append(evicted, e.Queue[v].Seq)
					e.Queue = slices.Delete(e.Queue, v, v+1)
				}
			}
			res.Dropped += uint64(len(evicted))
			full := len(e.Queue) >= int(c.MaxQueued)
			if full {
				// DropNewest, or only released messages left: the new
				// message is dropped too.
				res.Dropped++
			}
			evs = append(evs, event{session: &SessionChange{Kind: QueueDropped, ClientID: t.ClientID,
				Owner: e.Owner, Seqs: evicted, DroppedNew: full, Index: res.Index}})
			if full {
				continue
			}
		}
		seq := e.NextSeq
		e.NextSeq++
		e.Queue = append(e.Queue, QueuedMessage{
			Seq: seq, Topic: c.Topic, Payload: c.Payload, Blob: s.blob, QoS: t.QoS, Retain: t.Retain,
			SubscriptionIDs: t.SubscriptionIDs, Properties: c.Properties, Expires: c.Expires, Created: c.Created,
		})
		res.Seqs[i] = seq
		res.Changed = true
		evs = append(evs, event{session: &SessionChange{Kind: QueueAppended, ClientID: t.ClientID,
			Owner: e.Owner, Seqs: []uint64{seq}, Index: res.Index}})
	}
	return evs
}
