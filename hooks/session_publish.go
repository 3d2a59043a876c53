package hooks

import (
	"context"
	"maps"
	"slices"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/replication"
)

// Publishing: what a QoS 1/2 PUBLISH writes to the log before it is
// acknowledged, and the QoS 0 copies for live persistent sessions.

// OnPublish enqueues a QoS 1/2 message for every matching persistent
// session and returns once that is committed, so mochi acknowledges only
// what the log holds.
//
// Matching uses this node's copy of the subscriptions, which may lag the
// log (a node just restarted, paused, cut off, or slow to apply). So the
// publish first waits on a read barrier: once it returns, this node holds
// every subscription whose SUBACK was sent before the PUBLISH arrived, on
// any node. Without a leader the barrier fails and the publish is refused
// like a retained write without quorum (replication/DESIGN.md,
// "Acknowledging a publish").
func (h *Sessions) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Qos == 0 || pk.Ignore || isInjector(cl) || isWillPublisher(cl) {
		return pk, nil // a will's persistent copies were queued by its claim
	}
	if h.pipeline != nil {
		if v := h.pipeline.verdict(cl, pk); v != nil && !v.hooks {
			if v.err != nil {
				return pk, h.refuse(cl, pk, v.err)
			}
			return pk, h.published(v.qos2, v.res)
		}
		if h.pipeline.takeInlined(cl, pk) {
			return pk, nil // nothing to commit, as of a barrier after it arrived
		}
	}
	ctx, cancel := context.WithTimeout(h.base, durableTimeout(h.cfg.Timeout, len(pk.Payload)))
	defer cancel()
	if ackBeforeCommit {
		// The deliberately broken build: match on a possibly stale view,
		// acknowledge before the commit.
		if cmd := h.enqueueCommand(pk, cl.ID); cmd != nil {
			go func() { _, _ = h.repl.Apply(context.Background(), cmd) }()
		}
		return pk, nil
	}
	if err := h.repl.SessionsBarrier(ctx); err != nil {
		return pk, h.refuse(cl, pk, err)
	}
	wcmd, qos2 := h.publishCommand(cl, h.conn(cl), pk)
	if wcmd == nil {
		return pk, nil
	}
	if enq := enqueueOf(wcmd); enq != nil {
		var err error
		if wcmd, err = withBlob(ctx, h.repl, h.durableLimit(), pk.Payload, wcmd, func() { enq.Payload = nil }); err != nil {
			return pk, h.refuse(cl, pk, err)
		}
	}
	res, err := applyDurable(ctx, h.repl, wcmd, pk.Payload)
	if err != nil {
		return pk, h.refuse(cl, pk, err)
	}
	return pk, h.published(qos2, res)
}

// publishCommand is what a QoS 1/2 PUBLISH writes before it is
// acknowledged (after a sessions barrier): an Enqueue for the persistent
// sessions it matches, or, for a QoS 2 PUBLISH from a persistent session,
// a QoS2Publish (qos2) that records the receipt with the enqueue; nil when
// nothing is to be written.
//
// c is the publisher's connection state (nil: none) as it was when the
// PUBLISH arrived: the connection may have ended since (pipeline.go).
func (h *Sessions) publishCommand(cl *mqtt.Client, c *sessConn, pk packets.Packet) (cmd replication.Command, qos2 bool) {
	enq := h.enqueueCommand(pk, cl.ID)
	// A QoS 2 PUBLISH from a persistent session is recorded with its
	// enqueue, in one entry: the client resends it (same packet id) on
	// another node if the PUBREC was lost, and that copy must not be
	// delivered again; a receipt without its enqueue would drop the
	// message for everyone.
	if c != nil && c.managed && pk.FixedHeader.Qos == 2 && !cl.Net.Inline {
		// Fenced to this connection's open: a forward that arrives late,
		// after the client resumed elsewhere and completed the flow
		// there, must not queue the message again.
		q2 := &replication.QoS2Publish{ClientID: c.id, PacketID: pk.PacketID, Enqueue: enq}
		if h.repl.QoS2Fence() { // every server applies type 23 (a rolling upgrade may not be done)
			q2.IfOpened = c.opened.Load()
		}
		return q2, true
	}
	if enq == nil {
		return nil, false
	}
	return enq, false
}

// enqueueOf is the Enqueue a publishCommand carries (nil: a QoS 2
// receipt alone).
func enqueueOf(cmd replication.Command) *replication.Enqueue {
	switch c := cmd.(type) {
	case *replication.Enqueue:
		return c
	case *replication.QoS2Publish:
		return c.Enqueue
	}
	return nil
}

// published is OnPublish's answer once publishCommand's entry committed
// with res: a QoS 2 receipt that was not new is a duplicate, acknowledged
// and not delivered again.
func (h *Sessions) published(qos2 bool, res replication.Result) error {
	if qos2 && !res.Changed {
		h.m.qos2Duplicates.Inc()
		return packets.CodeSuccessIgnore
	}
	h.enqueued(res)
	return nil
}

// refuse is what the publisher gets when its message could not be stored
// (refusePublish).
func (h *Sessions) refuse(cl *mqtt.Client, pk packets.Packet, err error) error {
	h.m.enqueueFailed.Inc()
	h.log.Warn("message for persistent sessions not replicated; not acknowledged", "client", cl.ID,
		"topic", pk.TopicName, "error", err)
	return refusePublish(cl, pk, "message", err)
}

func (h *Sessions) enqueued(res replication.Result) {
	if res.Dropped == 0 {
		return
	}
	h.m.dropped.Add(float64(res.Dropped))
	now := time.Now().UnixNano()
	if last := h.dropLog.Load(); now-last > int64(10*time.Second) && h.dropLog.CompareAndSwap(last, now) {
		h.log.Warn("session queue full: messages dropped (max_queued_messages)", "dropped", res.Dropped,
			"limit", h.cfg.MaxQueued)
	}
}

// enqueueCommand matches pk against every persistent session; nil when no
// session gets it at QoS 1 or 2 (QoS 0 copies are delivered directly).
func (h *Sessions) enqueueCommand(pk packets.Packet, origin string) *replication.Enqueue {
	subs := h.idx.Load().Subscribers(pk.TopicName)
	if len(subs.Subscriptions) == 0 {
		return nil
	}
	var targets []replication.QueueTarget
	for _, id := range slices.Sorted(maps.Keys(subs.Subscriptions)) {
		sub := subs.Subscriptions[id]
		qos := min(pk.FixedHeader.Qos, sub.Qos)
		if qos == 0 || (sub.NoLocal && id == origin) {
			continue
		}
		targets = append(targets, replication.QueueTarget{ClientID: id, QoS: qos,
			Retain: pk.FixedHeader.Retain && sub.RetainAsPublished, SubscriptionIDs: subscriptionIDs(sub)})
	}
	if len(targets) == 0 {
		return nil
	}
	now := time.Now().UnixMilli()
	p := pk.Properties
	cmd := &replication.Enqueue{Topic: pk.TopicName, Payload: pk.Payload, Created: now,
		MaxQueued: uint32(h.cfg.MaxQueued), Policy: replication.DropNewest, Targets: targets,
		Properties: replication.Properties{PayloadFormat: p.PayloadFormat, ContentType: p.ContentType,
			ResponseTopic: p.ResponseTopic, CorrelationData: p.CorrelationData}}
	for _, u := range p.User {
		cmd.Properties.UserProperties = append(cmd.Properties.UserProperties, replication.UserProperty{Key: u.Key, Value: u.Val})
	}
	if p.MessageExpiryInterval > 0 {
		cmd.Expires = now + int64(p.MessageExpiryInterval)*1000
	}
	return cmd
}

func subscriptionIDs(sub packets.Subscription) []uint32 {
	var ids []uint32
	if sub.Identifiers != nil {
		for _, v := range sub.Identifiers {
			if v > 0 {
				ids = append(ids, uint32(v))
			}
		}
	} else if sub.Identifier > 0 {
		ids = append(ids, uint32(sub.Identifier))
	}
	slices.Sort(ids)
	return ids
}

// OnPublished delivers QoS 0 copies to the live persistent sessions here
// (their subscriptions are not in mochi's index). It runs for local
// publishes and for messages forwarded by peers alike.
func (h *Sessions) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	h.deliverQoS0(pk)
}

// OnWillSent handles wills mochi publishes itself (clean sessions), which
// skip OnPublish: persistent sessions still get them queued (best effort,
// nobody waits for an acknowledgement) and QoS 0 copies.
func (h *Sessions) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	h.deliverQoS0(pk)
	if pk.FixedHeader.Qos == 0 {
		return
	}
	if cmd := h.enqueueCommand(pk, cl.ID); cmd != nil {
		h.submit(sessOp{cmd: func() replication.Command { return cmd }})
	}
}

func (h *Sessions) deliverQoS0(pk packets.Packet) {
	subs := h.idx.Load().Subscribers(pk.TopicName)
	if len(subs.Subscriptions) == 0 {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for id, sub := range subs.Subscriptions {
		c := h.live[id]
		if c == nil || min(pk.FixedHeader.Qos, sub.Qos) != 0 || (sub.NoLocal && pk.Origin == id) {
			continue
		}
		out := pk.Copy(false)
		out.FixedHeader.Qos, out.PacketID, out.FixedHeader.Dup = 0, 0, false
		if !sub.RetainAsPublished {
			out.FixedHeader.Retain = false
		}
		out.Properties.SubscriptionIdentifier = nil
		for _, v := range subscriptionIDs(sub) {
			out.Properties.SubscriptionIdentifier = append(out.Properties.SubscriptionIdentifier, int(v))
		}
		out.Properties.TopicAlias, out.Properties.TopicAliasFlag = 0, false
		c.pump.sendQoS0(out)
	}
}

// isInjector reports whether cl injects messages forwarded by a peer.
func isInjector(cl *mqtt.Client) bool {
	return cl.Net.Inline && strings.HasPrefix(cl.ID, injectorPrefix)
}
