package session

import (
	"sync"

	"github.com/mqtt-ha/broker/replication"
)

// The delivery pump's bookkeeping (hooks/pump.go): which queued messages
// are in flight on a connection, under which packet ids.

// DefaultWindow applies when neither max_inflight_messages nor the client
// limits in-flight messages.
const DefaultWindow = 100

// WindowSize is how many messages a connection may have unacknowledged:
// max_inflight_messages (maxInflight, 0 none), lowered to the client's
// Receive Maximum (0 none), DefaultWindow when neither is set.
func WindowSize(maxInflight int, receiveMaximum uint16) int {
	window := maxInflight
	if rm := int(receiveMaximum); rm > 0 && (window == 0 || rm < window) {
		window = rm
	}
	if window <= 0 {
		window = DefaultWindow
	}
	return window
}

// PidFor maps a Seq to its packet id. The same message gets the same id
// on every node, so a QoS 2 receiver that already has it (PUBREC sent)
// sees a duplicate, not a new message, when another node resends it. At
// most a window (< 65535) of consecutive Seqs are in flight, so ids never
// collide.
func PidFor(seq uint64) uint16 { return uint16((seq-1)%65535) + 1 }

// PacketID is the packet id m is sent under: PidFor its Seq, or, once
// released (PUBREC received), the id the client acknowledged.
func PacketID(m replication.QueuedMessage) uint16 {
	if m.Released {
		return m.PacketID
	}
	return PidFor(m.Seq)
}

// ExpiredInQueue reports whether m's message expiry passed at now (Unix
// ms) before it was delivered (MQTT-3.3.2-5): it is then acknowledged
// unsent. A released message (PUBREC received) is past expiry's reach:
// the client holds its packet id until PUBREL.
func ExpiredInQueue(m replication.QueuedMessage, now int64) bool {
	return m.Expires > 0 && m.Expires <= now && !m.Released
}

// RemainingExpiry is the message expiry interval to send for a message
// expiring at expires (Unix ms, > 0) at now: the remaining lifetime,
// rounded up to whole seconds, at least 1 (MQTT-3.3.2-6).
func RemainingExpiry(expires, now int64) uint32 {
	return uint32(max((expires-now+999)/1000, 1))
}

// Window is one connection's deliveries in flight: packet id -> Seq, and
// the next Seq to send. It is safe for concurrent use (the pump sends,
// the client's reader acknowledges).
type Window struct {
	size int

	mu       sync.Mutex
	inflight map[uint16]uint64 // packet id -> Seq, sent and not acknowledged
	next     uint64            // lowest Seq not sent on this connection
}

// NewWindow returns an empty window of size messages (WindowSize).
func NewWindow(size int) *Window {
	return &Window{size: size, inflight: map[uint16]uint64{}}
}

// Room is how many more messages may be sent now, and the Seq to read the
// queue from.
func (w *Window) Room() (room int, from uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.size - len(w.inflight), w.next
}

// Busy reports whether pid is in flight already: the id wrapped (65,535
// later messages went by while one stayed unacknowledged), and the sender
// waits for it rather than lose track of the older message.
func (w *Window) Busy(pid uint16) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	_, busy := w.inflight[pid]
	return busy
}

// Sent records that seq was sent under pid.
func (w *Window) Sent(pid uint16, seq uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.inflight[pid] = seq
	w.next = seq + 1
}

// Skip records that seq is done without being sent (it expired).
func (w *Window) Skip(seq uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.next = max(w.next, seq+1)
}

// Acked ends the delivery under pid (PUBACK, PUBCOMP, a refusing PUBREC,
// or a message too large to send) and returns its Seq; false if pid was
// not one of the window's deliveries.
func (w *Window) Acked(pid uint16) (uint64, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	seq, ok := w.inflight[pid]
	delete(w.inflight, pid)
	return seq, ok
}

// SeqOf returns the Seq of a message in flight under pid.
func (w *Window) SeqOf(pid uint16) (uint64, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	seq, ok := w.inflight[pid]
	return seq, ok
}
