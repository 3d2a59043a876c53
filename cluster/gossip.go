package cluster

import (
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// maxDeltaSize keeps a delta inside one gossip packet (memberlist's UDP
// buffer is 1400 bytes, minus headers, labels and encryption overhead).
// Bigger deltas (filters over ~900 bytes) are not gossiped; the version gap
// they leave is closed by the next push/pull.
const maxDeltaSize = 900

// maxQueuedDeltas bounds the broadcast queue; beyond it the oldest (most
// retransmitted) deltas are pruned and anti-entropy repairs the gaps.
const maxQueuedDeltas = 4096

// routeBroadcast is a route delta in memberlist's broadcast queue. Deltas
// never invalidate each other: each is one link of a version chain.
type routeBroadcast []byte

func (b routeBroadcast) Invalidates(memberlist.Broadcast) bool { return false }
func (b routeBroadcast) Message() []byte                       { return b }
func (b routeBroadcast) Finished()                             {}

// UniqueBroadcast tells the queue not to scan for invalidations.
func (b routeBroadcast) UniqueBroadcast() {}

// headBroadcast announces our route head; a newer one replaces the queued
// older one (only the latest head matters).
type headBroadcast []byte

func (b headBroadcast) Invalidates(o memberlist.Broadcast) bool {
	nb, ok := o.(memberlist.NamedBroadcast)
	return ok && nb.Name() == b.Name()
}
func (b headBroadcast) Message() []byte { return b }
func (b headBroadcast) Finished()       {}
func (b headBroadcast) Name() string    { return "route-head" }

var (
	_ memberlist.UniqueBroadcast = routeBroadcast(nil)
	_ memberlist.NamedBroadcast  = headBroadcast(nil)
)

// delegate receives memberlist callbacks. memberlist calls the event methods
// while holding its own locks, so none of them may call back into the
// memberlist synchronously or block.
type delegate struct{ n *Node }

var (
	_ memberlist.Delegate         = (*delegate)(nil)
	_ memberlist.EventDelegate    = (*delegate)(nil)
	_ memberlist.ConflictDelegate = (*delegate)(nil)
)

func (d *delegate) NodeMeta(limit int) []byte {
	d.n.metaMu.Lock()
	b := appendMeta(nil, d.n.meta)
	d.n.metaMu.Unlock()
	if len(b) > limit {
		// Validate caps the node id and host, so this is a bug, not input.
		d.n.log.Error("node metadata too large", "size", len(b), "limit", limit)
		return nil
	}
	return b
}

func (d *delegate) NotifyMsg(b []byte) {
	if len(b) == 0 {
		return
	}
	var err error
	switch b[0] {
	case gossipRouteDelta:
		var delta routeDelta
		if delta, err = decodeDelta(b); err == nil {
			res := d.n.routes.applyDelta(delta)
			d.n.metrics.deltas.WithLabelValues(res.String()).Inc()
			if res == deltaBuffered {
				d.n.scheduleRepair(delta.Node)
			}
		}
	case gossipRouteHead:
		var node string
		var inc, ver uint64
		if node, inc, ver, err = decodeHead(b); err == nil && d.n.routes.noteHead(node, inc, ver) {
			d.n.scheduleRepair(node)
		}
	case gossipLeave:
		var node string
		if node, err = decodeLeave(b); err == nil {
			d.n.onLeaveIntent(node)
		}
	default:
		err = fmt.Errorf("unknown gossip message type %d", b[0])
	}
	if err != nil {
		d.n.metrics.badGossip.Inc()
		if d.n.badGossipLog.allow() {
			d.n.log.Warn("dropping undecodable gossip message", "err", err)
		}
	}
}

func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte {
	return d.n.bcast.GetBroadcasts(overhead, limit)
}

func (d *delegate) LocalState(join bool) []byte {
	return appendState(nil, d.n.routes.snapshot(d.n.cfg.RouteStateBudget))
}

func (d *delegate) MergeRemoteState(buf []byte, join bool) {
	entries, err := decodeState(buf)
	if err != nil {
		d.n.metrics.badGossip.Inc()
		if d.n.badGossipLog.allow() {
			d.n.log.Warn("dropping undecodable route state", "err", err)
		}
		return
	}
	res := d.n.routes.merge(entries)
	d.n.metrics.merges.Add(float64(res.Replaced))
	if res.Bumped {
		d.n.log.Warn("a peer knew a newer route incarnation of this node; raised ours so our routes win")
	}
}

func (d *delegate) NotifyJoin(node *memberlist.Node)   { d.n.onJoin(node) }
func (d *delegate) NotifyLeave(node *memberlist.Node)  { d.n.onLeave(node) }
func (d *delegate) NotifyUpdate(node *memberlist.Node) { d.n.onUpdate(node) }

func (d *delegate) NotifyConflict(existing, other *memberlist.Node) {
	d.n.log.Warn("two nodes claim the same node id", "node_id", existing.Name,
		"existing", existing.Address(), "other", other.Address())
}

// member is what we remember about a node for Status, including nodes that
// have gone (kept for goneRetention so operators can see what died).
type member struct {
	id          string
	state       string // alive, dead, left
	gossipAddr  string
	clusterAddr string
	meta        nodeMeta
	metaErr     error
	since       time.Time
}

const goneRetention = time.Hour

// clusterAddr derives where a node accepts forwarding connections: its
// advertised host (which may be a stable DNS name) or, when it advertised
// none, the address memberlist reaches it at.
func clusterAddr(node *memberlist.Node, meta nodeMeta) string {
	host := meta.AdvertiseHost
	if host == "" {
		host = node.Addr.String()
	}
	if meta.ClusterPort == 0 {
		return ""
	}
	return net.JoinHostPort(host, strconv.Itoa(int(meta.ClusterPort)))
}

func (n *Node) onJoin(node *memberlist.Node) {
	meta, metaErr := decodeMeta(node.Meta)
	caddr := ""
	if metaErr == nil {
		caddr = clusterAddr(node, meta)
	}
	self := node.Name == n.cfg.NodeID
	n.mu.Lock()
	delete(n.leaving, node.Name)
	n.members[node.Name] = &member{id: node.Name, state: "alive", gossipAddr: node.Address(), clusterAddr: caddr,
		meta: meta, metaErr: metaErr, since: time.Now()}
	n.pruneGoneLocked()
	if self || n.closing {
		n.updateAliveLocked()
		n.mu.Unlock()
		return
	}
	// Accept its routes before anything (the sync below) can deliver them.
	n.routes.setMember(node.Name, true)
	switch {
	case metaErr != nil:
		n.log.Warn("member has unreadable metadata; not forwarding to it", "peer", node.Name, "err", metaErr)
	case meta.Proto < n.mux.minVersion || meta.Proto > n.mux.maxVersion:
		// meta.Proto is the oldest version the member speaks (a version-1
		// node refuses to forward to a member announcing anything but 1, so
		// that is what we announce). One we speak too means a handshake
		// will agree on a version; one above our newest means it dropped
		// all of ours. One below our oldest says nothing about its newest:
		// see "Rolling upgrades" in DESIGN.md before raising
		// MinProtocolVersion.
		n.log.Warn("member speaks another cluster protocol version; not forwarding to it",
			"peer", node.Name, "theirs_oldest", meta.Proto, "ours_oldest", n.mux.minVersion, "ours_newest", n.mux.maxVersion)
	default:
		if p := n.peers[node.Name]; p != nil {
			p.setAddr(caddr)
		} else if caddr != "" {
			p = newPeer(n, node.Name, caddr)
			n.peers[node.Name] = p
			n.wg.Add(1)
			go func() {
				defer n.wg.Done()
				p.run()
			}()
		}
	}
	if n.ml != nil {
		// Exchange full route state with the newcomer right away rather than
		// at the next push/pull: it may have routes from before it joined
		// (restored sessions) that no delta will ever carry to us. Started
		// before the member is counted (numAlive is read without mu), so
		// that "member counted" implies "sync counted".
		n.syncWithLocked(node.Address())
	}
	n.updateAliveLocked()
	n.mu.Unlock()
	n.metrics.memberEvents.WithLabelValues("join").Inc()
	n.emit(MemberEvent{Type: MemberJoin, NodeID: node.Name, GossipAddr: node.Address(), ClusterAddr: caddr, MQTTPort: int(meta.MQTTPort)})
	n.log.Info("member joined", "peer", node.Name, "gossip_addr", node.Address(), "cluster_addr", caddr)
}

func (n *Node) onUpdate(node *memberlist.Node) {
	meta, err := decodeMeta(node.Meta)
	if err != nil || node.Name == n.cfg.NodeID {
		return
	}
	caddr := clusterAddr(node, meta)
	n.mu.Lock()
	defer n.mu.Unlock()
	if m := n.members[node.Name]; m != nil {
		m.meta, m.clusterAddr, m.gossipAddr = meta, caddr, node.Address()
	}
	if p := n.peers[node.Name]; p != nil && caddr != "" {
		p.setAddr(caddr)
	}
	n.emit(MemberEvent{Type: MemberUpdate, NodeID: node.Name, GossipAddr: node.Address(), ClusterAddr: caddr, MQTTPort: int(meta.MQTTPort)})
}

func (n *Node) onLeave(node *memberlist.Node) {
	if node.Name == n.cfg.NodeID {
		return
	}
	// memberlist v0.7.0 never sets Node.State on the node it hands to
	// NotifyLeave, so a graceful leave is recognised by the intent the
	// leaving node sent us first (see announceLeave).
	state, event, evType := "dead", "fail", MemberFail
	n.mu.Lock()
	if t, ok := n.leaving[node.Name]; ok && time.Since(t) < leaveIntentTTL {
		state, event, evType = "left", "leave", MemberLeave
	}
	delete(n.leaving, node.Name)
	if m := n.members[node.Name]; m != nil {
		m.state, m.since = state, time.Now()
	}
	n.updateAliveLocked()
	// While this node closes, shutdown stops the peers it finds in the
	// table: leave them there. Removed here without being stopped, a peer
	// outlived Close, which then waited closeWait for it and failed (every
	// node of a cluster closed at once: TestCloseAllAtOnce).
	var p *peer
	if !n.closing {
		p = n.peers[node.Name]
		delete(n.peers, node.Name)
	}
	in := n.inbound[node.Name]
	if p != nil {
		// stop waits for the writer; never block memberlist's callback.
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			p.stop(dropPeerGone)
		}()
	}
	n.mu.Unlock()
	if in != nil {
		_ = in.conn.Close()
	}
	n.routes.setMember(node.Name, false)
	n.metrics.memberEvents.WithLabelValues(event).Inc()
	n.emit(MemberEvent{Type: evType, NodeID: node.Name, GossipAddr: node.Address()})
	n.log.Info("member gone; its routes are removed", "peer", node.Name, "state", state)
}

// leaveIntentTTL bounds how long a leave intent explains a later NotifyLeave.
const leaveIntentTTL = time.Minute

// onLeaveIntent records that node announced a graceful leave. If its
// NotifyLeave already arrived (the intent lost the race with the gossip),
// the member's state is corrected to "left".
func (n *Node) onLeaveIntent(node string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if m := n.members[node]; m != nil && m.state == "dead" && time.Since(m.since) < leaveIntentTTL {
		m.state = "left"
		return
	}
	n.leaving[node] = time.Now()
}

// announceLeave tells every live member, over TCP and before memberlist's
// own leave broadcast, that this node is leaving on purpose.
func (n *Node) announceLeave(ml *memberlist.Memberlist) {
	msg := appendLeave(nil, n.cfg.NodeID)
	var targets []*memberlist.Node
	n.mu.RLock()
	for id, m := range n.members {
		if id == n.cfg.NodeID || m.state != "alive" {
			continue
		}
		host, port, err := splitHostPort(m.gossipAddr)
		if ip := net.ParseIP(host); err == nil && ip != nil {
			targets = append(targets, &memberlist.Node{Name: id, Addr: ip, Port: uint16(port)})
		}
	}
	n.mu.RUnlock()
	var wg sync.WaitGroup
	for _, t := range targets {
		wg.Go(func() {
			if err := ml.SendReliable(t, msg); err != nil {
				n.log.Debug("leave intent not delivered", "peer", t.Name, "err", err)
			}
		})
	}
	wg.Wait()
}

func (n *Node) updateAliveLocked() {
	alive := 0
	for _, m := range n.members {
		if m.state == "alive" {
			alive++
		}
	}
	n.numAlive.Store(int32(alive))
	n.metrics.members.Set(float64(alive))
}

func (n *Node) pruneGoneLocked() {
	for id, m := range n.members {
		if m.state != "alive" && time.Since(m.since) > goneRetention {
			delete(n.members, id)
		}
	}
}

// syncWithLocked runs a one-off push/pull (memberlist Join) with addr in
// the background. Caller holds n.mu.
func (n *Node) syncWithLocked(addr string) {
	if n.closing || n.ml == nil {
		return
	}
	ml := n.ml
	n.wg.Add(1)
	n.syncing.Add(1)
	go func() {
		defer n.wg.Done()
		defer n.syncing.Add(-1)
		if _, err := ml.Join([]string{addr}); err != nil {
			n.log.Debug("route sync with new member failed", "addr", addr, "err", err)
		}
	}()
}

// scheduleRepair closes a gap in a node's delta chain. Each delta is
// gossiped a bounded number of times to random peers, so with bursts a peer
// regularly misses one (and everything after it waits). If the gap is still
// open after a few gossip rounds (the missing delta may just be late), a
// push/pull with that node fetches its full entry. At most one repair per
// node is pending at a time.
func (n *Node) scheduleRepair(node string) {
	n.mu.Lock()
	if n.closing || n.ml == nil || n.repairing[node] {
		n.mu.Unlock()
		return
	}
	n.repairing[node] = true
	n.wg.Add(1)
	n.mu.Unlock()
	go func() {
		defer n.wg.Done()
		defer func() {
			n.mu.Lock()
			delete(n.repairing, node)
			n.mu.Unlock()
		}()
		t := time.NewTimer(repairGraceRounds * n.cfg.GossipInterval)
		defer t.Stop()
		select {
		case <-t.C:
		case <-n.stop:
			return
		}
		if !n.routes.needsRepair(node) {
			return
		}
		n.mu.RLock()
		m := n.members[node]
		ml := n.ml
		addr := ""
		if m != nil && m.state == "alive" {
			addr = m.gossipAddr
		}
		n.mu.RUnlock()
		if addr == "" {
			return
		}
		n.metrics.repairs.Inc()
		if _, err := ml.Join([]string{addr}); err != nil {
			n.log.Debug("route repair push/pull failed", "peer", node, "err", err)
		}
	}()
}

// repairGraceRounds is how many gossip rounds a delta gap may stay open
// before scheduleRepair asks the node for its full entry.
const repairGraceRounds = 5

// queueDelta gossips a local route change.
func (n *Node) queueDelta(d routeDelta) {
	b := appendDelta(make([]byte, 0, 32+len(d.Node)+len(d.Filter)), d)
	if len(b) > maxDeltaSize {
		n.log.Debug("route delta too large to gossip; left to anti-entropy", "size", len(b))
		return
	}
	n.bcast.QueueBroadcast(routeBroadcast(b))
	n.queueHead()
	if n.bcast.NumQueued() > maxQueuedDeltas {
		n.bcast.Prune(maxQueuedDeltas)
	}
}

// queueHead gossips our route head. It follows every delta (replacing the
// previous head in the queue), so a peer that lost the last deltas of a
// burst notices, and headLoop repeats it so that even a lost head is
// eventually noticed well before the next push/pull.
func (n *Node) queueHead() {
	inc, ver := n.routes.head()
	if ver == 0 {
		return
	}
	n.bcast.QueueBroadcast(headBroadcast(appendHead(nil, n.cfg.NodeID, inc, ver)))
}

// headInterval is how often headLoop re-announces our head, in gossip rounds.
const headInterval = 10

func (n *Node) headLoop() {
	defer n.wg.Done()
	t := time.NewTicker(headInterval * n.cfg.GossipInterval)
	defer t.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
			n.queueHead()
		}
	}
}
