// Package node assembles one broker node from a validated Config: the mochi
// server with its hooks and listeners, and the HTTP endpoints. cmd/broker
// builds the Config from flags, environment and files; tests build it
// directly, so several nodes can run in one process on port 0.
package node

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/mqtt-ha/broker/cluster"
	"github.com/mqtt-ha/broker/hooks"
	"github.com/mqtt-ha/broker/internal/logx"
	"github.com/mqtt-ha/broker/replication"
)

// replicatedWriteTimeout bounds a write that must be committed before the
// client is acknowledged: without a quorum it fails after this long.
const replicatedWriteTimeout = 5 * time.Second

// Node is one running broker node.
type Node struct {
	cfg  Config
	log  *slog.Logger
	mqtt *mqtt.Server
	auth *hooks.Auth
	reg  *prometheus.Registry
	// adminDenied counts refused admin writes (http.go).
	adminDenied *prometheus.CounterVec

	cluster         *cluster.Node
	clusterHook     *hooks.Cluster
	repl            *replication.Node
	retainedHook    *hooks.Retained
	pipeline        *hooks.Pipeline
	ownershipHook   *hooks.Ownership
	sessionsHook    *hooks.Sessions
	raftAddr        string
	initialHasState bool
	stopped         chan struct{} // closed when the node stops; ends background loops
	sys             *hooks.Sys
	drain           context.CancelFunc // ends the replicated writes clients wait for (shutdown)
	tls             *certReloader
	clusterTLS      *certReloader // nil: the cluster port is plain TCP

	listeners []*hooks.Listener
	httpLn    net.Listener
	httpSv    *http.Server

	recent *logx.Recent // the last warnings, for the status page

	ready     atomic.Bool
	checks    []readinessCheck
	closeOnce sync.Once
	closeErr  error
}

// readinessCheck is one condition /readyz requires; the cluster and
// replication layers add theirs ("joined", "caught up").
type readinessCheck struct {
	name  string
	check func() error
}

// New takes a Config its caller validated (cmd/broker does, naming flags
// and files), binds every listener so that a port in use is reported
// before anything starts, and wires the hooks.
func New(cfg Config) (_ *Node, err error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// Every component logs through the recorder: the status page lists
	// the cluster's and raft's warnings too.
	recent := logx.NewRecent(50)
	log = slog.New(recent.Wrap(log.Handler()))
	cfg.Logger = log
	log = log.With("node", cfg.NodeID)
	n := &Node{cfg: cfg, log: log, reg: prometheus.NewRegistry(), stopped: make(chan struct{}), recent: recent}
	if n.initialHasState, err = replication.HasState(n.raftDir()); err != nil {
		return nil, fmt.Errorf("raft state in %s: %w", n.raftDir(), err)
	}
	defer func() {
		if err != nil {
			n.closeListeners()
		}
	}()

	n.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	n.adminDenied = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "broker_admin_denied_total",
		Help: "Admin writes on the HTTP port refused (reason: token, not_loopback)."}, []string{"reason"})
	n.reg.MustRegister(n.adminDenied)

	mochiLog := slog.New(logx.RateLimit(logx.Rewrite(log.Handler(), packetSummary), 10*time.Second)).With("component", "mqtt")
	n.mqtt = mqtt.New(&mqtt.Options{
		Capabilities: cfg.capabilities(),
		Logger:       mochiLog,
		// mochi's own $SYS publisher cannot be turned off (0 means 1 s):
		// a century. hooks.Sys publishes Mosquitto's names instead.
		SysTopicResendInterval: 100 * 365 * 24 * 3600,
	})
	metrics := hooks.NewMetrics(n.reg, n.mqtt.Info)

	n.auth, err = hooks.NewAuth(hooks.AuthOptions{
		AllowAnonymous: cfg.AllowAnonymous,
		PasswordFile:   cfg.PasswordFile,
		ACLFile:        cfg.ACLFile,
		Logger:         log,
		OnAuthFailure:  metrics.AuthFailure,
		OnACLDenied:    metrics.ACLDenied,
	})
	if err != nil {
		return nil, fmt.Errorf("auth: %w", err)
	}
	n.clusterHook = hooks.NewCluster(n.mqtt, log)
	n.retainedHook = hooks.NewRetained(n.mqtt, replicatedWriteTimeout, metrics, log)
	n.ownershipHook = hooks.NewOwnership(n.mqtt, cfg.NodeID, replicatedWriteTimeout, log)
	n.ownershipHook.BeforeClaim = cfg.BeforeClaim
	if cfg.claimPace > 0 {
		n.ownershipHook.Pace = cfg.claimPace
	}
	drainCtx, drain := context.WithCancel(context.Background())
	n.drain = drain
	n.retainedHook.SetBase(drainCtx)
	n.retainedHook.SetDurableLimit(cfg.ReplicatedSizeLimit)
	scfg := hooks.SessionsConfig{
		Self: cfg.NodeID, MaxQueued: cfg.MaxQueuedMessages, MaxInflight: cfg.MaxInflightMessages,
		Timeout: replicatedWriteTimeout, Alive: n.memberAlive, Left: n.memberLeft, Log: log, Metrics: metrics,
		ACL: n.auth.OnACLCheck, DurableLimit: cfg.ReplicatedSizeLimit,
	}
	if scfg.RestartedAfterStop, err = takeStoppedMarker(cfg.DataDir); err != nil {
		return nil, err
	}
	if cfg.SessionsTuning != nil {
		cfg.SessionsTuning(&scfg)
	}
	n.sessionsHook = hooks.NewSessions(n.mqtt, n.clusterHook, scfg)
	n.sys = hooks.NewSys(n.mqtt, hooks.SysConfig{Interval: cfg.SysInterval, Version: cfg.Version,
		Cluster: n.sysCluster, Log: log.With("component", "sys")})
	n.sessionsHook.SetBase(drainCtx)
	n.pipeline = hooks.NewPipeline(n.sessionsHook)
	n.retainedHook.SetPipeline(n.pipeline)
	n.sessionsHook.SetRetained(n.retainedHook)
	// Order matters: auth decides first; storage and the cluster see only
	// accepted traffic.
	for _, h := range []mqtt.Hook{
		n.auth,
		hooks.NewMetricsHook(metrics, log.With("component", "mqtt")),
		n.sys,
		hooks.NewLimits(n.mqtt, cfg.MaxKeepalive, cfg.MaxPacketSize, log.With("component", "mqtt")),
		&hooks.Acks{},
		hooks.NewQueueOrder(n.mqtt),
		// After auth (a refused publish must not be written), before
		// every hook that writes a publish to the log.
		n.pipeline,
		n.retainedHook,
		n.sessionsHook, // before the cluster hook: it may refuse filters in OnSubscribed
		n.ownershipHook,
		n.clusterHook,
		hooks.NewRetainPacer(cfg.liveQueue()),
	} {
		if err := n.mqtt.AddHook(h, nil); err != nil {
			return nil, fmt.Errorf("add hook %s: %w", h.ID(), err)
		}
	}
	// Sessions, subscriptions, queued messages and retained messages are
	// kept by the raft log (hooks.Sessions, hooks.Retained), so there is no
	// per-node store: cfg.Persistence is always in effect.
	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}

	if err := n.bindListeners(metrics); err != nil {
		return nil, err
	}
	if err := n.newCluster(); err != nil {
		return nil, err
	}
	n.httpLn, err = net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		return nil, fmt.Errorf("--http-addr %s: %w", cfg.HTTPAddr, err)
	}
	n.httpSv = &http.Server{Handler: n.routes(), ReadHeaderTimeout: 10 * time.Second}
	n.addReadiness("cluster", func() error {
		if st := n.cluster.Status().State; st != cluster.StateRunning {
			return fmt.Errorf("cluster membership is %s", st)
		}
		return nil
	})
	return n, nil
}

func (n *Node) bindListeners(metrics *hooks.Metrics) error {
	guard := hooks.ConnGuard{
		ConnectTimeout: n.cfg.ConnectTimeout,
		WriteStall:     n.cfg.WriteTimeout,
		MaxPacketSize:  n.cfg.MaxPacketSize,
		Metrics:        metrics,
		Log:            slog.New(logx.RateLimit(logx.Rewrite(n.log.Handler(), packetSummary), 10*time.Second)).With("component", "listener"),
		Ended:          n.clusterHook.ConnectionEnded,
	}
	add := func(id, addr string, ws bool, tcfg *tls.Config) error {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("listener %s on %s: %w", id, addr, err)
		}
		if tcfg != nil {
			ln = tls.NewListener(ln, tcfg)
		}
		l := hooks.NewListener(id, ln, ws, guard)
		n.listeners = append(n.listeners, l)
		return n.mqtt.AddListener(l)
	}
	if n.cfg.MQTTAddr != "" {
		if err := add("mqtt", n.cfg.MQTTAddr, false, nil); err != nil {
			return err
		}
	}
	if n.cfg.WSAddr != "" {
		if err := add("ws", n.cfg.WSAddr, true, nil); err != nil {
			return err
		}
	}
	if n.cfg.TLSAddr != "" {
		var err error
		n.tls, err = newCertReloader(n.cfg.TLSCert, n.cfg.TLSKey, n.cfg.TLSClientCA, "--tls-cert", "--tls-key", "--tls-client-ca")
		if err != nil {
			return err
		}
		if err := add("tls", n.cfg.TLSAddr, false, n.tls.config()); err != nil {
			return err
		}
	}
	return nil
}

// Start serves MQTT and HTTP; it returns once every listener is accepting.
func (n *Node) Start(ctx context.Context) error {
	if err := n.cluster.Start(ctx); err != nil {
		return fmt.Errorf("start cluster: %w", err)
	}
	if err := n.startReplication(ctx); err != nil {
		return err
	}
	if err := n.mqtt.Serve(); err != nil {
		return fmt.Errorf("start mqtt: %w", err)
	}
	go func() {
		if err := n.httpSv.Serve(n.httpLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			n.log.Error("http server stopped", "error", err)
		}
	}()
	sysCtx, sysStop := context.WithCancel(context.Background())
	go func() {
		<-n.stopped
		sysStop()
	}()
	go n.sys.Run(sysCtx)
	n.ready.Store(true)
	n.log.Info("broker node started", "mqtt", n.Addr("mqtt"), "ws", n.Addr("ws"), "tls", n.Addr("tls"),
		"http", n.httpLn.Addr().String())
	return nil
}

// Addr returns the bound address of a listener ("mqtt", "ws", "tls",
// "http"), or "" when that listener is off.
func (n *Node) Addr(id string) string {
	if id == "http" && n.httpLn != nil {
		return n.httpLn.Addr().String()
	}
	for _, l := range n.listeners {
		if l.ID() == id {
			return l.Address()
		}
	}
	return ""
}

// Reload re-reads what an operator may change without a restart: the
// password and ACL files and the TLS certificate. Connections stay up; on
// error the previous rules stay in force.
func (n *Node) Reload() error {
	var errs []error
	if err := n.auth.Reload(); err != nil {
		errs = append(errs, fmt.Errorf("auth: %w", err))
	}
	if n.tls != nil {
		if err := n.tls.reload(); err != nil {
			errs = append(errs, fmt.Errorf("tls: %w", err))
		}
	}
	if n.clusterTLS != nil {
		if err := n.clusterTLS.reload(); err != nil {
			errs = append(errs, fmt.Errorf("cluster tls: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Shutdown stops the node gracefully: readiness turns false, listeners stop
// accepting, clients are disconnected (MQTT 5: reason 0x8B), and pending
// writes are flushed. It gives up when ctx ends. It is idempotent.
func (n *Node) Shutdown(ctx context.Context) error {
	n.closeOnce.Do(func() {
		n.ready.Store(false)
		n.log.Info("shutting down")
		// Clean sessions' wills stay in the log for the leave grace.
		n.sessionsHook.PrepareStop()
		done := make(chan struct{})
		go func() {
			n.disconnectClients(ctx)
			// After the lame duck (clients still connected meanwhile
			// publish as usual): a client blocked in a replicated write
			// (no quorum right now) gets its failure at once instead of
			// holding the drain up.
			n.drain()
			_ = n.mqtt.Close()
			n.mqtt.Listeners.ClientsWg.Wait()
			close(done)
		}()
		select {
		case <-done:
		case <-ctx.Done():
			n.closeErr = fmt.Errorf("clients still draining: %w", ctx.Err())
		}
		// Acknowledgements of delivered messages are still queued for the
		// log: propose them before raft stops (fewer redeliveries). Not
		// for long: without a leader they cannot commit anyway.
		fctx, fcancel := context.WithTimeout(ctx, 2*time.Second)
		n.sessionsHook.Flush(fctx)
		fcancel()
		if n.repl != nil && n.repl.HasState() {
			// Whichever node leads later learns from the log that this
			// one left on purpose (a scale-down removes it if it stays
			// away; a restart clears the record).
			dctx, dcancel := context.WithTimeout(ctx, time.Second)
			if err := n.repl.RecordDeparture(dctx); err != nil {
				n.log.Warn("leave not recorded in the log; only members that saw it know", "error", err)
			}
			dcancel()
		}
		close(n.stopped)
		if n.repl != nil {
			if err := n.repl.Close(); err != nil {
				n.log.Warn("raft close", "error", err)
			}
		}
		if err := writeStoppedMarker(n.cfg.DataDir); err != nil {
			n.log.Warn("graceful stop not recorded; the next start closes this run's sessions at once", "error", err)
		}
		// Leave after the clients are gone: what they published before the
		// listeners closed has been handed to the forward queues.
		if err := n.cluster.Close(); err != nil {
			n.log.Warn("cluster leave", "error", err)
		}
		hctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = n.httpSv.Shutdown(hctx)
	})
	return n.closeErr
}

// lameDuckStep is the gap between two disconnects of a graceful stop.
const lameDuckStep = 10 * time.Millisecond

// disconnectClients stops accepting, then ends every connection: MQTT 5
// clients get DISCONNECT 0x8B (server shutting down); MQTT 3.1.1 has no
// server DISCONNECT, so those connections are just closed (mochi would
// send one regardless of the version).
func (n *Node) disconnectClients(ctx context.Context) {
	for _, l := range n.listeners {
		l.StopAccepting()
	}
	var clients []*mqtt.Client
	for _, cl := range n.mqtt.Clients.GetAll() {
		if cl.Net.Conn != nil && !cl.Closed() {
			clients = append(clients, cl)
		}
	}
	// Lame duck (NATS's name): spread the disconnects, lameDuckStep
	// apart, over at most LameDuck, so that a thousand devices reconnect
	// to the other nodes over seconds, not in one burst. Readiness is
	// already off: the Service sends no new clients here meanwhile.
	// At most half the stop's time: the rest is for the drain, the
	// acknowledgements' flush, the leadership transfer and the leave.
	spread := n.cfg.LameDuck
	if n.cfg.ShutdownTimeout > 0 {
		spread = min(spread, n.cfg.ShutdownTimeout/2)
	}
	var step time.Duration
	if len(clients) > 1 && spread > 0 {
		step = min(lameDuckStep, spread/time.Duration(len(clients)))
	}
	for i, cl := range clients {
		if step > 0 && i > 0 && ctx.Err() == nil {
			select {
			case <-time.After(step):
			case <-ctx.Done(): // out of time: the rest at once
			}
		}
		if cl.Closed() {
			continue
		}
		n.sessionsHook.TellStop(cl) // before the 0x8B: its EOF is the stop's
		if cl.Properties.ProtocolVersion == 5 {
			_ = n.mqtt.DisconnectClient(cl, packets.ErrServerShuttingDown)
		} else {
			cl.Stop(packets.ErrServerShuttingDown)
		}
	}
}

func (n *Node) closeListeners() {
	for _, l := range n.listeners {
		l.Close(func(string) {})
	}
	if n.httpLn != nil {
		_ = n.httpLn.Close()
	}
}

func (n *Node) addReadiness(name string, check func() error) {
	n.checks = append(n.checks, readinessCheck{name: name, check: check})
}

// Kill stops the node abruptly, as far as a process can to itself: the
// cluster leaves without telling peers and client connections drop without
// DISCONNECT. In-process tests use it to stand in for SIGKILL.
func (n *Node) Kill() {
	n.closeOnce.Do(func() {
		n.ready.Store(false)
		n.drain()
		close(n.stopped)
		if n.repl != nil {
			_ = n.repl.Close()
		}
		_ = n.cluster.Kill()
		for _, l := range n.listeners {
			l.Close(func(string) {})
		}
		for _, cl := range n.mqtt.Clients.GetAll() {
			cl.Stop(nil)
		}
		_ = n.mqtt.Close()
		_ = n.httpSv.Close()
	})
}
