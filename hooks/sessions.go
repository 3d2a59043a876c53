package hooks

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/internal/session"
	"github.com/mqtt-ha/broker/replication"
)

// Sessions keeps persistent sessions (MQTT 3.1.1 clean session 0, MQTT 5
// session expiry > 0) in the raft log instead of in mochi, so that they
// survive the loss of the node that held them (DESIGN.md guarantees 1, 3
// and 4; replication/DESIGN.md "Persistent sessions" for the state).
//
// The replicated queue is the only queue. mochi keeps no offline state for
// a persistent session: its subscriptions are taken out of mochi's topic
// index right after SUBACK and live in the log (and in idx, this node's
// mirror of every persistent session's subscriptions, used for matching).
//
//   - Publish: a QoS 1/2 PUBLISH first passes a read barrier (this node's
//     copy of the subscriptions then holds every SUBACK sent before it),
//     then, if it matches persistent sessions, is enqueued for all of them
//     in one Enqueue entry before mochi acknowledges it (OnPublish blocks
//     until commit; group commit batches concurrent publishers into one
//     entry). Without a leader it is refused.
//   - Delivery: the node holding a session's connection runs a pump that
//     reads the replicated queue in Seq order and sends at most a window
//     of messages (max_inflight_messages, and the client's Receive
//     Maximum) ahead of the acknowledgements. Packet ids are derived from
//     Seq, so a message resent by another node after a failover carries
//     the packet id the client saw, and a QoS 2 receiver discards it as a
//     duplicate. PUBACK/PUBCOMP become batched Ack entries, PUBREC a
//     QueueRelease. QoS 0 copies (QoS 0 publishes, QoS 0 subscriptions)
//     go to live sessions directly, as mochi would.
//   - Connect: SessionOpen (with the will) is committed before CONNACK,
//     whose session-present flag comes from the log. Any node can resume
//     any session; the previous owner sees the SessionOpen and drops its
//     connection (0x8E).
//   - Wills of persistent sessions live in the log. The raft leader
//     publishes each will once (PublishWill: the claim queues and retains
//     it in the log; then the live publish, wills.go) when its session
//     was closed without DISCONNECT, after the will delay, or when the node
//     that held the connection is declared dead (it closes those sessions
//     on the dead node's behalf first; a node that left gracefully gets a
//     leave grace instead, see wills.go). Clean sessions with a will are
//     mirrored too, so their will fires when their node dies; while the
//     node lives, mochi publishes it as before.
//
// Shared subscriptions of persistent sessions stay in mochi (not durable).
type Sessions struct {
	mqtt.HookBase
	server  *mqtt.Server
	cluster *Cluster
	cfg     SessionsConfig
	log     *slog.Logger
	loads   *loadBudget // large payloads the pumps hold (blobs.go)
	m       *sessionMetrics
	repl    *replication.Node
	stop    <-chan struct{}
	willCl  *mqtt.Client
	// base bounds every write a client waits for; cancelled when the node
	// starts shutting down, so no client hangs on to a quorum while its
	// connection should drain.
	base context.Context

	mu      sync.Mutex
	conns   map[*mqtt.Client]*sessConn // connections this hook tracks
	live    map[string]*sessConn       // client id -> the live persistent connection here
	mirrors map[string]*sessConn       // client id -> the clean session here whose will is mirrored
	closing map[string]*sessConn       // client id -> the persistent connection here whose close is being written
	// opening: client id -> At of the SessionOpen a CONNECT here is still
	// writing (retries included): a session it opened already is live.
	opening map[string]int64
	// openSeen: client id -> index at which this node applied the
	// SessionOpen of opening[id] (a try whose reply was lost committed).
	openSeen map[string]uint64
	// abandoned: the opens of CONNECTs refused here (session_open.go,
	// undoAbandoned), by the open's At, with when they were refused.
	abandoned       map[willlessKey]time.Time
	abandonedPruned time.Time
	// claims: the will claims this node wrote whose live copies it still
	// owes (wills.go, expectClaim).
	claims session.Claims

	// idx mirrors the subscriptions of every persistent session in the log
	// (by client id), for matching publishes. Written only by the raft
	// observer goroutine and by Resync, which builds a new index and swaps
	// it in, so a publish never matches against a half-rebuilt one.
	idx     atomic.Pointer[mqtt.TopicsIndex]
	idxMu   sync.Mutex
	idxSubs map[string]map[string]struct{}

	ops          chan sessOp
	pending      atomic.Int64
	writesFailed atomic.Uint64
	wake         chan struct{} // wakes the leader's will loop

	stale map[string]uint64 // maintenance: sessions seen stale once (id -> opened index)
	// staleOwed: owed wills seen stale once; willless: connections of
	// this node that ended owing no will (owedwills.go; under mu).
	staleOwed map[owedKey]bool
	willless  map[willlessKey]time.Time
	dead      map[string]time.Time
	// ownerDead: node -> when the leader first saw it not alive while it
	// still owned client ids (releaseDeadOwners).
	ownerDead map[string]time.Time
	dropLog   atomic.Int64 // unix ns of the last queue-drop log line
	// openClock gives each SessionOpen of this node a later At, so that
	// the log tells a retry of the same open (equal owner and At) from a
	// new connection.
	openClock session.OpenClock

	stopping stopState // graceful stops and restarts (wills.go)

	pipeline *Pipeline // nil: durable publishes wait inside OnPublish
	retained *Retained // SetRetained; nil: none
}

// SetRetained tells the hook the retained hook, whose writes of a client
// its will waits for (afterClientWrites); call it before the server
// serves.
func (h *Sessions) SetRetained(r *Retained) { h.retained = r }

// afterClientWrites runs fn once cl's last publishes went through the
// hooks (its pipe) and their retained writes are written (its lane): a
// will that the log publishes after a close written by fn then comes
// after the client's own retained writes, as on Mosquitto, where a
// client's "online" never lands after its will's "offline"
// (TestWillAfterClientsLastRetainedWrites).
func (h *Sessions) afterClientWrites(cl *mqtt.Client, id string, fn func()) {
	then := fn
	if h.retained != nil {
		then = func() { h.retained.AfterWrites(id, fn) }
	}
	if h.pipeline == nil {
		then()
		return
	}
	h.pipeline.AfterPublishes(cl, then)
}

// hasWill reports whether cl has a will the log holds (a persistent
// session's, a clean session's mirrored will), which a takeover may
// publish in its own entry. A will only mochi holds is published by mochi,
// after the connection's pipe (replicateWill); mochi's will of another
// client is not read here: mochi clears it without synchronisation on
// DISCONNECT (a data race in CI).
func (h *Sessions) hasWill(cl *mqtt.Client) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	c := h.conns[cl]
	return c != nil && (c.will || c.mirror)
}

// awaitQueuedWrites waits until the publishes cl had queued when it was
// called went through the hooks (its pipe: AfterQueued, not waiting for
// what a live connection queues later) and the client's retained writes
// queued by then are written, or until deadline; it reports whether they
// were.
func (h *Sessions) awaitQueuedWrites(cl *mqtt.Client, id string, deadline time.Time) bool {
	done := make(chan struct{})
	then := func() { close(done) }
	if h.retained != nil {
		then = func() { h.retained.AfterWrites(id, func() { close(done) }) }
	}
	if h.pipeline != nil {
		h.pipeline.AfterQueued(cl, then)
	} else {
		then()
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	return waitOrStop(done, t.C, h.base.Done())
}

// SessionsConfig configures the Sessions hook.
type SessionsConfig struct {
	Self string // this node's id
	// MaxQueued caps each session's queue (max_queued_messages), 0 none;
	// the newest message is dropped when it is full, as Mosquitto does.
	MaxQueued int
	// MaxInflight caps the messages sent to one client and not yet
	// acknowledged (max_inflight_messages); 0: the client's Receive Maximum.
	MaxInflight int
	// Timeout bounds a write the client waits for (CONNACK, PUBACK);
	// large payloads get more (durableTimeout).
	Timeout time.Duration
	// DurableLimit is the largest payload queued for persistent sessions
	// (--replicated-size-limit; 0: any MQTT payload). Payloads over
	// replication.BlobThreshold are written as blobs (blobs.go).
	DurableLimit int
	// Alive reports whether a node is a live cluster member. A session
	// whose owner has not been alive for DeadAfter is closed on its behalf
	// (LeaveGrace if Left reports the owner left gracefully).
	Alive     func(node string) bool
	Left      func(node string) bool
	DeadAfter time.Duration
	// LeaveGrace: how long the sessions of a node that left gracefully
	// stay open for their clients to come back before they are closed on
	// its behalf (wills.go); default 30 s.
	LeaveGrace time.Duration
	// RestartedAfterStop: this node's previous run stopped gracefully; the
	// sessions it still owns from that run get LeaveGrace too.
	RestartedAfterStop bool
	// AfterWillClaim, if set, runs between claiming a will and publishing
	// it live; false skips the live publication (tests stand in for a
	// leader that dies right after the claim with it).
	AfterWillClaim func(clientID string) bool
	// HoldWillClaims, if set and true for a client id, keeps the leader
	// from claiming its due will (tests stand in for a slow leader).
	HoldWillClaims func(clientID string) bool
	// CleanBarrierErr, if set and non-nil for a client id, is the result
	// of the read barrier a clean CONNECT of that id passes before it
	// discards the session, in place of the real one (tests stand in for
	// a leader that did not answer).
	CleanBarrierErr func(clientID string) error
	// AfterMaintain, if set, runs after each maintenance round (tests
	// wait for rounds instead of sleeping).
	AfterMaintain func()
	// AfterOpenWrite, if set, gets the error of each SessionOpen write of
	// a CONNECT and returns the one to act on (tests stand in for a
	// leader that died after committing it: ErrUnknownOutcome).
	AfterOpenWrite func(clientID string, err error) error
	// BeforeOpenWrite, if set, sees each SessionOpen write of a CONNECT
	// before it is proposed; an error skips the write and stands for its
	// result (tests keep the command to commit it late, as a forwarded
	// proposal can).
	BeforeOpenWrite func(clientID string, cmd replication.Command) error
	// AfterLiveRemoved, if set, runs in OnDisconnect right after the
	// connection stopped being the client id's live one (tests).
	AfterLiveRemoved func(clientID string)
	// ACL is the read check mochi applies to a SUBSCRIBE's filters
	// (hooks.Auth.OnACLCheck); nil allows every filter. A persistent
	// session's filters never reach mochi (session_subscribe.go), so the
	// hook applies it itself.
	ACL     func(cl *mqtt.Client, topic string, write bool) bool
	Log     *slog.Logger
	Metrics *Metrics
}

// sessConn is one client connection the hook tracks.
type sessConn struct {
	cl      *mqtt.Client
	id      string
	managed bool // persistent session in the log
	mirror  bool // clean session whose will is mirrored in the log
	refused bool // the log could not open the session: CONNACK refuses it
	// closedByLeader: the leader closed this mirror on the node's behalf
	// and owns its will now; the connection must not delete it.
	closedByLeader atomic.Bool
	// willTaken: a new connection of this id took this one over and
	// published its will in the log (TakeoverWill); it must not be
	// published here again.
	willTaken atomic.Bool
	present   bool
	opened    atomic.Uint64 // OpenedIndex of this connection's SessionOpen
	openAt    int64         // At of its SessionOpen (0: none written)
	expiry    uint32
	will      bool // the CONNECT had a will (held by the log, not mochi)
	// closeDone is closed once the connection's close is written to the
	// log (or nothing is to be written): see awaitPreviousClose.
	closeDone chan struct{}
	closeOnce sync.Once
	// closeIndex is the log index of that close (0: none written), set
	// before closeDone is closed.
	closeIndex atomic.Uint64

	pump *pump
	// unsuback: the reason codes of the UNSUBACK being sent (OnUnsubscribed
	// to OnPacketEncode, on the client's goroutine).
	unsuback []byte
	// unmirrored: the mirror's commands, when they could not be written at
	// CONNECT (PrepareStop writes them before a graceful stop).
	unmirrored replication.Command
	// mirrorWill: a mirrored clean session's will, published here if the
	// log cannot take the mirror's close (session_mirror.go).
	mirrorWill atomic.Pointer[replication.Will]
	// suback: the SUBACK being sent (OnSubscribe to OnPacketEncode, on the
	// client's goroutine).
	suback *session.Suback
}

// sessOp is an asynchronous write; cmd is evaluated when the writer builds
// its batch (so it can read results of earlier ops), nil skips it.
type sessOp struct {
	cmd  func() replication.Command
	done func(replication.Result, error)
}

// NewSessions returns the hook. SetReplication must be called before the
// server serves.
func NewSessions(s *mqtt.Server, c *Cluster, cfg SessionsConfig) *Sessions {
	if cfg.DeadAfter == 0 {
		cfg.DeadAfter = 3 * time.Second
	}
	sm := newSessionMetrics() // unregistered, when the caller keeps no metrics
	if cfg.Metrics != nil {
		sm = cfg.Metrics.sessions
	}
	h := &Sessions{server: s, cluster: c, cfg: cfg, log: cfg.Log.With("component", "sessions"),
		m: sm, loads: newLoadBudget(blobLoadBudget),
		conns: map[*mqtt.Client]*sessConn{}, live: map[string]*sessConn{}, mirrors: map[string]*sessConn{},
		closing: map[string]*sessConn{}, opening: map[string]int64{}, openSeen: map[string]uint64{}, abandoned: map[willlessKey]time.Time{}, willless: map[willlessKey]time.Time{}, idxSubs: map[string]map[string]struct{}{},
		ops: make(chan sessOp, 1<<16), wake: make(chan struct{}, 1),
		stale: map[string]uint64{}, dead: map[string]time.Time{}, ownerDead: map[string]time.Time{}}
	h.idx.Store(mqtt.NewTopicsIndex())
	h.base = context.Background()
	h.initStop()
	h.willCl = s.NewClient(nil, "cluster", willClientID, true)
	h.willCl.Properties.ProtocolVersion = 5
	return h
}

// willClientID publishes the wills of sessions whose node is gone. Like
// the injectors' ids it cannot collide with a real client (U+0000).
const willClientID = "\x00wills"

// SetBase sets the context client-facing writes derive from (see base);
// call it before the server serves.
func (h *Sessions) SetBase(ctx context.Context) { h.base = ctx }

// SetReplication attaches the raft node and starts the background loops.
func (h *Sessions) SetReplication(r *replication.Node, stop <-chan struct{}) {
	h.repl, h.stop = r, stop
	go h.writer()
	go h.maintain()
}

// ID implements mqtt.Hook.
func (h *Sessions) ID() string { return "replicated-sessions" }

// Provides implements mqtt.Hook.
func (h *Sessions) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnect, mqtt.OnSessionEstablish, mqtt.OnSessionEstablished, mqtt.OnDisconnect,
		mqtt.OnSubscribe, mqtt.OnUnsubscribed, mqtt.OnPublish, mqtt.OnPublished, mqtt.OnWillSent,
		mqtt.OnPacketRead, mqtt.OnPacketEncode:
		return true
	}
	return false
}

// persistent reports whether a CONNECT asks for a session that outlives
// the connection.
func persistent(cl *mqtt.Client, pk packets.Packet) bool {
	return session.Persistent(cl.Properties.ProtocolVersion, cl.Properties.Props.SessionExpiryInterval, pk.Connect.Clean)
}

// expiryOf is the session expiry to store: the client's (MQTT 5) or the
// server's maximum (3.1.1), capped by the server's maximum.
func (h *Sessions) expiryOf(cl *mqtt.Client) uint32 {
	return session.ExpiryOf(cl.Properties.ProtocolVersion, cl.Properties.Props.SessionExpiryInterval,
		h.server.Options.Capabilities.MaximumSessionExpiryInterval)
}

func (h *Sessions) conn(cl *mqtt.Client) *sessConn {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.conns[cl]
}

// OnConnect refuses a persistent session while the log has no leader: it
// could neither be resumed nor stored (guarantee 5: fail fast with a clear
// reason rather than hang). Clean sessions are served.
func (h *Sessions) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	if !persistent(cl, pk) || h.repl.HasLeader() {
		return nil
	}
	h.log.Info("persistent session refused: no raft leader", "client", cl.ID)
	code := packets.ErrServerUnavailable
	_ = h.server.SendConnack(cl, code, false, nil)
	return code
}

// OnSessionEstablish opens the session in the log before CONNACK.
func (h *Sessions) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline {
		return
	}
	// When this CONNECT arrived: a connection elsewhere that claimed the
	// client id since is newer (applyOpen).
	arrival := time.Now().UnixMilli()
	if old, ok := h.server.Clients.Get(cl.ID); ok && old != cl && !old.Closed() && !old.Net.Inline && h.hasWill(old) {
		// A takeover here, of a connection with a will. A will the
		// takeover publishes in this CONNECT's entry (TakeoverWill) comes
		// after what the old connection sent before the CONNECT arrived,
		// which its pipe may still hold, as on Mosquitto. Waited for
		// before the open's own time budget starts: inside it, a backlog
		// made the open, or the discard of a clean start, fail (found by
		// review). Past the write timeout the will goes out anyway: better
		// out of order than lost. Without a will there is nothing to
		// order here (the new connection's publishes wait for the old
		// ones: pipeline_takeover.go), and CONNACK does not wait.
		//
		// The old reader may still be reading what the client sent before
		// this CONNECT (held back by a full pipe, or just slow): once it
		// waits for input, wait for what it queued meanwhile too (CI
		// failed twice, the will landing before the "online" read late:
		// TestCleanTakeoverWithBacklog/persistent/late).
		deadline := time.Now().Add(h.cfg.Timeout)
		if h.awaitQueuedWrites(old, cl.ID, deadline) && h.awaitReaderIdle(old, deadline) {
			h.awaitQueuedWrites(old, cl.ID, deadline)
		}
	}
	if !pk.Connect.Clean {
		h.awaitDisconnectInFlight(cl.ID) // session_lifecycle.go
	}
	c := &sessConn{cl: cl, id: cl.ID, closeDone: make(chan struct{})}
	hasWill := atomic.LoadUint32(&cl.Properties.Will.Flag) == 1
	if !persistent(cl, pk) && !h.resumesWithoutExpiry(cl, pk) {
		if !pk.Connect.Clean {
			h.awaitMochiSessionEnd(cl.ID)
		}
		if !hasWill {
			if pk.Connect.Clean && !h.discardSession(cl.ID) { // session_lifecycle.go
				h.refuseAside(c)
				return
			}
			h.endMirrorOf(cl.ID)
			return
		}
		// A clean session's will is mirrored in the log (session_mirror.go);
		// the mirror's SessionOpen has clean start and discards any older
		// session too.
		if !h.openMirror(c, cl, pk, arrival) {
			if pk.Connect.Clean && !h.discardSession(cl.ID) {
				h.refuseAside(c)
				return
			}
			// Tracked anyway: a graceful stop writes the mirror then.
			h.track(c)
			return
		}
		c.mirror = true
		h.track(c)
		h.mu.Lock()
		h.mirrors[c.id] = c
		h.mu.Unlock()
		return
	}
	c.managed, c.expiry, c.will = true, h.expiryOf(cl), hasWill
	// A connection of this id still live here is being taken over by
	// mochi (inheritClientSession): stop its pump; the new one resends
	// what was in flight from the log.
	h.mu.Lock()
	old := h.live[cl.ID]
	h.mu.Unlock()
	if old != nil {
		old.pump.stop()
	}
	h.awaitPreviousClose(cl.ID, old) // session_lifecycle.go
	ctx, cancel := context.WithTimeout(h.base, h.cfg.Timeout)
	defer cancel()
	openAt := h.nextOpenAt(time.Now().UnixMilli())
	c.openAt = openAt
	defer h.markOpening(cl.ID, openAt)()
	open, at, tw, res, err := h.applyOpen(ctx, cl, pk, c.expiry, openAt, arrival, nil)
	// A retry is fenced to what the first try read: the first try may
	// have committed and a newer CONNECT deleted its session since (the
	// client gave up on this one), and a retry fenced to "no session"
	// would bring it back (clean-start-session-present).
	var read *openFence
	if session.OpenOf(open) != nil {
		f := fenceOf(open)
		read = &f
	}
	retried := false
	for err != nil && ctx.Err() == nil && !errors.Is(err, replication.ErrInvalidCommand) && !errors.Is(err, replication.ErrTooLarge) &&
		!errors.Is(err, replication.ErrReopened) {
		retried = true
		// Outcome unknown (the leader died while committing) or no
		// leader yet: opening again is safe (the same session resumes,
		// or the same clean start happens again: same At).
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
		// An earlier try that committed after all, whose session is gone
		// or taken since: only a newer CONNECT does that (a clean start's
		// discard, a resume elsewhere), and it wins. Writing again would
		// bring the session back, and when the first try read no session
		// no fence can tell (clean-start-session-present).
		if why := h.openOvertaken(cl.ID); why != "" {
			err = fmt.Errorf("%w: %s", replication.ErrReopened, why)
			break
		}
		open, at, tw, res, err = h.applyOpen(ctx, cl, pk, c.expiry, openAt, arrival, read)
		if read == nil && session.OpenOf(open) != nil {
			f := fenceOf(open)
			read = &f
		}
		if r0 := openResult(res, at); err == nil && !r0.Present {
			// The earlier try may have committed before the newer CONNECT
			// and this node applied it only now, with this retry: the
			// retry created the session again (a retry that resumed one
			// found a newer connection's session and is left alone).
			// Undo it (conditional on the retry's open) and refuse.
			if why := h.openOvertaken(cl.ID); why != "" {
				if s, ok := h.repl.SessionHead(cl.ID); ok && s.Owner == h.cfg.Self && s.OpenedAt == openAt {
					h.submit(sessOp{cmd: func() replication.Command {
						return &replication.SessionDelete{ClientID: s.ClientID, IfOpened: s.OpenedIndex}
					}})
				}
				err = fmt.Errorf("%w: %s", replication.ErrReopened, why)
			}
		}
	}
	if err != nil {
		// mochi cannot refuse the CONNECT from here: OnPacketEncode turns
		// its CONNACK into a refusal and OnSessionEstablished closes the
		// connection. Serving it without the log would answer session
		// present 0 to a client whose session exists.
		h.log.Warn("persistent session could not be opened in the log; connection refused", "client", cl.ID, "error", err)
		h.abandonOpen(cl.ID, openAt)
		h.m.openFailed.Inc()
		c.refused = true
		h.track(c)
		return
	}
	// The pump reads this node's copy of the log: it must include
	// everything committed before this connection (acks and QoS 2 steps
	// recorded by the session's previous node), or it would resend what
	// the client already completed.
	opened := res.Index
	if err := h.repl.WaitAppliedLocal(ctx, res.Index); err != nil {
		if retried {
			// An earlier try may have committed first and be the session's
			// open (its index, not res.Index, fences this connection's
			// commands), and the state that would tell is not here yet:
			// refuse rather than run with a fence that may be wrong (its
			// closes and QoS 2 publishes would be ignored as stale).
			h.log.Warn("retried session open not applied here in time; connection refused", "client", cl.ID, "error", err)
			h.abandonOpen(cl.ID, openAt)
			h.m.openFailed.Inc()
			c.refused = true
			h.track(c)
			return
		}
		h.log.Warn("session state not applied here in time; resending from an older state", "client", cl.ID, "error", err)
	} else if s, ok := h.repl.SessionHead(cl.ID); ok && s.Owner == h.cfg.Self && s.OpenedAt == session.OpenAtOf(open) {
		// When a retried open committed twice, the session keeps the
		// index of whichever try committed first: that is the fence.
		opened = s.OpenedIndex
	}
	r0 := openResult(res, at)
	tw.published(h, res, err)
	c.present = r0.Present
	c.opened.Store(opened)
	if hasWill {
		// The log holds the will now; mochi must not publish it too.
		atomic.StoreUint32(&cl.Properties.Will.Flag, 0)
	}
	h.track(c)
}

// refusedSeq makes the ids refuseAside gives unique.
var refusedSeq atomic.Uint64

// refuseAside refuses a clean CONNECT (CONNACK 0x88 / 3.1.1 server
// unavailable, OnPacketEncode) without touching the client's live
// connection: mochi takes over whatever connection of cl.ID it holds right
// after this hook, whatever the CONNACK will say, so the refused client
// gets a private id first. Only the clean paths use it: a persistent
// CONNECT has already stopped the old connection's delivery by then.
func (h *Sessions) refuseAside(c *sessConn) {
	c.refused = true
	c.cl.ID = fmt.Sprintf("%s\x00refused-%d", c.id, refusedSeq.Add(1))
	h.track(c)
}

func (h *Sessions) track(c *sessConn) {
	h.mu.Lock()
	h.conns[c.cl] = c
	h.mu.Unlock()
}

// setWill is the SetWill of the CONNECT's will.
func (h *Sessions) setWill(cl *mqtt.Client) replication.Command {
	w := cl.Properties.Will
	will := replication.Will{Topic: w.TopicName, Payload: w.Payload, QoS: w.Qos, Retain: w.Retain,
		DelaySeconds: w.WillDelayInterval}
	for _, u := range w.User {
		will.Properties.UserProperties = append(will.Properties.UserProperties, replication.UserProperty{Key: u.Key, Value: u.Val})
	}
	return &replication.SetWill{ClientID: cl.ID, Will: will}
}

// OnPacketEncode sets CONNACK's session-present flag from the log (mochi
// only knows sessions it holds itself), and fixes the reason codes of
// UNSUBACK for filters that lived in the log rather than in mochi.
func (h *Sessions) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type == packets.Suback {
		if c := h.conn(cl); c != nil && c.managed && c.suback != nil {
			pk.ReasonCodes, c.suback = c.suback.Merge(pk.ReasonCodes), nil
		}
		return pk
	}
	if pk.FixedHeader.Type == packets.Unsuback {
		if c := h.conn(cl); c != nil && c.managed && len(c.unsuback) == len(pk.ReasonCodes) {
			pk.ReasonCodes, c.unsuback = c.unsuback, nil
		}
		return pk
	}
	if pk.FixedHeader.Type != packets.Connack || pk.ReasonCode >= 0x80 {
		return pk
	}
	c := h.conn(cl)
	switch {
	case c == nil:
	case c.refused:
		pk.SessionPresent = false
		pk.ReasonCode = packets.ErrServerUnavailable.Code
		if cl.Properties.ProtocolVersion < 5 {
			pk.ReasonCode = packets.Err3ServerUnavailable.Code
		}
		pk.Properties.ReasonString = "session could not be stored in the cluster's log; try again"
	case !c.managed:
	default:
		pk.SessionPresent = c.present
	}
	return pk
}

// OnSessionEstablished starts delivering the session's queue (CONNACK has
// been sent) and routes its subscriptions to this node.
func (h *Sessions) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	c := h.conn(cl)
	if c == nil {
		return
	}
	if c.refused {
		// CONNACK said so. A refused CONNECT has no session and no will.
		atomic.StoreUint32(&cl.Properties.Will.Flag, 0)
		cl.Stop(packets.ErrServerUnavailable)
		return
	}
	if !c.managed {
		return
	}
	c.pump = newPump(h, c)
	h.mu.Lock()
	old := h.live[c.id]
	h.live[c.id] = c
	h.mu.Unlock()
	if old != nil && old != c {
		old.pump.stop()
	}
	if s, ok := h.repl.SessionHead(c.id); ok {
		for f := range s.Subscriptions {
			h.cluster.addRoute(c.id, f)
		}
	}
	go c.pump.run()
}

// OnUnsubscribed removes filters from the log (only an UNSUBSCRIBE: mochi's
// whole-client cleanup never sees the log's filters). mochi calls it before
// it writes UNSUBACK, whose reason codes it computed from its own index,
// where a persistent session's filters never are (0x11 for all):
// OnPacketEncode replaces them with what the log says (0x00 removed, 0x11
// not subscribed, 0x80 when the write failed and the filter stays).
func (h *Sessions) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	c := h.conn(cl)
	if c == nil || !c.managed || pk.FixedHeader.Type != packets.Unsubscribe {
		return
	}
	var filters []string
	for _, f := range pk.Filters {
		filters = append(filters, f.Filter)
	}
	if len(filters) == 0 {
		return
	}
	codes := make([]byte, len(filters))
	s, _ := h.repl.SessionHead(c.id)
	for i, f := range filters {
		if _, ok := s.Subscriptions[f]; !ok {
			codes[i] = packets.CodeNoSubscriptionExisted.Code
		}
	}
	c.unsuback = codes
	ctx, cancel := context.WithTimeout(h.base, h.cfg.Timeout)
	defer cancel()
	if _, err := h.repl.Apply(ctx, &replication.Unsubscribe{ClientID: c.id, Filters: filters}); err != nil {
		h.log.Warn("unsubscribe not replicated; refused", "client", c.id, "error", err)
		for i := range codes {
			codes[i] = packets.ErrUnspecifiedError.Code
		}
		return
	}
	for _, f := range filters {
		h.cluster.removeRoute(c.id, f)
	}
}

// OnDisconnect closes the session in the log. A connection taken over, or
// dropped because this node shuts down, leaves the session as it is: the
// client continues elsewhere (and a node that restarts closes what nobody
// resumed, see maintain). Without DISCONNECT the will stays in the log for
// the leader to publish; with one it is cleared.
func (h *Sessions) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	h.mu.Lock()
	c := h.conns[cl]
	delete(h.conns, cl)
	if c != nil && h.live[c.id] == c {
		delete(h.live, c.id)
	}
	if c != nil && h.mirrors[c.id] == c {
		delete(h.mirrors, c.id)
	}
	isMirror := c != nil && c.mirror // written under mu by PrepareStop too
	if c != nil && c.managed && !c.refused && !isMirror {
		// Closing from the moment it is no longer live: a clean CONNECT
		// of the same id here in between found neither, did not wait for
		// this close, and deleted the session with the will it makes due
		// (CI: TestDropThenCleanConnectSameNodeKeepsTheWill lost 1 of 20;
		// TestCleanConnectWaitsForCloseOfDroppedConnection).
		h.closing[c.id] = c
	}
	h.mu.Unlock()
	if c == nil {
		return
	}
	if h.cfg.AfterLiveRemoved != nil {
		h.cfg.AfterLiveRemoved(c.id)
	}
	if c.refused {
		// Refused after a try of its open may have committed: that
		// connection never owed a will (closeStale, closeStaleOwed).
		h.noWillOwed(c)
		if cur, ok := h.server.Clients.Get(cl.ID); ok && cur == cl {
			h.server.Clients.Delete(cl.ID) // cl.ID: see refuseAside
		}
		return
	}
	cause := cl.StopCause()
	if err == nil || h.stoppingNow(cl) {
		h.noWillOwed(c) // DISCONNECT, or told to go
	}
	handedOver := errors.Is(cause, packets.ErrSessionTakenOver) || h.stoppingNow(cl) ||
		errors.Is(cause, packets.ErrAdministrativeAction)
	if isMirror {
		// A connection taken over was replaced in the log already; one
		// closed by the leader on this node's behalf has its will claimed
		// by the leader; a graceful stop leaves it for the leave grace,
		// also a mirror opened after PrepareStop listed them (its close,
		// written here, let the leader, or since endingWill a clean
		// CONNECT elsewhere, publish the will of a client that came back
		// within the grace: chaos seed 20261208, will-on-graceful-stop).
		if c.closedByLeader.Load() || h.stoppingNow(cl) || errors.Is(cause, packets.ErrSessionTakenOver) {
			h.settleOwed(c, cl)
			return
		}
		if err == nil {
			h.endMirror(c, err) // session_mirror.go
			return
		}
		// The will is due: its close after the client's retained writes.
		h.afterClientWrites(cl, c.id, func() { h.endMirror(c, err) })
		return
	}
	if !c.managed {
		return // a clean session whose will mochi keeps (not mirrored)
	}
	if c.pump != nil {
		c.pump.stop()
	}
	// Routes are keyed by client id: a connection taken over on this node
	// must leave them to the connection that replaced it.
	if s, ok := h.repl.SessionHead(c.id); ok && !h.hasOtherConn(c) {
		for f := range s.Subscriptions {
			h.cluster.removeRoute(c.id, f)
		}
	}
	// mochi keeps a persistent client in Clients while offline; the log
	// holds this session, so mochi must not (it would queue for it).
	if cur, ok := h.server.Clients.Get(c.id); ok && cur == cl {
		h.server.Clients.Delete(c.id)
	}
	if handedOver {
		h.settleOwed(c, cl)
		h.closeWritten(c)
		return
	}
	cmd := h.closeCommands(cl, c, err) // session_lifecycle.go
	h.mu.Lock()
	h.closing[c.id] = c
	h.mu.Unlock()
	submit := func() {
		h.submit(sessOp{cmd: func() replication.Command { return cmd },
			done: func(res replication.Result, err error) {
				if err == nil {
					c.closeIndex.Store(res.Index)
				}
				h.closeWritten(c)
			}})
	}
	if err == nil {
		submit() // DISCONNECT: no will
		return
	}
	// A will may be due: its close after the client's retained writes.
	h.afterClientWrites(cl, c.id, submit)
}

// hasOtherConn reports whether another connection of c's client id is
// tracked here (a same-node takeover).
func (h *Sessions) hasOtherConn(c *sessConn) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, o := range h.conns {
		if o != c && o.id == c.id && o.managed && !o.refused {
			return true
		}
	}
	return false
}
