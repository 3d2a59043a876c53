package hooks

import (
	"time"
	"unsafe"

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
		h.wills[cl] = willMark{topic: w.TopicName, data: unsafe.SliceData(w.Payload)}
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

// willMark names the retained will mochi is publishing for a client: its
// topic and its payload's backing array (mochi publishes the will's own
// payload slice). The topic alone is not enough: the publish pipeline
// hands the client's last publishes back on its worker while the read
// loop publishes the will, and a retained "online" handed back between
// OnWill and the will's OnRetainMessage was taken for the will, and the
// will for a stale copy (TestWillAfterClientsLastRetainedWrites).
type willMark struct {
	topic string
	data  *byte
}

// takeWill reports (once) whether pk, being retained for cl, is cl's
// retained will.
func (h *Retained) takeWill(cl *mqtt.Client, pk packets.Packet) bool {
	if cl == nil {
		return false
	}
	h.willMu.Lock()
	defer h.willMu.Unlock()
	m, ok := h.wills[cl]
	if !ok || m.topic != pk.TopicName || m.data != unsafe.SliceData(pk.Payload) {
		return false
	}
	delete(h.wills, cl)
	return true
}

// replicateWill proposes a will mochi retained locally, in its client's
// lane (retained_lane.go), once the client's pipe handed back its last
// publishes: after the client's own retained writes. It is
// not waited for (the client is gone, and a clean session must not need a quorum):
// mochi's local copy serves this node's subscribers meanwhile, and every
// node applies the committed value. If it cannot be committed, the local
// copy is replaced by the committed value again, so that every node keeps
// the same retained set (guarantee 2).
func (h *Retained) replicateWill(cl *mqtt.Client, pk packets.Packet) {
	topic, id := pk.TopicName, cl.ID
	w := &retainWrite{topic: topic, cmd: retainCommand(pk, time.Now()), payload: pk.Payload,
		failed: func(err error) {
			h.metrics.retainedFailed(err)
			h.log.Warn("retained will not replicated", "topic", topic, "error", err)
			h.assert(topic)
		}}
	write := func() { _ = h.writeOrdered(h.base, id, w) }
	if h.pipeline == nil {
		write()
		return
	}
	// After the client's last publishes, which its pipe may still hold.
	h.pipeline.AfterPublishes(cl, write)
}
