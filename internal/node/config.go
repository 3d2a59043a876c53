package node

import (
	"log/slog"
	"math"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/mqtt-ha/broker/cluster"
	"github.com/mqtt-ha/broker/hooks"
	"github.com/mqtt-ha/broker/replication"
)

// Config is everything a node needs, already validated by its caller.
type Config struct {
	NodeID  string
	DataDir string

	MQTTAddr, WSAddr, HTTPAddr string
	TLSAddr, TLSCert, TLSKey   string
	TLSClientCA                string // set: clients must present a certificate signed by it
	GossipAddr, ClusterAddr    string
	AdvertiseHost              string
	Join                       []string
	// DNSServer (host:port), when set, resolves every peer name (--join,
	// --advertise-host, raft addresses) instead of the system resolver.
	DNSServer       string
	BootstrapExpect int
	// RemoveLeftAfter: the leader removes a raft server that left the
	// cluster gracefully and has not come back for this long (a
	// scale-down), never going below MinVoters voters. 0: the default
	// (2 minutes); negative: never.
	RemoveLeftAfter time.Duration
	MinVoters       int
	// ClusterKey authenticates the cluster port and encrypts gossip;
	// ClusterAcceptedKeys are also accepted from peers while keys rotate.
	ClusterKey          string
	ClusterAcceptedKeys []string
	// ClusterTLSCert, ClusterTLSKey and ClusterTLSCA (all or none) run the
	// cluster port under mutual TLS.
	ClusterTLSCert, ClusterTLSKey, ClusterTLSCA string
	// AdminToken, when set, is required (Authorization: Bearer) by every
	// admin write on the HTTP port; without it writes are accepted from
	// loopback only.
	AdminToken string

	AllowAnonymous bool
	PasswordFile   string
	ACLFile        string

	MaxPacketSize       uint32 // message_size_limit; 0 = protocol maximum
	MaxQueuedMessages   int    // per session, queued plus in flight
	MaxInflightMessages int    // persistent sessions (hooks.Sessions); see capabilities() for clean ones
	MaxKeepalive        uint16
	MaxConnections      int64 // -1 = unlimited
	RetainAvailable     bool
	SessionExpiry       time.Duration // cap for persistent sessions; 0 = never
	Persistence         bool

	// MaxPendingWrites is mochi's per-client outbound queue, in packets
	// (MaximumClientWritesPending); 0 derives it from MaxQueuedMessages
	// (writeQueueSize). Tests set it low to reach the queue's limit with
	// few messages.
	MaxPendingWrites int32

	// SysInterval is how often $SYS is published (mosquitto:
	// sys_interval); 0 disables it.
	SysInterval time.Duration
	// Version is published as $SYS/broker/version.
	Version string

	ConnectTimeout time.Duration
	// WriteTimeout closes a client connection whose socket takes no bytes
	// for about this long (a subscriber that stopped reading stalls
	// whoever delivers to it: hooks.ConnGuard.WriteStall); 0: never.
	WriteTimeout    time.Duration
	ShutdownTimeout time.Duration
	// LameDuck spreads a graceful stop's client disconnects over up to
	// this long (lameDuckStep per client), so that the clients of a node
	// do not all reconnect to the others in one burst. 0: all at once.
	LameDuck time.Duration
	Pprof    bool
	// ReadLease: the raft leader confirms read indexes by its lease
	// instead of a heartbeat round (--read-lease, experimental).
	ReadLease bool
	// RaftPipeline: raft sends AppendEntries without waiting for the
	// previous answer (--raft-pipeline, experimental).
	RaftPipeline bool
	// RaftLogStore is the log store a new data dir gets
	// (replication.LogStoreBolt or LogStoreWAL; --raft-log-store).
	RaftLogStore string

	Logger *slog.Logger
	// ClusterTuning, if set, adjusts the cluster configuration before the
	// node is built (tests tighten failure-detection timings with it).
	ClusterTuning func(*cluster.Config)
	// ReplicationTuning, likewise, adjusts the raft configuration.
	ReplicationTuning func(*replication.Config)
	// SessionsTuning, likewise, adjusts the persistent-session hook's
	// configuration (tests shorten the leave grace with it).
	SessionsTuning func(*hooks.SessionsConfig)
	// BeforeClaim, if set, runs before each client-id claim this node
	// writes (tests stand in for a slow claim).
	BeforeClaim func(clientID string)
	// claimPace, if set, replaces the spacing of client-id claim entries
	// (hooks.Ownership.Pace; tests).
	claimPace time.Duration
	// ReplicatedSizeLimit is the largest payload stored durably (retained,
	// or queued for a persistent session); larger ones are refused. 0:
	// any MQTT payload. Payloads over replication.BlobThreshold are
	// written as blobs (replication/blob.go).
	ReplicatedSizeLimit int
}

// capabilities sets every mochi capability deliberately rather than
// inheriting mochi's defaults, some of which would surprise a Mosquitto
// user (see the comments).
func (c Config) capabilities() *mqtt.Capabilities {
	caps := mqtt.NewDefaultServerCapabilities()
	// mochi's default (86400) deletes every retained and queued message a
	// day after it was published, whatever its own expiry. Mosquitto keeps
	// them until the message's own expiry, so do we: 0 means no cap.
	caps.MaximumMessageExpiryInterval = 0
	caps.MaximumPacketSize = c.MaxPacketSize
	caps.MaximumInflight = uint16(min(max(c.MaxQueuedMessages, 1), math.MaxUint16))
	caps.MaximumClients = math.MaxInt64
	if c.MaxConnections > 0 {
		caps.MaximumClients = c.MaxConnections
	}
	caps.MaximumSessionExpiryInterval = math.MaxUint32
	if c.SessionExpiry > 0 {
		caps.MaximumSessionExpiryInterval = uint32(min(c.SessionExpiry/time.Second, math.MaxUint32-1))
	}
	caps.RetainAvailable = 0
	if c.RetainAvailable {
		caps.RetainAvailable = 1
	}
	// Mosquitto's default topic_alias_maximum is 10; mochi's 65535 lets one
	// client pin 65535 topic strings per connection.
	caps.TopicAliasMaximum = 10
	// Inbound QoS 1/2 flow control per client (MQTT 5 Receive Maximum).
	// MaxInflightMessages is deliberately NOT applied to mochi's outbound
	// send quota: mochi drops the redelivery record of every message sent
	// through that path (notes/mochi-v2.7.9.md §4), which would break
	// at-least-once. Outbound in-flight is bounded by the client's own
	// Receive Maximum and by MaxQueuedMessages.
	caps.ReceiveMaximum = 1024
	caps.MaximumClientWritesPending = c.writeQueueSize()
	return caps
}

// Bounds of the live messages a connected client's outbound queue makes
// room for (liveQueue), and the slack writeQueueSize adds.
const (
	minWriteQueue   = 256
	maxWriteQueue   = 4096
	writeQueueSlack = 64
)

// liveQueue is how many live messages a connected client's outbound
// queue makes room for beside its QoS 1/2 messages in flight:
// max_queued_messages, as Mosquitto stops queueing QoS 0 messages for a
// connected client once that many wait to be written, at least
// minWriteQueue (mochi's write loop is a goroutine away from the socket,
// so a tiny queue would drop even for a fast client) and at most
// maxWriteQueue. A test's MaxPendingWrites replaces it. RetainPacer keeps
// retained messages sent on SUBSCRIBE to a quarter of it.
func (c Config) liveQueue() int {
	if c.MaxPendingWrites > 0 {
		return int(c.MaxPendingWrites)
	}
	return min(max(c.MaxQueuedMessages, minWriteQueue), maxWriteQueue)
}

// writeQueueSize sizes mochi's per-client outbound queue (a channel that
// mochi preallocates for every connection, 8 bytes a slot, and that the
// garbage collector scans in every cycle: its default of 8,192 cost
// 64 KiB per idle connection and a third of the CPU of a connection
// storm, BENCHMARKS.md). mochi drops a live message that does not fit,
// whatever its QoS (publishToClient). The queue holds liveQueue messages,
// the quarter of it the retain pacer lets wait, and the QoS 1/2 messages
// in flight (at most MaximumInflight, max_queued_messages, themselves at
// most maxWriteQueue here), plus slack for publishers racing past.
// mochi cannot be told to drop QoS 0 first, so a clean session's
// subscriber that falls that far behind loses QoS 1/2 messages too, where
// Mosquitto keeps them up to max_queued_messages (README, known gaps).
func (c Config) writeQueueSize() int32 {
	if c.MaxPendingWrites > 0 {
		return c.MaxPendingWrites
	}
	live := c.liveQueue()
	inflight := min(max(c.MaxQueuedMessages, 1), maxWriteQueue)
	return int32(live + live/4 + inflight + writeQueueSlack)
}
