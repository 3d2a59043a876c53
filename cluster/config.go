package cluster

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Versions of the cluster-port protocols (handshake, forwarding frames, and
// whatever else runs over the mux, such as raft). Two nodes talk at the
// lower of their newest versions if the other still speaks it; the
// handshake agrees on it (mux.go) and every PeerConn carries it, so a
// sender uses nothing newer than PeerConn.Version. History, append-only:
//
//	1  publish frames; the handshake required equal versions
//	2  the handshake negotiates; route and route-ack frames (routeack.go)
//	3  route snapshot frames (routesync.go)
const (
	// ProtocolVersion is the newest version this node speaks: what it
	// offers in a handshake and what Status reports as its own.
	ProtocolVersion uint8 = 3
	// MinProtocolVersion is the oldest version this node still speaks. A
	// peer speaking only older ones is refused at the handshake. It is what
	// the node announces in its metadata (nodeMeta.Proto), because a
	// version-1 node refuses to forward to a member announcing anything but
	// 1. Raise it only once no node of an older version can remain in a
	// cluster (DESIGN.md, "Rolling upgrades").
	MinProtocolVersion uint8 = 1
)

// Default addresses (the command-line contract's defaults).
const (
	DefaultGossipPort  = 7946
	DefaultClusterPort = 7947
)

// ErrInvalidConfig is wrapped by every Validate error.
var ErrInvalidConfig = errors.New("invalid cluster config")

// Config configures a Node. Zero values are replaced by defaults in
// Sanitize; Validate reports what cannot be defaulted.
type Config struct {
	// NodeID names this node cluster-wide (memberlist node name). Required.
	NodeID string
	// AdvertiseHost is the address peers use to reach this node (an IP or a
	// DNS name such as the pod's stable name). Empty: the bind IP if it is
	// specific, otherwise the first private IP (memberlist's rule).
	AdvertiseHost string
	// GossipAddr is the memberlist bind address (TCP and UDP). Port 0 picks
	// a free port (tests).
	GossipAddr string
	// ClusterAddr is the forwarding/raft bind address. Port 0 allowed.
	ClusterAddr string
	// MQTTPort is advertised in node metadata (for status and clients).
	MQTTPort int
	// Join lists seeds: "host:port", "host" (gossip port assumed) or DNS
	// names; a name with several A/AAAA records joins all of them.
	Join []string
	// ClusterKey is an optional shared secret. When set, gossip is encrypted
	// (AES-256 with sha256-derived key) and cluster-port connections must
	// pass an HMAC-SHA256 challenge/response in both directions.
	ClusterKey []byte
	// AcceptedKeys are further keys accepted from peers (gossip and cluster
	// port) while keys are rotated; this node proves ClusterKey. Ignored
	// without ClusterKey.
	AcceptedKeys [][]byte
	// TLSServer and TLSClient, when set, wrap every cluster-port connection
	// in TLS before the key handshake (both or neither). TLSClient's
	// ServerName defaults to the host of the dialled address.
	TLSServer *tls.Config
	TLSClient *tls.Config

	// Failure detection. The defaults detect a dead node in about 4 to 5
	// seconds on a LAN (see DESIGN.md for the arithmetic).
	ProbeInterval           time.Duration
	ProbeTimeout            time.Duration
	SuspicionMult           int
	SuspicionMaxTimeoutMult int
	GossipInterval          time.Duration
	// PushPullInterval is the anti-entropy period (full route state).
	PushPullInterval time.Duration
	// RouteStateBudget caps the route entries in one push/pull state
	// (memberlist refuses states over 20 MiB): this node's own entry
	// first, then others while they fit. Peers of protocol 3 get entries
	// that do not fit as route snapshots (routesync.go). Default 8 MiB.
	RouteStateBudget int
	// TCPTimeout bounds memberlist's TCP exchanges (join, push/pull).
	TCPTimeout     time.Duration
	RetransmitMult int
	// RejoinInterval is how often the seed list is re-resolved and seeds
	// that are not members are joined (partition healing).
	RejoinInterval time.Duration
	// LeaveTimeout bounds the graceful leave in Close.
	LeaveTimeout time.Duration

	// QueueSize and QueueBytes bound each peer's forward queue; a message
	// that does not fit is dropped (tail drop) and counted. A single message
	// larger than QueueBytes is still accepted into an empty queue.
	QueueSize  int
	QueueBytes int
	// Frames are written into a FlushBytes buffer that is flushed when it is
	// full and when the peer's queue is drained, so batches grow with load
	// by themselves (see DESIGN.md for measurements). FlushInterval > 0 adds
	// a linger: the writer then waits up to that long for more messages
	// before flushing a partial buffer (more throughput, that much more
	// latency; Go timers are ~1 ms granular when idle). Default 0.
	FlushInterval time.Duration
	FlushBytes    int
	// MaxFrameSize bounds one forwarded frame in both directions.
	MaxFrameSize     int
	DialTimeout      time.Duration
	HandshakeTimeout time.Duration
	// WriteTimeout bounds one flush to a peer; a peer that does not read for
	// that long is disconnected (its messages in flight are lost).
	WriteTimeout time.Duration
	ReconnectMin time.Duration
	ReconnectMax time.Duration

	// Logger receives structured logs (component=cluster, node=<id>).
	Logger *slog.Logger
	// Registerer receives the broker_cluster_* metrics; nil uses a private
	// registry (metrics then go nowhere).
	Registerer prometheus.Registerer
	// OnMemberEvent, if set, is called for every membership change of other
	// nodes, in order, on one goroutine (so it may take a lock but should
	// not block for long). hooks/replication use it, e.g. to fire the wills
	// of a failed node's clients.
	OnMemberEvent func(MemberEvent)
	// LookupHost resolves seed names; nil uses Resolver.
	LookupHost func(ctx context.Context, host string) ([]string, error)
	// Resolver resolves every name the node looks up or dials (seeds, the
	// advertise host, peers' cluster addresses); nil: net.DefaultResolver.
	Resolver *net.Resolver
	// AppMeta is opaque metadata gossiped with this node (at most 64
	// bytes), read by peers from MemberStatus.AppMeta; SetAppMeta changes it.
	AppMeta []byte
}

// Sanitize fills zero fields with defaults.
func (c *Config) Sanitize() {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	defInt := func(i *int, v int) {
		if *i == 0 {
			*i = v
		}
	}
	if c.GossipAddr == "" {
		c.GossipAddr = net.JoinHostPort("", strconv.Itoa(DefaultGossipPort))
	}
	if c.ClusterAddr == "" {
		c.ClusterAddr = net.JoinHostPort("", strconv.Itoa(DefaultClusterPort))
	}
	def(&c.ProbeInterval, 500*time.Millisecond)
	def(&c.ProbeTimeout, 250*time.Millisecond)
	defInt(&c.SuspicionMult, 4)
	defInt(&c.SuspicionMaxTimeoutMult, 2)
	def(&c.GossipInterval, 200*time.Millisecond)
	def(&c.PushPullInterval, 15*time.Second)
	defInt(&c.RouteStateBudget, 8<<20)
	def(&c.TCPTimeout, 5*time.Second)
	defInt(&c.RetransmitMult, 4)
	def(&c.RejoinInterval, 10*time.Second)
	def(&c.LeaveTimeout, 2*time.Second)
	defInt(&c.QueueSize, 16384)
	defInt(&c.QueueBytes, 64<<20)
	if c.FlushInterval < 0 {
		c.FlushInterval = 0
	}
	defInt(&c.FlushBytes, 64<<10)
	defInt(&c.MaxFrameSize, DefaultMaxFrameSize)
	def(&c.DialTimeout, 2*time.Second)
	def(&c.HandshakeTimeout, 5*time.Second)
	def(&c.WriteTimeout, 10*time.Second)
	def(&c.ReconnectMin, 50*time.Millisecond)
	def(&c.ReconnectMax, 5*time.Second)
	if c.Logger == nil {
		c.Logger = discardLogger()
	}
	if c.Registerer == nil {
		c.Registerer = prometheus.NewRegistry()
	}
	if c.Resolver == nil {
		c.Resolver = net.DefaultResolver
	}
	if c.LookupHost == nil {
		c.LookupHost = c.Resolver.LookupHost
	}
}

// Validate reports configuration errors, all of them, wrapped in
// ErrInvalidConfig. Call it after Sanitize.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf(format, args...))
	}
	if c.NodeID == "" {
		bad("node id is required")
	}
	if (c.TLSServer == nil) != (c.TLSClient == nil) {
		bad("cluster TLS needs both a server and a client configuration")
	}
	if len(c.NodeID) > 200 {
		bad("node id longer than 200 bytes")
	}
	if len(c.AppMeta) > maxAppMeta {
		bad("app metadata longer than %d bytes", maxAppMeta)
	}
	if _, _, err := splitHostPort(c.GossipAddr); err != nil {
		bad("gossip address %q: %w", c.GossipAddr, err)
	}
	if _, _, err := splitHostPort(c.ClusterAddr); err != nil {
		bad("cluster address %q: %w", c.ClusterAddr, err)
	}
	if c.MQTTPort < 0 || c.MQTTPort > 65535 {
		bad("mqtt port %d out of range", c.MQTTPort)
	}
	if len(c.AdvertiseHost) > 253 {
		bad("advertise host too long")
	}
	if c.ProbeTimeout >= c.ProbeInterval {
		bad("probe timeout %v must be shorter than probe interval %v", c.ProbeTimeout, c.ProbeInterval)
	}
	if c.SuspicionMult < 1 || c.SuspicionMaxTimeoutMult < 1 || c.RetransmitMult < 1 {
		bad("suspicion and retransmit multipliers must be >= 1")
	}
	if c.QueueSize < 1 || c.QueueBytes < 1 || c.FlushBytes < 512 {
		bad("queue size, queue bytes must be positive and flush bytes >= 512")
	}
	if c.MaxFrameSize < 1024 || c.MaxFrameSize > 1<<31-1 {
		bad("max frame size %d out of range [1024, 2^31)", c.MaxFrameSize)
	}
	if c.ReconnectMin > c.ReconnectMax {
		bad("reconnect min %v above max %v", c.ReconnectMin, c.ReconnectMax)
	}
	for _, s := range c.Join {
		if s == "" {
			bad("empty join entry")
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%w: %w", ErrInvalidConfig, errors.Join(errs...))
	}
	return nil
}

// splitHostPort parses "host:port" with a numeric port (0 allowed).
func splitHostPort(addr string) (string, int, error) {
	host, ps, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	p, err := strconv.Atoi(ps)
	if err != nil || p < 0 || p > 65535 {
		return "", 0, fmt.Errorf("bad port %q", ps)
	}
	return host, p, nil
}
