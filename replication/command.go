package replication

import (
	"fmt"
)

// CommandType is the first byte of every log entry this package writes.
type CommandType byte

// Command types. They are on disk in every raft log and snapshot and on the
// wire between nodes of different versions:
//
//	ONLY ADD TO THE END. Never renumber, reuse or remove a value, and never
//	change the payload of an existing type: add a new type instead.
//
// A type with the skippable bit (0x80) set may be ignored by an older node
// that does not know it (Consul's rule for rolling upgrades); an unknown
// type without that bit stops the node, because replicas that apply
// different things diverge silently, which is worse than a crash.
const (
	cmdInvalid      CommandType = 0
	CmdRetainSet    CommandType = 1
	CmdRetainClear  CommandType = 2
	CmdClaimOwner   CommandType = 3
	CmdReleaseOwner CommandType = 4
	CmdBatch        CommandType = 5
	// Persistent sessions (session_command.go).
	CmdSessionOpen   CommandType = 6
	CmdSessionClose  CommandType = 7
	CmdSessionDelete CommandType = 8
	CmdSubscribe     CommandType = 9
	CmdUnsubscribe   CommandType = 10
	CmdEnqueue       CommandType = 11
	CmdAck           CommandType = 12
	CmdQueueRelease  CommandType = 13
	CmdQoS2Received  CommandType = 14
	CmdQoS2Released  CommandType = 15
	CmdSetWill       CommandType = 16
	CmdClearWill     CommandType = 17
	CmdClaimWill     CommandType = 18
	CmdReclaimOwner  CommandType = 19
	CmdQoS2Publish   CommandType = 20
	CmdPublishWill   CommandType = 21 // will_publish.go
	CmdTakeoverWill  CommandType = 22 // will_publish.go
	// CmdQoS2PublishIf is QoS2Publish with IfOpened (session_qos2.go).
	CmdQoS2PublishIf CommandType = 23
	// CmdSessionOpenIf is SessionOpen fenced to the state the CONNECT
	// read, with the will (session_command.go).
	CmdSessionOpenIf CommandType = 24
	// CmdDeparture (0x99, skippable) is in departure.go.
	// CmdBlobChunk (25), CmdWithBlob (26), CmdBlobDrop (27) are in blob.go.
	// CmdSessionOpenOwe (28) and CmdOweWill (29) are in owed_will.go.
	// CmdSessionOpenAsOf (30) is in touched.go.
	// CmdLogFormat (31) is in logformat.go.
	// Next: 32 (or 0x9a for a command old nodes may skip).

	cmdSkippable CommandType = 0x80
)

func (t CommandType) String() string {
	switch t {
	case CmdRetainSet:
		return "retain_set"
	case CmdRetainClear:
		return "retain_clear"
	case CmdClaimOwner:
		return "claim_owner"
	case CmdReleaseOwner:
		return "release_owner"
	case CmdBatch:
		return "batch"
	case CmdSessionOpen:
		return "session_open"
	case CmdSessionClose:
		return "session_close"
	case CmdSessionDelete:
		return "session_delete"
	case CmdSubscribe:
		return "subscribe"
	case CmdUnsubscribe:
		return "unsubscribe"
	case CmdEnqueue:
		return "enqueue"
	case CmdAck:
		return "ack"
	case CmdQueueRelease:
		return "queue_release"
	case CmdQoS2Received:
		return "qos2_received"
	case CmdQoS2Released:
		return "qos2_released"
	case CmdSetWill:
		return "set_will"
	case CmdClearWill:
		return "clear_will"
	case CmdClaimWill:
		return "claim_will"
	case CmdReclaimOwner:
		return "reclaim_owner"
	case CmdQoS2Publish:
		return "qos2_publish"
	case CmdPublishWill:
		return "publish_will"
	case CmdTakeoverWill:
		return "takeover_will"
	case CmdQoS2PublishIf:
		return "qos2_publish_if"
	case CmdSessionOpenIf:
		return "session_open_if"
	case CmdDeparture:
		return "departure"
	case CmdBlobChunk:
		return "blob_chunk"
	case CmdWithBlob:
		return "with_blob"
	case CmdBlobDrop:
		return "blob_drop"
	case CmdSessionOpenOwe:
		return "session_open_owe"
	case CmdOweWill:
		return "owe_will"
	case CmdSessionOpenAsOf:
		return "session_open_as_of"
	case CmdLogFormat:
		return "log_format"
	}
	return fmt.Sprintf("command(%d)", byte(t))
}

// Command is a state-machine command. The set is closed: only this
// package's types implement it.
type Command interface {
	// Type is the command's type byte.
	Type() CommandType
	// appendPayload appends the encoding after the type byte.
	appendPayload(b []byte) []byte
	// validate reports a domain error (wrapping ErrInvalidCommand).
	validate() error
}

// Compile-time assertions: every command implements Command.
var (
	_ Command = (*RetainSet)(nil)
	_ Command = (*RetainClear)(nil)
	_ Command = (*ClaimOwner)(nil)
	_ Command = (*ReclaimOwner)(nil)
	_ Command = (*ReleaseOwner)(nil)
	_ Command = (*Batch)(nil)
)

// RetainSet stores Msg as the retained message of Msg.Topic, replacing any
// previous one. Msg.Index is ignored (the state machine assigns it).
//
//	str topic | bytes payload | u8 qos | u8 payload_format | str content_type |
//	str response_topic | bytes correlation_data |
//	uvarint n | n x (str key | str value) | varint expires | varint created
type RetainSet struct {
	Msg RetainedMessage
}

// RetainClear removes the retained message of Topic. With IfIndex != 0 it
// only does so if the stored message is still the one set at that log index
// (a conditional clear: the expiry sweeper uses it, so it never removes a
// value that was replaced meanwhile).
//
//	str topic | uvarint if_index
type RetainClear struct {
	Topic   string
	IfIndex uint64
}

// ClaimOwner makes Node the owner of ClientID with the next epoch; the
// result carries the new epoch and the previous owner, whose node must drop
// its connection (MQTT 5 reason 0x8E, session taken over).
//
//	str client_id | str node | varint at
type ClaimOwner struct {
	ClientID string
	Node     string
	At       int64 // Unix ms, the claiming node's clock
}

// ReclaimOwner is a claim retried after it could not be committed (no
// quorum, a partition): it takes ClientID over only if the current owner's
// connection is not newer than this one (Since <= At, At being when this
// connection was established). A client that moved on to another node
// while this node was cut off must not be disconnected there by its
// abandoned connection's late claim. Result.Changed is false when it lost;
// the claiming node then drops its own connection.
//
//	str client_id | str node | varint at
type ReclaimOwner struct {
	ClientID string
	Node     string
	At       int64 // Unix ms: when the connection was established
}

// ReleaseOwner removes the ownership of ClientID only if Node still holds it
// at Epoch: a node that lost a takeover race can never release the winner.
//
//	str client_id | str node | uvarint epoch
type ReleaseOwner struct {
	ClientID string
	Node     string
	Epoch    uint64
}

// Batch applies several commands atomically in one log entry (group
// commit). Batches do not nest.
//
//	uvarint n | n x bytes(type byte | payload)
type Batch struct {
	Commands []Command
}

func (*RetainSet) Type() CommandType    { return CmdRetainSet }
func (*RetainClear) Type() CommandType  { return CmdRetainClear }
func (*ClaimOwner) Type() CommandType   { return CmdClaimOwner }
func (*ReclaimOwner) Type() CommandType { return CmdReclaimOwner }
func (*ReleaseOwner) Type() CommandType { return CmdReleaseOwner }
func (*Batch) Type() CommandType        { return CmdBatch }

func (c *RetainSet) appendPayload(b []byte) []byte {
	m := &c.Msg
	b = appendString(b, m.Topic)
	b = appendBytes(b, m.Payload)
	b = append(b, m.QoS, m.PayloadFormat)
	b = appendString(b, m.ContentType)
	b = appendString(b, m.ResponseTopic)
	b = appendBytes(b, m.CorrelationData)
	b = appendUvarint(b, uint64(len(m.UserProperties)))
	for _, p := range m.UserProperties {
		b = appendString(b, p.Key)
		b = appendString(b, p.Value)
	}
	b = appendVarint(b, m.Expires)
	return appendVarint(b, m.Created)
}

func (c *RetainClear) appendPayload(b []byte) []byte {
	b = appendString(b, c.Topic)
	return appendUvarint(b, c.IfIndex)
}

func (c *ClaimOwner) appendPayload(b []byte) []byte {
	b = appendString(b, c.ClientID)
	b = appendString(b, c.Node)
	return appendVarint(b, c.At)
}

func (c *ReclaimOwner) appendPayload(b []byte) []byte {
	b = appendString(b, c.ClientID)
	b = appendString(b, c.Node)
	return appendVarint(b, c.At)
}

func (c *ReleaseOwner) appendPayload(b []byte) []byte {
	b = appendString(b, c.ClientID)
	b = appendString(b, c.Node)
	return appendUvarint(b, c.Epoch)
}

func (c *Batch) appendPayload(b []byte) []byte {
	b = appendUvarint(b, uint64(len(c.Commands)))
	for _, sub := range c.Commands {
		b = appendBytes(b, EncodeCommand(sub))
	}
	return b
}

func (c *RetainSet) validate() error {
	switch {
	case c.Msg.Topic == "":
		return fmt.Errorf("%w: retain_set: empty topic", ErrInvalidCommand)
	case len(c.Msg.Payload) == 0:
		// An empty retained payload means "clear" in MQTT; say so
		// explicitly with RetainClear so the log is unambiguous.
		return fmt.Errorf("%w: retain_set: empty payload (use RetainClear)", ErrInvalidCommand)
	case c.Msg.QoS > 2:
		return fmt.Errorf("%w: retain_set: qos %d", ErrInvalidCommand, c.Msg.QoS)
	case c.Msg.PayloadFormat > 1:
		return fmt.Errorf("%w: retain_set: payload format %d", ErrInvalidCommand, c.Msg.PayloadFormat)
	}
	return nil
}

func (c *RetainClear) validate() error {
	if c.Topic == "" {
		return fmt.Errorf("%w: retain_clear: empty topic", ErrInvalidCommand)
	}
	return nil
}

func (c *ClaimOwner) validate() error {
	if c.ClientID == "" || c.Node == "" {
		return fmt.Errorf("%w: claim_owner: empty client id or node", ErrInvalidCommand)
	}
	return nil
}

func (c *ReclaimOwner) validate() error {
	if c.ClientID == "" || c.Node == "" {
		return fmt.Errorf("%w: reclaim_owner: empty client id or node", ErrInvalidCommand)
	}
	return nil
}

func (c *ReleaseOwner) validate() error {
	if c.ClientID == "" || c.Node == "" || c.Epoch == 0 {
		return fmt.Errorf("%w: release_owner: empty client id, node or epoch", ErrInvalidCommand)
	}
	return nil
}

// validate checks the batch's shape only; each command is validated when it
// is applied, so one bad command does not reject its neighbours.
func (c *Batch) validate() error {
	for _, sub := range c.Commands {
		if sub == nil {
			return fmt.Errorf("%w: batch: nil command", ErrInvalidCommand)
		}
		if sub.Type() == CmdBatch {
			return fmt.Errorf("%w: batch: nested batch", ErrInvalidCommand)
		}
	}
	return nil
}

// EncodeCommand returns the log-entry encoding of c: its type byte, then its
// payload.
func EncodeCommand(c Command) []byte {
	return c.appendPayload(append(make([]byte, 0, 64), byte(c.Type())))
}

// DecodeCommand decodes a log entry. It returns (nil, nil) for an unknown
// skippable type, and an error wrapping errCorrupt for anything malformed.
func DecodeCommand(b []byte) (Command, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("%w: empty entry", errCorrupt)
	}
	t := CommandType(b[0])
	r := reader{b: b[1:]}
	var c Command
	switch t {
	case CmdRetainSet:
		m := RetainedMessage{Topic: r.str(), Payload: r.bytes(), QoS: r.u8(), PayloadFormat: r.u8()}
		m.ContentType = r.str()
		m.ResponseTopic = r.str()
		m.CorrelationData = r.bytes()
		if n := r.count(2); n > 0 {
			m.UserProperties = make([]UserProperty, n)
			for i := range m.UserProperties {
				m.UserProperties[i] = UserProperty{Key: r.str(), Value: r.str()}
			}
		}
		m.Expires = r.varint()
		m.Created = r.varint()
		c = &RetainSet{Msg: m}
	case CmdRetainClear:
		c = &RetainClear{Topic: r.str(), IfIndex: r.uvarint()}
	case CmdClaimOwner:
		c = &ClaimOwner{ClientID: r.str(), Node: r.str(), At: r.varint()}
	case CmdReclaimOwner:
		c = &ReclaimOwner{ClientID: r.str(), Node: r.str(), At: r.varint()}
	case CmdReleaseOwner:
		c = &ReleaseOwner{ClientID: r.str(), Node: r.str(), Epoch: r.uvarint()}
	case CmdDeparture:
		c = decodeDeparture(&r)
	case CmdLogFormat:
		c = &LogFormat{Version: r.u32()}
	case CmdBatch:
		n := r.count(2)
		bc := &Batch{Commands: make([]Command, 0, n)}
		for range n {
			sub := r.raw(r.uvarint())
			if r.err != nil {
				break
			}
			if len(sub) > 0 && CommandType(sub[0]) == CmdBatch {
				return nil, fmt.Errorf("%w: nested batch", errCorrupt)
			}
			sc, err := DecodeCommand(sub)
			if err != nil {
				return nil, fmt.Errorf("batch command %d: %w", len(bc.Commands), err)
			}
			if sc != nil { // skippable unknown commands are dropped
				bc.Commands = append(bc.Commands, sc)
			}
		}
		c = bc
	default:
		if sc, ok := decodeSessionCommand(t, &r); ok {
			c = sc
			break
		}
		if wc, ok := decodeWillCommand(t, &r); ok {
			c = wc
			break
		}
		if bc, ok := decodeBlobCommand(t, &r); ok {
			c = bc
			break
		}
		if t&cmdSkippable != 0 {
			return nil, nil
		}
		return nil, fmt.Errorf("%w: unknown command type %d", errCorrupt, byte(t))
	}
	if err := r.end(); err != nil {
		return nil, fmt.Errorf("%v: %w", t, err)
	}
	return c, nil
}

// Result is the outcome of one applied command.
type Result struct {
	// Index is the raft log index of the entry that carried the command.
	Index uint64
	// Changed reports whether the state changed: always for RetainSet and
	// ClaimOwner; for RetainClear whether a message was removed; for
	// ReleaseOwner whether the release was current; for Batch whether any
	// command changed something; for QoS2Received false means a duplicate
	// (the packet id already awaits its PUBREL).
	Changed bool
	// Epoch is the new epoch for ClaimOwner and the released one for
	// ReleaseOwner.
	Epoch uint64
	// Prev is the owner that ClaimOwner replaced, or the owner found by a
	// ReleaseOwner (zero if none).
	Prev Owner
	// Present (SessionOpen): an existing session was resumed (MQTT
	// CONNACK session present).
	Present bool
	// Seqs (Enqueue): the sequence number given to each target, in
	// Targets order; 0 where nothing was queued (no such session, or the
	// message was dropped by a full queue under DropNewest).
	Seqs []uint64
	// Dropped (Enqueue): messages dropped by full queues (the new one
	// under DropNewest, evicted ones under DropOldest).
	Dropped uint64
	// Results holds one result per command of a Batch.
	Results []Result
	// Err is a domain error (wrapping ErrInvalidCommand): the command was
	// committed but changed nothing. Node.Apply also returns it.
	Err error
}
