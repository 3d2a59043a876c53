package cluster

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Forwarding: each node dials every peer once for its own outgoing traffic
// (so a pair of nodes has two connections, one per direction) and keeps one
// ordered, bounded queue per peer, drained by one writer goroutine. One
// queue and one connection per peer is what keeps MQTT's per-publisher order
// across the hop; the receiver delivers one connection's frames in order on
// one goroutine.

// outMsg is one queued message for one peer. m is shared between the queues
// of all peers it goes to (read-only); shared is this peer's own decision.
type outMsg struct {
	m      *Message
	shared []string
	size   int // frame bytes including the length prefix
	// route, when set, makes this a route frame (routeack.go), not a
	// message: written only on a protocol-2 connection.
	route *routeDelta
	// queued is when a message with an expiry was queued: the time it
	// waits here (a slow peer, a reconnect) counts against its expiry
	// (MQTT-3.3.2-6).
	queued time.Time
}

// expiring returns the message to write for om: m itself, or a copy whose
// expiry has the time om spent queued taken off; nil when that is all of
// it (the message expired in the queue).
func (om *outMsg) expiring(now time.Time) *Message {
	if om.queued.IsZero() {
		return om.m
	}
	waited := uint32(min(now.Sub(om.queued)/time.Second, 1<<32-1))
	if waited == 0 {
		return om.m
	}
	if waited >= om.m.MessageExpiry {
		return nil
	}
	m := *om.m
	m.MessageExpiry -= waited
	return &m
}

// peer is the sending side towards one remote node.
type peer struct {
	n     *Node
	id    string
	depth prometheus.Gauge
	bytes prometheus.Gauge

	mu        sync.Mutex
	addr      string
	queue     []outMsg
	qbytes    int
	closed    bool
	connected bool
	conn      *PeerConn
	everUp    bool
	forwarded uint64
	dropped   uint64
	lastErr   string
	// How far the peer holds our routes, from the acks on the current
	// connection (routeack.go); reset on every new connection.
	ackInc, ackVer uint64
	// ackLate: a wait for this peer's ack timed out, and no ack came
	// since; AwaitRoutes does not wait for it meanwhile (routeack.go).
	ackLate bool
	// routeFrames counts the route frames in queue: they are not messages
	// and do not count against the queue's limits or as drops.
	routeFrames int
	// Route snapshots (routesync.go): snapAcked once the connection's
	// first ack arrived; snapDue asks the writer for one; snapAt is when
	// the last one was written and snapGap the wait before the next;
	// (snapInc, snapVer) is the head it carried, and lostGap the wait
	// before the next once the peer applied it and fell behind again.
	snapAcked        bool
	snapDue          bool
	snapAt           time.Time
	snapGap          time.Duration
	snapInc, snapVer uint64
	lostGap          time.Duration

	wake   chan struct{} // cap 1: "the queue is not empty" or "state changed"
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

func newPeer(n *Node, id, addr string) *peer {
	ctx, cancel := context.WithCancel(context.Background())
	return &peer{
		n: n, id: id, addr: addr,
		depth: n.metrics.queueDepth.WithLabelValues(id),
		bytes: n.metrics.queueBytes.WithLabelValues(id),
		wake:  make(chan struct{}, 1),
		ctx:   ctx, cancel: cancel,
		done: make(chan struct{}),
	}
}

func (p *peer) signal() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// enqueue appends om unless the queue is full or closed (tail drop: what is
// already queued keeps its order and nothing queued is ever reordered). It
// never blocks: it runs on the publisher's goroutine.
func (p *peer) enqueue(om outMsg) (bool, string) {
	p.mu.Lock()
	if p.closed {
		p.dropped++
		p.mu.Unlock()
		return false, dropPeerGone
	}
	cfg := &p.n.cfg
	if msgs := len(p.queue) - p.routeFrames; msgs >= cfg.QueueSize || (msgs > 0 && p.qbytes+om.size > cfg.QueueBytes) {
		p.dropped++
		p.mu.Unlock()
		return false, dropQueueFull
	}
	p.queue = append(p.queue, om)
	p.qbytes += om.size
	depth, qb := len(p.queue), p.qbytes
	p.mu.Unlock()
	p.depth.Set(float64(depth))
	p.bytes.Set(float64(qb))
	p.signal()
	return true, ""
}

// take moves the whole queue into buf (swapping backing arrays, so steady
// state allocates nothing).
func (p *peer) take(buf []outMsg) []outMsg {
	p.mu.Lock()
	q := p.queue
	p.queue = buf[:0]
	p.qbytes, p.routeFrames = 0, 0
	p.mu.Unlock()
	p.depth.Set(0)
	p.bytes.Set(0)
	return q
}

// setAddr switches the peer to a new cluster address (node metadata
// changed); the current connection is cut so the next dial uses it.
func (p *peer) setAddr(addr string) {
	p.mu.Lock()
	changed := p.addr != addr
	p.addr = addr
	c := p.conn
	p.mu.Unlock()
	if changed && c != nil {
		_ = c.Close()
	}
}

// stop ends the peer: queued messages are dropped with reason, the
// connection is closed, and stop waits for the writer goroutine.
func (p *peer) stop(reason string) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		<-p.done
		return
	}
	p.closed = true
	lost := len(p.queue) - p.routeFrames
	p.queue = nil
	p.qbytes, p.routeFrames = 0, 0
	p.dropped += uint64(lost)
	c := p.conn
	p.mu.Unlock()
	if lost > 0 {
		p.n.metrics.dropped.WithLabelValues(reason).Add(float64(lost))
	}
	p.cancel()
	if c != nil {
		_ = c.Close()
	}
	<-p.done
	p.n.metrics.queueDepth.DeleteLabelValues(p.id)
	p.n.metrics.queueBytes.DeleteLabelValues(p.id)
}

type peerStats struct {
	Addr       string
	Connected  bool
	QueueDepth int
	QueueBytes int
	Forwarded  uint64
	Dropped    uint64
	LastError  string
}

func (p *peer) stats() peerStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return peerStats{Addr: p.addr, Connected: p.connected, QueueDepth: len(p.queue), QueueBytes: p.qbytes,
		Forwarded: p.forwarded, Dropped: p.dropped, LastError: p.lastErr}
}

// run dials, writes until the connection fails, and reconnects with
// exponential backoff until stop. Messages keep queueing while disconnected
// (up to the bounds), so a short blip loses only what was in flight.
func (p *peer) run() {
	defer close(p.done)
	log := p.n.log.With("peer", p.id)
	backoff := p.n.cfg.ReconnectMin
	failures := 0
	var buf []outMsg
	for p.ctx.Err() == nil {
		p.mu.Lock()
		addr := p.addr
		p.mu.Unlock()
		conn, err := p.n.mux.Dial(p.ctx, addr, ProtoForward)
		if err == nil && conn.Peer() != p.id {
			_ = conn.Close()
			err = fmt.Errorf("%w: %s answered as %q, expected %q", ErrHandshake, addr, conn.Peer(), p.id)
		}
		if err != nil {
			if p.ctx.Err() != nil {
				return
			}
			p.n.metrics.dialErrors.Inc()
			failures++
			p.mu.Lock()
			p.lastErr = err.Error()
			p.mu.Unlock()
			if failures == 1 || errors.Is(err, ErrAuth) || errors.Is(err, ErrProtocolVersion) {
				log.Warn("cannot connect to peer", "addr", addr, "err", err)
			} else {
				log.Debug("cannot connect to peer", "addr", addr, "err", err, "failures", failures)
			}
			select {
			case <-time.After(jitter(backoff)):
			case <-p.ctx.Done():
				return
			}
			backoff = min(2*backoff, p.n.cfg.ReconnectMax)
			continue
		}
		backoff, failures = p.n.cfg.ReconnectMin, 0
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			_ = conn.Close()
			return
		}
		if p.everUp {
			p.n.metrics.reconnects.Inc()
		}
		p.everUp, p.connected, p.conn, p.lastErr = true, true, conn, ""
		// Acks describe what the peer held on the old connection; the peer
		// may have restarted since (and hold none of our routes). Its acker
		// answers on the new connection at once.
		p.ackInc, p.ackVer, p.ackLate = 0, 0, false
		p.snapAcked, p.snapDue, p.snapGap, p.lostGap = false, false, 0, 0
		p.snapInc, p.snapVer = 0, 0
		p.mu.Unlock()
		p.n.routeAcks.changed()
		log.Debug("connected to peer", "addr", addr)

		buf, err = p.writeLoop(conn, buf)

		_ = conn.Close()
		p.mu.Lock()
		p.connected, p.conn = false, nil
		if err != nil {
			p.lastErr = err.Error()
		}
		p.mu.Unlock()
		p.n.routeAcks.changed()
		if p.ctx.Err() == nil {
			log.Info("forwarding connection lost", "addr", addr, "err", err)
		}
	}
}

// retire closes a connection we are done writing to without losing what we
// wrote: a plain Close with acks still unread makes the kernel reset the
// connection, and a reset discards what the peer had not read yet. So it
// shuts our side down (the peer reads everything, then EOF, and closes),
// waits up to timeout for readerDone (our reader saw the peer's close),
// then closes.
func (c *PeerConn) retire(readerDone <-chan struct{}, timeout time.Duration) {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
		t := time.NewTimer(timeout)
		select {
		case <-readerDone:
		case <-t.C:
		}
		t.Stop()
	}
	_ = c.Close()
}

// jitter spreads reconnects of many nodes over [d/2, d).
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + time.Duration(rand.Int64N(int64(d/2)))
}

// writeLoop drains the queue into a buffered writer. It flushes when the
// buffer fills (FlushBytes), and when the queue is empty and the oldest
// unflushed message has waited FlushInterval (0 by default: at once). While
// a write is in progress new messages pile up in the queue, so under load
// frames go out in large writes without any timer.
func (p *peer) writeLoop(conn *PeerConn, buf []outMsg) ([]outMsg, error) {
	cfg := &p.n.cfg
	m := p.n.metrics
	// The reader (acks on protocol 2, nothing on 1) also tells us about a
	// dead connection before we lose a batch on it.
	closed := make(chan struct{})
	go func() {
		p.readAcks(conn)
		close(closed)
	}()
	defer conn.retire(closed, inboundDrainTimeout)
	bw := bufio.NewWriterSize(conn, cfg.FlushBytes)
	hdr := make([]byte, 0, 256)
	var (
		unflushed      int // messages written into bw since the last flush
		unflushedBytes int
		dirty          bool // frames (messages or routes) written since the last flush
		oldest         time.Time
		timer          *time.Timer
		timerC         <-chan time.Time
	)
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	snapTick := time.NewTicker(snapCheckInterval)
	defer snapTick.Stop()
	prevInc, prevVer := p.n.routes.head()
	flush := func() error {
		_ = conn.SetWriteDeadline(time.Now().Add(cfg.WriteTimeout))
		if err := bw.Flush(); err != nil {
			return err
		}
		dirty = false
		m.forwarded.Add(float64(unflushed))
		m.forwardedBytes.Add(float64(unflushedBytes))
		p.mu.Lock()
		p.forwarded += uint64(unflushed)
		p.mu.Unlock()
		unflushed, unflushedBytes = 0, 0
		return nil
	}
	lose := func(batch []outMsg, err error) ([]outMsg, error) {
		n := unflushed
		for _, om := range batch {
			if om.route == nil {
				n++
			}
		}
		if n > 0 {
			m.dropped.WithLabelValues(dropConnLost).Add(float64(n))
			p.mu.Lock()
			p.dropped += uint64(n)
			p.mu.Unlock()
		}
		return clearBatch(batch), err
	}
	for {
		if p.takeSnapshotDue() {
			if err := p.writeSnapshot(bw, conn); err != nil {
				return lose(nil, fmt.Errorf("route snapshot to %s: %w", p.id, err))
			}
			if !dirty {
				oldest = time.Now()
			}
			dirty = true
		}
		batch := p.take(buf)
		if len(batch) > 0 {
			if !dirty {
				oldest = time.Now()
			}
			for i := range batch {
				om := &batch[i]
				if om.route != nil {
					if conn.Version() < protoRouteAcks {
						continue // a protocol-1 peer learns routes by gossip
					}
					hdr = appendRouteFrame(hdr[:0], *om.route)
				} else {
					msg := om.expiring(time.Now())
					if msg == nil {
						m.dropped.WithLabelValues(dropExpired).Inc()
						p.mu.Lock()
						p.dropped++
						p.mu.Unlock()
						continue
					}
					hdr = appendPublishHeader(hdr[:0], msg, om.shared)
				}
				_ = conn.SetWriteDeadline(time.Now().Add(cfg.WriteTimeout))
				_, err := bw.Write(hdr)
				if err == nil && om.m != nil && len(om.m.Payload) > 0 {
					_, err = bw.Write(om.m.Payload)
				}
				if err != nil {
					return lose(batch[i:], fmt.Errorf("write to %s: %w", p.id, err))
				}
				dirty = true
				if om.route == nil {
					unflushed++
					unflushedBytes += om.size
				}
			}
			buf = clearBatch(batch)
			continue // drain everything that queued meanwhile before deciding to flush
		}
		buf = batch
		if dirty && (cfg.FlushInterval <= 0 || time.Since(oldest) >= cfg.FlushInterval) {
			if err := flush(); err != nil {
				return lose(nil, fmt.Errorf("flush to %s: %w", p.id, err))
			}
		}
		timerC = nil
		if dirty {
			wait := cfg.FlushInterval - time.Since(oldest)
			if timer == nil {
				timer = time.NewTimer(wait)
			} else {
				timer.Reset(wait)
			}
			timerC = timer.C
		}
		select {
		case <-p.wake:
		case <-timerC:
		case <-snapTick.C:
			p.checkSnapshot(conn, prevInc, prevVer)
			prevInc, prevVer = p.n.routes.head()
		case <-closed:
			return lose(nil, fmt.Errorf("peer %s closed the connection", p.id))
		case <-p.ctx.Done():
			return lose(nil, ErrClosed)
		}
	}
}

// clearBatch drops references so sent messages can be collected while the
// backing array is reused.
func clearBatch(b []outMsg) []outMsg {
	clear(b)
	return b[:0]
}

// --- receiving side ---

// inbound is one accepted forwarding connection.
type inbound struct {
	conn *PeerConn
	done chan struct{}
}

// acceptForward serves the ProtoForward listener until it is closed.
func (n *Node) acceptForward(ln net.Listener) {
	defer n.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		pc := c.(*PeerConn)
		in := &inbound{conn: pc, done: make(chan struct{})}
		n.mu.Lock()
		if n.closing {
			n.mu.Unlock()
			_ = c.Close()
			continue
		}
		prev := n.inbound[pc.Peer()]
		n.inbound[pc.Peer()] = in
		n.wg.Add(1)
		n.mu.Unlock()
		go n.serveInbound(in, prev)
	}
}

// inboundDrainTimeout bounds how long a peer's new connection waits for its
// old one to deliver what is left on it.
const inboundDrainTimeout = 2 * time.Second

// serveInbound reads frames and hands them to the Deliverer in order. A newer
// connection from the same peer replaces the older one only after the older
// one's last Deliver returned, so Deliver never runs twice at once for a peer.
func (n *Node) serveInbound(in *inbound, prev *inbound) {
	defer n.wg.Done()
	defer close(in.done)
	defer func() {
		_ = in.conn.Close()
		n.mu.Lock()
		if n.inbound[in.conn.Peer()] == in {
			delete(n.inbound, in.conn.Peer())
		}
		n.mu.Unlock()
	}()
	if prev != nil {
		// The peer replaced its connection: what it flushed on the old one
		// before giving up on it is still in our socket buffer, and comes
		// first. Let the old one read up to the peer's close; close it only
		// if that does not come (a half-dead connection).
		t := time.NewTimer(inboundDrainTimeout)
		select {
		case <-prev.done:
		case <-t.C:
		case <-n.stop:
		}
		t.Stop()
		_ = prev.conn.Close()
		<-prev.done
	}
	from := in.conn.Peer()
	n.startAcker(in)
	var snap snapAssembler
	br := bufio.NewReaderSize(in.conn, 64<<10)
	var lenBuf [frameLenSize]byte
	for {
		if _, err := io.ReadFull(br, lenBuf[:]); err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				n.badFrame(from, "truncated length", err)
			}
			return
		}
		size := binary.BigEndian.Uint32(lenBuf[:])
		if size == 0 || uint64(size) > uint64(n.cfg.MaxFrameSize) {
			n.badFrame(from, "frame size", fmt.Errorf("%w: %d bytes (max %d)", ErrFrameTooLarge, size, n.cfg.MaxFrameSize))
			return
		}
		body, err := readFrameBody(br, int(size))
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				n.badFrame(from, "truncated frame", err)
			}
			return
		}
		if body[0] == frameRoute && in.conn.Version() >= protoRouteAcks {
			if err := n.applyRouteFrame(from, body); err != nil {
				n.badFrame(from, "decode", err)
				return
			}
			continue
		}
		if body[0] == frameRouteSnap && in.conn.Version() >= protoRouteSnapshots {
			if err := n.applySnapFrame(from, &snap, body); err != nil {
				n.badFrame(from, "decode", err)
				return
			}
			continue
		}
		m, err := decodeFrame(body)
		if err != nil {
			n.badFrame(from, "decode", err)
			return
		}
		n.metrics.received.Inc()
		n.metrics.receivedBytes.Add(float64(frameLenSize + len(body)))
		n.deliverer.Deliver(from, m)
	}
}

// readFrameBody reads n bytes. Small frames get one exact allocation; large
// ones grow as bytes actually arrive, so a forged length costs the sender as
// much memory as it costs us.
func readFrameBody(r io.Reader, n int) ([]byte, error) {
	const chunk = 1 << 20
	if n <= chunk {
		b := make([]byte, n)
		if _, err := io.ReadFull(r, b); err != nil {
			return nil, err
		}
		return b, nil
	}
	b := make([]byte, 0, chunk)
	for len(b) < n {
		want := min(n-len(b), chunk)
		b = slices.Grow(b, want)
		k, err := io.ReadFull(r, b[len(b):len(b)+want])
		b = b[:len(b)+k]
		if err != nil {
			return nil, err
		}
	}
	return b, nil
}

func (n *Node) badFrame(from, what string, err error) {
	n.metrics.badFrames.Inc()
	if n.badFrameLog.allow() {
		n.log.Warn("dropping forwarding connection: bad frame", "peer", from, "what", what, "err", err)
	}
}
