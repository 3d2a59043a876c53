package mosquitto

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Reading Mosquitto's persistence file (mosquitto.db), for the importer.
//
// The format is that of Mosquitto 1.6 (database version 5) and 2.x
// (version 6), as its src/persist_read_v5.c reads it and as the tests
// check against files Debian's mosquitto 2.0.11 wrote:
//
//	magic "\x00\xB5\x00mosquitto db" | u32 crc (unused, 0) | u32 version
//	chunks: u32 type | u32 length | body
//
// Integers in chunk headers and in the fixed parts of bodies are big
// endian, except the 64-bit store ids and the absolute times, which
// Mosquitto writes in host byte order: little endian here (amd64 and
// arm64, the platforms Mosquitto's images ship for). The fixed parts are
// C structs written as they are, padding included.

var magic = []byte("\x00\xB5\x00mosquitto db")

// Chunk types.
const (
	chunkCfg       = 1
	chunkMsgStore  = 2
	chunkClientMsg = 3
	chunkRetain    = 4
	chunkSub       = 5
	chunkClient    = 6
)

// Sizes of the fixed parts (sizeof of Mosquitto's PF_* structs on a 64-bit
// machine).
const (
	sizeCfg       = 16
	sizeMsgStore  = 32
	sizeClientMsg = 16
	sizeSub       = 12
	sizeRetain    = 8
	sizeClientV5  = 16
	sizeClientV6  = 24
)

// Message states of a client's message (Mosquitto's enum mosquitto_msg_state).
const (
	StatePublishQoS1    = 2
	StateWaitForPuback  = 3
	StatePublishQoS2    = 4
	StateWaitForPubrec  = 5
	StateResendPubrel   = 6
	StateWaitForPubrel  = 7
	StateResendPubcomp  = 8
	StateWaitForPubcomp = 9
	StateSendPubrec     = 10
	StateQueued         = 11
)

// DB is what a persistence file holds.
type DB struct {
	Version  uint32
	Retained []*Message
	Sessions []*Session
	// Problems lists what the file refers to but does not hold (a queued
	// message whose stored message is missing, say): read past, reported.
	Problems []string
}

// Message is a stored message.
type Message struct {
	Topic      string
	Payload    []byte
	QoS        byte
	Retain     bool
	Expiry     int64 // Unix seconds, 0 for none (MQTT 5 message expiry)
	Properties packets.Properties
}

// Session is a persistent client session.
type Session struct {
	ClientID string
	Username string
	// ExpiryInterval is the session expiry in seconds; 0xFFFFFFFF (what
	// Mosquitto stores for an MQTT 3.1.1 persistent session) is never.
	ExpiryInterval uint32
	// ExpiresAt is when the session expires (Unix seconds), 0 when it is
	// not counting down (the client was connected when the file was
	// written, or it never expires).
	ExpiresAt     int64
	Subscriptions []Subscription
	Queue         []Queued // in Mosquitto's delivery order
}

// Subscription is one of a session's subscriptions.
type Subscription struct {
	Filter            string
	QoS               byte
	NoLocal           bool
	RetainAsPublished bool
	RetainHandling    byte
	Identifier        uint32
}

// Queued is a message in a session's queue or in flight.
type Queued struct {
	*Message
	QoS      byte // the QoS it is delivered at
	Retain   bool
	Incoming bool // from the client (a QoS 2 PUBLISH whose PUBREL is due), not to it
	State    byte
}

// CorruptError says where a file stopped making sense.
type CorruptError struct {
	Offset int64
	Reason string
}

func (e *CorruptError) Error() string {
	return fmt.Sprintf("corrupt or truncated at byte %d: %s", e.Offset, e.Reason)
}

// ErrNotMosquittoDB is returned for a file without Mosquitto's magic.
var ErrNotMosquittoDB = errors.New("not a Mosquitto persistence file (no mosquitto db header)")

// ReadDB reads a persistence file. On a corrupt or truncated file it
// returns what it read before the damage along with a *CorruptError: the
// caller decides whether a part is worth importing.
func ReadDB(r io.Reader) (*DB, error) {
	cr := &countingReader{r: bufio.NewReaderSize(r, 64<<10)}
	head := make([]byte, len(magic)+8)
	if _, err := io.ReadFull(cr, head); err != nil || !bytes.Equal(head[:len(magic)], magic) {
		return nil, ErrNotMosquittoDB
	}
	db := &DB{Version: binary.BigEndian.Uint32(head[len(magic)+4:])}
	if db.Version != 5 && db.Version != 6 {
		return nil, fmt.Errorf("persistence format version %d is not supported (Mosquitto 1.6 writes 5, 2.x writes 6)", db.Version)
	}
	p := &parser{db: db, stored: map[uint64]*Message{}, sessions: map[string]*Session{}}
	err := p.chunks(cr)
	p.finish()
	return db, err
}

type parser struct {
	db       *DB
	stored   map[uint64]*Message
	sessions map[string]*Session
	order    []string    // session ids in first-seen order
	retains  []uint64    // store ids of retained messages
	msgs     []clientMsg // client messages, resolved at the end
}

type clientMsg struct {
	client string
	store  uint64
	qos    byte
	retain bool
	dir    byte
	state  byte
}

func (p *parser) chunks(cr *countingReader) error {
	var hdr [8]byte
	for {
		at := cr.n
		if _, err := io.ReadFull(cr, hdr[:]); err != nil {
			if err == io.EOF {
				return nil
			}
			return &CorruptError{at, "chunk header cut short"}
		}
		typ, length := binary.BigEndian.Uint32(hdr[:4]), binary.BigEndian.Uint32(hdr[4:])
		// Bodies are read whole (the largest is a stored message, at most
		// MQTT's 256 MB plus its topic and properties), growing with what
		// the file holds: a damaged length must not allocate its claim.
		if length > 268435455+1<<20 {
			return &CorruptError{at, fmt.Sprintf("chunk of type %d claims %d bytes", typ, length)}
		}
		body, err := io.ReadAll(io.LimitReader(cr, int64(length)))
		if err != nil || len(body) != int(length) {
			return &CorruptError{at, fmt.Sprintf("chunk of type %d claims %d bytes, the file ends after %d", typ, length, len(body))}
		}
		if err := p.chunk(typ, body); err != nil {
			return &CorruptError{at, fmt.Sprintf("chunk of type %d: %v", typ, err)}
		}
	}
}

// body reads a chunk's fields in order.
type body struct {
	b   []byte
	err error
}

func (b *body) take(n int) []byte {
	if b.err != nil {
		return nil
	}
	if n > len(b.b) {
		b.err = fmt.Errorf("%d bytes short", n-len(b.b))
		return nil
	}
	v := b.b[:n:n]
	b.b = b.b[n:]
	return v
}

func (b *body) str(n uint16) string { return string(b.take(int(n))) }

func (p *parser) chunk(typ uint32, data []byte) error {
	b := &body{b: data}
	switch typ {
	case chunkCfg:
		f := b.take(sizeCfg)
		if b.err == nil && f[9] != 8 {
			return fmt.Errorf("store ids of %d bytes (only 8 is known)", f[9])
		}
	case chunkMsgStore:
		f := b.take(sizeMsgStore)
		if b.err != nil {
			break
		}
		id := binary.LittleEndian.Uint64(f[0:])
		m := &Message{Expiry: int64(binary.LittleEndian.Uint64(f[8:])), QoS: f[30], Retain: f[31] != 0}
		payloadLen := binary.BigEndian.Uint32(f[16:])
		sourceID, sourceUser, topicLen := binary.BigEndian.Uint16(f[22:]), binary.BigEndian.Uint16(f[24:]), binary.BigEndian.Uint16(f[26:])
		b.take(int(sourceID) + int(sourceUser))
		m.Topic = b.str(topicLen)
		m.Payload = b.take(int(payloadLen))
		if b.err == nil && len(b.b) > 0 {
			if _, err := m.Properties.Decode(packets.Publish, bytes.NewBuffer(b.b)); err != nil {
				return fmt.Errorf("message properties: %w", err)
			}
		}
		if m.QoS > 2 {
			return fmt.Errorf("message with QoS %d", m.QoS)
		}
		p.stored[id] = m
	case chunkClientMsg:
		f := b.take(sizeClientMsg)
		if b.err != nil {
			break
		}
		// Properties after the client id are per-delivery ones
		// (subscription identifiers), which the subscription gives again.
		cm := clientMsg{store: binary.LittleEndian.Uint64(f[0:]), qos: f[12], state: f[13],
			retain: f[14]>>4 != 0, dir: f[15]}
		cm.client = b.str(binary.BigEndian.Uint16(f[10:]))
		if cm.qos > 2 {
			return fmt.Errorf("queued message with QoS %d", cm.qos)
		}
		p.msgs = append(p.msgs, cm)
	case chunkRetain:
		f := b.take(sizeRetain)
		if b.err == nil {
			p.retains = append(p.retains, binary.LittleEndian.Uint64(f))
		}
	case chunkSub:
		f := b.take(sizeSub)
		if b.err != nil {
			break
		}
		sub := Subscription{Identifier: binary.BigEndian.Uint32(f[0:]), QoS: f[8] & 0x03,
			NoLocal: f[9]&0x04 != 0, RetainAsPublished: f[9]&0x08 != 0, RetainHandling: f[9] >> 4 & 0x03}
		id := b.str(binary.BigEndian.Uint16(f[4:]))
		sub.Filter = b.str(binary.BigEndian.Uint16(f[6:]))
		if b.err == nil {
			s := p.session(id)
			s.Subscriptions = append(s.Subscriptions, sub)
		}
	case chunkClient:
		size := sizeClientV6
		if p.db.Version == 5 {
			size = sizeClientV5
		}
		f := b.take(size)
		if b.err != nil {
			break
		}
		var userLen uint16
		if p.db.Version == 6 {
			userLen = binary.BigEndian.Uint16(f[18:])
		}
		idLen := binary.BigEndian.Uint16(f[14:])
		if idLen == 0 {
			return errors.New("client without an id")
		}
		s := p.session(b.str(idLen))
		s.Username = b.str(userLen)
		s.ExpiresAt = int64(binary.LittleEndian.Uint64(f[0:]))
		s.ExpiryInterval = binary.BigEndian.Uint32(f[8:])
	default:
		// Unknown chunks are skipped, as Mosquitto does.
	}
	return b.err
}

func (p *parser) session(id string) *Session {
	s := p.sessions[id]
	if s == nil {
		s = &Session{ClientID: id}
		p.sessions[id] = s
		p.order = append(p.order, id)
	}
	return s
}

// finish resolves store ids, in file order.
func (p *parser) finish() {
	for _, id := range p.retains {
		if m := p.stored[id]; m != nil {
			p.db.Retained = append(p.db.Retained, m)
		} else {
			p.db.Problems = append(p.db.Problems, fmt.Sprintf("a retained message refers to stored message %d, which the file does not hold", id))
		}
	}
	for _, cm := range p.msgs {
		m := p.stored[cm.store]
		if m == nil {
			p.db.Problems = append(p.db.Problems, fmt.Sprintf("client %q: a queued message refers to stored message %d, which the file does not hold", cm.client, cm.store))
			continue
		}
		s := p.session(cm.client)
		s.Queue = append(s.Queue, Queued{Message: m, QoS: cm.qos, Retain: cm.retain, Incoming: cm.dir == 0, State: cm.state})
	}
	for _, id := range p.order {
		p.db.Sessions = append(p.db.Sessions, p.sessions[id])
	}
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += int64(n)
	return n, err
}
