package hooks

import (
	"sort"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// QueueOrder makes a resumed session receive its queued messages in the
// order they were published, as Mosquitto does (MQTT-4.6.0). mochi resends
// them sorted by uint16(Created), which has one-second resolution and an
// unstable sort, so messages queued within a second come out shuffled.
//
// Just before mochi takes the stored session over, this hook renumbers the
// Created field of its messages to base+i in publish order, where base is a
// multiple of 65536 so that uint16(Created) is exactly i. Publish order is
// (Created second, then packet id: ids are allocated in sequence). Created
// is otherwise unused for queued messages because the broker sets no
// MaximumMessageExpiryInterval; per-message expiry lives in Expiry.
//
// Known limit: messages published live while the backlog is being resent
// can overtake it (mochi writes both concurrently).
type QueueOrder struct {
	mqtt.HookBase
	server *mqtt.Server
}

// NewQueueOrder returns the hook.
func NewQueueOrder(s *mqtt.Server) *QueueOrder { return &QueueOrder{server: s} }

// ID implements mqtt.Hook.
func (h *QueueOrder) ID() string { return "queue-order" }

// Provides implements mqtt.Hook.
func (h *QueueOrder) Provides(b byte) bool { return b == mqtt.OnSessionEstablish }

// OnSessionEstablish runs after authentication and before mochi inherits
// the stored session.
func (h *QueueOrder) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	if pk.Connect.Clean {
		return
	}
	if existing, ok := h.server.Clients.Get(cl.ID); ok && existing != cl {
		renumberQueue(existing.State.Inflight, time.Now().Unix())
	}
}

func renumberQueue(in *mqtt.Inflight, now int64) {
	all := in.GetAll(false)
	if len(all) < 2 {
		return
	}
	// Packet ids wrap at 65535; when a set spans the wrap, the small ids
	// are the newer ones.
	lo, hi := all[0].PacketID, all[0].PacketID
	for _, p := range all {
		lo, hi = min(lo, p.PacketID), max(hi, p.PacketID)
	}
	key := func(id uint16) int {
		if hi-lo > 1<<15 && id < 1<<15 {
			return int(id) + 1<<16
		}
		return int(id)
	}
	sort.SliceStable(all, func(i, j int) bool {
		if all[i].Created != all[j].Created {
			return all[i].Created < all[j].Created
		}
		return key(all[i].PacketID) < key(all[j].PacketID)
	})
	base := now &^ 0xFFFF
	for i, p := range all {
		p.Created = base + int64(i)
		in.Set(p)
	}
}
