package hooks

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/replication"
)

// Retained makes the raft log the source of truth for retained messages:
//
//   - a PUBLISH with the retain flag is proposed to the log; for QoS 1 and 2
//     mochi acknowledges it only after the entry is committed (OnPublish
//     blocks until then; the replication layer batches concurrent writes
//     into one entry, so the cost is one commit per batch, not per message);
//   - every node applies committed changes to its own mochi retained index
//     (Apply), so a new subscriber anywhere is served locally;
//   - whatever mochi stores by itself afterwards (the publisher's own copy,
//     or a copy forwarded by the cluster layer) is overwritten with the
//     committed value (OnRetainMessage), so a stale forward can never
//     replace a newer committed value.
//
// Without a quorum a retained QoS 1/2 write fails fast (refusePublish):
// an MQTT 5 client gets PUBACK 0x83 with a reason string, an MQTT 3.1.1
// client's connection is closed so that it resends. QoS 0 retained writes
// are proposed in the background, best effort. Either way a client's
// retained writes commit in the order sent (retained_lane.go).
type Retained struct {
	mqtt.HookBase
	server  *mqtt.Server
	repl    *replication.Node
	timeout time.Duration
	metrics *Metrics
	log     *slog.Logger
	// assertGap, if set, runs in assert between its read of the state
	// and its write of the index (tests: a newer value applied meanwhile).
	assertGap func(topic string)
	base      context.Context // see Sessions.base

	willMu sync.Mutex
	wills  map[*mqtt.Client]willMark // retained wills mochi is publishing (retained_wills.go)

	// indexMu orders the writes of committed values into mochi's index:
	// assert reads this node's state and then writes the index, and an
	// Apply of a newer value between the two was overwritten by the value
	// assert had read. A follower whose own forwarded write returned
	// before it applied it then served the older value until the topic
	// changed again (chaos seed 20261213, takeover-order:
	// TestAssertDoesNotUndoANewerApply).
	indexMu sync.Mutex

	// laneMu guards lanes, each client id's queue of retained writes
	// (retained_lane.go); laneSpace wakes writers waiting for room.
	laneMu    sync.Mutex
	laneSpace *sync.Cond
	lanes     map[string]*retainLane

	pipeline *Pipeline // SetPipeline; nil: none

	durableLimit int // SetDurableLimit
}

// NewRetained returns the hook; timeout bounds each replicated write.
// SetReplication must be called before the server serves.
func NewRetained(s *mqtt.Server, timeout time.Duration, m *Metrics, log *slog.Logger) *Retained {
	h := &Retained{server: s, timeout: timeout, metrics: m, log: log.With("component", "retained"), base: context.Background(),
		wills: map[*mqtt.Client]willMark{}, lanes: map[string]*retainLane{}}
	h.laneSpace = sync.NewCond(&h.laneMu)
	return h
}

// SetBase sets the context client-facing writes derive from; call it
// before the server serves. When it ends, publishes waiting for room in a
// full lane give up (retained_lane.go), so that a stop is not held up.
func (h *Retained) SetBase(ctx context.Context) {
	h.base = ctx
	context.AfterFunc(ctx, func() {
		h.laneMu.Lock()
		h.laneSpace.Broadcast()
		h.laneMu.Unlock()
	})
}

// SetPipeline tells the hook the publish pipeline, whose last publishes
// of a client its will waits for; call it before the server serves.
func (h *Retained) SetPipeline(p *Pipeline) { h.pipeline = p }

// SetReplication attaches the raft node (it is built once the cluster port
// is bound, after the hooks).
func (h *Retained) SetReplication(r *replication.Node) { h.repl = r }

// ID implements mqtt.Hook.
func (h *Retained) ID() string { return "replicated-retained" }

// Provides implements mqtt.Hook.
func (h *Retained) Provides(b byte) bool {
	switch b {
	case mqtt.OnPublish, mqtt.OnRetainMessage, mqtt.OnRetainedExpired, mqtt.OnWill, mqtt.OnWillSent, mqtt.OnSubscribe, mqtt.OnPacketEncode:
		return true
	}
	return false
}

// OnSubscribe waits, before the retained messages for the new
// subscriptions are read from this node's store (mochi for clean sessions,
// Sessions.retainedFor for persistent ones, both after this hook), until
// this node holds every retained value acknowledged before the SUBSCRIBE
// on any node (guarantee 2: a new subscriber on any node gets the latest
// value). Best effort: without a leader the subscription is still served
// from what this node holds (guarantee 5).
func (h *Retained) OnSubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if h.repl == nil || cl.Net.Inline || !h.repl.HasLeader() {
		return pk
	}
	wants := false
	for _, f := range pk.Filters {
		wants = wants || f.RetainHandling != 2
	}
	if !wants {
		return pk
	}
	ctx, cancel := context.WithTimeout(h.base, h.timeout)
	defer cancel()
	if err := h.repl.ReadBarrier(ctx); err != nil {
		h.log.Warn("retained messages for a new subscription read before this node caught up with the log",
			"client", cl.ID, "error", err)
	}
	return pk
}

// OnPublish replicates a local retained publish before mochi acknowledges it.
func (h *Retained) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	// Forwarded copies were replicated by their origin, wills published
	// by the leader by their claim (PublishWill); every other publish is
	// replicated here.
	if !pk.FixedHeader.Retain || isInjector(cl) || isWillPublisher(cl) || pk.Ignore {
		return pk, nil
	}
	if ackBeforeCommit {
		return pk, nil // the deliberately broken build: see brokenbuild_on.go
	}
	cmd := retainCommand(pk, time.Now())
	topic := pk.TopicName
	if pk.FixedHeader.Qos == 0 {
		h.writeOrdered(h.base, cl.ID, &retainWrite{topic: topic, cmd: cmd, payload: pk.Payload, failed: func(err error) {
			h.metrics.retainedFailed(err)
			h.log.Warn("QoS 0 retained message not replicated", "topic", topic, "error", err)
		}})
		return pk, nil
	}
	ctx, cancel := context.WithTimeout(h.base, h.laneTimeout(len(pk.Payload)))
	defer cancel()
	w := &retainWrite{topic: topic, cmd: cmd, payload: pk.Payload, done: make(chan error, 1)}
	if err := h.writeOrdered(ctx, cl.ID, w); err != nil {
		h.metrics.retainedFailed(err)
		h.log.Warn("retained message not replicated; not acknowledged", "client", cl.ID, "topic", topic, "error", err)
		return pk, refusePublish(cl, pk, "retained message", err)
	}
	return pk, nil
}

// write applies a retained write; a large payload goes as a blob.
func (h *Retained) write(ctx context.Context, cmd replication.Command, payload []byte) (replication.Result, error) {
	if rs, ok := cmd.(*replication.RetainSet); ok {
		return ApplyDurable(ctx, h.repl, h.durableLimit, payload, rs, func() { rs.Msg.Payload = nil })
	}
	return applyDurable(ctx, h.repl, cmd, payload)
}

// SetDurableLimit sets the largest retained payload (--replicated-size-limit,
// 0: any MQTT payload); call it before the server serves.
func (h *Retained) SetDurableLimit(n int) { h.durableLimit = n }

// packet is the mochi packet of a committed retained value. A large
// payload (a blob) is not put into mochi's index, which every node holds
// in memory: the packet carries a placeholder and names the blob, and
// OnPacketEncode reads the payload from this node's blob file when the
// message is sent (blobPacket).
func (h *Retained) packet(m replication.RetainedMessage) (packets.Packet, bool) {
	if m.Blob != nil {
		pk := retainedPacket(m)
		pk.Payload, pk.Origin = blobPlaceholder, blobOrigin(*m.Blob)
		return pk, true
	}
	return retainedPacket(m), true
}

// OnPacketEncode puts the payload of a large retained message into the
// packet being sent (see packet); mochi's index and in-flight copies keep
// the placeholder. A payload that cannot be read any more (the value was
// replaced and its blob dropped between the index read and this send) is
// not sent: the packet is made too large to encode, which mochi treats as
// undeliverable, rather than sending the placeholder.
func (h *Retained) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type != packets.Publish || !strings.HasPrefix(pk.Origin, blobOriginPrefix) {
		return pk
	}
	ref, ok := blobOfOrigin(pk.Origin)
	pk.Origin = ""
	var payload []byte
	var err error
	if ok {
		payload, err = h.repl.ReadBlob(ref)
	}
	if !ok || err != nil {
		h.log.Warn("large retained message not sent: its payload is gone (replaced meanwhile)", "client", cl.ID,
			"topic", pk.TopicName, "error", err)
		pk.Mods.MaxSize = 1
		return pk
	}
	pk.Payload = payload
	return pk
}

// OnRetainMessage re-asserts the committed value after mochi stored a copy
// of its own (see the type comment).
func (h *Retained) OnRetainMessage(cl *mqtt.Client, pk packets.Packet, r int64) {
	if ackBeforeCommit {
		return // the broken build keeps mochi's local, unreplicated copy
	}
	if h.takeWill(cl, pk) {
		h.replicateWill(cl, pk) // it never went through OnPublish
		return
	}
	h.assert(pk.TopicName)
}

func (h *Retained) assert(topic string) {
	h.indexMu.Lock()
	defer h.indexMu.Unlock()
	m, ok := h.repl.RetainedMessage(topic)
	if h.assertGap != nil {
		h.assertGap(topic)
	}
	if ok && !m.Expired(time.Now()) {
		if pk, ok := h.packet(m); ok {
			h.server.Topics.RetainMessage(pk)
		}
	} else {
		h.server.Topics.RetainMessage(clearPacket(topic))
	}
	atomic.StoreInt64(&h.server.Info.Retained, int64(h.server.Topics.Retained.Len()))
}

// OnRetainedExpired puts back what the state holds after mochi's own
// expiry sweep deleted filter from its index: the sweep deletes by name,
// from a copy of the index taken before, so it also deleted a newer,
// unexpired value that Apply wrote after the copy, and the node served
// nothing for the topic until it changed again (found by review).
func (h *Retained) OnRetainedExpired(filter string) {
	if h.repl != nil {
		h.assert(filter)
	}
}

// Apply is the replication observer: a committed change, in log order.
func (h *Retained) Apply(ch replication.RetainedChange) {
	h.indexMu.Lock()
	defer h.indexMu.Unlock()
	if ch.Cleared {
		h.server.Topics.RetainMessage(clearPacket(ch.Topic))
	} else if pk, ok := h.packet(ch.Msg); ok {
		h.server.Topics.RetainMessage(pk)
	} else {
		h.server.Topics.RetainMessage(clearPacket(ch.Topic)) // not the old value
	}
	atomic.StoreInt64(&h.server.Info.Retained, int64(h.server.Topics.Retained.Len()))
}

// Resync replaces the local retained index with the replicated state,
// after a snapshot restore (including at start-up).
func (h *Retained) Resync() {
	h.indexMu.Lock()
	defer h.indexMu.Unlock()
	want := map[string]bool{}
	now := time.Now()
	for _, m := range h.repl.Retained() {
		if m.Expired(now) {
			continue
		}
		if pk, ok := h.packet(m); ok {
			want[m.Topic] = true
			h.server.Topics.RetainMessage(pk)
		}
	}
	for _, pk := range h.server.Topics.Retained.GetAll() {
		if !want[pk.TopicName] && !strings.HasPrefix(pk.TopicName, "$SYS/") { // $SYS: this node's own (hooks.Sys)
			h.server.Topics.RetainMessage(clearPacket(pk.TopicName))
		}
	}
	atomic.StoreInt64(&h.server.Info.Retained, int64(h.server.Topics.Retained.Len()))
}

func retainCommand(pk packets.Packet, now time.Time) replication.Command {
	if len(pk.Payload) == 0 {
		return &replication.RetainClear{Topic: pk.TopicName}
	}
	p := pk.Properties
	m := replication.RetainedMessage{
		Topic: pk.TopicName, Payload: pk.Payload, QoS: pk.FixedHeader.Qos,
		PayloadFormat: p.PayloadFormat, ContentType: p.ContentType, ResponseTopic: p.ResponseTopic,
		CorrelationData: p.CorrelationData, Created: now.UnixMilli(),
	}
	if p.MessageExpiryInterval > 0 {
		m.Expires = now.UnixMilli() + int64(p.MessageExpiryInterval)*1000
	}
	for _, u := range p.User {
		m.UserProperties = append(m.UserProperties, replication.UserProperty{Key: u.Key, Value: u.Val})
	}
	return &replication.RetainSet{Msg: m}
}

// retainedPacket builds the packet mochi keeps in its retained index. The
// protocol version is 5 so mochi enforces the message expiry.
func retainedPacket(m replication.RetainedMessage) packets.Packet {
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Publish, Retain: true, Qos: m.QoS},
		TopicName:       m.Topic,
		Payload:         m.Payload,
		Created:         m.Created / 1000,
		ProtocolVersion: 5,
		Properties: packets.Properties{
			PayloadFormat:     m.PayloadFormat,
			PayloadFormatFlag: m.PayloadFormat != 0,
			ContentType:       m.ContentType,
			ResponseTopic:     m.ResponseTopic,
			CorrelationData:   m.CorrelationData,
		},
	}
	if m.Expires > 0 {
		pk.Expiry = (m.Expires + 999) / 1000
	}
	for _, u := range m.UserProperties {
		pk.Properties.User = append(pk.Properties.User, packets.UserProperty{Key: u.Key, Val: u.Value})
	}
	return pk
}

func clearPacket(topic string) packets.Packet {
	return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}, TopicName: topic}
}
