package cluster

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Drop reasons, the values of the "reason" label of
// broker_cluster_dropped_messages_total. The set is closed (bounded labels).
const (
	dropQueueFull = "queue_full" // the peer's queue hit QueueSize or QueueBytes
	dropOversize  = "oversize"   // the encoded frame would exceed MaxFrameSize
	dropPeerGone  = "peer_gone"  // the peer left or died with messages queued
	dropNoPeer    = "no_peer"    // a route points at a node we have no address for
	dropConnLost  = "conn_lost"  // written to a connection that then failed
	dropShutdown  = "shutdown"   // queued when this node closed
	dropExpired   = "expired"    // its message expiry ran out while it waited in the queue
)

// metrics are the broker_cluster_* collectors of one Node. Each Node registers
// its own set and unregisters it on Close, so tests can run many nodes with
// separate registries and a process can replace a node.
type metrics struct {
	reg        prometheus.Registerer
	collectors []prometheus.Collector

	forwarded        prometheus.Counter
	forwardedBytes   prometheus.Counter
	received         prometheus.Counter
	receivedBytes    prometheus.Counter
	dropped          *prometheus.CounterVec
	queueDepth       *prometheus.GaugeVec
	queueBytes       *prometheus.GaugeVec
	reconnects       prometheus.Counter
	dialErrors       prometheus.Counter
	badFrames        prometheus.Counter
	handshake        *prometheus.CounterVec
	members          prometheus.Gauge
	deltas           *prometheus.CounterVec
	merges           prometheus.Counter
	repairs          prometheus.Counter
	routeSnapshots   *prometheus.CounterVec
	badGossip        prometheus.Counter
	memberEvents     *prometheus.CounterVec
	routeAckWait     prometheus.Histogram
	routeAckTimeouts prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, rt *routeTable) (*metrics, error) {
	const ns, sub = "broker", "cluster"
	m := &metrics{reg: reg}
	counter := func(name, help string) prometheus.Counter {
		c := prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help})
		m.collectors = append(m.collectors, c)
		return c
	}
	counterVec := func(name, help string, labels ...string) *prometheus.CounterVec {
		c := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help}, labels)
		m.collectors = append(m.collectors, c)
		return c
	}
	gaugeVec := func(name, help string, labels ...string) *prometheus.GaugeVec {
		g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help}, labels)
		m.collectors = append(m.collectors, g)
		return g
	}
	m.forwarded = counter("forwarded_messages_total", "Messages written to peer connections.")
	m.forwardedBytes = counter("forwarded_bytes_total", "Frame bytes written to peer connections.")
	m.received = counter("received_messages_total", "Messages received from peers and handed to the deliverer.")
	m.receivedBytes = counter("received_bytes_total", "Frame bytes received from peers.")
	m.dropped = counterVec("dropped_messages_total", "Messages not forwarded, by reason.", "reason")
	for _, r := range []string{dropQueueFull, dropOversize, dropPeerGone, dropNoPeer, dropConnLost, dropShutdown, dropExpired} {
		m.dropped.WithLabelValues(r) // export zeros so rate() works from the start
	}
	m.queueDepth = gaugeVec("forward_queue_depth", "Messages queued for a peer.", "peer")
	m.queueBytes = gaugeVec("forward_queue_bytes", "Bytes queued for a peer.", "peer")
	m.reconnects = counter("peer_reconnects_total", "Forwarding connections re-established after a loss.")
	m.dialErrors = counter("peer_dial_errors_total", "Failed forwarding dials (including refused handshakes).")
	m.badFrames = counter("bad_frames_total", "Inbound frames that were oversize, truncated or undecodable (the connection is dropped).")
	m.handshake = counterVec("handshake_failures_total", "Cluster-port connections refused during the handshake.", "direction", "reason")
	m.routeAckTimeouts = counter("route_ack_timeouts_total", "Waits for peers to acknowledge a new route (before SUBACK) that ran out of time.")
	m.routeAckWait = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "route_ack_wait_seconds",
		Help:    "Time until every connected peer acknowledged a new route (before SUBACK).",
		Buckets: []float64{.0001, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5}})
	m.collectors = append(m.collectors, m.routeAckWait)
	m.members = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "members", Help: "Live members including this node."})
	m.collectors = append(m.collectors, m.members)
	m.deltas = counterVec("route_deltas_total", "Gossiped route deltas received, by outcome.", "result")
	m.merges = counter("route_merges_total", "Route entries replaced by anti-entropy (push/pull).")
	m.repairs = counter("route_repairs_total", "Push/pulls triggered to close a gap in a node's delta chain.")
	m.routeSnapshots = counterVec("route_snapshots_total", "Own route entries sent to peers that were behind, and peers' entries received (protocol 3).", "direction")
	m.badGossip = counter("bad_gossip_total", "Undecodable gossip messages or states.")
	m.memberEvents = counterVec("member_events_total", "Membership events.", "event")
	m.collectors = append(m.collectors,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "local_routes", Help: "Distinct local filters announced."},
			func() float64 { s, _ := rt.info(); return float64(s.Routes) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "remote_routes", Help: "(filter, node) routes known for other nodes."},
			func() float64 { rt.mu.RLock(); defer rt.mu.RUnlock(); return float64(rt.index.size) }),
	)
	for i, c := range m.collectors {
		if err := reg.Register(c); err != nil {
			for _, done := range m.collectors[:i] {
				reg.Unregister(done)
			}
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				return nil, fmt.Errorf("register cluster metrics (another Node uses this registerer): %w", err)
			}
			return nil, fmt.Errorf("register cluster metrics: %w", err)
		}
	}
	return m, nil
}

func (m *metrics) unregister() {
	for _, c := range m.collectors {
		m.reg.Unregister(c)
	}
}
