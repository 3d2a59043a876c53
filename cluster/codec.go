package cluster

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Wire format of the forwarding protocol (after the mux byte and handshake,
// see mux.go). Every frame is
//
//	u32 big-endian N   length of what follows, 1 <= N <= MaxFrameSize
//	u8  type           framePublish (the only type of protocol version 1);
//	                   frameRoute and frameRouteAck since 2 (routeack.go),
//	                   frameRouteSnap since 3 (routesync.go)
//	... body
//
// and a publish body is
//
//	u8       flags     bits 0-1 QoS, bit 2 retain, bit 3 payload format present, bits 4-7 zero
//	str      topic     (str = uvarint length + bytes)
//	uvarint  message expiry, remaining seconds, 0 = none
//	[u8      payload format, if flag bit 3]
//	str      content type
//	str      response topic
//	str      correlation data
//	uvarint  n user properties, then n x (str key, str value)
//	str      origin client id
//	uvarint  n shared groups, then n x str (full "$share/group/filter")
//	bytes    payload: the rest of the frame, so it is never copied into a header
//
// The golden test in codec_test.go pins these bytes: a change there is a
// protocol change and must bump ProtocolVersion.

// Frame types. Append-only: values are on the wire.
const (
	framePublish   byte = 1
	frameRoute     byte = 2 // protocol 2: the sender's route delta (routeack.go)
	frameRouteAck  byte = 3 // protocol 2: receiver to sender, how far it holds the sender's routes
	frameRouteSnap byte = 4 // protocol 3: part of the sender's full route entry (routesync.go)
)

const (
	frameLenSize = 4
	// DefaultMaxFrameSize fits the seed configuration's 256 MB MQTT packet
	// limit plus the frame header.
	DefaultMaxFrameSize = 256<<20 + 64<<10
)

const (
	flagQoSMask      = 0x03
	flagRetain       = 0x04
	flagPayloadFmt   = 0x08
	flagReservedMask = 0xF0
)

var (
	// ErrFrameTooLarge is returned for a frame whose length exceeds the limit.
	ErrFrameTooLarge = errors.New("frame too large")
	// ErrBadFrame is returned for a frame that does not decode.
	ErrBadFrame = errors.New("bad frame")
)

// UserProperty is an MQTT 5 user property; order and duplicates are kept.
type UserProperty struct {
	Key   string `json:"key"`
	Value string `json:"value"`
}

// Message is a publish as it crosses the cluster: the MQTT application
// message plus the properties that must survive the hop. Forward does not
// copy it: the caller must not modify a Message (or its slices) after handing
// it to Forward. A Message handed to Deliver belongs to the Deliverer.
type Message struct {
	Topic   string
	Payload []byte
	QoS     byte
	Retain  bool
	// MessageExpiry is the REMAINING lifetime in seconds at the time of
	// forwarding (MQTT-3.3.2-6), 0 when the message does not expire.
	MessageExpiry    uint32
	PayloadFormat    byte
	PayloadFormatSet bool
	ContentType      string
	ResponseTopic    string
	CorrelationData  []byte
	UserProperties   []UserProperty
	// OriginClient is the publishing client's id on the origin node.
	OriginClient string
	// Shared is set by the cluster on the receiving side only: the shared
	// groups (full "$share/group/filter" strings) for which this node was
	// chosen to deliver the message. Every other shared group on the
	// receiving node must be skipped for this message. It is ignored by
	// Forward (the cluster makes the decision, see Node.Forward).
	Shared []string

	// received marks a message that came from a peer; Forward refuses it so
	// a message is never forwarded twice even if a caller loops it back.
	received bool
}

// publishBodyLen is the exact N of the frame encoding m with shared groups.
func publishBodyLen(m *Message, shared []string) int {
	n := 1 + 1 + sizeString(len(m.Topic)) + sizeUvarint(uint64(m.MessageExpiry))
	if m.PayloadFormatSet {
		n++
	}
	n += sizeString(len(m.ContentType)) + sizeString(len(m.ResponseTopic)) + sizeString(len(m.CorrelationData))
	n += sizeUvarint(uint64(len(m.UserProperties)))
	for _, p := range m.UserProperties {
		n += sizeString(len(p.Key)) + sizeString(len(p.Value))
	}
	n += sizeString(len(m.OriginClient))
	n += sizeUvarint(uint64(len(shared)))
	for _, s := range shared {
		n += sizeString(len(s))
	}
	return n + len(m.Payload)
}

// appendPublishHeader appends the frame length, type and every field but the
// payload; the caller writes m.Payload right after it.
func appendPublishHeader(b []byte, m *Message, shared []string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(publishBodyLen(m, shared)))
	b = append(b, framePublish)
	flags := m.QoS & flagQoSMask
	if m.Retain {
		flags |= flagRetain
	}
	if m.PayloadFormatSet {
		flags |= flagPayloadFmt
	}
	b = append(b, flags)
	b = appendString(b, m.Topic)
	b = appendUvarint(b, uint64(m.MessageExpiry))
	if m.PayloadFormatSet {
		b = append(b, m.PayloadFormat)
	}
	b = appendString(b, m.ContentType)
	b = appendString(b, m.ResponseTopic)
	b = appendBytes(b, m.CorrelationData)
	b = appendUvarint(b, uint64(len(m.UserProperties)))
	for _, p := range m.UserProperties {
		b = appendString(b, p.Key)
		b = appendString(b, p.Value)
	}
	b = appendString(b, m.OriginClient)
	b = appendUvarint(b, uint64(len(shared)))
	for _, s := range shared {
		b = appendString(b, s)
	}
	return b
}

// appendPublishFrame appends a complete frame (header and payload).
func appendPublishFrame(b []byte, m *Message, shared []string) []byte {
	return append(appendPublishHeader(b, m, shared), m.Payload...)
}

// decodeFrame decodes a frame body (the N bytes after the length). The
// returned Message aliases body for Payload and CorrelationData: the caller
// must not reuse body.
func decodeFrame(body []byte) (*Message, error) {
	if len(body) == 0 {
		return nil, fmt.Errorf("%w: empty", ErrBadFrame)
	}
	if body[0] != framePublish {
		return nil, fmt.Errorf("%w: unknown type %d", ErrBadFrame, body[0])
	}
	r := reader{b: body[1:]}
	m := &Message{received: true}
	flags := r.u8()
	if flags&flagReservedMask != 0 || flags&flagQoSMask == 3 {
		return nil, fmt.Errorf("%w: flags %#x", ErrBadFrame, flags)
	}
	m.QoS = flags & flagQoSMask
	m.Retain = flags&flagRetain != 0
	m.Topic = r.str()
	exp := r.uvarint()
	if exp > 0xFFFFFFFF {
		r.fail(errors.New("expiry out of range"))
	}
	m.MessageExpiry = uint32(exp)
	if flags&flagPayloadFmt != 0 {
		m.PayloadFormatSet = true
		m.PayloadFormat = r.u8()
	}
	m.ContentType = r.str()
	m.ResponseTopic = r.str()
	if cd := r.bytes(); len(cd) > 0 {
		m.CorrelationData = cd
	}
	if n := r.count(2); n > 0 {
		m.UserProperties = make([]UserProperty, n)
		for i := range m.UserProperties {
			m.UserProperties[i] = UserProperty{Key: r.str(), Value: r.str()}
		}
	}
	m.OriginClient = r.str()
	if n := r.count(1); n > 0 {
		m.Shared = make([]string, n)
		for i := range m.Shared {
			m.Shared[i] = r.str()
		}
	}
	if r.err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadFrame, r.err)
	}
	if !ValidTopic(m.Topic) {
		return nil, fmt.Errorf("%w: invalid topic", ErrBadFrame)
	}
	if len(r.b) > 0 {
		m.Payload = r.b
	}
	return m, nil
}

// --- gossip messages (memberlist user messages and push/pull state) ---

// Gossip message types, first byte of a memberlist user message.
// Append-only: values are on the wire.
const (
	gossipRouteDelta byte = 1
	gossipLeave      byte = 2 // "I am leaving gracefully", sent reliably before memberlist's Leave
	gossipRouteHead  byte = 3 // "my routes are at (incarnation, version)": lets peers notice lost deltas
)

// stateFormat is the first byte of LocalState; bump it on format changes.
const stateFormat byte = 1

// delta: u8 type | u8 op | uvarint incarnation | uvarint version | str node | str filter
func appendDelta(b []byte, d routeDelta) []byte {
	b = append(b, gossipRouteDelta, byte(d.Op))
	b = appendUvarint(b, d.Incarnation)
	b = appendUvarint(b, d.Version)
	b = appendString(b, d.Node)
	return appendString(b, d.Filter)
}

// route head: u8 type | uvarint incarnation | uvarint version | str node
func appendHead(b []byte, node string, inc, ver uint64) []byte {
	b = append(b, gossipRouteHead)
	b = appendUvarint(b, inc)
	b = appendUvarint(b, ver)
	return appendString(b, node)
}

func decodeHead(b []byte) (node string, inc, ver uint64, err error) {
	r := reader{b: b}
	if t := r.u8(); r.err == nil && t != gossipRouteHead {
		return "", 0, 0, fmt.Errorf("unknown gossip message type %d", t)
	}
	inc, ver, node = r.uvarint(), r.uvarint(), r.str()
	if r.err == nil && len(r.b) != 0 {
		r.fail(errors.New("trailing bytes"))
	}
	if r.err != nil {
		return "", 0, 0, fmt.Errorf("decode route head: %w", r.err)
	}
	return node, inc, ver, nil
}

// leave intent: u8 type | str node
func appendLeave(b []byte, node string) []byte {
	return appendString(append(b, gossipLeave), node)
}

func decodeLeave(b []byte) (string, error) {
	r := reader{b: b}
	if t := r.u8(); r.err == nil && t != gossipLeave {
		return "", fmt.Errorf("unknown gossip message type %d", t)
	}
	node := r.str()
	if r.err == nil && len(r.b) != 0 {
		r.fail(errors.New("trailing bytes"))
	}
	if r.err != nil {
		return "", fmt.Errorf("decode leave intent: %w", r.err)
	}
	return node, nil
}

func decodeDelta(b []byte) (routeDelta, error) {
	r := reader{b: b}
	if t := r.u8(); r.err == nil && t != gossipRouteDelta {
		return routeDelta{}, fmt.Errorf("unknown gossip message type %d", t)
	}
	d := routeDelta{Op: routeOp(r.u8()), Incarnation: r.uvarint(), Version: r.uvarint(), Node: r.str(), Filter: r.str()}
	if r.err == nil && len(r.b) != 0 {
		r.fail(errors.New("trailing bytes"))
	}
	if r.err != nil {
		return routeDelta{}, fmt.Errorf("decode route delta: %w", r.err)
	}
	return d, nil
}

// state: u8 format | uvarint n | n x (str node | uvarint inc | uvarint ver | uvarint m | m x str filter)
func appendState(b []byte, entries []nodeRoutes) []byte {
	b = append(b, stateFormat)
	b = appendUvarint(b, uint64(len(entries)))
	for _, e := range entries {
		b = appendString(b, e.Node)
		b = appendUvarint(b, e.Incarnation)
		b = appendUvarint(b, e.Version)
		b = appendUvarint(b, uint64(len(e.Filters)))
		for _, f := range e.Filters {
			b = appendString(b, f)
		}
	}
	return b
}

func decodeState(b []byte) ([]nodeRoutes, error) {
	r := reader{b: b}
	if f := r.u8(); r.err == nil && f != stateFormat {
		return nil, fmt.Errorf("unknown route state format %d", f)
	}
	n := r.count(4)
	out := make([]nodeRoutes, 0, n)
	for i := 0; i < n && r.err == nil; i++ {
		e := nodeRoutes{Node: r.str(), Incarnation: r.uvarint(), Version: r.uvarint()}
		if k := r.count(1); k > 0 {
			e.Filters = make([]string, k)
			for j := range e.Filters {
				e.Filters[j] = r.str()
			}
		}
		out = append(out, e)
	}
	if r.err == nil && len(r.b) != 0 {
		r.fail(errors.New("trailing bytes"))
	}
	if r.err != nil {
		return nil, fmt.Errorf("decode route state: %w", r.err)
	}
	return out, nil
}

// --- node metadata (memberlist NodeMeta, at most 512 bytes) ---

// metaFormat is the first byte of node metadata.
const metaFormat byte = 1

// nodeMeta is what every node announces about itself in memberlist.
type nodeMeta struct {
	// Proto is the oldest protocol version the node speaks
	// (MinProtocolVersion), not its newest: a version-1 node compares it
	// for equality with 1 and does not forward to a member announcing
	// anything else (a version-1 node's only version is both).
	Proto         uint8
	NodeID        string
	AdvertiseHost string
	ClusterPort   uint16
	MQTTPort      uint16
	// App is opaque metadata of the embedding program (replication state
	// for raft bootstrap); the cluster only carries it.
	App []byte
}

// u8 format | u8 proto | u16 cluster port | u16 mqtt port | str advertise host | str node id
func appendMeta(b []byte, m nodeMeta) []byte {
	b = append(b, metaFormat, m.Proto)
	b = binary.BigEndian.AppendUint16(b, m.ClusterPort)
	b = binary.BigEndian.AppendUint16(b, m.MQTTPort)
	b = appendString(b, m.AdvertiseHost)
	b = appendString(b, m.NodeID)
	return appendBytes(b, m.App)
}

func decodeMeta(b []byte) (nodeMeta, error) {
	r := reader{b: b}
	if f := r.u8(); r.err == nil && f != metaFormat {
		return nodeMeta{}, fmt.Errorf("unknown node metadata format %d", f)
	}
	var m nodeMeta
	m.Proto = r.u8()
	if p := r.raw(4); p != nil {
		m.ClusterPort = binary.BigEndian.Uint16(p)
		m.MQTTPort = binary.BigEndian.Uint16(p[2:])
	}
	m.AdvertiseHost = r.str()
	m.NodeID = r.str()
	m.App = r.bytes()
	if r.err != nil {
		return nodeMeta{}, fmt.Errorf("decode node metadata: %w", r.err)
	}
	return m, nil
}
