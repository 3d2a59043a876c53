package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// Deliverer receives messages forwarded by peers. Deliver is called on one
// goroutine per peer, in the order the peer forwarded them, and never
// concurrently for the same peer. It may block (that backs up the peer's
// connection and then its queue, which drops). The Message belongs to the
// Deliverer; it must be delivered locally only, never forwarded again.
type Deliverer interface {
	Deliver(from string, m *Message)
}

// DelivererFunc adapts a function to Deliverer.
type DelivererFunc func(from string, m *Message)

// Deliver calls f.
func (f DelivererFunc) Deliver(from string, m *Message) { f(from, m) }

// Node states reported by Status.
const (
	StateNew     = "new"
	StateRunning = "running"
	StateClosed  = "closed"
)

// closeWait bounds how long Close waits for goroutines (a Deliverer stuck in
// Deliver keeps its peer's reader alive).
const closeWait = 10 * time.Second

// Node is one cluster member: membership, route table and forwarding.
type Node struct {
	cfg       Config
	log       *slog.Logger
	deliverer Deliverer
	metrics   *metrics
	routes    *routeTable
	bcast     *memberlist.TransmitLimitedQueue
	mux       *Mux
	fwdLn     net.Listener
	numAlive  atomic.Int32
	syncing   atomic.Int32 // join-time push/pulls in flight (tests wait for them)
	stop      chan struct{}
	matchPool sync.Pool
	events    *eventQueue

	badFrameLog  rateLimited
	badGossipLog rateLimited

	// wrapTransport, when set (tests only), wraps memberlist's network
	// transport, e.g. to cut a node off the network.
	wrapTransport func(memberlist.NodeAwareTransport) memberlist.NodeAwareTransport
	// gossipToTheDead, when set (tests only), overrides how long memberlist
	// keeps gossiping to dead nodes (which can heal a partition by itself).
	gossipToTheDead time.Duration

	// Set in Start before memberlist exists, read-only afterwards.
	metaMu     sync.Mutex // guards meta; never held while calling memberlist
	meta       nodeMeta
	gossipPort int
	selfGossip string

	// Lock order: mu, then peer.mu. routeTable.mu and Mux.mu are leaves
	// (nothing is acquired while holding them). Never call memberlist while
	// holding mu: memberlist calls us back with its own locks held.
	mu        sync.RWMutex
	state     string
	closing   bool
	ml        *memberlist.Memberlist
	peers     map[string]*peer    // outgoing, by node id
	inbound   map[string]*inbound // accepted forwarding connections, by node id
	members   map[string]*member
	leaving   map[string]time.Time // leave intents received, by node id
	repairing map[string]bool      // nodes with a scheduled route repair

	// Route acknowledgements (routeack.go). ackMu is a leaf.
	ackMu     sync.Mutex
	ackers    map[string]*acker // by peer id, one per protocol-2 inbound connection
	routeAcks ackWaiters
	started   time.Time
	closeErr  error
	closed    chan struct{}
	wg        sync.WaitGroup
}

// New validates cfg and builds a Node; nothing is bound until Start.
func New(cfg Config, d Deliverer) (*Node, error) {
	cfg.Sanitize()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if d == nil {
		return nil, fmt.Errorf("%w: nil Deliverer", ErrInvalidConfig)
	}
	log := cfg.Logger.With("component", "cluster", "node", cfg.NodeID)
	rt := newRouteTable(cfg.NodeID, uint64(time.Now().UnixNano()))
	m, err := newMetrics(cfg.Registerer, rt)
	if err != nil {
		return nil, err
	}
	n := &Node{
		cfg:          cfg,
		log:          log,
		deliverer:    d,
		metrics:      m,
		routes:       rt,
		stop:         make(chan struct{}),
		closed:       make(chan struct{}),
		state:        StateNew,
		peers:        make(map[string]*peer),
		inbound:      make(map[string]*inbound),
		members:      make(map[string]*member),
		leaving:      make(map[string]time.Time),
		repairing:    make(map[string]bool),
		ackers:       make(map[string]*acker),
		events:       newEventQueue(cfg.OnMemberEvent),
		badFrameLog:  rateLimited{every: time.Second},
		badGossipLog: rateLimited{every: time.Second},
	}
	n.matchPool.New = func() any { return new(matchResult) }
	rt.onRemote = n.routesMoved
	n.bcast = &memberlist.TransmitLimitedQueue{
		NumNodes:       func() int { return max(1, int(n.numAlive.Load())) },
		RetransmitMult: cfg.RetransmitMult,
	}
	n.mux = newMux(cfg.NodeID, cfg.ClusterKey, cfg.AcceptedKeys, cfg.HandshakeTimeout, cfg.DialTimeout, log, m)
	n.mux.resolver = cfg.Resolver
	n.mux.tlsServer, n.mux.tlsClient = cfg.TLSServer, cfg.TLSClient
	if n.fwdLn, err = n.mux.Listen(ProtoForward); err != nil {
		m.unregister()
		return nil, err
	}
	return n, nil
}

// Mux gives other packages (raft) their own protocol on the cluster port:
// n.Mux().Listen(ProtoRaft) and n.Mux().Dial(ctx, addr, ProtoRaft).
func (n *Node) Mux() *Mux { return n.mux }

// ID returns the node id.
func (n *Node) ID() string { return n.cfg.NodeID }

// Start binds the cluster and gossip ports, starts membership and
// forwarding, and starts joining the seeds in the background (retrying with
// backoff); it does not wait for a peer to answer. ctx only bounds Start.
func (n *Node) Start(ctx context.Context) error {
	n.mu.Lock()
	if n.state != StateNew {
		n.mu.Unlock()
		return fmt.Errorf("start: node is %s", n.state)
	}
	n.state = "starting"
	n.mu.Unlock()
	if err := n.start(ctx); err != nil {
		_ = n.shutdown(false)
		return err
	}
	return nil
}

func (n *Node) start(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("start: %w", err)
	}
	ln, err := net.Listen("tcp", n.cfg.ClusterAddr)
	if err != nil {
		return fmt.Errorf("listen on cluster address %s: %w", n.cfg.ClusterAddr, err)
	}
	if err := n.mux.start(ln); err != nil {
		_ = ln.Close()
		return err
	}
	clusterPort := ln.Addr().(*net.TCPAddr).Port

	host, port, _ := splitHostPort(n.cfg.GossipAddr) // validated
	advertiseIP, err := n.advertiseIP(ctx, host)
	if err != nil {
		return err
	}
	// Proto is the oldest version we speak: see nodeMeta.
	n.meta = nodeMeta{Proto: n.mux.minVersion, NodeID: n.cfg.NodeID, AdvertiseHost: n.cfg.AdvertiseHost,
		ClusterPort: uint16(clusterPort), MQTTPort: uint16(n.cfg.MQTTPort), App: n.cfg.AppMeta}
	if n.meta.AdvertiseHost == "" && advertiseIP != "" {
		n.meta.AdvertiseHost = advertiseIP
	}

	mc := memberlist.DefaultLANConfig()
	mc.Name = n.cfg.NodeID
	mc.BindAddr = host
	if mc.BindAddr == "" {
		mc.BindAddr = "0.0.0.0"
	}
	mc.BindPort, mc.AdvertisePort = port, port
	mc.AdvertiseAddr = advertiseIP
	mc.ProbeInterval = n.cfg.ProbeInterval
	mc.ProbeTimeout = n.cfg.ProbeTimeout
	mc.SuspicionMult = n.cfg.SuspicionMult
	mc.SuspicionMaxTimeoutMult = n.cfg.SuspicionMaxTimeoutMult
	mc.GossipInterval = n.cfg.GossipInterval
	mc.PushPullInterval = n.cfg.PushPullInterval
	mc.GossipToTheDeadTime = 2 * n.cfg.PushPullInterval
	if n.gossipToTheDead > 0 {
		mc.GossipToTheDeadTime = n.gossipToTheDead
	}
	mc.TCPTimeout = n.cfg.TCPTimeout
	mc.RetransmitMult = n.cfg.RetransmitMult
	// A node restarted under the same id with a new address (a rescheduled
	// pod) may take over its dead predecessor's name after this long.
	mc.DeadNodeReclaimTime = n.cfg.ProbeInterval
	mc.Delegate = &delegate{n: n}
	mc.Events = &delegate{n: n}
	mc.Conflict = &delegate{n: n}
	mc.Logger = memberlistLogger(n.log)
	if len(n.cfg.ClusterKey) > 0 {
		primary := deriveKey("mqtt-ha gossip", n.cfg.ClusterKey)
		var accepted [][]byte
		for _, k := range n.cfg.AcceptedKeys {
			accepted = append(accepted, deriveKey("mqtt-ha gossip", k))
		}
		// Encrypts with the primary, decrypts with any (key rotation).
		kr, err := memberlist.NewKeyring(accepted, primary)
		if err != nil {
			return fmt.Errorf("gossip keyring: %w", err)
		}
		mc.Keyring, mc.SecretKey = kr, primary
		mc.GossipVerifyIncoming, mc.GossipVerifyOutgoing = true, true
	}
	if n.wrapTransport != nil {
		nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{
			BindAddrs: []string{mc.BindAddr}, BindPort: port, Logger: mc.Logger})
		if err != nil {
			return fmt.Errorf("gossip transport on %s: %w", n.cfg.GossipAddr, err)
		}
		mc.Transport = n.wrapTransport(nt)
		mc.BindPort, mc.AdvertisePort = nt.GetAutoBindPort(), nt.GetAutoBindPort()
	}
	ml, err := memberlist.Create(mc)
	if err != nil {
		return fmt.Errorf("start memberlist on %s: %w", n.cfg.GossipAddr, err)
	}
	local := ml.LocalNode()
	n.gossipPort = int(local.Port)
	n.selfGossip = local.Address()

	n.mu.Lock()
	if n.closing {
		n.mu.Unlock()
		_ = ml.Shutdown()
		return ErrClosed
	}
	n.ml = ml
	n.state = StateRunning
	n.started = time.Now()
	n.wg.Add(4)
	n.mu.Unlock()
	go n.acceptForward(n.fwdLn)
	go n.joinLoop()
	go n.headLoop()
	go func() {
		defer n.wg.Done()
		n.events.run(n.stop)
	}()
	n.log.Info("cluster node started", "gossip_addr", n.selfGossip,
		"cluster_addr", net.JoinHostPort(n.meta.AdvertiseHost, strconv.Itoa(clusterPort)),
		"seeds", n.cfg.Join, "encrypted", len(n.cfg.ClusterKey) > 0, "cluster_tls", n.cfg.TLSServer != nil)
	return nil
}

// advertiseIP picks the IP memberlist advertises. memberlist needs an IP;
// AdvertiseHost may be a DNS name (kept as is in metadata for forwarding).
// An empty result lets memberlist choose (first private IP).
func (n *Node) advertiseIP(ctx context.Context, bindHost string) (string, error) {
	h := n.cfg.AdvertiseHost
	if h == "" {
		if ip := net.ParseIP(bindHost); ip != nil && !ip.IsUnspecified() {
			return ip.String(), nil
		}
		return "", nil
	}
	if ip := net.ParseIP(h); ip != nil {
		return ip.String(), nil
	}
	ctx, cancel := context.WithTimeout(ctx, n.cfg.TCPTimeout)
	defer cancel()
	addrs, err := n.cfg.LookupHost(ctx, h)
	if err != nil {
		return "", fmt.Errorf("resolve advertise host %q: %w", h, err)
	}
	for _, a := range addrs {
		if ip := net.ParseIP(a); ip != nil && ip.To4() != nil {
			return ip.String(), nil
		}
	}
	for _, a := range addrs {
		if ip := net.ParseIP(a); ip != nil {
			return ip.String(), nil
		}
	}
	return "", fmt.Errorf("resolve advertise host %q: no address", h)
}

// leaveDrain is how long a graceful Close waits between telling peers it
// is leaving and announcing the leave through memberlist.
const leaveDrain = 250 * time.Millisecond

// Close leaves the cluster gracefully (peers drop our routes at once instead
// of waiting for failure detection), closes every connection and waits for
// the node's goroutines. Queued messages are dropped. Idempotent.
func (n *Node) Close() error { return n.shutdown(true) }

// shutdown with graceful=false (Kill) skips the leave: peers must detect
// the death. Close and Kill share one shutdown; whichever comes first wins.
func (n *Node) shutdown(graceful bool) error {
	n.mu.Lock()
	if n.closing {
		n.mu.Unlock()
		<-n.closed
		return n.closeErr
	}
	n.closing = true
	ml := n.ml
	n.mu.Unlock()

	var errs []error
	close(n.stop)
	if ml != nil {
		if graceful {
			n.announceLeave(ml)
			// SendReliable returns once the intent is written, not once the
			// peer has handled it, and memberlist's own leave travels by UDP
			// gossip, which can overtake it: a peer would then report this
			// departure as a failure. A short drain, as Consul's
			// leave_drain_time, lets the intents land first.
			time.Sleep(leaveDrain)
			// A leave that times out is not a failure of Close: peers then
			// detect the departure as a failure, a few seconds later.
			if err := ml.Leave(n.cfg.LeaveTimeout); err != nil {
				n.log.Warn("graceful leave not confirmed", "err", err)
			}
		}
		if err := ml.Shutdown(); err != nil {
			errs = append(errs, fmt.Errorf("memberlist shutdown: %w", err))
		}
	}
	n.mux.close()

	n.mu.Lock()
	peers := n.peers
	n.peers = map[string]*peer{}
	ins := make([]*inbound, 0, len(n.inbound))
	for _, in := range n.inbound {
		ins = append(ins, in)
	}
	n.mu.Unlock()
	var pw sync.WaitGroup
	for _, p := range peers {
		pw.Go(func() { p.stop(dropShutdown) })
	}
	for _, in := range ins {
		_ = in.conn.Close()
	}
	pw.Wait()

	done := make(chan struct{})
	go func() {
		n.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(closeWait):
		errs = append(errs, fmt.Errorf("close: goroutines still running after %v (a Deliver call blocked?)", closeWait))
	}
	n.metrics.unregister()

	n.mu.Lock()
	n.state = StateClosed
	n.closeErr = errors.Join(errs...)
	n.mu.Unlock()
	close(n.closed)
	if n.closeErr != nil {
		n.log.Warn("cluster node closed with errors", "err", n.closeErr)
	} else {
		n.log.Info("cluster node closed", "graceful", graceful)
	}
	return n.closeErr
}

// AddRoute takes a reference on a local subscription filter (plain or
// "$share/group/filter"). The first reference announces the filter to the
// cluster. Call it for every successful local subscription, including the
// restored subscriptions of offline persistent sessions (their messages must
// still reach this node to be queued).
func (n *Node) AddRoute(filter string) error {
	d, changed, err := n.routes.addLocal(filter)
	if err != nil {
		return err
	}
	if changed {
		n.queueDelta(d)
		n.sendRoute(d)
	}
	return nil
}

// RemoveRoute drops a reference taken by AddRoute; the last one withdraws
// the filter. Unknown filters are ignored.
func (n *Node) RemoveRoute(filter string) {
	if d, changed := n.routes.removeLocal(filter); changed {
		n.queueDelta(d)
		n.sendRoute(d)
	}
}

// HasLocalRoute reports whether a local subscriber holds filter; for a
// shared filter, whether this node has a member of that group.
func (n *Node) HasLocalRoute(filter string) bool { return n.routes.hasLocal(filter) }

// Forward sends a locally published message to every other node that has a
// matching route, at most once per node however many of its filters match.
// It never blocks: a full queue drops (and counts) the message for that
// peer. It returns the number of nodes the message was queued for.
//
// Shared subscriptions: for each matching group ("$share/g/f") the cluster
// picks exactly one node. If this node has a member (HasLocalRoute), the
// group is left to local delivery and no other node gets it; otherwise one
// node holding the group is chosen at random (preferring connected peers),
// and the message it receives carries the group in Message.Shared. Every
// receiving node must deliver to exactly the groups in Message.Shared and
// skip its other groups. The caller's m.Shared is ignored.
//
// Retained messages are forwarded like any other: the replication layer,
// not forwarding, brings them to every node's retained index.
//
// Messages that came from a peer are never forwarded (no loops), and m must
// not be modified after the call.
func (n *Node) Forward(m *Message) int {
	if m == nil || m.received || !ValidTopic(m.Topic) {
		return 0
	}
	res := n.matchPool.Get().(*matchResult)
	defer func() {
		res.reset()
		n.matchPool.Put(res)
	}()
	n.routes.match(m.Topic, res)
	if len(res.plain) == 0 && len(res.shared) == 0 {
		return 0
	}
	type target struct {
		node   string
		shared []string
	}
	var buf [8]target
	targets := buf[:0]
	for _, id := range res.plain {
		targets = append(targets, target{node: id})
	}
	if len(res.shared) > 0 {
		slices.SortFunc(res.shared, func(a, b sharedMatch) int { return strings.Compare(a.Group, b.Group) })
	}
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.closing {
		return 0
	}
	for _, sm := range res.shared {
		if n.routes.hasLocal(sm.Group) {
			continue
		}
		pick := n.pickLocked(sm.Nodes)
		i := slices.IndexFunc(targets, func(t target) bool { return t.node == pick })
		if i < 0 {
			targets = append(targets, target{node: pick})
			i = len(targets) - 1
		}
		targets[i].shared = append(targets[i].shared, sm.Group)
	}
	queued := 0
	for _, t := range targets {
		size := frameLenSize + publishBodyLen(m, t.shared)
		if size-frameLenSize > n.cfg.MaxFrameSize {
			n.metrics.dropped.WithLabelValues(dropOversize).Inc()
			continue
		}
		p := n.peers[t.node]
		if p == nil {
			n.metrics.dropped.WithLabelValues(dropNoPeer).Inc()
			continue
		}
		om := outMsg{m: m, shared: t.shared, size: size}
		if m.MessageExpiry > 0 {
			om.queued = time.Now()
		}
		if ok, reason := p.enqueue(om); !ok {
			n.metrics.dropped.WithLabelValues(reason).Inc()
			continue
		}
		queued++
	}
	return queued
}

// pickLocked chooses one node for a shared group: uniformly among candidates
// with a live forwarding connection, else among all candidates.
func (n *Node) pickLocked(cands []string) string {
	if len(cands) == 1 {
		return cands[0]
	}
	var up [8]string
	ready := up[:0]
	for _, c := range cands {
		if p := n.peers[c]; p != nil {
			p.mu.Lock()
			ok := p.connected
			p.mu.Unlock()
			if ok {
				ready = append(ready, c)
			}
		}
	}
	if len(ready) > 0 {
		return ready[rand.IntN(len(ready))]
	}
	return cands[rand.IntN(len(cands))]
}

// RouteHolders returns the nodes that route filter (exactly that filter):
// where a publish matching it is forwarded (admin API).
func (n *Node) RouteHolders(filter string) []string { return n.routes.holders(filter) }
