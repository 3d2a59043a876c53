package hooks

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/cluster"
)

// injectorPrefix starts the client id of every inline client that injects
// forwarded messages. MQTT strings may not contain U+0000, so no real
// client can ever collide with one.
const injectorPrefix = "\x00cluster/"

// Cluster connects mochi to the cluster package:
//
//   - local subscriptions become routes (reference counted per client and
//     filter, so re-subscribing or overlapping sessions count once each);
//   - every local publish (and will) that passed mochi's checks is handed
//     to cluster.Node.Forward, which sends it at most once to each node with
//     a matching route;
//   - messages from peers are injected into mochi through one inline client
//     per peer (protocol version 5), on that peer's delivery goroutine, so
//     per-publisher order holds; they are never forwarded again.
//
// Shared subscriptions: the origin node decides which node serves each
// group (cluster.Node.Forward); a receiving node delivers only to the groups
// named in cluster.Message.Shared and skips its others (OnSelectSubscribers).
type Cluster struct {
	mqtt.HookBase
	server *mqtt.Server
	node   *cluster.Node
	log    *slog.Logger

	mu      sync.Mutex
	routes  map[string]map[string]struct{} // client id -> filters holding a route reference
	pending map[*mqtt.Client][]string      // filters OnSubscribe routed, until OnSubscribed

	// connMu orders a disconnect's removal of shared subscriptions
	// against a newer connection of the same client id (OnDisconnect).
	connMu    sync.Mutex
	latest    map[string]*mqtt.Client   // client id -> its newest connection on this node
	attaching map[net.Conn]*mqtt.Client // from OnSessionEstablish until established or disconnected

	ackLog atomic.Int64 // last "route not acknowledged" log, unix ns

	injMu     sync.RWMutex
	injectors map[string]*injector // by inline client id
}

// injector is the inline client of one peer. Its fields other than cl are
// touched only on that peer's delivery goroutine.
type injector struct {
	cl     *mqtt.Client
	shared map[string]struct{} // shared groups this node serves for the message being injected
}

// NewCluster returns the hook; SetNode must be called before the server
// serves (the node needs the hook as its Deliverer, so they are made in two
// steps).
func NewCluster(s *mqtt.Server, log *slog.Logger) *Cluster {
	return &Cluster{
		server:    s,
		log:       log.With("component", "cluster"),
		routes:    map[string]map[string]struct{}{},
		pending:   map[*mqtt.Client][]string{},
		latest:    map[string]*mqtt.Client{},
		attaching: map[net.Conn]*mqtt.Client{},
		injectors: map[string]*injector{},
	}
}

// SetNode attaches the cluster node.
func (h *Cluster) SetNode(n *cluster.Node) { h.node = n }

var _ cluster.Deliverer = (*Cluster)(nil)

// ID implements mqtt.Hook.
func (h *Cluster) ID() string { return "cluster" }

// Provides implements mqtt.Hook.
func (h *Cluster) Provides(b byte) bool {
	switch b {
	case mqtt.OnStarted, mqtt.OnSubscribe, mqtt.OnSubscribed, mqtt.OnUnsubscribed, mqtt.OnPublished,
		mqtt.OnWillSent, mqtt.OnSelectSubscribers, mqtt.OnDisconnect, mqtt.OnSessionEstablish, mqtt.OnSessionEstablished, mqtt.OnClientExpired:
		return true
	}
	return false
}

// OnStarted routes the subscriptions of sessions restored from disk, which
// mochi loads without firing OnSubscribed.
func (h *Cluster) OnStarted() {
	for _, cl := range h.server.Clients.GetAll() {
		for filter := range cl.State.Subscriptions.GetAll() {
			h.addRoute(cl.ID, filter)
		}
	}
}

// OnSubscribe routes the SUBSCRIBE's filters and waits (at most
// routeAckTimeout) until every connected peer has acknowledged them, so
// that a message published on any node after SUBACK matches the
// subscription, as on one broker (cluster/routeack.go). It waits here,
// before mochi puts the subscription in its index, not in OnSubscribed:
// from the index on, live messages reach the client, and mochi sends the
// retained ones only after SUBACK, so waiting there would let live
// messages overtake retained ones (retained-then-live, guarantee 8) for a
// round trip, or the whole bound. A peer that does not answer in time
// delays SUBACK by the bound and learns the route by gossip
// (broker_cluster_route_ack_timeouts_total). Filters mochi then refuses
// (ACL, invalid) lose the route again in OnSubscribed.
func (h *Cluster) OnSubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if cl.Net.Inline {
		return pk
	}
	var added []string
	for _, sub := range pk.Filters {
		if mqtt.IsValidFilter(sub.Filter, false) && h.addRoute(cl.ID, sub.Filter) {
			added = append(added, sub.Filter)
		}
	}
	if len(added) == 0 {
		return pk
	}
	h.mu.Lock()
	h.pending[cl] = added
	h.mu.Unlock()
	h.awaitRoutes(cl.ID)
	return pk
}

// OnSubscribed implements mqtt.Hook: only granted filters keep their
// route (OnSubscribe took it for every valid one).
func (h *Cluster) OnSubscribed(cl *mqtt.Client, pk packets.Packet, reasonCodes []byte) {
	if cl.Net.Inline {
		return
	}
	h.mu.Lock()
	added := h.pending[cl]
	delete(h.pending, cl)
	h.mu.Unlock()
	for i, sub := range pk.Filters {
		switch {
		case i < len(reasonCodes) && reasonCodes[i] < 0x80:
			h.addRoute(cl.ID, sub.Filter) // a no-op unless OnSubscribe did not see it
		case slices.Contains(added, sub.Filter):
			h.removeRoute(cl.ID, sub.Filter)
		}
	}
}

// awaitRoutes waits (at most routeAckTimeout) until every connected peer
// holds this node's routes as they are now; callers are about to send
// SUBACK for a route they just took.
func (h *Cluster) awaitRoutes(clientID string) {
	if h.node == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), routeAckTimeout)
	defer cancel()
	if err := h.node.AwaitRoutes(ctx); err != nil {
		now := time.Now().UnixNano()
		if last := h.ackLog.Load(); now-last > int64(10*time.Second) && h.ackLog.CompareAndSwap(last, now) {
			h.log.Warn("SUBACK sent before every peer acknowledged the route; a message published on that peer right after may miss it",
				"client", clientID, "error", err)
		}
	}
}

// routeAckTimeout bounds how long SUBACK waits for peers to acknowledge a
// new route (OnSubscribed). A round trip on a LAN takes well under a
// millisecond; the bound only matters when a peer is cut off but its
// connection has not failed yet.
const routeAckTimeout = time.Second

// OnUnsubscribed implements mqtt.Hook. mochi also calls it with every filter
// when a session ends or expires, which withdraws that session's routes.
func (h *Cluster) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline {
		return
	}
	for _, sub := range pk.Filters {
		h.removeRoute(cl.ID, sub.Filter)
	}
}

// addRoute takes the client's reference on filter's route; it reports
// whether the client did not hold one yet.
func (h *Cluster) addRoute(clientID, filter string) bool {
	h.mu.Lock()
	fs := h.routes[clientID]
	if fs == nil {
		fs = map[string]struct{}{}
		h.routes[clientID] = fs
	}
	_, had := fs[filter]
	fs[filter] = struct{}{}
	h.mu.Unlock()
	if had {
		return false
	}
	if err := h.node.AddRoute(filter); err != nil {
		h.log.Warn("subscription not routed", "client", clientID, "error", err)
		return false
	}
	return true
}

// SharedSubscriptions counts the shared subscriptions of this node's
// clients (client and filter pairs): $SYS/broker/shared_subscriptions/count.
func (h *Cluster) SharedSubscriptions() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, fs := range h.routes {
		for f := range fs {
			if mqtt.IsSharedFilter(f) {
				n++
			}
		}
	}
	return n
}

func (h *Cluster) removeRoute(clientID, filter string) {
	h.mu.Lock()
	fs := h.routes[clientID]
	_, had := fs[filter]
	delete(fs, filter)
	if len(fs) == 0 {
		delete(h.routes, clientID)
	}
	h.mu.Unlock()
	if had {
		h.node.RemoveRoute(filter)
	}
}

// OnPublished forwards a local publish. It runs after mochi's ACL check and
// every OnPublish hook, so only accepted messages leave the node.
func (h *Cluster) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if isInjector(cl) || pk.Ignore {
		return
	}
	m := toClusterMessage(cl, pk)
	if pk.Expiry > 0 {
		left := pk.Expiry - time.Now().Unix()
		if left < 0 {
			return // expired already (mochi's rule): nobody may receive it (MQTT-3.3.2-5)
		}
		m.MessageExpiry = uint32(max(left, 1))
	}
	h.node.Forward(m)
}

// OnWillSent forwards wills, which mochi publishes without OnPublished. A
// delayed will's pk.Expiry is its send deadline, not a message expiry, and
// mochi keeps no expiry for wills, so none is sent.
func (h *Cluster) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	h.node.Forward(toClusterMessage(cl, pk))
}

// OnSelectSubscribers keeps, for a forwarded message, only the shared
// groups the origin chose this node for; mochi then picks one local member
// of each. For a local message all local groups stay (the origin node
// serves a group whenever it has a member).
func (h *Cluster) OnSelectSubscribers(subs *mqtt.Subscribers, pk packets.Packet) *mqtt.Subscribers {
	h.dropAbsentMembers(subs)
	if !strings.HasPrefix(pk.Origin, injectorPrefix) {
		return subs
	}
	h.injMu.RLock()
	inj := h.injectors[pk.Origin]
	h.injMu.RUnlock()
	if inj == nil {
		return subs
	}
	for group := range subs.Shared {
		if _, ok := inj.shared[group]; !ok {
			delete(subs.Shared, group)
		}
	}
	return subs
}

// dropAbsentMembers removes from the shared groups the members whose
// client is not connected: a persistent session keeps its shared
// subscriptions in mochi while the client is away, and mochi would choose
// such a member and drop the message for the whole group. A group left
// without a member here is removed (its route was withdrawn at the
// disconnect, so other nodes no longer send it here and this node's
// Forward chooses a node with a live member).
func (h *Cluster) dropAbsentMembers(subs *mqtt.Subscribers) {
	for group, members := range subs.Shared {
		for id := range members {
			if cl, ok := h.server.Clients.Get(id); !ok || cl.Closed() {
				delete(members, id)
			}
		}
		if len(members) == 0 {
			delete(subs.Shared, group)
		}
	}
}

// OnDisconnect ends the shared subscriptions of a client whose session
// outlives the connection. They are not part of the replicated session
// (hooks/session_subscribe.go): left in mochi, the absent member was
// chosen for its group and the message dropped, and the group's route
// made other nodes send it here to be dropped too. So they end with the
// connection, like a clean session's (documented; the client subscribes
// again when it reconnects). Its plain subscriptions stay routed: their
// messages are queued for it.
func (h *Cluster) OnDisconnect(cl *mqtt.Client, _ error, expire bool) {
	if cl.Net.Inline {
		return
	}
	h.connMu.Lock()
	defer h.connMu.Unlock()
	delete(h.attaching, cl.Net.Conn)
	latest := h.latest[cl.ID]
	if latest == cl {
		delete(h.latest, cl.ID)
	}
	if expire {
		return // an ending session's filters are all withdrawn by OnUnsubscribed
	}
	// Taken over on this node: the new connection inherits them (the
	// same client id in mochi's index, the same route references). mochi's
	// Client.Stop closes the socket before it records the cause, and
	// marks the client taken over only after that, so the old read loop
	// can end here first: a newer connection registered by
	// OnSessionEstablish (before mochi stops the old one) is the sign that
	// cannot come late (CI: the takeover lost its route). connMu makes a
	// newer connection wait until a removal begun before it is complete,
	// so mochi never copies a half-removed set. Should the newer one end
	// before it is established, ConnectionEnded removes them.
	if (latest != nil && latest != cl) || cl.IsTakenOver() || errors.Is(cl.StopCause(), packets.ErrSessionTakenOver) {
		return
	}
	if cur, ok := h.server.Clients.Get(cl.ID); ok && cur != cl {
		return
	}
	h.removeShared(cl)
}

// removeShared ends cl's shared subscriptions (in mochi and routed);
// connMu is held.
func (h *Cluster) removeShared(cl *mqtt.Client) {
	for filter := range cl.State.Subscriptions.GetAll() {
		if mqtt.IsSharedFilter(filter) {
			h.server.Topics.Unsubscribe(filter, cl.ID)
			cl.State.Subscriptions.Delete(filter)
			h.removeRoute(cl.ID, filter)
		}
	}
}

// OnSessionEstablish registers cl as its client id's newest connection,
// before mochi takes over (and stops) an older one (see OnDisconnect).
func (h *Cluster) OnSessionEstablish(cl *mqtt.Client, _ packets.Packet) {
	if cl.Net.Inline {
		return
	}
	h.connMu.Lock()
	h.latest[cl.ID] = cl
	h.attaching[cl.Net.Conn] = cl
	h.connMu.Unlock()
}

// ConnectionEnded is told (by the listener) that mochi is done with conn.
// A connection that ended between OnSessionEstablish and its CONNACK gets
// no OnDisconnect from mochi: if it is still its id's newest, the shared
// subscriptions it inherited (whose old connection left them to it) are
// ended here, as OnDisconnect would have.
func (h *Cluster) ConnectionEnded(conn net.Conn) {
	h.connMu.Lock()
	defer h.connMu.Unlock()
	cl := h.attaching[conn]
	if cl == nil {
		return // established (OnDisconnect handles it) or never attached
	}
	delete(h.attaching, conn)
	if h.latest[cl.ID] != cl {
		return // a newer connection took it over and inherits
	}
	delete(h.latest, cl.ID)
	h.removeShared(cl)
}

// OnClientExpired forgets an expired session's client.
func (h *Cluster) OnClientExpired(cl *mqtt.Client) {
	h.connMu.Lock()
	if h.latest[cl.ID] == cl {
		delete(h.latest, cl.ID)
	}
	h.connMu.Unlock()
}

// OnSessionEstablished makes sure the shared subscriptions a connection
// inherited from the one it took over on this node are in mochi's index
// and routed: the old connection's teardown may have raced the handover
// (see OnDisconnect). Both calls are no-ops when nothing was lost.
func (h *Cluster) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	if cl.Net.Inline {
		return
	}
	h.connMu.Lock()
	delete(h.attaching, cl.Net.Conn)
	h.connMu.Unlock()
	for filter, sub := range cl.State.Subscriptions.GetAll() {
		if mqtt.IsSharedFilter(filter) {
			h.server.Topics.Subscribe(cl.ID, sub)
			h.addRoute(cl.ID, filter)
		}
	}
}

// Deliver implements cluster.Deliverer: inject a peer's message into mochi.
func (h *Cluster) Deliver(from string, m *cluster.Message) {
	// The key is built on the stack: the lookup of string(key) does not
	// allocate, where injectorPrefix+from did for every message.
	var buf [64]byte
	key := append(append(buf[:0], injectorPrefix...), from...)
	h.injMu.RLock()
	inj := h.injectors[string(key)]
	h.injMu.RUnlock()
	if inj == nil {
		id := string(key)
		cl := h.server.NewClient(nil, "cluster", id, true)
		// InjectPacket copies the client's version into the packet, and
		// mochi enforces message expiry only for version 5 packets.
		cl.Properties.ProtocolVersion = 5
		inj = &injector{cl: cl, shared: map[string]struct{}{}}
		h.injMu.Lock()
		h.injectors[id] = inj
		h.injMu.Unlock()
	}
	clear(inj.shared)
	for _, g := range m.Shared {
		inj.shared[g] = struct{}{}
	}
	if err := h.server.InjectPacket(inj.cl, fromClusterMessage(m)); err != nil {
		h.log.Warn("forwarded message rejected", "from", from, "error", err)
	}
}

// toClusterMessage copies what must survive the hop; the caller sets the
// remaining expiry (MQTT-3.3.2-6).
func toClusterMessage(cl *mqtt.Client, pk packets.Packet) *cluster.Message {
	p := pk.Properties
	m := &cluster.Message{
		Topic:            pk.TopicName,
		Payload:          pk.Payload,
		QoS:              pk.FixedHeader.Qos,
		Retain:           pk.FixedHeader.Retain,
		PayloadFormat:    p.PayloadFormat,
		PayloadFormatSet: p.PayloadFormatFlag,
		ContentType:      p.ContentType,
		ResponseTopic:    p.ResponseTopic,
		CorrelationData:  p.CorrelationData,
		OriginClient:     cl.ID,
	}
	if len(p.User) > 0 {
		m.UserProperties = make([]cluster.UserProperty, len(p.User))
		for i, u := range p.User {
			m.UserProperties[i] = cluster.UserProperty{Key: u.Key, Value: u.Val}
		}
	}
	return m
}

func fromClusterMessage(m *cluster.Message) packets.Packet {
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: m.QoS, Retain: m.Retain},
		TopicName:   m.Topic,
		Payload:     m.Payload,
		Properties: packets.Properties{
			MessageExpiryInterval: m.MessageExpiry,
			PayloadFormat:         m.PayloadFormat,
			PayloadFormatFlag:     m.PayloadFormatSet,
			ContentType:           m.ContentType,
			ResponseTopic:         m.ResponseTopic,
			CorrelationData:       m.CorrelationData,
		},
	}
	if m.QoS > 0 {
		pk.PacketID = 1 // required non-zero; the inline client keeps no inflight state
	}
	for _, u := range m.UserProperties {
		pk.Properties.User = append(pk.Properties.User, packets.UserProperty{Key: u.Key, Val: u.Value})
	}
	return pk
}
