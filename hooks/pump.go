package hooks

import (
	"errors"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/internal/session"
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
	h  *Sessions
	c  *sessConn
	cl *mqtt.Client
	// w: the deliveries in flight, by packet id (session.Window).
	w *session.Window
	// resumeUpTo is the last Seq queued when the connection resumed its
	// session: those messages may have been sent before (DUP).
	resumeUpTo uint64

	wakeCh   chan struct{}
	qos0     chan packets.Packet
	done     chan struct{}
	stopOnce sync.Once
}

func newPump(h *Sessions, c *sessConn) *pump {
	window := session.WindowSize(h.cfg.MaxInflight, c.cl.Properties.Props.ReceiveMaximum)
	p := &pump{h: h, c: c, cl: c.cl, w: session.NewWindow(window), wakeCh: make(chan struct{}, 1),
		qos0: make(chan packets.Packet, 1024), done: make(chan struct{})}
	if c.present {
		if q := h.repl.Queue(c.id, 0, 0); len(q) > 0 {
			p.resumeUpTo = q[len(q)-1].Seq
		}
	}
	return p
}

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
		room, from := p.w.Room()
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
			if session.ExpiredInQueue(m, now) {
				p.w.Skip(m.Seq)
				p.h.ack(p.c.id, m.Seq) // expired while queued: never delivered (MQTT-3.3.2-5)
				continue
			}
			pid := session.PacketID(m)
			if _, busy := p.cl.State.Inflight.Get(pid); busy {
				return // mochi holds this id (an inbound QoS 2, a shared subscription's message): wait
			}
			if p.w.Busy(pid) {
				// The id wrapped (65,535 later messages went by while one
				// stayed unacknowledged): wait for it rather than lose
				// track of the older message.
				return
			}
			var loaded int64
			if m.Blob != nil && !m.Released {
				// A large payload is read from this node's blob file; the
				// pumps of the node hold at most blobLoadBudget of them at
				// once (a message to many sessions here is read once per
				// session).
				if !p.h.loads.acquire(m.Blob.Size, p.done) {
					return
				}
				payload, err := p.h.repl.ReadBlob(*m.Blob)
				if err != nil {
					p.h.loads.release(m.Blob.Size)
					p.h.log.Error("queued message's payload unreadable; retried at the next wake-up", "client", p.c.id,
						"seq", m.Seq, "error", err)
					return
				}
				m.Payload, loaded = payload, m.Blob.Size
			}
			pk := p.packet(m, pid, now)
			p.w.Sent(pid, m.Seq)
			if m.Seq <= p.resumeUpTo {
				p.h.m.redelivered.Inc()
			}
			err := p.cl.WritePacket(pk)
			if loaded > 0 {
				p.h.loads.release(loaded)
			}
			if err != nil {
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
		pk.Properties.MessageExpiryInterval = session.RemainingExpiry(m.Expires, now)
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
	seq, ok := p.w.Acked(pid)
	if ok {
		p.h.ack(p.c.id, seq)
		p.poke()
	}
	return ok
}

// seqOf returns the Seq of a message in flight under packet id pid.
func (p *pump) seqOf(pid uint16) (uint64, bool) { return p.w.SeqOf(pid) }

func (p *pump) sendQoS0(pk packets.Packet) {
	select {
	case p.qos0 <- pk:
	default:
		atomic.AddInt64(&p.h.server.Info.MessagesDropped, 1) // slow consumer: QoS 0 may be dropped
	}
}

// sendRetainedQoS0 queues the QoS 0 retained copies for a new
// subscription, waiting for room rather than dropping what does not fit
// (found by review: 1,665 of 5,000 arrived, where Mosquitto sends all; see
// RetainPacer for clean sessions). It runs on the subscriber's read loop,
// which waits as on Mosquitto. When the pump takes nothing for
// retainStall, the rest is dropped as for a slow consumer.
func (p *pump) sendRetainedQoS0(pks []packets.Packet) {
	stall := retainStall(p.cl)
	var t *time.Timer
	for i, pk := range pks {
		select {
		case p.qos0 <- pk:
			continue
		default:
		}
		if t == nil {
			t = time.NewTimer(stall)
			defer t.Stop()
		} else {
			t.Reset(stall)
		}
		select {
		case p.qos0 <- pk:
		case <-p.done:
			return
		case <-t.C:
			atomic.AddInt64(&p.h.server.Info.MessagesDropped, int64(len(pks)-i))
			return
		}
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
