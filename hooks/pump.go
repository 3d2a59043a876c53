package hooks

import (
	"errors"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/replication"
)

// pump delivers one live persistent session's replicated queue to its
// connection, in Seq order, keeping at most window messages unacknowledged.
// It also writes the session's QoS 0 copies, so all writes to the client
// from this hook come from one goroutine and never block a publisher.
type pump struct {
	h      *Sessions
	c      *sessConn
	cl     *mqtt.Client
	window int
	// resumeUpTo is the last Seq queued when the connection resumed its
	// session: those messages may have been sent before (DUP).
	resumeUpTo uint64

	wakeCh   chan struct{}
	qos0     chan packets.Packet
	done     chan struct{}
	stopOnce sync.Once

	mu       sync.Mutex
	inflight map[uint16]uint64 // packet id -> Seq, sent and not acknowledged
	next     uint64            // lowest Seq not sent on this connection
}

// defaultWindow applies when neither max_inflight_messages nor the client
// limits in-flight messages.
const defaultWindow = 100

func newPump(h *Sessions, c *sessConn) *pump {
	window := h.cfg.MaxInflight
	if rm := int(c.cl.Properties.Props.ReceiveMaximum); rm > 0 && (window == 0 || rm < window) {
		window = rm
	}
	if window <= 0 {
		window = defaultWindow
	}
	p := &pump{h: h, c: c, cl: c.cl, window: window, wakeCh: make(chan struct{}, 1),
		qos0: make(chan packets.Packet, 1024), done: make(chan struct{}), inflight: map[uint16]uint64{}}
	if c.present {
		if q := h.repl.Queue(c.id, 0, 0); len(q) > 0 {
			p.resumeUpTo = q[len(q)-1].Seq
		}
	}
	return p
}

// pidFor maps a Seq to its packet id. The same message gets the same id on
// every node, so a QoS 2 receiver that already has it (PUBREC sent) sees a
// duplicate, not a new message, when another node resends it. At most
// window (< 65535) consecutive Seqs are in flight, so ids never collide.
func pidFor(seq uint64) uint16 { return uint16((seq-1)%65535) + 1 }

func (p *pump) run() {
	t := time.NewTicker(time.Second) // safety net: expired messages, ids freed by mochi
	defer t.Stop()
	p.fill()
	for {
		select {
		case <-p.done:
			return
		case pk := <-p.qos0:
			_ = p.cl.WritePacket(pk)
		case <-p.wakeCh:
			p.fill()
		case <-t.C:
			p.fill()
		}
	}
}

func (p *pump) stopped() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// fill sends queued messages until the window is full or the queue ends.
func (p *pump) fill() {
	for !p.stopped() {
		p.mu.Lock()
		room, from := p.window-len(p.inflight), p.next
		p.mu.Unlock()
		if room <= 0 {
			return
		}
		msgs := p.h.repl.Queue(p.c.id, from, room)
		if len(msgs) == 0 {
			return
		}
		now := time.Now().UnixMilli()
		for _, m := range msgs {
			if p.stopped() {
				return
			}
			if m.Expires > 0 && m.Expires <= now {
				p.advance(m.Seq)
				p.h.ack(p.c.id, m.Seq) // expired while queued: never delivered (MQTT-3.3.2-5)
				continue
			}
			pid := pidFor(m.Seq)
			if m.Released {
				pid = m.PacketID
			}
			if _, busy := p.cl.State.Inflight.Get(pid); busy {
				return // mochi holds this id (a retained message it sent, an inbound QoS 2): wait
			}
			pk := p.packet(m, pid)
			p.mu.Lock()
			p.inflight[pid] = m.Seq
			p.next = m.Seq + 1
			p.mu.Unlock()
			// mochi's inflight entry makes it answer PUBREC with PUBREL and
			// keeps its packet-id allocator off this id.
			if p.cl.State.Inflight.Set(pk) {
				atomic.AddInt64(&p.h.server.Info.Inflight, 1)
			}
			if m.Seq <= p.resumeUpTo {
				p.h.m.redelivered.Inc()
			}
			if err := p.cl.WritePacket(pk); err != nil {
				if errors.Is(err, packets.ErrPacketTooLarge) {
					// Larger than the client accepts: it can never be
					// delivered (MQTT-3.1.2-25), so it is discarded.
					p.forgetID(pid)
					p.h.ack(p.c.id, m.Seq)
					continue
				}
				return // connection gone; OnDisconnect stops the pump
			}
		}
	}
}

func (p *pump) advance(seq uint64) {
	p.mu.Lock()
	p.next = max(p.next, seq+1)
	p.mu.Unlock()
}

func (p *pump) packet(m replication.QueuedMessage, pid uint16) packets.Packet {
	if m.Released {
		return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: pid}
	}
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: m.QoS, Retain: m.Retain, Dup: m.Seq <= p.resumeUpTo},
		TopicName:   m.Topic,
		Payload:     m.Payload,
		PacketID:    pid,
		Created:     m.Created / 1000,
		Properties: packets.Properties{
			PayloadFormat:     m.Properties.PayloadFormat,
			PayloadFormatFlag: m.Properties.PayloadFormat != 0,
			ContentType:       m.Properties.ContentType,
			ResponseTopic:     m.Properties.ResponseTopic,
			CorrelationData:   m.Properties.CorrelationData,
		},
	}
	if m.Expires > 0 {
		pk.Expiry = (m.Expires + 999) / 1000 // WritePacket sends the remaining interval
	}
	for _, u := range m.Properties.UserProperties {
		pk.Properties.User = append(pk.Properties.User, packets.UserProperty{Key: u.Key, Val: u.Value})
	}
	for _, id := range m.SubscriptionIDs {
		pk.Properties.SubscriptionIdentifier = append(pk.Properties.SubscriptionIdentifier, int(id))
	}
	return pk
}

// acked: PUBACK, PUBCOMP, or a refusing PUBREC for packet id pid.
func (p *pump) acked(pid uint16) {
	p.mu.Lock()
	seq, ok := p.inflight[pid]
	delete(p.inflight, pid)
	p.mu.Unlock()
	if ok {
		p.h.ack(p.c.id, seq)
		p.poke()
	}
}

// released: PUBREC for a QoS 2 message; only PUBREL/PUBCOMP remain.
func (p *pump) released(pid uint16) {
	p.mu.Lock()
	seq, ok := p.inflight[pid]
	p.mu.Unlock()
	if ok {
		id := p.c.id
		p.h.submit(sessOp{cmd: func() replication.Command {
			return &replication.QueueRelease{ClientID: id, Seq: seq, PacketID: pid}
		}})
	}
}

func (p *pump) sendQoS0(pk packets.Packet) {
	select {
	case p.qos0 <- pk:
	default:
		atomic.AddInt64(&p.h.server.Info.MessagesDropped, 1) // slow consumer: QoS 0 may be dropped
	}
}

func (p *pump) poke() {
	select {
	case p.wakeCh <- struct{}{}:
	default:
	}
}

func (p *pump) stop() { p.stopOnce.Do(func() { close(p.done) }) }

// forget removes the pump's deliveries from mochi's inflight state: the
// log keeps them, and whichever connection resumes the session resends
// them from there (mochi must not resend its own copies as well).
func (p *pump) forget() {
	p.mu.Lock()
	ids := make([]uint16, 0, len(p.inflight))
	for id := range p.inflight {
		ids = append(ids, id)
	}
	p.mu.Unlock()
	for _, id := range ids {
		p.forgetID(id)
	}
}

func (p *pump) forgetID(pid uint16) {
	p.mu.Lock()
	delete(p.inflight, pid)
	p.mu.Unlock()
	if p.cl.State.Inflight.Delete(pid) {
		atomic.AddInt64(&p.h.server.Info.Inflight, -1)
	}
}

// ack queues the acknowledgement of one delivered (or discarded) message.
func (h *Sessions) ack(id string, seq uint64) {
	h.submit(sessOp{cmd: func() replication.Command { return &replication.Ack{ClientID: id, Seqs: []uint64{seq}} }})
}
