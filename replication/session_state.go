package replication

import (
	"maps"
	"slices"
	"sync/atomic"
)

// Persistent sessions as the cluster stores them: this package's own types
// (never mochi's), so the state machine is testable without a broker. The
// hooks translate to and from mochi. See DESIGN.md "Persistent sessions".

// NeverExpires is the MQTT 5 session expiry interval that means "never".
const NeverExpires uint32 = 0xFFFFFFFF

// Subscription is one subscription of a session with its MQTT 5 options.
type Subscription struct {
	Filter            string
	QoS               byte
	NoLocal           bool
	RetainAsPublished bool
	RetainHandling    byte   // 0, 1 or 2
	Identifier        uint32 // MQTT 5 subscription identifier, 0 for none
}

// Properties are the MQTT 5 publish properties a stored message carries
// (wills and queued messages). Expiry is not here: it is the absolute
// Expires deadline of the message.
type Properties struct {
	PayloadFormat   byte // 0 unspecified bytes, 1 UTF-8
	ContentType     string
	ResponseTopic   string
	CorrelationData []byte
	UserProperties  []UserProperty
}

// Will is a session's will message.
type Will struct {
	Topic   string
	Payload []byte
	QoS     byte
	Retain  bool
	// DelaySeconds is the MQTT 5 will delay interval.
	DelaySeconds uint32
	// ExpirySeconds is the will's MQTT 5 message expiry interval, 0 for
	// none. It is relative: the deadline starts when the will is published.
	ExpirySeconds uint32
	Properties    Properties
}

// QueuedMessage is a message queued for (or in flight to) one session.
// It is keyed by Seq, a per-session sequence number assigned by the state
// machine, never by MQTT packet id: packet ids are per connection, are
// reused, and a new node resends with fresh ones (DESIGN.md).
type QueuedMessage struct {
	Seq     uint64
	Topic   string
	Payload []byte
	// Blob, when set, is the payload (Payload is then empty): a large
	// message stored as a blob (blob.go).
	Blob *BlobRef
	// QoS is the delivery QoS for this session (min of publish and
	// subscription QoS); Retain the retain flag as delivered.
	QoS    byte
	Retain bool
	// SubscriptionIDs are the identifiers of the session's matching
	// subscriptions (MQTT 5).
	SubscriptionIDs []uint32
	Properties      Properties
	// Expires is the absolute deadline in Unix ms, 0 for never; Created is
	// when the publishing node received it (Unix ms). Both come from the
	// command: Apply never reads the clock.
	Expires int64
	Created int64
	// Released: the client acknowledged the QoS 2 PUBLISH with PUBREC
	// under PacketID; only PUBREL (with that same packet id) remains, so
	// a node taking the session over must not resend the PUBLISH.
	Released bool
	PacketID uint16
}

// Session is a persistent session. Read APIs return deep copies.
type Session struct {
	ClientID        string
	ProtocolVersion byte   // 3, 4 or 5
	ExpiryInterval  uint32 // seconds after disconnect; NeverExpires for never
	// Owner is the node that holds (or last held) the connection.
	Owner     string
	Connected bool
	// OpenedIndex is the log index of the SessionOpen that last connected
	// the session: a fencing token for conditional closes and deletes.
	OpenedIndex uint64
	// OpenedAt is the At of that SessionOpen (unique per owner: the hooks
	// never reuse one) and OpenedPresent what it answered: an owner that
	// retries an open whose outcome it could not learn gets the first
	// answer again, not "present" for the session its first try created.
	OpenedAt      int64
	OpenedPresent bool
	// DisconnectedAt is when the session was closed (Unix ms, from the
	// command), 0 while connected.
	DisconnectedAt int64
	Subscriptions  map[string]Subscription
	Will           *Will
	// Queue holds the queued and in-flight messages in Seq order.
	Queue []QueuedMessage
	// NextSeq is the Seq the next queued message gets (starts at 1).
	NextSeq uint64
	// AwaitingRelease are the inbound QoS 2 packet ids received (PUBREC
	// sent) whose PUBREL has not arrived, sorted: a duplicate PUBLISH with
	// one of them must not be delivered again, on any node.
	AwaitingRelease []uint16
}

// SessionSummary is one line of Sessions().
type SessionSummary struct {
	ClientID       string
	Owner          string
	Connected      bool
	QueueDepth     int
	HasWill        bool
	ExpiryInterval uint32
	DisconnectedAt int64
	OpenedIndex    uint64
}

// SessionChangeKind says what a SessionChange reports.
type SessionChangeKind byte

const (
	SessionOpened SessionChangeKind = iota + 1
	SessionClosed
	SessionDeleted
	SessionSubscribed
	SessionUnsubscribed
	QueueAppended
	QueueAcked
	QueueDropped
	QueueReleased
	WillSet
	WillCleared
	// WillOwed: the session's will was moved aside, owed by its replaced
	// connection (OweWill). WillOwedDue: that connection was closed
	// without DISCONNECT; the will (in Will) is due. WillOwedPublished:
	// a PublishWill with At published it (as WillCleared for a session's).
	WillOwed
	WillOwedDue
	WillOwedPublished
)

func (k SessionChangeKind) String() string {
	switch k {
	case SessionOpened:
		return "session_opened"
	case SessionClosed:
		return "session_closed"
	case SessionDeleted:
		return "session_deleted"
	case SessionSubscribed:
		return "session_subscribed"
	case SessionUnsubscribed:
		return "session_unsubscribed"
	case QueueAppended:
		return "queue_appended"
	case QueueAcked:
		return "queue_acked"
	case QueueDropped:
		return "queue_dropped"
	case QueueReleased:
		return "queue_released"
	case WillSet:
		return "will_set"
	case WillCleared:
		return "will_cleared"
	case WillOwed:
		return "will_owed"
	case WillOwedDue:
		return "will_owed_due"
	case WillOwedPublished:
		return "will_owed_published"
	}
	return "session_change(?)"
}

// SessionChange is passed to Config.OnSession after an applied command
// changed a session. QoS 2 receive state changes are not reported (nothing
// mirrors them; read Session when adopting).
type SessionChange struct {
	Kind     SessionChangeKind
	ClientID string
	// Owner is the session's owner after the change.
	Owner string
	// Present (SessionOpened): an existing session was resumed.
	Present bool
	// Seqs: the appended, acked, evicted (QueueDropped) or released
	// sequence numbers.
	Seqs []uint64
	// DroppedNew (QueueDropped): the incoming message was dropped for this
	// session (it never got a Seq).
	DroppedNew bool
	// Filters: the subscribed or unsubscribed filters.
	Filters []string
	// Will (SessionDeleted, SessionClosed): the will the session still
	// held, for a node that must publish it.
	Will *Will
	// At (WillCleared by a will's publication: PublishWill, TakeoverWill):
	// the claim's At, by which the node that wrote it knows its own;
	// (SessionOpened) the open's At, by which its owner knows an open
	// whose write's reply it did not get.
	At int64
	// Opened (WillOwedPublished): the index of the connection that owed it.
	Opened uint64
	Index  uint64
}

// sessionEntry is a stored session. Clones of the state (snapshots) share
// entries; frozen marks an entry a clone may be reading, so the applier
// copies it before its first mutation (copy-on-write) instead of copying
// every queue on every snapshot.
type sessionEntry struct {
	Session
	frozen atomic.Bool
}

// copyProps deep-copies the slices that callers could mutate. Stored byte
// slices are never mutated, but read APIs hand out copies anyway: a caller
// must not be able to corrupt replicated state through a returned value.
func copyProps(p Properties) Properties {
	p.CorrelationData = slices.Clone(p.CorrelationData)
	p.UserProperties = slices.Clone(p.UserProperties)
	return p
}

func copyWill(w *Will) *Will {
	if w == nil {
		return nil
	}
	c := *w
	c.Payload = slices.Clone(w.Payload)
	c.Properties = copyProps(w.Properties)
	return &c
}

func copyQueued(m QueuedMessage) QueuedMessage {
	m.Payload = slices.Clone(m.Payload)
	m.SubscriptionIDs = slices.Clone(m.SubscriptionIDs)
	m.Properties = copyProps(m.Properties)
	return m
}

// export returns a deep copy for readers.
func (s *Session) export() Session {
	c := s.exportHead()
	c.Queue = make([]QueuedMessage, len(s.Queue))
	for i, m := range s.Queue {
		c.Queue[i] = copyQueued(m)
	}
	return c
}

// exportHead is export without the queued messages (Queue nil).
func (s *Session) exportHead() Session {
	c := *s
	c.Subscriptions = maps.Clone(s.Subscriptions)
	if c.Subscriptions == nil {
		c.Subscriptions = map[string]Subscription{}
	}
	c.Will = copyWill(s.Will)
	c.Queue = nil
	c.AwaitingRelease = slices.Clone(s.AwaitingRelease)
	return c
}

func (s *Session) summary() SessionSummary {
	return SessionSummary{ClientID: s.ClientID, Owner: s.Owner, Connected: s.Connected,
		QueueDepth: len(s.Queue), HasWill: s.Will != nil, ExpiryInterval: s.ExpiryInterval,
		DisconnectedAt: s.DisconnectedAt, OpenedIndex: s.OpenedIndex}
}

// thaw returns a private copy of a frozen entry's containers. Payloads and
// other immutable slices stay shared: the applier replaces them, never
// writes into them.
func (e *sessionEntry) thaw() *sessionEntry {
	c := &sessionEntry{Session: e.Session}
	c.Subscriptions = maps.Clone(e.Subscriptions)
	c.Queue = slices.Clone(e.Queue)
	c.AwaitingRelease = slices.Clone(e.AwaitingRelease)
	if e.Will != nil {
		w := *e.Will
		c.Will = &w
	}
	return c
}

// mutableSession returns the entry of id ready for mutation (thawed if a
// clone may share it), or nil.
func (s *state) mutableSession(id string) *sessionEntry {
	e := s.sessions[id]
	if e == nil || !e.frozen.Load() {
		return e
	}
	e = e.thaw()
	s.sessions[id] = e
	return e
}

// freezeSessions marks every entry shared (called by clone).
func (s *state) freezeSessions() map[string]*sessionEntry {
	for _, e := range s.sessions {
		e.frozen.Store(true)
	}
	return maps.Clone(s.sessions)
}

func (s *state) sortedSessions() []string {
	return slices.Sorted(maps.Keys(s.sessions))
}

// expiredSession is a sweep candidate.
type expiredSession struct {
	ClientID    string
	OpenedIndex uint64
}

// sessionExpired reports whether a disconnected session's expiry passed at
// nowMs (never for a connected one, one with NeverExpires, or one whose
// will has not been claimed yet).
func sessionExpired(s *Session, nowMs int64) bool {
	// A session still holding a will is kept until the will is claimed
	// (ClaimWill): it is published at the latest when the session expires
	// (MQTT-3.1.3-9), and deleting first would lose it.
	if s.Connected || s.ExpiryInterval == NeverExpires || s.Will != nil {
		return false
	}
	return nowMs >= s.DisconnectedAt+int64(s.ExpiryInterval)*1000
}
