package cluster

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"
)

// Acknowledged routes (protocol 2).
//
// On a single broker a message published after SUBACK matches the new
// subscription. Across nodes the route travels by gossip, which takes
// 3-200 ms (seconds with packet loss), and a message published on another
// node in that window was not forwarded. So each local route change also
// travels on the forwarding connection to every peer (frameRoute, in order
// with the forwarded messages), and the peer answers on the same
// connection with how far it holds our routes (frameRouteAck), whenever
// that moves forward by any path (this frame, a gossiped delta, a
// push/pull). AwaitRoutes waits until every connected peer has
// acknowledged our current route version; the hooks call it before SUBACK
// for a filter that is new on this node. Gossip stays the way routes reach
// peers that speak protocol 1 and the repair path for everything else.
//
//	route frame  u32 N | u8 type=2 | u8 op | uvarint incarnation | uvarint version | str filter
//	ack frame    u32 N | u8 type=3 | uvarint incarnation | uvarint version
//
// The route frame names no node: it is the connection's authenticated
// peer, so a peer can only announce its own routes.

// protoRouteAcks is the protocol version that has route and ack frames.
const protoRouteAcks uint8 = 2

// maxAckFrame bounds an ack frame's body (type and two uvarints).
const maxAckFrame = 1 + 2*binary.MaxVarintLen64

func appendRouteFrame(b []byte, d routeDelta) []byte {
	body := 1 + 1 + sizeUvarint(d.Incarnation) + sizeUvarint(d.Version) + sizeString(len(d.Filter))
	b = binary.BigEndian.AppendUint32(b, uint32(body))
	b = append(b, frameRoute, byte(d.Op))
	b = appendUvarint(b, d.Incarnation)
	b = appendUvarint(b, d.Version)
	return appendString(b, d.Filter)
}

// decodeRouteFrame decodes a route frame body from node.
func decodeRouteFrame(body []byte, node string) (routeDelta, error) {
	r := reader{b: body[1:]}
	d := routeDelta{Node: node, Op: routeOp(r.u8()), Incarnation: r.uvarint(), Version: r.uvarint(), Filter: r.str()}
	if r.err == nil && len(r.b) > 0 {
		r.fail(errors.New("trailing bytes"))
	}
	if r.err != nil {
		return routeDelta{}, fmt.Errorf("%w: route: %w", ErrBadFrame, r.err)
	}
	return d, nil
}

func appendAckFrame(b []byte, inc, ver uint64) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(1+sizeUvarint(inc)+sizeUvarint(ver)))
	b = append(b, frameRouteAck)
	b = appendUvarint(b, inc)
	return appendUvarint(b, ver)
}

func decodeAckFrame(body []byte) (inc, ver uint64, err error) {
	if len(body) == 0 || body[0] != frameRouteAck {
		return 0, 0, fmt.Errorf("%w: not an ack", ErrBadFrame)
	}
	r := reader{b: body[1:]}
	inc, ver = r.uvarint(), r.uvarint()
	if r.err == nil && len(r.b) > 0 {
		r.fail(errors.New("trailing bytes"))
	}
	if r.err != nil {
		return 0, 0, fmt.Errorf("%w: ack: %w", ErrBadFrame, r.err)
	}
	return inc, ver, nil
}

// --- receiving side: acknowledge a peer's routes on its connection ---

// acker writes route acks back on one inbound connection: at once, then
// whenever our copy of the peer's routes moves forward. Only it writes on
// the connection (serveInbound only reads).
type acker struct {
	in   *inbound
	wake chan struct{} // cap 1
}

// startAcker registers and starts in's acker, if the peer speaks protocol 2.
func (n *Node) startAcker(in *inbound) {
	if in.conn.Version() < protoRouteAcks {
		return
	}
	a := &acker{in: in, wake: make(chan struct{}, 1)}
	peer := in.conn.Peer()
	n.ackMu.Lock()
	n.ackers[peer] = a
	n.ackMu.Unlock()
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		defer func() {
			n.ackMu.Lock()
			if n.ackers[peer] == a {
				delete(n.ackers, peer)
			}
			n.ackMu.Unlock()
		}()
		n.runAcker(a, peer)
	}()
}

func (n *Node) runAcker(a *acker, peer string) {
	var buf []byte
	var lastInc, lastVer uint64
	first := true
	for {
		inc, ver := n.routes.remoteHead(peer)
		if first || inc != lastInc || ver != lastVer {
			first = false
			lastInc, lastVer = inc, ver
			buf = appendAckFrame(buf[:0], inc, ver)
			_ = a.in.conn.SetWriteDeadline(time.Now().Add(n.cfg.WriteTimeout))
			if _, err := a.in.conn.Write(buf); err != nil {
				// A connection we cannot ack on is no use to the sender
				// (every wait would time out): end it, it reconnects.
				_ = a.in.conn.Close()
				return
			}
		}
		select {
		case <-a.wake:
		case <-a.in.done:
			return
		}
	}
}

// routesMoved wakes the acker of node's connection: our copy of node's
// routes moved forward (routeTable.onRemote; called without locks held
// but possibly from memberlist's delegates, so it never blocks).
func (n *Node) routesMoved(node string) {
	n.ackMu.Lock()
	a := n.ackers[node]
	n.ackMu.Unlock()
	if a != nil {
		select {
		case a.wake <- struct{}{}:
		default:
		}
	}
}

// applyRouteFrame applies a route frame received from node.
func (n *Node) applyRouteFrame(node string, body []byte) error {
	d, err := decodeRouteFrame(body, node)
	if err != nil {
		return err
	}
	res := n.routes.applyDelta(d)
	n.metrics.deltas.WithLabelValues(res.String()).Inc()
	if res == deltaBuffered {
		n.scheduleRepair(node)
	}
	return nil
}

// --- sending side: read the acks, and wait for them ---

// readAcks reads what the peer sends back on our forwarding connection:
// acks on protocol 2, nothing on protocol 1. It returns when the
// connection ends or the peer sends something it should not.
func (p *peer) readAcks(conn *PeerConn) {
	if conn.Version() < protoRouteAcks {
		_, _ = io.Copy(io.Discard, conn)
		return
	}
	br := bufio.NewReaderSize(conn, 512)
	var lenBuf [frameLenSize]byte
	var body [maxAckFrame]byte
	for {
		if _, err := io.ReadFull(br, lenBuf[:]); err != nil {
			return
		}
		size := binary.BigEndian.Uint32(lenBuf[:])
		if size == 0 || size > maxAckFrame {
			p.n.badFrame(p.id, "ack frame size", fmt.Errorf("%w: %d bytes", ErrBadFrame, size))
			_ = conn.Close()
			return
		}
		if _, err := io.ReadFull(br, body[:size]); err != nil {
			return
		}
		inc, ver, err := decodeAckFrame(body[:size])
		if err != nil {
			p.n.badFrame(p.id, "ack", err)
			_ = conn.Close()
			return
		}
		p.mu.Lock()
		if inc > p.ackInc || inc == p.ackInc && ver > p.ackVer {
			p.ackInc, p.ackVer = inc, ver
		}
		p.ackLate = false
		p.mu.Unlock()
		p.wantSnapshotAfterAck(conn, inc, ver)
		p.n.routeAcks.changed()
	}
}

// ackWaiters lets AwaitRoutes sleep until an ack or a connection change.
type ackWaiters struct {
	mu sync.Mutex
	ch chan struct{}
}

func (w *ackWaiters) wait() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ch == nil {
		w.ch = make(chan struct{})
	}
	return w.ch
}

func (w *ackWaiters) changed() {
	w.mu.Lock()
	if w.ch != nil {
		close(w.ch)
		w.ch = nil
	}
	w.mu.Unlock()
}

// ErrRoutesNotAcknowledged is returned by AwaitRoutes when a peer did not
// acknowledge our routes in time.
var ErrRoutesNotAcknowledged = errors.New("routes not acknowledged by every peer")

// AwaitRoutes waits until every peer we have a protocol-2 forwarding
// connection to holds our routes as they were at the call, or ctx ends.
// Peers without a connection (down, cut off, reconnecting) and protocol-1
// peers are not waited for: they learn routes by gossip. The hooks call it
// before SUBACK so that a message published on any node after SUBACK
// matches the subscription, as on one broker.
func (n *Node) AwaitRoutes(ctx context.Context) error {
	inc, ver := n.routes.head()
	start := time.Now()
	for {
		ch := n.routeAcks.wait()
		missing := n.unacked(inc, ver)
		if len(missing) == 0 {
			n.metrics.routeAckWait.Observe(time.Since(start).Seconds())
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			n.metrics.routeAckTimeouts.Inc()
			n.markLate(missing)
			return fmt.Errorf("%w: %v at version %d: %w", ErrRoutesNotAcknowledged, missing, ver, ctx.Err())
		case <-n.stop:
			return ErrClosed
		}
	}
}

// markLate stops waiting for peers that let a wait time out, until they
// ack again: a peer whose connection still looks up while it is cut off
// (its cluster port black-holed, a partition not yet detected) would
// otherwise delay every SUBACK by the whole bound.
func (n *Node) markLate(ids []string) {
	n.mu.RLock()
	defer n.mu.RUnlock()
	for _, id := range ids {
		if p := n.peers[id]; p != nil {
			p.mu.Lock()
			p.ackLate = true
			p.mu.Unlock()
		}
	}
}

// unacked lists the connected protocol-2 peers that have not acknowledged
// our routes at (inc, ver), but for those marked late.
func (n *Node) unacked(inc, ver uint64) []string {
	n.mu.RLock()
	defer n.mu.RUnlock()
	var out []string
	for id, p := range n.peers {
		p.mu.Lock()
		waiting := !p.closed && p.connected && !p.ackLate && p.conn != nil && p.conn.Version() >= protoRouteAcks &&
			(p.ackInc < inc || p.ackInc == inc && p.ackVer < ver)
		p.mu.Unlock()
		if waiting {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// sendRoute queues our route delta d to every peer we are connected to, in
// order with the messages forwarded to it. A peer that is not connected
// learns it by gossip (and is not waited for).
func (n *Node) sendRoute(d routeDelta) {
	om := outMsg{route: &d, size: frameLenSize + 2 + sizeUvarint(d.Incarnation) + sizeUvarint(d.Version) + sizeString(len(d.Filter))}
	n.mu.RLock()
	defer n.mu.RUnlock()
	for _, p := range n.peers {
		p.enqueueRoute(om)
	}
}

// enqueueRoute appends a route frame. Unlike messages it is not subject to
// the queue's limits, nor counted in them (a route change is rare and
// small, and dropping it would only make AwaitRoutes wait for gossip), but
// it is queued only while connected: a reconnecting peer catches up by
// gossip. A stalled connection is given up after WriteTimeout, and the
// frames with it.
func (p *peer) enqueueRoute(om outMsg) {
	p.mu.Lock()
	if p.closed || !p.connected {
		p.mu.Unlock()
		return
	}
	p.queue = append(p.queue, om)
	p.routeFrames++
	p.mu.Unlock()
	p.signal()
}
