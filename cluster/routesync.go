package cluster

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// Route snapshots (protocol 3).
//
// Full route entries used to travel only in memberlist's push/pull, which
// refuses a state over 20 MiB (about 550k short filters cluster-wide): past
// that, a node that joined or restarted never learned the existing routes.
// Now each node sends its OWN entry to each peer over the forwarding
// connection, when the peer's route acks (routeack.go) show that it is
// behind: at once when a connection's first ack is behind, later when an
// ack stays behind the head of one check interval ago (at most every 30 s,
// doubling to a minute: a receiver applying a large one acks only once
// done; after 2 s, doubling, when the peer's ack shows it applied the last
// snapshot and lost deltas since). The snapshot is
// chunked (no frame near MaxFrameSize, however many filters), and it is
// ordered with the route frames on the same connection, so the deltas
// that follow it apply on top. Push/pull carries full entries only up to
// Config.RouteStateBudget (this node's first), for peers of protocol 1
// and 2, and as a second path.
//
//	begin  u32 N | u8 type=4 | u8 part=1 | uvarint incarnation | uvarint version | uvarint count
//	chunk  u32 N | u8 type=4 | u8 part=2 | uvarint n | n x str filter
//	end    u32 N | u8 type=4 | u8 part=3
//
// The filters are the sender's at (incarnation, version), copied under the
// route table's lock in one step; the receiver replaces its copy only with
// a newer entry (routeTable.merge).

// protoRouteSnapshots is the protocol version that has snapshot frames.
const protoRouteSnapshots uint8 = 3

const (
	snapBegin byte = 1
	snapChunk byte = 2
	snapEnd   byte = 3
)

const (
	// snapChunkBytes is the target size of one chunk frame.
	snapChunkBytes = 256 << 10
	// maxSnapFilters bounds one snapshot (a peer is authenticated, but a
	// bug must not exhaust memory).
	maxSnapFilters = 1 << 24
	// snapCheckInterval: how often a writer compares the peer's ack with
	// the head of one interval before.
	snapCheckInterval = time.Second
	// snapMinGap and snapMaxGap bound how often snapshots are repeated to
	// a peer that stays behind (doubling in between).
	snapMinGap = 30 * time.Second
	snapMaxGap = time.Minute
	// snapLostGap is the first wait before a snapshot to a peer that
	// applied the last one and lost deltas after it (doubling to
	// snapMinGap while that repeats).
	snapLostGap = 2 * time.Second
)

func appendSnapBegin(b []byte, inc, ver uint64, count int) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(2+sizeUvarint(inc)+sizeUvarint(ver)+sizeUvarint(uint64(count))))
	b = append(b, frameRouteSnap, snapBegin)
	b = appendUvarint(b, inc)
	b = appendUvarint(b, ver)
	return appendUvarint(b, uint64(count))
}

// appendSnapChunk appends one chunk frame holding filters.
func appendSnapChunk(b []byte, filters []string) []byte {
	body := 2 + sizeUvarint(uint64(len(filters)))
	for _, f := range filters {
		body += sizeString(len(f))
	}
	b = binary.BigEndian.AppendUint32(b, uint32(body))
	b = append(b, frameRouteSnap, snapChunk)
	b = appendUvarint(b, uint64(len(filters)))
	for _, f := range filters {
		b = appendString(b, f)
	}
	return b
}

func appendSnapEnd(b []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, 2)
	return append(b, frameRouteSnap, snapEnd)
}

// writeSnapshot writes this node's own route entry to bw as snapshot
// frames. The caller flushes.
func (p *peer) writeSnapshot(bw *bufio.Writer, conn *PeerConn) error {
	start := time.Now()
	inc, ver, filters := p.n.routes.ownEntry()
	p.mu.Lock()
	p.snapInc, p.snapVer = inc, ver
	p.mu.Unlock()
	buf := appendSnapBegin(make([]byte, 0, snapChunkBytes+1024), inc, ver, len(filters))
	write := func() error {
		_ = conn.SetWriteDeadline(time.Now().Add(p.n.cfg.WriteTimeout))
		_, err := bw.Write(buf)
		buf = buf[:0]
		return err
	}
	if err := write(); err != nil {
		return err
	}
	for i := 0; i < len(filters); {
		j, size := i, 0
		for j < len(filters) && (j == i || size+sizeString(len(filters[j])) <= snapChunkBytes) {
			size += sizeString(len(filters[j]))
			j++
		}
		buf = appendSnapChunk(buf, filters[i:j])
		if err := write(); err != nil {
			return err
		}
		i = j
	}
	buf = appendSnapEnd(buf)
	if err := write(); err != nil {
		return err
	}
	p.n.metrics.routeSnapshots.WithLabelValues("sent").Inc()
	p.n.log.Debug("sent route snapshot", "peer", p.id, "routes", len(filters), "version", ver,
		"took", time.Since(start).Round(time.Millisecond))
	return nil
}

// wantSnapshot is called with an ack from the peer: the first ack of a
// connection that shows the peer behind our head asks for a snapshot at
// once (a node that joined or restarted, or missed deltas while the
// connection was down).
func (p *peer) wantSnapshotAfterAck(conn *PeerConn, inc, ver uint64) {
	if conn.Version() < protoRouteSnapshots {
		return
	}
	hInc, hVer := p.n.routes.head()
	p.mu.Lock()
	first := !p.snapAcked
	p.snapAcked = true
	due := first && headBefore(inc, ver, hInc, hVer)
	if due {
		p.snapDue = true
	}
	p.mu.Unlock()
	if due {
		p.signal()
	}
}

// checkSnapshot runs every snapCheckInterval on the writer: an ack still
// behind the head we had one interval ago will not catch up by the frames
// in flight; it needs a snapshot (rate-limited, doubling the gap while the
// peer stays behind).
func (p *peer) checkSnapshot(conn *PeerConn, prevInc, prevVer uint64) {
	if conn.Version() < protoRouteSnapshots {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if !headBefore(p.ackInc, p.ackVer, prevInc, prevVer) {
		// Caught up: the next snapshot may come at the minimum gaps.
		p.snapGap, p.lostGap = 0, 0
		return
	}
	if p.snapVer > 0 && !headBefore(p.ackInc, p.ackVer, p.snapInc, p.snapVer) {
		// The peer applied our last snapshot and is behind again: deltas
		// after it were lost (its buffer of out-of-order deltas overflowed
		// while it applied the snapshot under churn), not a slow apply.
		// Nothing else repairs an entry larger than push/pull carries, so
		// send again soon rather than after snapMinGap (found by CI: the
		// peer stayed wrong for the 30 s gap).
		gap := max(p.lostGap, snapLostGap)
		if time.Since(p.snapAt) < gap {
			return
		}
		p.snapDue = true
		p.lostGap = min(gap*2, snapMinGap)
		return
	}
	gap := max(p.snapGap, snapMinGap)
	if !p.snapAt.IsZero() && time.Since(p.snapAt) < gap {
		return
	}
	p.snapDue = true
	p.snapGap = min(gap*2, snapMaxGap)
}

// takeSnapshotDue reports whether a snapshot is due, and clears it.
func (p *peer) takeSnapshotDue() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	due := p.snapDue
	if due {
		p.snapDue, p.snapAt = false, time.Now()
	}
	return due
}

// headBefore reports whether (inc, ver) is older than (hInc, hVer).
func headBefore(inc, ver, hInc, hVer uint64) bool {
	return inc < hInc || inc == hInc && ver < hVer
}

// snapAssembler collects one peer's snapshot on an inbound connection.
type snapAssembler struct {
	active   bool
	inc, ver uint64
	count    int
	filters  []string
	start    time.Time
}

// applySnapFrame handles a snapshot frame from node; the entry is merged
// when the end frame arrives with every announced filter.
func (n *Node) applySnapFrame(node string, s *snapAssembler, body []byte) error {
	if len(body) < 2 {
		return fmt.Errorf("%w: snapshot frame of %d bytes", ErrBadFrame, len(body))
	}
	r := reader{b: body[2:]}
	switch body[1] {
	case snapBegin:
		inc, ver, count := r.uvarint(), r.uvarint(), r.uvarint()
		if r.err == nil && count > maxSnapFilters {
			r.fail(fmt.Errorf("%d filters, at most %d", count, maxSnapFilters))
		}
		if r.err != nil {
			break
		}
		*s = snapAssembler{active: true, inc: inc, ver: ver, count: int(count),
			filters: make([]string, 0, min(int(count), 1<<16)), start: time.Now()}
	case snapChunk:
		if !s.active {
			r.fail(errors.New("chunk outside a snapshot"))
			break
		}
		k := r.uvarint()
		if r.err == nil && k > uint64(s.count-len(s.filters)) {
			r.fail(fmt.Errorf("chunk of %d filters past the announced %d", k, s.count))
		}
		for i := uint64(0); i < k && r.err == nil; i++ {
			s.filters = append(s.filters, r.str())
		}
	case snapEnd:
		if !s.active || len(s.filters) != s.count {
			r.fail(fmt.Errorf("end after %d of %d filters", len(s.filters), s.count))
			break
		}
		if len(r.b) > 0 {
			break // trailing bytes: reported below
		}
		n.metrics.routeSnapshots.WithLabelValues("received").Inc()
		nr := nodeRoutes{Node: node, Incarnation: s.inc, Version: s.ver, Filters: s.filters}
		if len(nr.Filters) <= mergeBatch {
			n.routes.merge([]nodeRoutes{nr})
		} else if job := n.routes.startSnapshot(nr); job == nil {
			n.log.Debug("route snapshot ignored: not newer, its sender not a member, or one already applying",
				"peer", node, "routes", s.count, "version", s.ver)
		} else {
			// Seconds for a million filters: not on this connection's
			// reader, which goes on delivering messages (the node's
			// deltas wait for the snapshot, see startSnapshot).
			start, count, ver := s.start, s.count, s.ver
			n.wg.Add(1)
			go func() {
				defer n.wg.Done()
				newer := job()
				n.log.Debug("applied route snapshot", "peer", node, "routes", count, "version", ver,
					"newer", newer, "took", time.Since(start).Round(time.Millisecond))
			}()
		}
		*s = snapAssembler{}
	default:
		r.fail(fmt.Errorf("unknown snapshot part %d", body[1]))
	}
	if r.err == nil && len(r.b) > 0 {
		r.fail(errors.New("trailing bytes"))
	}
	if r.err != nil {
		return fmt.Errorf("%w: route snapshot: %w", ErrBadFrame, r.err)
	}
	return nil
}
