package chaos

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
)

// A minimal MQTT 3.1.1 client (paho.golang speaks only MQTT 5): CONNECT
// with clean session and a will, PUBLISH QoS 0-2 both ways, SUBSCRIBE,
// keep-alive, DISCONNECT. Its session state (session311) outlives a
// connection, as a real client's does: outgoing QoS 1/2 messages not yet
// completed are resent on the next connection that finds its session
// (PUBLISH with DUP, or PUBREL once PUBREC came), and the packet ids of
// incoming QoS 2 messages whose PUBREL has not come yet are remembered, so
// that a resent one is not handed to the application twice.

// session311 is the client side of a 3.1.1 session.
type session311 struct {
	mu     sync.Mutex
	nextID uint16
	out    map[uint16]*out311
	order  []uint16        // ids of out in the order they were first sent
	inQoS2 map[uint16]bool // received QoS 2 (PUBREC sent), PUBREL not yet
}

// out311 is one outgoing QoS 1/2 message in flight.
type out311 struct {
	id       uint16
	qos      byte
	topic    string
	payload  []byte
	retain   bool
	released bool          // PUBREC came, PUBREL sent: waiting for PUBCOMP
	done     chan struct{} // closed when PUBACK / PUBCOMP came
	dropped  chan struct{} // closed when the session dropped it (no session on the server)
}

func newSession311() *session311 {
	return &session311{out: map[uint16]*out311{}, inQoS2: map[uint16]bool{}}
}

// clear drops the whole session (clean session, or the server has none).
func (s *session311) clear() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range s.out {
		close(m.dropped)
	}
	s.out, s.order, s.inQoS2 = map[uint16]*out311{}, nil, map[uint16]bool{}
}

// client311 is one connection.
type client311 struct {
	ID             string
	conn           net.Conn
	s              *session311
	SessionPresent bool
	Msgs           chan *paho.Publish
	done           chan struct{}
	subacks        chan []byte
	wmu            sync.Mutex
	lastRead       time.Time
	lmu            sync.Mutex
}

type opts311 struct {
	ID        string
	Clean     bool
	KeepAlive uint16 // s; 0: 30
	Will      *paho.WillMessage
	Session   *session311 // nil: a new one
	Buffer    int
}

func put16(b *bytes.Buffer, v uint16) { _ = binary.Write(b, binary.BigEndian, v) }

func putString(b *bytes.Buffer, s []byte) {
	put16(b, uint16(len(s)))
	b.Write(s)
}

// packet311 is a fixed header (type and flags in first) and a body.
func packet311(first byte, body []byte) []byte {
	out := []byte{first}
	n := len(body)
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		out = append(out, d)
		if n == 0 {
			break
		}
	}
	return append(out, body...)
}

func readPacket311(r *bufio.Reader) (byte, []byte, error) {
	first, err := r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, mult := 0, 1
	for i := 0; ; i++ {
		d, err := r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		n += int(d&0x7f) * mult
		mult *= 128
		if d&0x80 == 0 {
			break
		}
		if i == 3 {
			return 0, nil, errors.New("malformed remaining length")
		}
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return 0, nil, err
	}
	return first, body, nil
}

// connect311 dials node n and completes an MQTT 3.1.1 CONNECT; on success
// it resends what the session still has in flight (when the server has the
// session) or clears the session (clean session, or none on the server).
func connect311(n *Node, o opts311) (*client311, error) {
	if o.Session == nil {
		o.Session = newSession311()
	}
	if o.KeepAlive == 0 {
		o.KeepAlive = 30
	}
	if o.Buffer == 0 {
		o.Buffer = 1000
	}
	conn, err := n.dial(n.MQTTAddr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	putString(&b, []byte("MQTT"))
	b.WriteByte(4)
	flags := byte(0)
	if o.Clean {
		flags |= 0x02
	}
	if o.Will != nil {
		flags |= 0x04 | o.Will.QoS<<3
		if o.Will.Retain {
			flags |= 0x20
		}
	}
	b.WriteByte(flags)
	put16(&b, o.KeepAlive)
	putString(&b, []byte(o.ID))
	if o.Will != nil {
		putString(&b, []byte(o.Will.Topic))
		putString(&b, o.Will.Payload)
	}
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(conn)
	if _, err := conn.Write(packet311(0x10, b.Bytes())); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("CONNECT: %w", err)
	}
	first, body, err := readPacket311(r)
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("CONNECT: %w", err)
	}
	if first>>4 != 2 || len(body) != 2 {
		_ = conn.Close()
		return nil, fmt.Errorf("CONNECT: got packet type %d instead of CONNACK", first>>4)
	}
	if body[1] != 0 {
		_ = conn.Close()
		return nil, fmt.Errorf("CONNECT: CONNACK return code %d", body[1])
	}
	_ = conn.SetDeadline(time.Time{})
	c := &client311{ID: o.ID, conn: conn, s: o.Session, SessionPresent: body[0]&1 == 1, Msgs: make(chan *paho.Publish, o.Buffer),
		done: make(chan struct{}), subacks: make(chan []byte, 1), lastRead: time.Now()}
	if o.Clean || !c.SessionPresent {
		c.s.clear()
	}
	// Resend in the original order before anything new is sent.
	c.s.mu.Lock()
	for _, id := range c.s.order {
		m := c.s.out[id]
		if m.released {
			_ = c.write(packet311(0x62, []byte{byte(id >> 8), byte(id)}))
		} else {
			_ = c.write(m.packet(true))
		}
	}
	c.s.mu.Unlock()
	go c.reader(r)
	go c.pinger(time.Duration(o.KeepAlive) * time.Second)
	return c, nil
}

func (m *out311) packet(dup bool) []byte {
	var b bytes.Buffer
	putString(&b, []byte(m.topic))
	put16(&b, m.id)
	b.Write(m.payload)
	first := byte(0x30) | m.qos<<1
	if dup {
		first |= 0x08
	}
	if m.retain {
		first |= 0x01
	}
	return packet311(first, b.Bytes())
}

func (c *client311) write(p []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := c.conn.Write(p)
	return err
}

// Done is closed when the connection has ended.
func (c *client311) Done() <-chan struct{} { return c.done }

// Drop closes the socket without DISCONNECT and waits until the reader
// has let go of the session.
func (c *client311) Drop() {
	_ = c.conn.Close()
	<-c.done
}

// Close sends DISCONNECT (the will is discarded) and closes.
func (c *client311) Close() {
	_ = c.write([]byte{0xe0, 0x00})
	c.Drop()
}

func (c *client311) pinger(every time.Duration) {
	t := time.NewTicker(every / 2)
	defer t.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-t.C:
			c.lmu.Lock()
			silent := time.Since(c.lastRead)
			c.lmu.Unlock()
			if silent > every*3/2 {
				_ = c.conn.Close() // no PINGRESP: the server is gone
				return
			}
			_ = c.write([]byte{0xc0, 0x00})
		}
	}
}

func (c *client311) reader(r *bufio.Reader) {
	defer close(c.done)
	defer c.conn.Close()
	for {
		first, body, err := readPacket311(r)
		if err != nil {
			return
		}
		c.lmu.Lock()
		c.lastRead = time.Now()
		c.lmu.Unlock()
		id := func() uint16 {
			if len(body) < 2 {
				return 0
			}
			return binary.BigEndian.Uint16(body)
		}
		switch first >> 4 {
		case 3: // PUBLISH
			qos := (first >> 1) & 3
			if len(body) < 2 {
				return
			}
			tl := int(binary.BigEndian.Uint16(body))
			if len(body) < 2+tl {
				return
			}
			p := &packets.Publish{Topic: string(body[2 : 2+tl]), QoS: qos, Retain: first&1 == 1, Duplicate: first&0x08 != 0,
				Properties: &packets.Properties{}}
			rest := body[2+tl:]
			if qos > 0 {
				if len(rest) < 2 {
					return
				}
				p.PacketID = binary.BigEndian.Uint16(rest)
				rest = rest[2:]
			}
			p.Payload = append([]byte(nil), rest...)
			deliver := true
			if qos == 2 {
				c.s.mu.Lock()
				deliver = !c.s.inQoS2[p.PacketID]
				c.s.inQoS2[p.PacketID] = true
				c.s.mu.Unlock()
			}
			if deliver {
				c.Msgs <- paho.PublishFromPacketPublish(p) // a full buffer blocks: sized too small
			}
			switch qos {
			case 1:
				_ = c.write(packet311(0x40, []byte{byte(p.PacketID >> 8), byte(p.PacketID)}))
			case 2:
				_ = c.write(packet311(0x50, []byte{byte(p.PacketID >> 8), byte(p.PacketID)}))
			}
		case 6: // PUBREL
			pid := id()
			c.s.mu.Lock()
			delete(c.s.inQoS2, pid)
			c.s.mu.Unlock()
			_ = c.write(packet311(0x70, []byte{byte(pid >> 8), byte(pid)}))
		case 4, 7: // PUBACK, PUBCOMP
			c.s.complete(id())
		case 5: // PUBREC
			pid := id()
			c.s.mu.Lock()
			if m := c.s.out[pid]; m != nil {
				m.released = true
			}
			c.s.mu.Unlock()
			_ = c.write(packet311(0x62, []byte{byte(pid >> 8), byte(pid)}))
		case 9: // SUBACK
			if len(body) >= 2 {
				select {
				case c.subacks <- append([]byte(nil), body[2:]...):
				default:
				}
			}
		}
	}
}

func (s *session311) complete(id uint16) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.out[id]
	if m == nil {
		return
	}
	delete(s.out, id)
	for i, o := range s.order {
		if o == id {
			s.order = append(s.order[:i:i], s.order[i+1:]...)
			break
		}
	}
	close(m.done)
}

// Subscribe sends one SUBSCRIBE and returns the SUBACK's return codes
// (0x80: refused).
func (c *client311) Subscribe(filters []paho.SubscribeOptions, timeout time.Duration) ([]byte, error) {
	var b bytes.Buffer
	put16(&b, 1) // one SUBSCRIBE at a time: its id does not matter
	for _, f := range filters {
		putString(&b, []byte(f.Topic))
		b.WriteByte(f.QoS)
	}
	if err := c.write(packet311(0x82, b.Bytes())); err != nil {
		return nil, err
	}
	select {
	case codes := <-c.subacks:
		if len(codes) != len(filters) {
			return codes, fmt.Errorf("SUBACK has %d codes for %d filters", len(codes), len(filters))
		}
		return codes, nil
	case <-c.done:
		return nil, errors.New("connection lost before SUBACK")
	case <-time.After(timeout):
		return nil, errors.New("no SUBACK in time")
	}
}

// PublishAsync sends a QoS 1/2 PUBLISH and returns the message in flight:
// m.done closes on PUBACK / PUBCOMP (perhaps on a later connection of the
// session, after a resend), m.dropped when the session dropped it.
func (c *client311) PublishAsync(topic string, qos byte, retain bool, payload []byte) (*out311, error) {
	c.s.mu.Lock()
	var id uint16
	for range 65536 {
		c.s.nextID++
		if c.s.nextID != 0 && c.s.out[c.s.nextID] == nil {
			id = c.s.nextID
			break
		}
	}
	if id == 0 {
		c.s.mu.Unlock()
		return nil, errors.New("no packet id free")
	}
	m := &out311{id: id, qos: qos, topic: topic, payload: payload, retain: retain, done: make(chan struct{}), dropped: make(chan struct{})}
	c.s.out[id] = m
	c.s.order = append(c.s.order, id)
	c.s.mu.Unlock()
	return m, c.write(m.packet(false))
}

// Publish is PublishAsync waiting up to timeout on this connection: ok
// (acknowledged) or unknown (3.1.1 has no negative acknowledgement).
func (c *client311) Publish(topic string, qos byte, retain bool, payload string, timeout time.Duration) (Outcome, string) {
	m, err := c.PublishAsync(topic, qos, retain, []byte(payload))
	if err != nil {
		return Unknown, err.Error()
	}
	select {
	case <-m.done:
		return OK, ""
	case <-m.dropped:
		return Unknown, "dropped from the session"
	case <-c.done:
		return Unknown, "connection lost"
	case <-time.After(timeout):
		return Unknown, "no acknowledgement in time"
	}
}
