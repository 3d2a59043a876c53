package replication

import (
	"fmt"
)

// Session commands (type bytes 6..17, see CommandType). Layouts use the
// primitives of codec.go; "props" is
//
//	u8 payload_format | str content_type | str response_topic |
//	bytes correlation_data | uvarint n | n x (str key | str value)
//
// the same layout RetainSet uses for its properties.

// SessionOpen connects ClientID on Owner (CONNECT accepted). Without
// CleanStart an existing session is resumed (Result.Present) and keeps its
// subscriptions and queue; with CleanStart any old session is dropped and a
// new one created. Either way the will is cleared (a will belongs to one
// connection: the hooks send SetWill in the same Batch when the CONNECT
// carries one).
//
// Fenced (type 24, SessionOpenIf; log version 3): the open applies only
// if the session's OpenedIndex is still IfOpened (0: no session), the
// state the CONNECT read, or if it is a retry of this same open (Owner
// and At); otherwise it fails with ErrReopened and changes nothing. An
// open that commits late, after its CONNECT gave up, must not take the
// session back from the connection the client has moved to, nor (clean
// start) delete it. Will, only when Fenced, is set in the same step: a
// SetWill beside a refused open would land on the newer session.
//
//	str client_id | u8 version | uvarint expiry | str owner | varint at | bool clean_start
//	[Fenced: uvarint if_opened | bool has_will | will (as SetWill's)]
type SessionOpen struct {
	ClientID        string
	ProtocolVersion byte
	ExpiryInterval  uint32
	Owner           string
	At              int64 // Unix ms, the owner's clock
	CleanStart      bool
	Fenced          bool
	IfOpened        uint64
	Will            *Will
	// OweWill (fenced only; type CmdSessionOpenOwe): a session this open
	// replaces while it is connected on another node keeps its will,
	// owed by that connection (owed_will.go), instead of losing it.
	OweWill bool
	// AsOf (fenced only, with HasAsOf; type CmdSessionOpenAsOf): the
	// index of the state the CONNECT read. With IfOpened 0 the open also
	// fails when the client id was touched since (touched.go).
	AsOf    uint64
	HasAsOf bool
}

// SessionClose marks ClientID disconnected at At, if Owner still owns it
// and, with IfOpened != 0, if it was not reopened since that SessionOpen's
// log index (a late close from a node that lost a takeover must not mark
// the new connection's session disconnected). WillPublished clears the
// will (it was sent); otherwise it stays for a delayed or a survivor's
// publication. SetExpiry applies an MQTT 5 DISCONNECT's new expiry.
//
//	str client_id | str owner | uvarint if_opened | varint at |
//	bool will_published | bool set_expiry | uvarint expiry
type SessionClose struct {
	ClientID       string
	Owner          string
	IfOpened       uint64
	At             int64
	WillPublished  bool
	SetExpiry      bool
	ExpiryInterval uint32
}

// SessionDelete removes ClientID's session (expiry, or a clean session's
// end). With IfOpened != 0 only if the session was not reopened since that
// SessionOpen (the expiry sweeper's conditional delete).
//
//	str client_id | uvarint if_opened
type SessionDelete struct {
	ClientID string
	IfOpened uint64
}

// Subscribe adds or replaces subscriptions of ClientID.
//
//	str client_id | uvarint n | n x (str filter | u8 qos | bool no_local |
//	bool retain_as_published | u8 retain_handling | uvarint identifier)
type Subscribe struct {
	ClientID      string
	Subscriptions []Subscription
}

// Unsubscribe removes filters of ClientID.
//
//	str client_id | uvarint n | n x str filter
type Unsubscribe struct {
	ClientID string
	Filters  []string
}

// DropPolicy says which message a full session queue gives up.
type DropPolicy byte

const (
	// DropNewest refuses the incoming message for a full queue (what
	// Mosquitto does): what is queued keeps its place.
	DropNewest DropPolicy = 0
	// DropOldest evicts the oldest message that is not released (a QoS 2
	// message whose PUBREC arrived still needs its PUBREL), then queues.
	DropOldest DropPolicy = 1
)

// QueueTarget is one session an Enqueue delivers to, with what the
// session's matching subscriptions make of the message.
type QueueTarget struct {
	ClientID        string
	QoS             byte
	Retain          bool
	SubscriptionIDs []uint32
}

// Enqueue queues one message for many sessions in one entry (fan-out to
// every matching persistent session, so a publish is one command however
// many sessions match). Targets without a session are skipped
// (Result.Seqs 0). MaxQueued (0: no limit) caps each queue; Policy says
// what gives; Result.Dropped counts the drops. The limit travels in the
// command so every replica enforces the one the proposer was configured
// with.
//
//	str topic | bytes payload | props | varint expires | varint created |
//	uvarint max_queued | u8 policy | uvarint n | n x (str client_id |
//	u8 qos | bool retain | uvarint k | k x uvarint subscription_id)
type Enqueue struct {
	Topic      string
	Payload    []byte
	Properties Properties
	Expires    int64 // Unix ms, 0 for never
	Created    int64 // Unix ms
	MaxQueued  uint32
	Policy     DropPolicy
	Targets    []QueueTarget
}

// Ack removes delivered messages of ClientID: every Seq <= UpTo (0: none)
// and every Seq listed (PUBACK / PUBCOMP, or expired messages).
//
//	str client_id | uvarint up_to | uvarint n | n x uvarint seq
type Ack struct {
	ClientID string
	UpTo     uint64
	Seqs     []uint64
}

// QueueRelease records that the QoS 2 message Seq of ClientID was PUBREC'd
// under PacketID: only PUBREL remains, with that packet id.
//
//	str client_id | uvarint seq | uvarint packet_id
type QueueRelease struct {
	ClientID string
	Seq      uint64
	PacketID uint16
}

// QoS2Received records an inbound QoS 2 PUBLISH (before PUBREC is sent).
// Result.Changed is false for a packet id already awaiting release: a
// duplicate that must not be delivered again.
//
//	str client_id | uvarint packet_id
type QoS2Received struct {
	ClientID string
	PacketID uint16
}

// QoS2Released records the PUBREL of an inbound QoS 2 packet id.
//
//	str client_id | uvarint packet_id
type QoS2Released struct {
	ClientID string
	PacketID uint16
}

// SetWill stores ClientID's will.
//
//	str client_id | str topic | bytes payload | u8 qos | bool retain |
//	uvarint delay | uvarint expiry | props
type SetWill struct {
	ClientID string
	Will     Will
}

// ClearWill removes ClientID's will.
//
//	str client_id
type ClearWill struct {
	ClientID string
}

// ClaimWill takes the will of a disconnected session for publication: it
// clears the will, with Result.Changed, only if the session is still the
// one opened at IfOpened, is disconnected and still holds a will. The node
// that publishes wills (the leader) claims first and publishes only on
// Changed, so a will is published once even if two nodes try, and never
// after the client reconnected (the reconnect's SessionOpen moved
// OpenedIndex on). ClearWill cannot do this: it would clear the will of a
// connection opened in between.
//
//	str client_id | uvarint if_opened
type ClaimWill struct {
	ClientID string
	IfOpened uint64
}

// Compile-time assertions.
var (
	_ Command = (*ClaimWill)(nil)
	_ Command = (*SessionOpen)(nil)
	_ Command = (*SessionClose)(nil)
	_ Command = (*SessionDelete)(nil)
	_ Command = (*Subscribe)(nil)
	_ Command = (*Unsubscribe)(nil)
	_ Command = (*Enqueue)(nil)
	_ Command = (*Ack)(nil)
	_ Command = (*QueueRelease)(nil)
	_ Command = (*QoS2Received)(nil)
	_ Command = (*QoS2Released)(nil)
	_ Command = (*SetWill)(nil)
	_ Command = (*ClearWill)(nil)
)

func (c *SessionOpen) Type() CommandType {
	if c.HasAsOf {
		return CmdSessionOpenAsOf
	}
	if c.OweWill {
		return CmdSessionOpenOwe
	}
	if c.Fenced {
		return CmdSessionOpenIf
	}
	return CmdSessionOpen
}
func (*SessionClose) Type() CommandType  { return CmdSessionClose }
func (*SessionDelete) Type() CommandType { return CmdSessionDelete }
func (*Subscribe) Type() CommandType     { return CmdSubscribe }
func (*Unsubscribe) Type() CommandType   { return CmdUnsubscribe }
func (*Enqueue) Type() CommandType       { return CmdEnqueue }
func (*Ack) Type() CommandType           { return CmdAck }
func (*QueueRelease) Type() CommandType  { return CmdQueueRelease }
func (*QoS2Received) Type() CommandType  { return CmdQoS2Received }
func (*QoS2Released) Type() CommandType  { return CmdQoS2Released }
func (*SetWill) Type() CommandType       { return CmdSetWill }
func (*ClearWill) Type() CommandType     { return CmdClearWill }
func (*ClaimWill) Type() CommandType     { return CmdClaimWill }

func appendProps(b []byte, p *Properties) []byte {
	b = append(b, p.PayloadFormat)
	b = appendString(b, p.ContentType)
	b = appendString(b, p.ResponseTopic)
	b = appendBytes(b, p.CorrelationData)
	b = appendUvarint(b, uint64(len(p.UserProperties)))
	for _, u := range p.UserProperties {
		b = appendString(b, u.Key)
		b = appendString(b, u.Value)
	}
	return b
}

func (r *reader) props() Properties {
	p := Properties{PayloadFormat: r.u8(), ContentType: r.str(), ResponseTopic: r.str(), CorrelationData: r.bytes()}
	if n := r.count(2); n > 0 {
		p.UserProperties = make([]UserProperty, n)
		for i := range p.UserProperties {
			p.UserProperties[i] = UserProperty{Key: r.str(), Value: r.str()}
		}
	}
	return p
}

func appendU32s(b []byte, v []uint32) []byte {
	b = appendUvarint(b, uint64(len(v)))
	for _, x := range v {
		b = appendUvarint(b, uint64(x))
	}
	return b
}

func (r *reader) u32s() []uint32 {
	n := r.count(1)
	if n == 0 {
		return nil
	}
	v := make([]uint32, n)
	for i := range v {
		v[i] = r.u32()
	}
	return v
}

func (r *reader) u32() uint32 {
	v := r.uvarint()
	if v > 0xFFFFFFFF {
		r.fail("u32 %d out of range", v)
	}
	return uint32(v)
}

func (r *reader) u16() uint16 {
	v := r.uvarint()
	if v > 0xFFFF {
		r.fail("u16 %d out of range", v)
	}
	return uint16(v)
}

func (c *SessionOpen) appendPayload(b []byte) []byte {
	b = appendString(b, c.ClientID)
	b = append(b, c.ProtocolVersion)
	b = appendUvarint(b, uint64(c.ExpiryInterval))
	b = appendString(b, c.Owner)
	b = appendVarint(b, c.At)
	b = appendBool(b, c.CleanStart)
	if !c.Fenced {
		return b
	}
	b = appendUvarint(b, c.IfOpened)
	b = appendBool(b, c.Will != nil)
	if c.Will != nil {
		b = appendWill(b, c.Will)
	}
	if c.HasAsOf {
		b = appendUvarint(appendBool(b, c.OweWill), c.AsOf)
	}
	return b
}

func (c *SessionClose) appendPayload(b []byte) []byte {
	b = appendString(b, c.ClientID)
	b = appendString(b, c.Owner)
	b = appendUvarint(b, c.IfOpened)
	b = appendVarint(b, c.At)
	b = appendBool(b, c.WillPublished)
	b = appendBool(b, c.SetExpiry)
	return appendUvarint(b, uint64(c.ExpiryInterval))
}

func (c *SessionDelete) appendPayload(b []byte) []byte {
	b = appendString(b, c.ClientID)
	return appendUvarint(b, c.IfOpened)
}

func (c *Subscribe) appendPayload(b []byte) []byte {
	b = appendString(b, c.ClientID)
	b = appendUvarint(b, uint64(len(c.Subscriptions)))
	for _, s := range c.Subscriptions {
		b = appendString(b, s.Filter)
		b = append(b, s.QoS)
		b = appendBool(b, s.NoLocal)
		b = appendBool(b, s.RetainAsPublished)
		b = append(b, s.RetainHandling)
		b = appendUvarint(b, uint64(s.Identifier))
	}
	return b
}

func (c *Unsubscribe) appendPayload(b []byte) []byte {
	b = appendString(b, c.ClientID)
	b = appendUvarint(b, uint64(len(c.Filters)))
	for _, f := range c.Filters {
		b = appendString(b, f)
	}
	return b
}

func (c *Enqueue) appendPayload(b []byte) []byte {
	b = appendString(b, c.Topic)
	b = appendBytes(b, c.Payload)
	b = appendProps(b, &c.Properties)
	b = appendVarint(b, c.Expires)
	b = appendVarint(b, c.Created)
	b = appendUvarint(b, uint64(c.MaxQueued))
	b = append(b, byte(c.Policy))
	b = appendUvarint(b, uint64(len(c.Targets)))
	for _, t := range c.Targets {
		b = appendString(b, t.ClientID)
		b = append(b, t.QoS)
		b = appendBool(b, t.Retain)
		b = appendU32s(b, t.SubscriptionIDs)
	}
	return b
}

func (c *Ack) appendPayload(b []byte) []byte {
	b = appendString(b, c.ClientID)
	b = appendUvarint(b, c.UpTo)
	b = appendUvarint(b, uint64(len(c.Seqs)))
	for _, s := range c.Seqs {
		b = appendUvarint(b, s)
	}
	return b
}

func (c *QueueRelease) appendPayload(b []byte) []byte {
	b = appendString(b, c.ClientID)
	b = appendUvarint(b, c.Seq)
	return appendUvarint(b, uint64(c.PacketID))
}

func (c *QoS2Received) appendPayload(b []byte) []byte {
	return appendUvarint(appendString(b, c.ClientID), uint64(c.PacketID))
}

func (c *QoS2Released) appendPayload(b []byte) []byte {
	return appendUvarint(appendString(b, c.ClientID), uint64(c.PacketID))
}

func appendWill(b []byte, w *Will) []byte {
	b = appendString(b, w.Topic)
	b = appendBytes(b, w.Payload)
	b = append(b, w.QoS)
	b = appendBool(b, w.Retain)
	b = appendUvarint(b, uint64(w.DelaySeconds))
	b = appendUvarint(b, uint64(w.ExpirySeconds))
	return appendProps(b, &w.Properties)
}

func (r *reader) will() Will {
	w := Will{Topic: r.str(), Payload: r.bytes(), QoS: r.u8(), Retain: r.bool(), DelaySeconds: r.u32(), ExpirySeconds: r.u32()}
	w.Properties = r.props()
	return w
}

func (c *SetWill) appendPayload(b []byte) []byte {
	return appendWill(appendString(b, c.ClientID), &c.Will)
}

func (c *ClearWill) appendPayload(b []byte) []byte { return appendString(b, c.ClientID) }

func (c *ClaimWill) appendPayload(b []byte) []byte {
	return appendUvarint(appendString(b, c.ClientID), c.IfOpened)
}

// decodeSessionCommand decodes the payload of a session command type; ok
// is false for a type that is not one.
func decodeSessionCommand(t CommandType, r *reader) (Command, bool) {
	switch t {
	case CmdSessionOpen, CmdSessionOpenIf, CmdSessionOpenOwe, CmdSessionOpenAsOf:
		c := &SessionOpen{ClientID: r.str(), ProtocolVersion: r.u8(), ExpiryInterval: r.u32(), Owner: r.str(),
			At: r.varint(), CleanStart: r.bool(), OweWill: t == CmdSessionOpenOwe}
		if t != CmdSessionOpen {
			c.Fenced, c.IfOpened = true, r.uvarint()
			if r.bool() {
				w := r.will()
				c.Will = &w
			}
		}
		if t == CmdSessionOpenAsOf {
			c.HasAsOf, c.OweWill, c.AsOf = true, r.bool(), r.uvarint()
		}
		return c, true
	case CmdSessionClose:
		return &SessionClose{ClientID: r.str(), Owner: r.str(), IfOpened: r.uvarint(), At: r.varint(),
			WillPublished: r.bool(), SetExpiry: r.bool(), ExpiryInterval: r.u32()}, true
	case CmdSessionDelete:
		return &SessionDelete{ClientID: r.str(), IfOpened: r.uvarint()}, true
	case CmdSubscribe:
		c := &Subscribe{ClientID: r.str()}
		if n := r.count(6); n > 0 {
			c.Subscriptions = make([]Subscription, n)
			for i := range c.Subscriptions {
				c.Subscriptions[i] = Subscription{Filter: r.str(), QoS: r.u8(), NoLocal: r.bool(),
					RetainAsPublished: r.bool(), RetainHandling: r.u8(), Identifier: r.u32()}
			}
		}
		return c, true
	case CmdUnsubscribe:
		c := &Unsubscribe{ClientID: r.str()}
		if n := r.count(1); n > 0 {
			c.Filters = make([]string, n)
			for i := range c.Filters {
				c.Filters[i] = r.str()
			}
		}
		return c, true
	case CmdEnqueue:
		c := &Enqueue{Topic: r.str(), Payload: r.bytes(), Properties: r.props(), Expires: r.varint(),
			Created: r.varint(), MaxQueued: r.u32(), Policy: DropPolicy(r.u8())}
		if n := r.count(4); n > 0 {
			c.Targets = make([]QueueTarget, n)
			for i := range c.Targets {
				c.Targets[i] = QueueTarget{ClientID: r.str(), QoS: r.u8(), Retain: r.bool(), SubscriptionIDs: r.u32s()}
			}
		}
		return c, true
	case CmdAck:
		c := &Ack{ClientID: r.str(), UpTo: r.uvarint()}
		if n := r.count(1); n > 0 {
			c.Seqs = make([]uint64, n)
			for i := range c.Seqs {
				c.Seqs[i] = r.uvarint()
			}
		}
		return c, true
	case CmdQueueRelease:
		return &QueueRelease{ClientID: r.str(), Seq: r.uvarint(), PacketID: r.u16()}, true
	case CmdQoS2Received:
		return &QoS2Received{ClientID: r.str(), PacketID: r.u16()}, true
	case CmdQoS2Released:
		return &QoS2Released{ClientID: r.str(), PacketID: r.u16()}, true
	case CmdSetWill:
		return &SetWill{ClientID: r.str(), Will: r.will()}, true
	case CmdClearWill:
		return &ClearWill{ClientID: r.str()}, true
	case CmdClaimWill:
		return &ClaimWill{ClientID: r.str(), IfOpened: r.uvarint()}, true
	case CmdQoS2Publish:
		return decodeQoS2Publish(r, false), true
	case CmdQoS2PublishIf:
		return decodeQoS2Publish(r, true), true
	}
	return nil, false
}

func invalid(t CommandType, format string, args ...any) error {
	return fmt.Errorf("%w: %v: %s", ErrInvalidCommand, t, fmt.Sprintf(format, args...))
}

func validProps(t CommandType, p *Properties) error {
	if p.PayloadFormat > 1 {
		return invalid(t, "payload format %d", p.PayloadFormat)
	}
	return nil
}

func (c *SessionOpen) validate() error {
	switch {
	case c.ClientID == "" || c.Owner == "":
		return invalid(c.Type(), "empty client id or owner")
	case c.ProtocolVersion < 3 || c.ProtocolVersion > 5:
		return invalid(c.Type(), "protocol version %d", c.ProtocolVersion)
	case (c.Will != nil || c.OweWill || c.HasAsOf) && !c.Fenced:
		return invalid(c.Type(), "a will, an owed will or as-of in an open that is not fenced")
	case c.Will != nil:
		return (&SetWill{ClientID: c.ClientID, Will: *c.Will}).validate()
	}
	return nil
}

func (c *SessionClose) validate() error {
	if c.ClientID == "" || c.Owner == "" {
		return invalid(c.Type(), "empty client id or owner")
	}
	return nil
}

func (c *SessionDelete) validate() error {
	if c.ClientID == "" {
		return invalid(c.Type(), "empty client id")
	}
	return nil
}

func (c *Subscribe) validate() error {
	if c.ClientID == "" || len(c.Subscriptions) == 0 {
		return invalid(c.Type(), "empty client id or no subscriptions")
	}
	for _, s := range c.Subscriptions {
		if s.Filter == "" || s.QoS > 2 || s.RetainHandling > 2 {
			return invalid(c.Type(), "filter %q qos %d retain handling %d", s.Filter, s.QoS, s.RetainHandling)
		}
	}
	return nil
}

func (c *Unsubscribe) validate() error {
	if c.ClientID == "" || len(c.Filters) == 0 {
		return invalid(c.Type(), "empty client id or no filters")
	}
	return nil
}

func (c *Enqueue) validate() error {
	switch {
	case c.Topic == "":
		return invalid(c.Type(), "empty topic")
	case len(c.Targets) == 0:
		return invalid(c.Type(), "no targets")
	case c.Policy > DropOldest:
		return invalid(c.Type(), "drop policy %d", c.Policy)
	}
	if err := validProps(c.Type(), &c.Properties); err != nil {
		return err
	}
	// A duplicate target would queue the message twice for one session:
	// the hooks dedupe overlapping subscriptions before proposing.
	seen := make(map[string]struct{}, len(c.Targets))
	for _, t := range c.Targets {
		if t.ClientID == "" || t.QoS > 2 {
			return invalid(c.Type(), "target %q qos %d", t.ClientID, t.QoS)
		}
		if _, dup := seen[t.ClientID]; dup {
			return invalid(c.Type(), "duplicate target %q", t.ClientID)
		}
		seen[t.ClientID] = struct{}{}
	}
	return nil
}

func (c *Ack) validate() error {
	if c.ClientID == "" || (c.UpTo == 0 && len(c.Seqs) == 0) {
		return invalid(c.Type(), "empty client id or nothing to ack")
	}
	return nil
}

func (c *QueueRelease) validate() error {
	if c.ClientID == "" || c.Seq == 0 || c.PacketID == 0 {
		return invalid(c.Type(), "empty client id, seq or packet id")
	}
	return nil
}

func (c *QoS2Received) validate() error {
	if c.ClientID == "" || c.PacketID == 0 {
		return invalid(c.Type(), "empty client id or packet id")
	}
	return nil
}

func (c *QoS2Released) validate() error {
	if c.ClientID == "" || c.PacketID == 0 {
		return invalid(c.Type(), "empty client id or packet id")
	}
	return nil
}

func (c *SetWill) validate() error {
	switch {
	case c.ClientID == "" || c.Will.Topic == "":
		return invalid(c.Type(), "empty client id or will topic")
	case c.Will.QoS > 2:
		return invalid(c.Type(), "will qos %d", c.Will.QoS)
	}
	return validProps(c.Type(), &c.Will.Properties)
}

func (c *ClearWill) validate() error {
	if c.ClientID == "" {
		return invalid(c.Type(), "empty client id")
	}
	return nil
}

func (c *ClaimWill) validate() error {
	if c.ClientID == "" {
		return invalid(c.Type(), "empty client id")
	}
	if c.IfOpened == 0 {
		return invalid(c.Type(), "zero if_opened")
	}
	return nil
}
