package replication

import "fmt"

// QoS2Publish records an inbound QoS 2 PUBLISH of a persistent session
// (as QoS2Received) and, in the same entry, queues it for the persistent
// sessions it matched (Enqueue, nil when none did). Receipt and enqueue
// are one entry so that neither can happen without the other: a receipt
// recorded without its enqueue would make the client's resend (same packet
// id) look like a duplicate and drop the message for every subscriber.
// Result.Changed is false, and nothing is queued, for a packet id already
// awaiting release (a duplicate). Result.Seqs and Dropped are the
// Enqueue's.
//
// IfOpened, when not 0, fences the command to the connection that opened
// the session at that index: once the session was opened again (the
// client resumed elsewhere), it fails with ErrReopened and changes
// nothing. Without it, a forward that timed out (outcome unknown) and
// reached the leader seconds later, after the client had resumed on
// another node, resent the PUBLISH there and completed the QoS 2 flow
// (so the receipt was released), queued the message a second time (chaos
// seed 772869237). Encoded as type 23 (type 20 has no IfOpened).
//
//	str client_id | uvarint packet_id | bool has_enqueue [| Enqueue payload] [| uvarint if_opened (type 23)]
type QoS2Publish struct {
	ClientID string
	PacketID uint16
	Enqueue  *Enqueue
	IfOpened uint64
}

var _ Command = (*QoS2Publish)(nil)

// Type implements Command.
func (c *QoS2Publish) Type() CommandType {
	if c.IfOpened != 0 {
		return CmdQoS2PublishIf
	}
	return CmdQoS2Publish
}

func (c *QoS2Publish) appendPayload(b []byte) []byte {
	b = appendUvarint(appendString(b, c.ClientID), uint64(c.PacketID))
	b = appendBool(b, c.Enqueue != nil)
	if c.Enqueue != nil {
		b = c.Enqueue.appendPayload(b)
	}
	if c.IfOpened != 0 {
		b = appendUvarint(b, c.IfOpened)
	}
	return b
}

func decodeQoS2Publish(r *reader, fenced bool) *QoS2Publish {
	c := &QoS2Publish{ClientID: r.str(), PacketID: r.u16()}
	if r.bool() {
		e, _ := decodeSessionCommand(CmdEnqueue, r)
		c.Enqueue = e.(*Enqueue)
	}
	if fenced {
		if c.IfOpened = r.uvarint(); c.IfOpened == 0 {
			r.fail("qos2_publish_if without an index")
		}
	}
	return c
}

func (c *QoS2Publish) validate() error {
	if c.ClientID == "" || c.PacketID == 0 {
		return invalid(c.Type(), "empty client id or packet id")
	}
	if c.Enqueue != nil {
		return c.Enqueue.validate()
	}
	return nil
}

// applyQoS2Publish applies c (see QoS2Publish).
func (s *state) applyQoS2Publish(c *QoS2Publish, res *Result, evs []event) []event {
	if e := s.sessions[c.ClientID]; e != nil && c.IfOpened != 0 && e.OpenedIndex != c.IfOpened {
		res.Err = fmt.Errorf("%w: %w: %v %q opened at %d, not %d", ErrInvalidCommand, ErrReopened, c.Type(),
			c.ClientID, e.OpenedIndex, c.IfOpened)
		return evs
	}
	var r Result
	r.Index = res.Index
	evs, _ = s.applySession(&QoS2Received{ClientID: c.ClientID, PacketID: c.PacketID}, &r, evs)
	if r.Err != nil || !r.Changed {
		res.Err = r.Err
		return evs
	}
	res.Changed = true
	if c.Enqueue != nil {
		var q Result
		q.Index = res.Index
		evs = s.applyEnqueue(c.Enqueue, &q, evs)
		res.Seqs, res.Dropped = q.Seqs, q.Dropped
	}
	return evs
}
