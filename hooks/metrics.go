package hooks

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync/atomic"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/mochi-mqtt/server/v2/system"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mqtt-ha/broker/replication"
)

// Metrics holds the broker's MQTT Prometheus metrics (namespace broker,
// subsystem mqtt). Label values are bounded: QoS levels and fixed reason
// strings, never a client id or a topic. A nil *Metrics counts nothing.
type Metrics struct {
	connects     prometheus.Counter
	msgsIn       *prometheus.CounterVec
	msgsOut      *prometheus.CounterVec
	payloadIn    *prometheus.CounterVec
	payloadOut   *prometheus.CounterVec
	dropped      *prometheus.CounterVec
	authFailures *prometheus.CounterVec
	aclDenied    *prometheus.CounterVec
	packetErrors *prometheus.CounterVec
	retainedFail *prometheus.CounterVec
	retainedRepl prometheus.Counter
	laneWaits    prometheus.Counter
	laneWaiting  int64 // publishes waiting for room in a full retained lane now
	acceptErrors *prometheus.CounterVec
	sessions     *sessionMetrics

	// qos holds msgsIn, msgsOut, payloadIn and payloadOut resolved for
	// each QoS: the label lookup cost about 2 % of a node's CPU at 5,000
	// QoS 0 msg/s, counted for every packet.
	qos [3]qosCounters
}

// qosCounters are one QoS level's message and payload counters.
type qosCounters struct {
	msgsIn, msgsOut, payloadIn, payloadOut prometheus.Counter
}

// sessionMetrics count the replicated-session events of this node (the
// queue-depth histogram is the node's: it reads the log).
type sessionMetrics struct {
	dropped, redelivered, wills, enqueueFailed, openFailed, opsDropped, qos2Duplicates prometheus.Counter
	pipelined, pipelineBatches, writesFailed                                           prometheus.Counter
}

func newSessionMetrics() *sessionMetrics {
	c := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Namespace: "broker", Subsystem: "sessions", Name: name, Help: help})
	}
	return &sessionMetrics{
		dropped:         c("queue_dropped_total", "Messages not queued for a persistent session because its queue was full (max_queued_messages), counted by the publishing node."),
		redelivered:     c("redelivered_total", "Queued messages sent again to a resumed session (DUP)."),
		wills:           c("wills_published_total", "Wills this node published for sessions closed without DISCONNECT or whose node died."),
		enqueueFailed:   c("enqueue_failures_total", "QoS 1/2 publishes for persistent sessions refused because the log did not commit them."),
		openFailed:      c("open_failures_total", "Persistent sessions served without replication because SessionOpen failed."),
		opsDropped:      c("writes_dropped_total", "Asynchronous session writes (acks, closes) dropped because the write queue was full."),
		qos2Duplicates:  c("qos2_duplicates_total", "Inbound QoS 2 PUBLISH resends recognised from the log and not delivered again."),
		pipelined:       c("pipelined_publishes_total", "QoS 1/2 publishes taken off the read loop by the publish pipeline (hooks/pipeline.go); on a one-node broker, those with nothing to commit stay on it and are not counted."),
		pipelineBatches: c("pipeline_batches_total", "Batches the publish pipeline's workers took; pipelined_publishes_total divided by it is the mean batch."),
		writesFailed:    c("writes_failed_total", "Asynchronous session writes (acks, closes) given up after retrying for 10 s without a quorum; the maintenance loop repairs what it can."),
	}
}

func (s *sessionMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{s.dropped, s.redelivered, s.wills, s.enqueueFailed, s.openFailed, s.opsDropped, s.qos2Duplicates,
		s.pipelined, s.pipelineBatches, s.writesFailed}
}

// NewMetrics registers the metrics on reg; info is the mochi server's
// counters, read at scrape time for the gauges mochi already maintains.
func NewMetrics(reg prometheus.Registerer, info *system.Info) *Metrics {
	const ns, sub = "broker", "mqtt"
	counter := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help}, labels)
	}
	m := &Metrics{
		connects:     prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "connections_total", Help: "Sessions established (CONNECT accepted)."}),
		msgsIn:       counter("messages_received_total", "PUBLISH packets received from clients, by QoS.", "qos"),
		msgsOut:      counter("messages_sent_total", "PUBLISH packets sent to clients, by QoS.", "qos"),
		payloadIn:    counter("payload_bytes_received_total", "Payload bytes of PUBLISH packets received, by QoS.", "qos"),
		payloadOut:   counter("payload_bytes_sent_total", "Payload bytes of PUBLISH packets sent, by QoS.", "qos"),
		dropped:      counter("messages_dropped_total", "Messages not delivered to a subscriber, by reason.", "reason"),
		authFailures: counter("auth_failures_total", "Rejected CONNECTs, by reason.", "reason"),
		aclDenied:    counter("acl_denied_total", "Publishes and subscriptions refused by the ACL, by access.", "access"),
		packetErrors: counter("packet_errors_total", "Connections ended by bad input, by reason.", "reason"),
		retainedFail: counter("retained_replication_failures_total", "Retained writes the raft log did not commit, by reason.", "reason"),
		retainedRepl: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "retained_writes_replaced_total",
			Help: "QoS 0 retained writes (and clean sessions' retained wills) not written because a newer write of the same topic by the same client replaced them while they were queued (hooks/retained_lane.go)."}),
		laneWaits: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "retained_lane_waits_total",
			Help: "Retained publishes that waited for room in their client's full lane of queued retained writes (1,024 writes or 64 MiB; hooks/retained_lane.go): the client writes faster than the log commits."}),
		acceptErrors: counter("accept_errors_total", "Failed accepts on a client listener (EMFILE: out of file descriptors), retried with backoff, by listener.", "listener"),
		sessions:     newSessionMetrics(),
	}
	reg.MustRegister(m.sessions.collectors()...)
	gauge := func(name, help string, v *int64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help},
			func() float64 { return float64(atomic.LoadInt64(v)) })
	}
	counterFunc := func(name, help string, v *int64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help},
			func() float64 { return float64(atomic.LoadInt64(v)) })
	}
	reg.MustRegister(
		m.connects, m.msgsIn, m.msgsOut, m.payloadIn, m.payloadOut, m.dropped,
		m.authFailures, m.aclDenied, m.packetErrors, m.retainedFail, m.retainedRepl, m.laneWaits, m.acceptErrors,
		gauge("connections", "Clients currently connected.", &info.ClientsConnected),
		gauge("sessions", "Sessions held, connected or not.", &info.ClientsTotal),
		gauge("subscriptions", "Active subscriptions.", &info.Subscriptions),
		gauge("retained_messages", "Retained messages held.", &info.Retained),
		gauge("retained_lane_waiting", "Retained publishes waiting now for room in their client's full lane (their read loops wait too).", &m.laneWaiting),
		gauge("inflight_messages", "QoS 1/2 messages in flight or queued for sessions.", &info.Inflight),
		counterFunc("bytes_received_total", "Bytes received from clients.", &info.BytesReceived),
		counterFunc("bytes_sent_total", "Bytes sent to clients.", &info.BytesSent),
		counterFunc("queue_full_dropped_total", "QoS 1/2 messages dropped because a session's queue (max_queued_messages) was full.", &info.InflightDropped),
	)
	// Pre-create the label values people alert on, so they read 0, not absent.
	// (payload counters too, resolved once for the hot path: m.qos).
	for i, q := range qosLabel {
		m.qos[i] = qosCounters{
			msgsIn: m.msgsIn.WithLabelValues(q), msgsOut: m.msgsOut.WithLabelValues(q),
			payloadIn: m.payloadIn.WithLabelValues(q), payloadOut: m.payloadOut.WithLabelValues(q),
		}
	}
	for _, r := range []string{"too_large", "malformed", "protocol_error", "no_connect", "keepalive_timeout",
		reasonNotConnect, reasonConnectTooLarge} {
		m.packetErrors.WithLabelValues(r)
	}
	return m
}

func (m *Metrics) acceptError(listener string) {
	if m != nil {
		m.acceptErrors.WithLabelValues(listener).Inc()
	}
}

func (m *Metrics) packetError(reason string) {
	if m != nil {
		m.packetErrors.WithLabelValues(reason).Inc()
	}
}

func (m *Metrics) retainedFailed(err error) {
	if m == nil {
		return
	}
	reason := "other"
	switch {
	case errors.Is(err, replication.ErrTooLarge):
		reason = "too_large"
	case errors.Is(err, replication.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		reason = "timeout"
	case errors.Is(err, replication.ErrNoLeader), errors.Is(err, replication.ErrNotLeader):
		reason = "no_leader"
	}
	m.retainedFail.WithLabelValues(reason).Inc()
}

// retainedReplaced counts a queued retained write a newer one replaced.
func (m *Metrics) retainedReplaced() {
	if m != nil {
		m.retainedRepl.Inc()
	}
}

// laneWait counts a publish that starts (+1) or stops (-1) waiting for
// room in a full retained lane.
func (m *Metrics) laneWait(d int64) {
	if m != nil {
		if d > 0 {
			m.laneWaits.Inc()
		}
		atomic.AddInt64(&m.laneWaiting, d)
	}
}

// AuthFailure counts a rejected CONNECT; reason is a fixed, small string.
func (m *Metrics) AuthFailure(reason string) {
	if m != nil {
		m.authFailures.WithLabelValues(reason).Inc()
	}
}

// ACLDenied counts an ACL refusal; access is read, write or subscribe.
func (m *Metrics) ACLDenied(access string) {
	if m != nil {
		m.aclDenied.WithLabelValues(access).Inc()
	}
}

var qosLabel = [3]string{"0", "1", "2"}

// MetricsHook feeds Metrics from mochi's events and records the protocol
// version on each guarded connection (see guardedConn).
type MetricsHook struct {
	mqtt.HookBase
	m   *Metrics
	log *slog.Logger
}

// NewMetricsHook returns a hook counting into m.
func NewMetricsHook(m *Metrics, log *slog.Logger) *MetricsHook {
	return &MetricsHook{m: m, log: log}
}

// ID implements mqtt.Hook.
func (h *MetricsHook) ID() string { return "metrics" }

// Provides implements mqtt.Hook.
func (h *MetricsHook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnect, mqtt.OnSessionEstablished, mqtt.OnDisconnect, mqtt.OnPacketRead,
		mqtt.OnPacketSent, mqtt.OnPublishDropped:
		return true
	}
	return false
}

// OnConnect records the protocol version on the connection so that an
// over-size packet can be answered with an MQTT 5 DISCONNECT.
func (h *MetricsHook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	if gc, ok := cl.Net.Conn.(*guardedConn); ok {
		gc.SetProtocolVersion(cl.Properties.ProtocolVersion)
	}
	return nil
}

// OnSessionEstablished implements mqtt.Hook.
func (h *MetricsHook) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	h.m.connects.Inc()
}

// OnPacketRead implements mqtt.Hook.
func (h *MetricsHook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type == packets.Publish && pk.FixedHeader.Qos <= 2 {
		c := &h.m.qos[pk.FixedHeader.Qos]
		c.msgsIn.Inc()
		c.payloadIn.Add(float64(len(pk.Payload)))
	}
	return pk, nil
}

// OnPacketSent implements mqtt.Hook.
func (h *MetricsHook) OnPacketSent(cl *mqtt.Client, pk packets.Packet, b []byte) {
	if pk.FixedHeader.Type == packets.Publish && pk.FixedHeader.Qos <= 2 {
		c := &h.m.qos[pk.FixedHeader.Qos]
		c.msgsOut.Inc()
		c.payloadOut.Add(float64(len(pk.Payload)))
	}
}

// OnPublishDropped implements mqtt.Hook: the client's write queue was full.
func (h *MetricsHook) OnPublishDropped(cl *mqtt.Client, pk packets.Packet) {
	h.m.dropped.WithLabelValues("slow_consumer").Inc()
}

// OnDisconnect classifies the error that ended a session: one log line and
// one count per connection, never per packet.
func (h *MetricsHook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	reason := disconnectReason(err)
	switch reason {
	case "":
		return
	case "too_large":
		// counted by guardedConn.Close, which also sends the DISCONNECT
	default:
		h.m.packetError(reason)
	}
	h.log.Info("client connection ended by error", "client", cl.ID, "remote", cl.Net.Remote,
		"reason", reason, "error", err)
}

// disconnectReason maps the error that ended a session to a metric label,
// or "" for an ordinary end (client DISCONNECT, EOF, takeover, shutdown).
func disconnectReason(err error) string {
	if err == nil || errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		return ""
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return "keepalive_timeout"
	}
	var code packets.Code
	if errors.As(err, &code) {
		switch {
		case code.Code == packets.ErrPacketTooLarge.Code:
			return "too_large"
		case code.Code == packets.ErrMalformedPacket.Code:
			return "malformed"
		case code.Code == packets.ErrProtocolViolation.Code:
			return "protocol_error"
		case code.Code < 0x80, code.Code == packets.ErrSessionTakenOver.Code, code.Code == packets.ErrServerShuttingDown.Code:
			return ""
		default:
			return "code_" + strconv.FormatUint(uint64(code.Code), 16)
		}
	}
	return ""
}
