package hooks

import (
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// RetainPacer keeps mochi from dropping retained messages sent on
// SUBSCRIBE.
//
// mochi puts each retained message that matches a new subscription on the
// client's outbound queue without waiting (publishToClient), and drops
// what does not fit (MaximumClientWritesPending, 8,192 packets by default)
// as if the subscriber were slow. So a subscriber to a filter that matches
// more retained messages than that lost some, where Mosquitto sends them
// all: with 20,000 retained messages under one filter, mosquitto_sub
// received 14,075 and 18,105 (Home Assistant and Zigbee2MQTT keep their
// discovery and state topics retained). mochi calls OnRetainPublished on
// the subscriber's read loop after queueing each one; the pacer waits
// there while more than a quarter of the queue holds retained messages
// not yet written (OnPacketSent, on the client's write loop), so they
// never fill it. The subscriber's own packets wait meanwhile, as on a
// Mosquitto that writes the retained messages before the next read.
//
// A client that stops reading makes no progress: after stallTimeout the
// pacer lets mochi go on (and drop, as before) rather than hold the read
// loop for ever.
type RetainPacer struct {
	mqtt.HookBase
	window  int64
	stalled time.Duration
	clients sync.Map // *mqtt.Client -> *retainPace
}

type retainPace struct {
	queued atomic.Int64 // retained messages queued by this SUBSCRIBE and the ones before
	sent   atomic.Int64 // PUBLISH packets with the retain flag written
	wake   chan struct{}
}

// retainStallTimeout is how long the pacer waits for a subscriber that
// writes nothing.
const retainStallTimeout = 10 * time.Second

// NewRetainPacer returns the hook for a server whose clients' outbound
// queues hold pending packets (mochi's MaximumClientWritesPending).
func NewRetainPacer(pending int) *RetainPacer {
	return &RetainPacer{window: max(int64(pending)/4, 1), stalled: retainStallTimeout}
}

// ID implements mqtt.Hook.
func (h *RetainPacer) ID() string { return "retain-pacer" }

// Provides implements mqtt.Hook.
func (h *RetainPacer) Provides(b byte) bool {
	return b == mqtt.OnSubscribed || b == mqtt.OnRetainPublished || b == mqtt.OnPacketSent || b == mqtt.OnDisconnect
}

// OnSubscribed runs before mochi writes the SUBACK and queues the
// retained messages: it starts counting for this client, or lines the
// counts up again (live messages forwarded with their retain flag count
// as sent without having been counted as queued).
func (h *RetainPacer) OnSubscribed(cl *mqtt.Client, _ packets.Packet, _ []byte) {
	v, ok := h.clients.Load(cl)
	if !ok {
		v, _ = h.clients.LoadOrStore(cl, &retainPace{wake: make(chan struct{}, 1)})
	}
	p := v.(*retainPace)
	p.queued.Store(p.sent.Load())
}

// OnRetainPublished waits until the client's queue has room for more
// retained messages.
func (h *RetainPacer) OnRetainPublished(cl *mqtt.Client, _ packets.Packet) {
	v, ok := h.clients.Load(cl)
	if !ok {
		return
	}
	p := v.(*retainPace)
	q := p.queued.Add(1)
	deadline := time.Now().Add(h.stalled)
	for {
		sent := p.sent.Load()
		if q-sent < h.window || cl.Closed() {
			return
		}
		if time.Now().After(deadline) {
			return // no progress: let mochi drop, as without the pacer
		}
		t := time.NewTimer(50 * time.Millisecond) // to notice a closed client
		select {
		case <-p.wake:
		case <-t.C:
		}
		t.Stop()
		if p.sent.Load() > sent {
			deadline = time.Now().Add(h.stalled)
		}
	}
}

// OnPacketSent counts written retained messages of a client being paced.
func (h *RetainPacer) OnPacketSent(cl *mqtt.Client, pk packets.Packet, _ []byte) {
	if pk.FixedHeader.Type != packets.Publish || !pk.FixedHeader.Retain {
		return
	}
	if v, ok := h.clients.Load(cl); ok {
		p := v.(*retainPace)
		p.sent.Add(1)
		select {
		case p.wake <- struct{}{}:
		default:
		}
	}
}

// OnDisconnect forgets the client.
func (h *RetainPacer) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	h.clients.Delete(cl)
}
