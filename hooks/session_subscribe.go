package hooks

import (
	"context"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/internal/session"
	"github.com/mqtt-ha/broker/replication"
)

// A persistent session's subscriptions live in the log, never in mochi's
// topic index: if mochi indexed them, even briefly, it would deliver
// messages published in that window to the client itself, outside the
// session's queue (ahead of the retained values queued for the
// subscription, and twice once the subscription is in the log). So
// OnSubscribe takes a persistent session's filters out of the SUBSCRIBE
// before mochi sees them, decides each one as mochi would (valid filter,
// ACL, granted QoS), commits the granted ones with their retained messages
// in one entry, and OnPacketEncode writes the reason codes into mochi's
// SUBACK. Shared subscriptions ($share/...) are left to mochi (they are
// not durable yet).

// OnSubscribe commits a persistent session's new subscriptions (and the
// retained messages they get) before SUBACK; see above.
func (h *Sessions) OnSubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	c := h.conn(cl)
	if c == nil || !c.managed || c.refused || cl.Net.Inline {
		return pk
	}
	c.suback = nil
	if _, inUse := cl.State.Inflight.Get(pk.PacketID); inUse {
		return pk // mochi refuses every filter (0x91) and indexes nothing
	}
	p := &session.Suback{Codes: make([]byte, len(pk.Filters))}
	var keep []packets.Subscription
	var subs []replication.Subscription
	var pos []int
	var existed []bool
	maxQoS := h.server.Options.Capabilities.MaximumQos
	h.idxMu.Lock()
	known := h.idxSubs[c.id]
	for i, f := range pk.Filters {
		if isSharedFilter(f.Filter) {
			keep = append(keep, f)
			p.Mochi = append(p.Mochi, i)
			continue
		}
		// The ACL is asked about valid filters only.
		valid := mqtt.IsValidFilter(f.Filter, false)
		allowed := valid && (h.cfg.ACL == nil || h.cfg.ACL(cl, f.Filter, false))
		code, q, granted := session.SubscribeCode(valid, allowed, h.server.Options.Capabilities.Compatibilities.ObscureNotAuthorized,
			f.Qos, maxQoS, cl.Properties.ProtocolVersion)
		p.Codes[i] = code
		if granted {
			subs = append(subs, replication.Subscription{Filter: f.Filter, QoS: q, NoLocal: f.NoLocal,
				RetainAsPublished: f.RetainAsPublished, RetainHandling: f.RetainHandling, Identifier: uint32(f.Identifier)})
			pos = append(pos, i)
			_, had := known[f.Filter]
			existed = append(existed, had)
		}
	}
	h.idxMu.Unlock()
	c.suback = p
	pk.Filters = keep
	if len(subs) == 0 {
		return pk
	}
	if err := h.subscribe(c, subs, existed); err != nil {
		h.log.Warn("subscription not replicated; refused", "client", c.id, "error", err)
		for _, i := range pos {
			p.Codes[i] = packets.ErrUnspecifiedError.Code
		}
	}
	return pk
}

// subscribe commits subs with the retained messages they get, routes them
// to this node, and sends the QoS 0 retained copies.
func (h *Sessions) subscribe(c *sessConn, subs []replication.Subscription, existed []bool) error {
	// The retained messages for the new subscriptions are queued in the
	// same entry as the subscription (MQTT-3.3.1-9), so every live message
	// matched after it comes later in the queue: an older retained value
	// never arrives after a newer live one. A very large retained set is
	// split over further entries (chunks bounded by retainedChunkBytes).
	retained, qos0 := h.retainedFor(c, subs, existed)
	chunks := session.ChunkCommands(retained, retainedChunkBytes)
	var cmd replication.Command = &replication.Subscribe{ClientID: c.id, Subscriptions: subs}
	if len(chunks) > 0 {
		cmd = &replication.Batch{Commands: append([]replication.Command{cmd}, chunks[0]...)}
		chunks = chunks[1:]
	}
	// Routed first, and acknowledged by every connected peer, so that a
	// QoS 0 copy published on any node after SUBACK reaches this node; and
	// before the commit, since from the commit on live QoS 0 copies are
	// delivered (deliverQoS0) and must not overtake the retained ones sent
	// below (retained-then-live).
	var added []string
	for _, s := range subs {
		if h.cluster.addRoute(c.id, s.Filter) {
			added = append(added, s.Filter)
		}
	}
	if len(added) > 0 {
		h.cluster.awaitRoutes(c.id)
	}
	ctx, cancel := context.WithTimeout(h.base, h.cfg.Timeout)
	defer cancel()
	res, err := h.repl.Apply(ctx, cmd)
	if err == nil && len(res.Results) > 0 && res.Results[0].Err != nil {
		err = res.Results[0].Err
	}
	if err != nil {
		for _, f := range added {
			h.cluster.removeRoute(c.id, f)
		}
		return err
	}
	for _, ch := range chunks {
		if _, cerr := h.repl.Apply(ctx, &replication.Batch{Commands: ch}); cerr != nil {
			h.log.Warn("retained messages for a new subscription not queued", "client", c.id, "count", len(ch), "error", cerr)
		}
	}
	// QoS 0 copies are matched against this node's copy of the log
	// (deliverQoS0): it must hold the subscription before SUBACK.
	// Publishers on other nodes need no wait here: each QoS 1/2 publish
	// passes a read barrier first (OnPublish).
	if werr := h.repl.WaitAppliedLocal(ctx, res.Index); werr != nil {
		h.log.Debug("subscription not yet applied here", "client", c.id, "error", werr)
	}
	c.pump.sendRetainedQoS0(qos0)
	return nil
}

// isSharedFilter reports whether filter is a shared subscription, as mochi
// decides it (case-insensitive prefix).
func isSharedFilter(filter string) bool { return mqtt.IsSharedFilter(filter) }

// retainedChunkBytes bounds the retained payload queued in one entry for a
// new subscription (half the default raft batch size).
const retainedChunkBytes = 4 << 20

// retainedFor returns the retained messages matching new subscriptions
// (MQTT-3.3.1-9, with retain handling 1 and 2): enqueues for the QoS 1/2
// copies, so they are ordered with everything else and get the pump's
// packet ids, and the QoS 0 copies to send directly.
func (h *Sessions) retainedFor(c *sessConn, subs []replication.Subscription, existed []bool) ([]replication.Command, []packets.Packet) {
	now := time.Now()
	var cmds []replication.Command
	var qos0 []packets.Packet
	for k, sub := range subs {
		if sub.RetainHandling == 2 || (sub.RetainHandling == 1 && existed[k]) {
			continue
		}
		for _, r := range h.server.Topics.Messages(sub.Filter) {
			if r.Expiry > 0 && r.Expiry < now.Unix() {
				continue
			}
			var ids []uint32
			if sub.Identifier > 0 {
				ids = []uint32{sub.Identifier}
			}
			qos := min(r.FixedHeader.Qos, sub.QoS)
			if qos == 0 {
				out := r.Copy(false)
				out.FixedHeader.Qos, out.PacketID, out.FixedHeader.Retain = 0, 0, true
				for _, id := range ids {
					out.Properties.SubscriptionIdentifier = append(out.Properties.SubscriptionIdentifier, int(id))
				}
				qos0 = append(qos0, out)
				continue
			}
			e := &replication.Enqueue{Topic: r.TopicName, Payload: r.Payload, Created: now.UnixMilli(),
				MaxQueued: uint32(h.cfg.MaxQueued), Policy: replication.DropNewest,
				Targets: []replication.QueueTarget{{ClientID: c.id, QoS: qos, Retain: true, SubscriptionIDs: ids}},
				Properties: replication.Properties{PayloadFormat: r.Properties.PayloadFormat, ContentType: r.Properties.ContentType,
					ResponseTopic: r.Properties.ResponseTopic, CorrelationData: r.Properties.CorrelationData}}
			for _, u := range r.Properties.User {
				e.Properties.UserProperties = append(e.Properties.UserProperties, replication.UserProperty{Key: u.Key, Value: u.Val})
			}
			if r.Expiry > 0 {
				e.Expires = r.Expiry * 1000
			}
			if ref, ok := blobOfOrigin(r.Origin); ok {
				// A large retained value: its blob, which the value refers
				// to, is queued by reference.
				e.Payload = nil
				cmds = append(cmds, &replication.WithBlob{Ref: ref, Cmd: e})
				continue
			}
			if len(r.Payload) > replication.BlobThreshold {
				// The retained value's blob: PutBlob finds it and
				// writes nothing (or writes it, if the value changed).
				ctx, cancel := context.WithTimeout(h.base, durableTimeout(h.cfg.Timeout, len(r.Payload)))
				wb, err := withBlob(ctx, h.repl, replication.MaxBlobSize, r.Payload, e, func() { e.Payload = nil })
				cancel()
				if err != nil {
					h.log.Warn("large retained message for a new subscription not queued", "client", c.id,
						"topic", r.TopicName, "error", err)
					continue
				}
				cmds = append(cmds, wb)
				continue
			}
			cmds = append(cmds, e)
		}
	}
	return cmds, qos0
}
