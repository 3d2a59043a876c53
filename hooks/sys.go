package hooks

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"runtime"
	"strconv"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Sys publishes the $SYS tree every interval, as Mosquitto does (its
// sys_interval, 10 s by default): Mosquitto's topic names and payload
// formats for this node, so that dashboards written for Mosquitto keep
// working, and $SYS/cluster/... for the cluster. It replaces mochi's own
// $SYS publisher, whose names and formats differ (uptime without
// " seconds", totals under load/..., its own version string).
//
// Per node: each node publishes its own figures, to its own subscribers
// only (like every node of a Mosquitto bridge pair has its own $SYS).
// Messages are retained in this node's index (not in the replicated log)
// and delivered live at QoS 0 through an inline client that neither the
// log nor the cluster layer forwards.
type Sys struct {
	mqtt.HookBase
	server *mqtt.Server
	cfg    SysConfig
	inj    *mqtt.Client
	start  time.Time

	injected atomic.Int64 // $SYS publishes: not counted as received
	// Counted by the hook methods (mochi keeps no such counters).
	connections, pubBytesIn, pubBytesOut atomic.Int64

	last    time.Time
	prev    sysCounters
	loads   map[string]*[3]float64
	heapMax uint64
}

// SysConfig configures Sys.
type SysConfig struct {
	// Interval between updates; 0 disables $SYS.
	Interval time.Duration
	// Version is published as $SYS/broker/version.
	Version string
	// Cluster reports the cluster-wide figures (called once per update).
	Cluster func() SysCluster
	Log     *slog.Logger
}

// SysCluster are the cluster-wide figures of one update.
type SysCluster struct {
	Self      string // this node's id
	Nodes     int    // members alive, this node included
	Leader    string // the raft leader's id, "" for none
	Sessions  int    // persistent sessions (connected or not)
	Connected int    // of which connected
	// DisconnectedHere: disconnected sessions this node held last (the
	// node's share of Mosquitto's clients/disconnected).
	DisconnectedHere int
	Retained         int // retained messages
	Queued           int // messages queued or in flight for persistent sessions
	// StoredBytes: payload bytes of the retained and queued messages.
	StoredBytes int64
	// ExpiredHere: sessions this node's expiry sweeps deleted (it does
	// them as the leader).
	ExpiredHere int64
	// SharedHere: shared subscriptions of this node's clients.
	SharedHere int
}

// sysCounters are mochi's counters at one update.
type sysCounters struct {
	bytesIn, bytesOut, pktsIn, pktsOut, pubIn, pubOut, pubDropped, conns int64
}

// sysClientID is the client id of the inline client that injects $SYS
// updates: under injectorPrefix, so that neither the log (Retained and
// Sessions skip injectors) nor the cluster layer (it forwards only local
// publishes) takes them.
const sysClientID = injectorPrefix + "$SYS"

// NewSys returns the publisher; Run starts it.
func NewSys(s *mqtt.Server, cfg SysConfig) *Sys {
	if cfg.Version == "" {
		cfg.Version = "dev"
	}
	cl := s.NewClient(nil, "sys", sysClientID, true)
	cl.Properties.ProtocolVersion = 5
	return &Sys{server: s, cfg: cfg, inj: cl, start: time.Now(), loads: map[string]*[3]float64{}}
}

// Run publishes at once, then every interval, until ctx ends (with
// Interval 0 it only clears what mochi published as it started).
func (y *Sys) Run(ctx context.Context) {
	y.clearMochiSys()
	if y.cfg.Interval <= 0 {
		return
	}
	t := time.NewTicker(y.cfg.Interval)
	defer t.Stop()
	for {
		y.update(time.Now())
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
	}
}

func (y *Sys) counters() sysCounters {
	in := y.server.Info
	inj := y.injected.Load()
	return sysCounters{
		bytesIn: atomic.LoadInt64(&in.BytesReceived), bytesOut: atomic.LoadInt64(&in.BytesSent),
		pktsIn: atomic.LoadInt64(&in.PacketsReceived) - inj, pktsOut: atomic.LoadInt64(&in.PacketsSent),
		pubIn: atomic.LoadInt64(&in.MessagesReceived) - inj, pubOut: atomic.LoadInt64(&in.MessagesSent),
		pubDropped: atomic.LoadInt64(&in.MessagesDropped), conns: y.connections.Load(),
	}
}

// ID implements mqtt.Hook.
func (y *Sys) ID() string { return "sys" }

// Provides implements mqtt.Hook: the counters mochi does not keep.
func (y *Sys) Provides(b byte) bool {
	return b == mqtt.OnSessionEstablished || b == mqtt.OnPacketRead || b == mqtt.OnPacketSent
}

// OnSessionEstablished counts connections ($SYS/broker/load/connections).
func (y *Sys) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) { y.connections.Add(1) }

// OnPacketRead counts PUBLISH payload bytes from clients.
func (y *Sys) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type == packets.Publish {
		y.pubBytesIn.Add(int64(len(pk.Payload)))
	}
	return pk, nil
}

// OnPacketSent counts PUBLISH payload bytes to clients.
func (y *Sys) OnPacketSent(cl *mqtt.Client, pk packets.Packet, b []byte) {
	if pk.FixedHeader.Type == packets.Publish {
		y.pubBytesOut.Add(int64(len(pk.Payload)))
	}
}

// update publishes one round. Load figures are Mosquitto's: the rate per
// minute since the last update, smoothed exponentially over 1, 5 and 15
// minutes, "%.2f".
func (y *Sys) update(now time.Time) {
	c := y.counters()
	in := y.server.Info
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	y.heapMax = max(y.heapMax, ms.HeapInuse)
	cl := SysCluster{}
	if y.cfg.Cluster != nil {
		cl = y.cfg.Cluster()
	}
	connected := atomic.LoadInt64(&in.ClientsConnected)
	disconnected := int64(cl.DisconnectedHere)
	topics := []struct{ topic, payload string }{
		{"$SYS/broker/version", "mqtt-ha broker version " + y.cfg.Version},
		{"$SYS/broker/uptime", fmt.Sprintf("%d seconds", int64(now.Sub(y.start).Seconds()))},
		{"$SYS/broker/clients/connected", itoa(connected)},
		{"$SYS/broker/clients/active", itoa(connected)}, // Mosquitto's older name
		{"$SYS/broker/clients/disconnected", itoa(disconnected)},
		{"$SYS/broker/clients/inactive", itoa(disconnected)},
		{"$SYS/broker/clients/total", itoa(connected + disconnected)},
		{"$SYS/broker/clients/maximum", itoa(atomic.LoadInt64(&in.ClientsMaximum))},
		{"$SYS/broker/clients/expired", itoa(cl.ExpiredHere)},
		{"$SYS/broker/messages/received", itoa(c.pktsIn)},
		{"$SYS/broker/messages/sent", itoa(c.pktsOut)},
		{"$SYS/broker/messages/stored", strconv.Itoa(cl.Retained + cl.Queued)},
		{"$SYS/broker/store/messages/count", strconv.Itoa(cl.Retained + cl.Queued)},
		{"$SYS/broker/store/messages/bytes", itoa(cl.StoredBytes)},
		{"$SYS/broker/messages/inflight", itoa(atomic.LoadInt64(&in.Inflight))},
		{"$SYS/broker/publish/messages/received", itoa(c.pubIn)},
		{"$SYS/broker/publish/messages/sent", itoa(c.pubOut)},
		{"$SYS/broker/publish/messages/dropped", itoa(c.pubDropped)},
		{"$SYS/broker/publish/bytes/received", itoa(y.pubBytesIn.Load())},
		{"$SYS/broker/publish/bytes/sent", itoa(y.pubBytesOut.Load())},
		{"$SYS/broker/bytes/received", itoa(c.bytesIn)},
		{"$SYS/broker/bytes/sent", itoa(c.bytesOut)},
		{"$SYS/broker/retained messages/count", strconv.Itoa(cl.Retained)},
		{"$SYS/broker/subscriptions/count", itoa(atomic.LoadInt64(&in.Subscriptions))},
		{"$SYS/broker/shared_subscriptions/count", strconv.Itoa(cl.SharedHere)},
		{"$SYS/broker/heap/current", strconv.FormatUint(ms.HeapInuse, 10)},
		{"$SYS/broker/heap/maximum", strconv.FormatUint(y.heapMax, 10)},
		{"$SYS/cluster/self", cl.Self},
		{"$SYS/cluster/nodes", strconv.Itoa(cl.Nodes)},
		{"$SYS/cluster/leader", cl.Leader},
		{"$SYS/cluster/sessions", strconv.Itoa(cl.Sessions)},
	}
	if !y.last.IsZero() {
		if secs := now.Sub(y.last).Seconds(); secs > 0 {
			for _, l := range []struct {
				name        string
				now, before int64
			}{
				{"messages/received", c.pktsIn, y.prev.pktsIn},
				{"messages/sent", c.pktsOut, y.prev.pktsOut},
				{"publish/received", c.pubIn, y.prev.pubIn},
				{"publish/sent", c.pubOut, y.prev.pubOut},
				{"publish/dropped", c.pubDropped, y.prev.pubDropped},
				{"bytes/received", c.bytesIn, y.prev.bytesIn},
				{"bytes/sent", c.bytesOut, y.prev.bytesOut},
				// Mosquitto counts accepted sockets and connections
				// apart; here both are connections established.
				{"connections", c.conns, y.prev.conns},
				{"sockets", c.conns, y.prev.conns},
			} {
				perMinute := float64(l.now-l.before) * 60 / secs
				ld := y.loads[l.name]
				if ld == nil {
					ld = &[3]float64{}
					y.loads[l.name] = ld
				}
				for i, window := range []float64{60, 300, 900} {
					e := math.Exp(-secs / window)
					ld[i] = perMinute + e*(ld[i]-perMinute)
					topics = append(topics, struct{ topic, payload string }{
						fmt.Sprintf("$SYS/broker/load/%s/%s", l.name, [...]string{"1min", "5min", "15min"}[i]),
						strconv.FormatFloat(ld[i], 'f', 2, 64)})
				}
			}
		}
	}
	y.last, y.prev = now, c
	for _, t := range topics {
		y.publish(t.topic, t.payload)
	}
}

// publish retains payload under topic in this node's index and delivers
// it live.
func (y *Sys) publish(topic, payload string) {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: topic,
		Payload: []byte(payload), Created: time.Now().Unix()}
	r := pk.Copy(false)
	r.FixedHeader.Retain = true
	if _, ok := y.server.Topics.Retained.Get(topic); ok && len(payload) > 0 {
		// Only the value changes: replace it in the retained map (its own
		// lock) and leave the topic trie alone. mochi v2.7.9's
		// RetainMessage writes the trie node's retainPath on every call,
		// which a SUBSCRIBE scanning retained messages reads without the
		// node's lock (a data race reported under -race in CI, and in
		// test/chaos/README.md).
		y.server.Topics.Retained.Add(topic, r)
	} else {
		y.server.Topics.RetainMessage(r) // the first value; an empty payload (no leader) clears it
	}
	if err := y.server.InjectPacket(y.inj, pk); err != nil {
		if y.cfg.Log != nil {
			y.cfg.Log.Debug("$SYS update not delivered", "topic", topic, "error", err)
		}
		return
	}
	y.injected.Add(1)
}

// mochiSysTopics are the topics of mochi's own $SYS publisher that are not
// Mosquitto's: mochi publishes them once as it starts (its periodic
// publisher is set to a century), and Sys clears them.
var mochiSysTopics = []string{
	"$SYS/broker/time", "$SYS/broker/started", "$SYS/broker/load/bytes/received", "$SYS/broker/load/bytes/sent",
	"$SYS/broker/packets/received", "$SYS/broker/packets/sent", "$SYS/broker/messages/dropped",
	"$SYS/broker/retained", "$SYS/broker/subscriptions", "$SYS/broker/system/memory", "$SYS/broker/system/threads",
}

// clearMochiSys removes mochi's own $SYS values from the retained index.
func (y *Sys) clearMochiSys() {
	for _, t := range mochiSysTopics {
		y.server.Topics.RetainMessage(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}, TopicName: t})
	}
}

func itoa(v int64) string { return strconv.FormatInt(v, 10) }
