package hooks

import (
	"context"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Retained wills that mochi publishes itself (clean sessions: sendLWT).
// They skip OnPublish, so the retained hook never proposed them, and
// mochi's retainMessage then fires OnRetainMessage, which would put the
// old committed value back. The hook recognises them instead: OnWill marks
// the client, and the OnRetainMessage that follows on the same goroutine
// (sendLWT: OnWill, retainMessage, publish, OnWillSent) proposes the will
// as the new retained value. Delayed wills are not marked: mochi retains a
// delayed will only for a client still in its Clients, which a clean
// session is not, and persistent sessions' wills live in the log (the
// leader publishes them, see Sessions.publishDueWills).

// OnWill marks a client whose retained will mochi is about to publish.
func (h *Retained) OnWill(cl *mqtt.Client, w mqtt.Will) (mqtt.Will, error) {
	if w.Retain && w.WillDelayInterval == 0 && !cl.Net.Inline {
		h.willMu.Lock()
		h.wills[cl] = w.TopicName
		h.willMu.Unlock()
	}
	return w, nil
}

// OnWillSent forgets the mark when mochi did not retain the will (retain
// unavailable, or an ignored packet).
func (h *Retained) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	h.willMu.Lock()
	delete(h.wills, cl)
	h.willMu.Unlock()
}

// takeWill reports (once) whether cl's retained will for topic is the
// message being retained.
func (h *Retained) takeWill(cl *mqtt.Client, topic string) bool {
	if cl == nil {
		return false
	}
	h.willMu.Lock()
	defer h.willMu.Unlock()
	t, ok := h.wills[cl]
	if !ok || t != topic {
		return false
	}
	delete(h.wills, cl)
	return true
}

// replicateWill proposes a will mochi retained locally. It is not waited
// for (the client is gone, and a clean session must not need a quorum):
// mochi's local copy serves this node's subscribers meanwhile, and every
// node applies the committed value. If it cannot be committed, the local
// copy is replaced by the committed value again, so that every node keeps
// the same retained set (guarantee 2).
func (h *Retained) replicateWill(pk packets.Packet) {
	cmd := retainCommand(pk, time.Now())
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), h.timeout)
		defer cancel()
		if _, err := h.repl.Apply(ctx, cmd); err != nil {
			h.metrics.retainedFailed(err)
			h.log.Warn("retained will not replicated", "topic", pk.TopicName, "error", err)
			h.assert(pk.TopicName)
		}
	}()
}
