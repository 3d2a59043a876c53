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
//
// Its deliveries are not entered in mochi's inflight table: mochi keeps
// inbound and outbound packet ids in that one table, and would refuse a
// SUBSCRIBE (0x91) or drop our entry on an inbound PUBLISH that happens to
// use the same id. The acknowledgements of the pump's deliveries are
// consumed in Sessions.OnPacketRead and never reach mochi.
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
			// A released message (PUBREC received) is past expiry's reach:
			// the client holds its packet id until PUBREL.
			if m.Expires > 0 && m.Expires <= now && !m.Released {
				p.advance(m.Seq)
				p.h.ack(p.c.id, m.Seq) // expired while queued: never delivered (MQTT-3.3.2-5)
				continue
			}
			pid := pidFor(m.Seq)
			if m.Released {
				pid = m.PacketID
			}
			if _, busy := p.cl.State.Inflight.Get(pid); busy {
				return // mochi holds this id (an inbound QoS 2, a shared subscription's message): wait
			}
			p.mu.Lock()
			_, busy := p.inflight[pid]
			p.mu.Unlock()
			if busy {
				// The id wrapped (65,535 later messages went by while one
				// stayed unacknowledged): wait for it rather than lose
				// track of the older message.
				return
			}
			pk := p.packet(m, pid, now)
			p.mu.Lock()
			p.inflight[pid] = m.Seq
			p.next = m.Seq + 1
			p.mu.Unlock()
			if m.Seq <= p.resumeUpTo {
				p.h.m.redelivered.Inc()
			}
			if err := p.cl.WritePacket(pk); err != nil {
				if errors.Is(err, packets.ErrPacketTooLarge) {
					// Larger than the client accepts: it can never be
					// delivered (MQTT-3.1.2-25), so it is discarded.
					p.acked(pid)
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

func (p *pump) packet(m replication.QueuedMessage, pid uint16, now int64) packets.Packet {
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
		// The remaining lifetime, rounded up to whole seconds
		// (MQTT-3.3.2-6). Not through pk.Expiry: mochi computes it from
		// whole-second clocks and reported up to two seconds too many.
		pk.Properties.MessageExpiryInterval = uint32(max((m.Expires-now+999)/1000, 1))
	}
	for _, u := range m.Properties.UserProperties {
		pk.Properties.User = append(pk.Properties.User, packets.UserProperty{Key: u.Key, Val: u.Value})
	}
	for _, id := range m.SubscriptionIDs {
		pk.Properties.SubscriptionIdentifier = append(pk.Properties.SubscriptionIdentifier, int(id))
	}
	return pk
}

// acked: PUBACK, PUBCOMP, or a refusing PUBREC for packet id pid. It
// reports whether pid was a delivery of the pump.
func (p *pump) acked(pid uint16) bool {
	p.mu.Lock()
	seq, ok := p.inflight[pid]
	delete(p.inflight, pid)
	p.mu.Unlock()
	if ok {
		p.h.ack(p.c.id, seq)
		p.poke()
	}
	return ok
}

// seqOf returns the Seq of a message in flight under packet id pid.
func (p *pump) seqOf(pid uint16) (uint64, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	seq, ok := p.inflight[pid]
	return seq, ok
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

// ack queues the acknowledgement of one delivered (or discarded) message.
func (h *Sessions) ack(id string, seq uint64) {
	h.submit(sessOp{cmd: func() replication.Command { return &replication.Ack{ClientID: id, Seqs: []uint64{seq}} }})
}
