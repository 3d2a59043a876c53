package hooks

import (
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// RetainPacer keeps mochi from dropping retained messages sent on
// SUBSCRIBE to a clean session (persistent sessions get theirs through
// the log and the pump: Sessions.subscribe).
//
// mochi puts each retained message that matches a new subscription on the
// client's outbound queue without waiting (publishToClient), and drops
// what does not fit (MaximumClientWritesPending)
// as if the subscriber were slow. So a subscriber to a filter that matches
// more retained messages than that lost some, where Mosquitto sends them
// all: with 20,000 retained messages under one filter, mosquitto_sub
// received 14,075 and 18,105 (Home Assistant and Zigbee2MQTT keep their
// discovery and state topics retained). mochi calls OnRetainPublished on
// the subscriber's read loop after queueing each one; the pacer waits
// there while more than a quarter of the queue holds retained messages
// not yet taken by the write loop (OnPacketEncode: it sees every packet
// written, including those then refused as too large), so they never fill
// it. The subscriber's own packets wait meanwhile, as on a Mosquitto that
// writes the retained messages before the next read.
//
// Only QoS 0 retained messages are paced: a QoS 1/2 one may be held in
// flight rather than queued (the client's Receive Maximum), and waiting
// for it would wait for acknowledgements the blocked read loop cannot
// read; max_queued_messages bounds those anyway. A subscriber that takes
// nothing for retainStall (at most half its keepalive, so that a dead peer
// is still reaped) ends the pacing until its next SUBSCRIBE, and mochi
// drops the rest as before.
type RetainPacer struct {
	mqtt.HookBase
	window  int64
	clients sync.Map // *mqtt.Client -> *retainPace
}

type retainPace struct {
	queued atomic.Int64 // QoS 0 retained messages queued on SUBSCRIBE
	sent   atomic.Int64 // QoS 0 PUBLISH packets with the retain flag taken by the write loop
	gaveUp atomic.Bool  // no progress: no pacing until the next SUBSCRIBE
	wake   chan struct{}
}

// NewRetainPacer returns the hook for a server whose clients' outbound
// queues make room for pending live packets beside their QoS 1/2
// messages in flight (MaximumClientWritesPending is larger).
func NewRetainPacer(pending int) *RetainPacer {
	return &RetainPacer{window: max(int64(pending)/4, 1)}
}

// retainStall is how long a SUBSCRIBE's read loop waits for a subscriber
// that takes nothing: 10 s, at most half its keepalive.
func retainStall(cl *mqtt.Client) time.Duration {
	d := 10 * time.Second
	if ka := time.Duration(cl.State.Keepalive) * time.Second; ka > 0 {
		d = min(d, max(ka/2, 100*time.Millisecond))
	}
	return d
}

// ID implements mqtt.Hook.
func (h *RetainPacer) ID() string { return "retain-pacer" }

// Provides implements mqtt.Hook.
func (h *RetainPacer) Provides(b byte) bool {
	return b == mqtt.OnSubscribed || b == mqtt.OnRetainPublished || b == mqtt.OnPacketEncode || b == mqtt.OnDisconnect
}

// OnSubscribed runs before mochi writes the SUBACK and queues the
// retained messages: it starts counting for this client, or lines the
// counts up again (live messages forwarded with their retain flag count
// as taken without having been counted as queued).
func (h *RetainPacer) OnSubscribed(cl *mqtt.Client, _ packets.Packet, _ []byte) {
	v, ok := h.clients.Load(cl)
	if !ok {
		v, _ = h.clients.LoadOrStore(cl, &retainPace{wake: make(chan struct{}, 1)})
	}
	p := v.(*retainPace)
	p.queued.Store(p.sent.Load())
	p.gaveUp.Store(false)
}

// OnRetainPublished waits until the client's queue has room for more
// retained messages.
func (h *RetainPacer) OnRetainPublished(cl *mqtt.Client, pk packets.Packet) {
	if pk.FixedHeader.Qos != 0 {
		return
	}
	v, ok := h.clients.Load(cl)
	if !ok {
		return
	}
	p := v.(*retainPace)
	q := p.queued.Add(1)
	stall := retainStall(cl)
	deadline := time.Now().Add(stall)
	for !p.gaveUp.Load() {
		sent := p.sent.Load()
		if q-sent < h.window || cl.Closed() {
			return
		}
		if time.Now().After(deadline) {
			p.gaveUp.Store(true) // let mochi drop the rest, as without the pacer
			return
		}
		t := time.NewTimer(50 * time.Millisecond) // to notice a closed client
		select {
		case <-p.wake:
		case <-t.C:
		}
		t.Stop()
		if p.sent.Load() > sent {
			deadline = time.Now().Add(stall)
		}
	}
}

// OnPacketEncode counts the QoS 0 retained messages the write loop takes
// for a client being paced.
func (h *RetainPacer) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type != packets.Publish || !pk.FixedHeader.Retain || pk.FixedHeader.Qos != 0 {
		return pk
	}
	if v, ok := h.clients.Load(cl); ok {
		p := v.(*retainPace)
		p.sent.Add(1)
		select {
		case p.wake <- struct{}{}:
		default:
		}
	}
	return pk
}

// OnDisconnect forgets the client.
func (h *RetainPacer) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	h.clients.Delete(cl)
}
