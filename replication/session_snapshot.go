package replication

import (
	"fmt"
	"maps"
	"slices"
)

// Session snapshot records (snapshot.go has the framing).
//
//	session: str client_id | u8 version | uvarint expiry | str owner |
//	         bool connected | uvarint opened_index | varint disconnected_at |
//	         uvarint next_seq | uvarint n | n x subscription (as in Subscribe,
//	         sorted by filter) | bool has_will | [will (as in SetWill)] |
//	         uvarint k | k x uvarint packet_id (awaiting release)
//	queued:  str client_id | uvarint seq | str topic | bytes payload | u8 qos |
//	         bool retain | uvarint k | k x uvarint subscription_id | props |
//	         varint expires | varint created | bool released | uvarint packet_id

func appendSessionRecord(b []byte, s *Session) []byte {
	b = appendString(b, s.ClientID)
	b = append(b, s.ProtocolVersion)
	b = appendUvarint(b, uint64(s.ExpiryInterval))
	b = appendString(b, s.Owner)
	b = appendBool(b, s.Connected)
	b = appendUvarint(b, s.OpenedIndex)
	b = appendVarint(b, s.DisconnectedAt)
	b = appendUvarint(b, s.NextSeq)
	// Sorted: equal states give byte-identical snapshots.
	filters := slices.Sorted(maps.Keys(s.Subscriptions))
	subs := make([]Subscription, len(filters))
	for i, f := range filters {
		subs[i] = s.Subscriptions[f]
	}
	b = appendUvarint(b, uint64(len(subs)))
	for _, sub := range subs {
		b = appendString(b, sub.Filter)
		b = append(b, sub.QoS)
		b = appendBool(b, sub.NoLocal)
		b = appendBool(b, sub.RetainAsPublished)
		b = append(b, sub.RetainHandling)
		b = appendUvarint(b, uint64(sub.Identifier))
	}
	b = appendBool(b, s.Will != nil)
	if s.Will != nil {
		b = appendWill(b, s.Will)
	}
	b = appendUvarint(b, uint64(len(s.AwaitingRelease)))
	for _, p := range s.AwaitingRelease {
		b = appendUvarint(b, uint64(p))
	}
	return b
}

// maxNextSeq bounds a restored session's NextSeq. A crafted snapshot or
// backup near 2^64 would make Seq wrap around after a few messages, and the
// queue must stay sorted by Seq (acknowledgements search it); from this
// bound, counting up at a million messages a second takes 290,000 years.
const maxNextSeq = 1 << 63

func readSessionRecord(r *reader) (*sessionEntry, error) {
	s := Session{ClientID: r.str(), ProtocolVersion: r.u8(), ExpiryInterval: r.u32(), Owner: r.str(),
		Connected: r.bool(), OpenedIndex: r.uvarint(), DisconnectedAt: r.varint(), NextSeq: r.uvarint()}
	n := r.count(6)
	s.Subscriptions = make(map[string]Subscription, n)
	for range n {
		sub := Subscription{Filter: r.str(), QoS: r.u8(), NoLocal: r.bool(), RetainAsPublished: r.bool(),
			RetainHandling: r.u8(), Identifier: r.u32()}
		s.Subscriptions[sub.Filter] = sub
	}
	if r.bool() {
		w := r.will()
		s.Will = &w
	}
	if k := r.count(1); k > 0 {
		s.AwaitingRelease = make([]uint16, k)
		for i := range s.AwaitingRelease {
			s.AwaitingRelease[i] = r.u16()
		}
	}
	if err := r.end(); err != nil {
		return nil, fmt.Errorf("session record: %w", err)
	}
	if s.ClientID == "" || s.NextSeq == 0 || s.NextSeq > maxNextSeq || !slices.IsSorted(s.AwaitingRelease) {
		return nil, fmt.Errorf("%w: session record %q: bad client id, next seq or packet ids", errCorrupt, s.ClientID)
	}
	return &sessionEntry{Session: s}, nil
}

func appendQueued(b []byte, m *QueuedMessage) []byte {
	b = appendUvarint(b, m.Seq)
	b = appendString(b, m.Topic)
	b = appendBytes(b, m.Payload)
	b = append(b, m.QoS)
	b = appendBool(b, m.Retain)
	b = appendU32s(b, m.SubscriptionIDs)
	b = appendProps(b, &m.Properties)
	b = appendVarint(b, m.Expires)
	b = appendVarint(b, m.Created)
	b = appendBool(b, m.Released)
	return appendUvarint(b, uint64(m.PacketID))
}

// readQueuedRecord appends a queued message to the session it names, which
// must be the session record just read, in increasing Seq order below
// NextSeq: anything else is corruption.
func readQueuedRecord(r *reader, last *sessionEntry) error {
	client := r.str()
	m := QueuedMessage{Seq: r.uvarint(), Topic: r.str(), Payload: r.bytes(), QoS: r.u8(), Retain: r.bool(),
		SubscriptionIDs: r.u32s(), Properties: r.props(), Expires: r.varint(), Created: r.varint(),
		Released: r.bool(), PacketID: r.u16()}
	if err := r.end(); err != nil {
		return fmt.Errorf("queued record: %w", err)
	}
	switch {
	case last == nil || last.ClientID != client:
		return fmt.Errorf("%w: queued record for %q outside its session", errCorrupt, client)
	case m.Seq == 0 || m.Seq >= last.NextSeq:
		return fmt.Errorf("%w: queued record %q seq %d, next seq %d", errCorrupt, client, m.Seq, last.NextSeq)
	case len(last.Queue) > 0 && last.Queue[len(last.Queue)-1].Seq >= m.Seq:
		return fmt.Errorf("%w: queued records of %q out of order", errCorrupt, client)
	}
	last.Queue = append(last.Queue, m)
	return nil
}
