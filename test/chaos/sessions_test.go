package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/eclipse/paho.golang/paho/session/state"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// The persistent-session and will part of the campaign (guarantees 1, 3
// and 4): persistent subscribers that move between nodes keeping their
// session, publishers of numbered QoS 1 and QoS 2 messages to them, will
// clients that stay on a node, and a watcher of their wills.

const (
	sessTopicQ1    = "chaos/sess/q1" // QoS 1 publishes
	sessTopicQ2    = "chaos/sess/q2" // QoS 2 publishes
	sessExpiry     = 600             // s: no session can expire during a campaign
	sessSubs       = 2
	sessPublishers = 2
	sessIdle       = 3 * time.Second // a subscriber that hears nothing this long moves
	sessMarker     = "sess-marker"   // publishes the drain marker after the fault phase
	willPrefix     = "chaos/will/"
	willWatcher    = "will-watcher"
	willArmWithin  = 5 * time.Second // how long a will client looks for its will in the log
)

// sessFilters: every persistent subscriber takes both topics, at the
// publishes' QoS, into one session queue.
var sessFilters = []paho.SubscribeOptions{{Topic: sessTopicQ1, QoS: 1}, {Topic: sessTopicQ2, QoS: 2}}

// sessSubV311 is the MQTT 3.1.1 persistent subscriber (clean session 0).
const sessSubV311 = "sess-sub3"

// sessSubIDs are the persistent subscribers' client ids: sessSubs MQTT 5
// ones and sessSubV311.
func sessSubIDs() []string {
	ids := make([]string, sessSubs)
	for i := range ids {
		ids[i] = fmt.Sprintf("sess-sub%d", i+1)
	}
	return append(ids, sessSubV311)
}

// connectWith connects with session options and remembers the connection
// for the per-client-id checks.
func (cp *campaign) connectWith(n *Node, o connectOptions) (*testutil.Client, error) {
	c, err := connectNodeOpts(n, o)
	if err != nil {
		return nil, fmt.Errorf("%s connect to %s: %w", o.ID, n.ID, err)
	}
	cp.connMu.Lock()
	cp.conns[o.ID] = append(cp.conns[o.ID], c)
	cp.connMu.Unlock()
	return c, nil
}

// release closes a connection's socket and waits until paho has let go of
// it, so that its session state may be handed to the next connection.
func release(c *testutil.Client) {
	_ = c.Conn.Close()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
	}
}

// receiptFunc turns a received PUBLISH into an op (kind, publisher, seq or
// value); the caller fills in who, where and when.
type receiptFunc func(p *paho.Publish) (Op, error)

// sessionReceipt parses "<publisher>:<seq>".
func sessionReceipt(p *paho.Publish) (Op, error) {
	s := string(p.Payload)
	i := strings.LastIndexByte(s, ':')
	seq, err := strconv.Atoi(s[i+1:])
	if i <= 0 || err != nil {
		return Op{}, fmt.Errorf("malformed session payload %q on %s", s, p.Topic)
	}
	return Op{Kind: KindSessRecv, Publisher: s[:i], Seq: seq, Value: s}, nil
}

// willReceipt keeps the will's payload.
func willReceipt(p *paho.Publish) (Op, error) {
	return Op{Kind: KindWillRecv, Value: string(p.Payload)}, nil
}

// sessionSub is one persistent subscriber.
type sessionSub struct {
	id        string
	filters   []paho.SubscribeOptions
	keepAlive uint16        // 0: 30 s
	idle      time.Duration // moves after this long without a message; 0: only when the connection fails
	parse     receiptFunc
	// v311: an MQTT 3.1.1 client (clean session 0) instead of MQTT 5.
	v311 bool
	// st is paho's session state, kept across connections (nil: a new
	// one; st311 for v311); subscribed says the session already holds
	// filters, so the first connection resumes it.
	st         *state.State
	st311      *session311
	subscribed bool
}

// sessConn is one connection of a persistent client, MQTT 5 (paho) or
// MQTT 3.1.1 (client311), as the session code sees it.
type sessConn struct {
	msgs    chan *paho.Publish
	done    <-chan struct{}
	present bool
	release func() // close the socket, wait until the session state is free
	subFn   func(filters []paho.SubscribeOptions) ([]byte, error)
	pub5    *testutil.Client // the connection itself: one of these two
	pub311  *client311
}

func v5Conn(c *testutil.Client) sessConn {
	return sessConn{msgs: c.Msgs, done: c.Done(), present: c.Connack.SessionPresent, release: func() { release(c) }, pub5: c,
		subFn: func(filters []paho.SubscribeOptions) ([]byte, error) {
			ctx, cancel := context.WithTimeout(context.Background(), publishTimeout)
			defer cancel()
			sa, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: filters})
			if err != nil {
				return nil, err
			}
			return sa.Reasons, nil
		}}
}

func v311Conn(c *client311) sessConn {
	return sessConn{msgs: c.Msgs, done: c.Done(), present: c.SessionPresent, release: c.Drop, pub311: c,
		subFn: func(filters []paho.SubscribeOptions) ([]byte, error) { return c.Subscribe(filters, publishTimeout) }}
}

// connect311 is connect311 remembering the connection for the
// per-client-id checks.
func (cp *campaign) connect311(n *Node, o opts311) (*client311, error) {
	c, err := connect311(n, o)
	if err != nil {
		return nil, fmt.Errorf("%s connect (3.1.1) to %s: %w", o.ID, n.ID, err)
	}
	cp.connMu.Lock()
	if cp.conns311 == nil {
		cp.conns311 = map[string][]*client311{}
	}
	cp.conns311[o.ID] = append(cp.conns311[o.ID], c)
	cp.connMu.Unlock()
	return c, nil
}

// persistentSubscriber keeps one persistent session (MQTT 5 with session
// expiry sessExpiry, or MQTT 3.1.1 with clean session 0) subscribed to its
// filters until ctx ends: the first connection starts clean (MQTT 5; a
// 3.1.1 client id is new in each campaign) and subscribes; after that,
// whenever the connection fails or hears nothing for idle, it moves to
// another node with clean start off and the same client-side session
// state, as a real client resuming its session does. Every CONNACK and
// every receipt goes into the history.
func (cp *campaign) persistentSubscriber(ctx context.Context, s sessionSub, rng *rand.Rand) {
	if s.st == nil {
		s.st = state.NewInMemory()
	}
	if s.st311 == nil {
		s.st311 = newSession311()
	}
	last := ""
	for epoch := 0; ctx.Err() == nil; {
		node := cp.pick(rng, last)
		last = node.ID
		clean := !s.subscribed && !s.v311
		start := time.Now()
		var c sessConn
		op := Op{Kind: KindSessConnect, Client: s.id, Node: node.ID, Start: start, Outcome: OK, CleanStart: clean}
		if s.v311 {
			c3, err := cp.connect311(node, opts311{ID: s.id, KeepAlive: s.keepAlive, Session: s.st311, Buffer: 100000})
			if err != nil {
				if !pace(ctx, 100*time.Millisecond) {
					return
				}
				continue
			}
			c, op.Proto = v311Conn(c3), 4
		} else {
			c5, err := cp.connectWith(node, connectOptions{KeepAlive: s.keepAlive, ClientOptions: testutil.ClientOptions{
				ID: s.id, CleanStart: clean, SessionExpiry: sessExpiry, Session: s.st, Buffer: 100000}})
			if err != nil {
				if !pace(ctx, 100*time.Millisecond) {
					return
				}
				continue
			}
			c, op.Expiry = v5Conn(c5), sessExpiry
		}
		epoch++
		op.End, op.SessionPresent, op.SubConn = time.Now(), c.present, epoch
		cp.h.Add(op)
		if s.subscribed && !c.present {
			// The session was not found (the checker judges it): try
			// another node rather than subscribe again.
			c.release()
			continue
		}
		if !s.subscribed {
			if !cp.subscribeSession(c, s.id, node, s.filters, epoch) {
				c.release()
				continue
			}
			s.subscribed = true
		}
		cp.receiveSession(ctx, c, s.id, node, epoch, s.idle, s.parse)
		c.release()
		cp.drainReceipts(c, s.id, node, epoch, s.parse)
	}
}

// subscribeSession subscribes to filters and records each granted one; it
// reports whether all were granted.
func (cp *campaign) subscribeSession(c sessConn, id string, node *Node, filters []paho.SubscribeOptions, epoch int) bool {
	start := time.Now()
	reasons, err := c.subFn(filters)
	if err != nil || len(reasons) != len(filters) {
		return false
	}
	for _, r := range reasons {
		if r >= 0x80 {
			return false
		}
	}
	end := time.Now()
	for i, f := range filters {
		cp.h.Add(Op{Kind: KindSessSub, Client: id, Node: node.ID, Topic: f.Topic, QoS: reasons[i],
			Start: start, End: end, Outcome: OK, SubConn: epoch})
	}
	return true
}

// receiveSession records c's messages until ctx ends, the connection
// ends, or nothing arrives for idle (when idle > 0).
func (cp *campaign) receiveSession(ctx context.Context, c sessConn, id string, node *Node, epoch int, idle time.Duration, parse receiptFunc) {
	var silent <-chan time.Time
	var timer *time.Timer
	if idle > 0 {
		timer = time.NewTimer(idle)
		defer timer.Stop()
		silent = timer.C
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.done:
			return
		case <-silent:
			return // nothing for a while: the node is paused or cut off; move
		case p := <-c.msgs:
			if timer != nil {
				timer.Reset(idle)
			}
			cp.addReceipt(p, id, node, epoch, parse)
		}
	}
}

// drainReceipts records what a closed connection delivered and nobody read
// yet (the client acknowledged those: the application has them).
func (cp *campaign) drainReceipts(c sessConn, id string, node *Node, epoch int, parse receiptFunc) {
	for {
		select {
		case p := <-c.msgs:
			cp.addReceipt(p, id, node, epoch, parse)
		default:
			return
		}
	}
}

func (cp *campaign) addReceipt(p *paho.Publish, id string, node *Node, epoch int, parse receiptFunc) {
	op, err := parse(p)
	if err != nil {
		cp.t.Errorf("%s: %v", id, err)
		return
	}
	now := time.Now()
	op.Client, op.Node, op.Topic, op.QoS, op.Dup, op.SubConn = id, node.ID, p.Topic, p.QoS, p.Duplicate(), epoch
	op.Start, op.End, op.Outcome = now, now, OK
	cp.h.Add(op)
}

// sessionPublisher publishes numbered messages, each at random QoS 1 to
// sessTopicQ1 or QoS 2 to sessTopicQ2, with a clean session on one node
// until a publish fails, then on another. A connection whose publish got
// no answer is abandoned, as the retained writers do.
func (cp *campaign) sessionPublisher(ctx context.Context, id string, rng *rand.Rand) {
	var c *testutil.Client
	var node *Node
	last := ""
	epoch := 0
	for seq := 1; ctx.Err() == nil; {
		if c == nil {
			node = cp.pick(rng, last)
			var err error
			if c, err = cp.connect(id, node, 0); err != nil {
				last = node.ID
				if !pace(ctx, 100*time.Millisecond) {
					return
				}
				continue
			}
			epoch++
		}
		topic, qos := sessTopicQ1, byte(1)
		if rng.Intn(2) == 1 {
			topic, qos = sessTopicQ2, 2
		}
		op := Op{Kind: KindSessPub, Client: id, Node: node.ID, Topic: topic, QoS: qos, Publisher: id, Seq: seq,
			PubConn: epoch, Value: fmt.Sprintf("%s:%d", id, seq), Start: time.Now()}
		seq++
		op.Outcome, op.Err = publishQoS(c, topic, qos, false, op.Value, publishTimeout)
		op.End = time.Now()
		cp.h.Add(op)
		switch op.Outcome {
		case Unknown:
			c, last = nil, node.ID
		case Failed:
			go c.Close()
			c, last = nil, node.ID
		}
		if !pace(ctx, time.Duration(30+rng.Intn(30))*time.Millisecond) {
			return
		}
	}
}

// willSpawner starts a will client every 1.5-3 s until ctx ends; each stays
// connected until stay ends (wg tracks them). Odd ones hold a persistent
// session (their will is in the log before CONNACK), even ones a clean
// session (the broker mirrors their will into the log asynchronously).
func (cp *campaign) willSpawner(ctx, stay context.Context, wg *sync.WaitGroup, rng *rand.Rand) {
	for k := 1; pace(ctx, time.Duration(1500+rng.Intn(1500))*time.Millisecond); k++ {
		id := fmt.Sprintf("will%d", k)
		crng := rand.New(rand.NewSource(rng.Int63()))
		wg.Add(1)
		go func() {
			defer wg.Done()
			cp.willClient(ctx, stay, id, k%2 == 1, crng)
		}()
	}
}

// willClient connects to a random node with a QoS 2 will on
// chaos/will/<id> whose payload is unique to the connection, looks for the
// will in the replicated log (armed), and stays until stay ends, then
// disconnects normally (the will is discarded). A connection lost to a
// fault is not replaced: the client is gone with its node, and its will is
// due. Only DISCONNECT 0x8B (a rolling restart hands the session over)
// makes it reconnect elsewhere, with a new will payload.
//
// With avail, it is an availability client instead (availClient).
func (cp *campaign) willClient(ctx, stay context.Context, id string, persistent bool, rng *rand.Rand) {
	cp.willClientOpts(ctx, stay, id, persistent, false, rng)
}

// availClient is a clean-session client that announces itself as Home
// Assistant devices do: a retained QoS 1 will "offline <id>:<k>" on
// chaos/avail/<id>, and once connected a retained "online <id>:<k>" on the
// same topic. Besides faults, it drops its own connection (no DISCONNECT)
// after 4-10 s once the will is armed: the will is then due. After a lost
// connection it comes back half the time (1-3 s later, a new k); after
// DISCONNECT 0x8B (a graceful stop) it comes back at once, elsewhere.
func (cp *campaign) availClient(ctx, stay context.Context, id string, rng *rand.Rand) {
	cp.willClientOpts(ctx, stay, id, false, true, rng)
}

func (cp *campaign) willClientOpts(ctx, stay context.Context, id string, persistent, avail bool, rng *rand.Rand) {
	last := ""
	topic := willPrefix + id
	if avail {
		topic = availPrefix + id
	}
	for k := 1; ctx.Err() == nil; k++ {
		node := cp.pick(rng, last)
		last = node.ID
		payload := fmt.Sprintf("%s:%d", id, k)
		will := &paho.WillMessage{Topic: topic, QoS: 2, Payload: []byte(payload)}
		if avail {
			payload = fmt.Sprintf("%s %s:%d", availOffline, id, k)
			will = &paho.WillMessage{Topic: topic, QoS: 1, Retain: true, Payload: []byte(payload)}
		}
		o := testutil.ClientOptions{ID: id, CleanStart: !persistent || k == 1, Will: will}
		if persistent {
			o.SessionExpiry = sessExpiry
		}
		op := Op{Kind: KindWillConnect, Client: id, Node: node.ID, Topic: topic, Value: payload, Expiry: o.SessionExpiry, Start: time.Now()}
		c, err := cp.connectWith(node, connectOptions{ClientOptions: o})
		op.End = time.Now()
		if err != nil {
			// The broker may have opened the session (and stored the
			// will) before the CONNECT failed: at most once.
			op.Outcome, op.Err = Unknown, err.Error()
			cp.h.Add(op)
			if !pace(ctx, 200*time.Millisecond) {
				return
			}
			continue
		}
		op.Outcome = OK
		cp.h.Add(op)
		end := Op{Kind: KindWillEnd, Client: id, Node: node.ID, Topic: topic, Value: payload, Outcome: OK}
		var dropAfter <-chan time.Time
		if avail {
			online := fmt.Sprintf("%s %s:%d", availOnline, id, k)
			on := Op{Kind: KindAvailOnline, Client: id, Node: node.ID, Topic: topic, Value: online, Start: time.Now()}
			on.Outcome, on.Err = publishQoS(c, topic, 1, true, online, publishTimeout)
			on.End = time.Now()
			cp.h.Add(on)
			if on.Outcome != OK {
				release(c)
				end.Start, end.End, end.Err = time.Now(), time.Now(), "closed: the online message was not acknowledged"
				cp.h.Add(end)
				continue
			}
		}
		armed := make(chan bool, 1)
		go func() {
			armed <- cp.armWill(c, node, id, topic, payload)
		}()
		wasArmed := false
		if avail {
			select {
			case wasArmed = <-armed:
			case <-stay.Done():
			}
			if wasArmed {
				dropAfter = time.After(time.Duration(4000+rng.Intn(6000)) * time.Millisecond)
			}
		}
		select {
		case <-stay.Done():
			c.Close() // DISCONNECT 0x00: the will is discarded
			if !avail {
				<-armed
			}
			end.Start, end.End, end.Err = time.Now(), time.Now(), "closed by the workload (DISCONNECT 0x00)"
			cp.h.Add(end)
			return
		case <-dropAfter:
			end.Start = time.Now()
			release(c)
			end.End, end.Err = time.Now(), dropByClient
			cp.h.Add(end)
			if rng.Intn(2) == 0 || !pace(ctx, time.Duration(1000+rng.Intn(2000))*time.Millisecond) {
				return
			}
			continue
		case <-c.Done():
		}
		end.Start, end.End, end.Err = time.Now(), time.Now(), "connection lost"
		if !avail {
			<-armed
		}
		code := byte(0)
		select { // paho reports a server DISCONNECT just after the connection ends
		case d := <-c.Disconnects:
			code = d.ReasonCode
			end.Err = fmt.Sprintf("%s 0x%02x", serverDisconnect, code)
		case <-time.After(500 * time.Millisecond):
		}
		cp.h.Add(end)
		if code == 0x8B {
			continue // a graceful stop: back at once, elsewhere
		}
		if !avail || rng.Intn(2) == 0 || !pace(ctx, time.Duration(1000+rng.Intn(2000))*time.Millisecond) {
			return
		}
	}
}

// armWill polls the node's /api/sessions until it shows the client
// connected there with a will in the log, and records when; it gives up
// after willArmWithin or when the connection ends. A will client whose
// will was never seen is not expected to get its will (the broker may have
// served it without replication, or not yet mirrored its clean session's
// will).
func (cp *campaign) armWill(c *testutil.Client, node *Node, id, topic, payload string) bool {
	err := poll(willArmWithin, func() error {
		select {
		case <-c.Done():
			return errStop{fmt.Errorf("connection ended")}
		default:
		}
		ss, err := node.sessions()
		if err != nil {
			return err
		}
		for _, s := range ss {
			if s.ClientID == id && s.HasWill && s.State == "connected" && s.Owner == node.ID {
				return nil
			}
		}
		return fmt.Errorf("%s: no will in the log yet", id)
	})
	if err == nil {
		now := time.Now()
		cp.h.Add(Op{Kind: KindWillArmed, Client: id, Node: node.ID, Topic: topic, Value: payload, Start: now, End: now, Outcome: OK})
	}
	return err == nil
}

// sessionInfo is the part of a /api/sessions row the campaign reads.
type sessionInfo struct {
	ClientID   string `json:"client_id"`
	Owner      string `json:"owner"`
	State      string `json:"state"`
	QueueDepth int    `json:"queue_depth"`
	HasWill    bool   `json:"has_will"`
}

func (n *Node) sessions() ([]sessionInfo, error) {
	code, body, err := n.httpGet("/api/sessions")
	if err != nil {
		return nil, err
	}
	if code != 200 {
		return nil, fmt.Errorf("node %s /api/sessions: HTTP %d", n.ID, code)
	}
	var ss []sessionInfo
	if err := json.Unmarshal(body, &ss); err != nil {
		return nil, fmt.Errorf("node %s /api/sessions: %w", n.ID, err)
	}
	return ss, nil
}

// drainSessions runs after the fault phase, the cluster healthy again: a
// marker is published (QoS 1, acknowledged) to sessTopicQ1 behind every
// message committed before it, and the persistent subscribers (still
// running, moving if they have to) are given until settleTimeout to
// receive it, so that each has received whatever was queued for it; the
// wills the faults require must arrive in the same time. It returns how
// long that took, or what was still missing.
func (cp *campaign) drainSessions(subs []string) (time.Duration, error) {
	began := time.Now()
	deadline := began.Add(settleTimeout)
	rng := rand.New(rand.NewSource(cp.seed + 300))
	var c *testutil.Client
	var node *Node
	acked := map[int]bool{}
	// Markers of a later drain continue the numbering: one publisher's
	// sequence never goes back.
	seq := cp.drainSeq
	defer func() { cp.drainSeq = seq }()
	for seq++; len(acked) == 0 && time.Now().Before(deadline); seq++ {
		if c == nil {
			node = cp.pick(rng)
			var err error
			if c, err = cp.connect(sessMarker, node, 0); err != nil {
				time.Sleep(100 * time.Millisecond) // retry pacing, not a wait for a condition
				continue
			}
		}
		op := Op{Kind: KindSessPub, Client: sessMarker, Node: node.ID, Topic: sessTopicQ1, QoS: 1, Publisher: sessMarker,
			Seq: seq, PubConn: seq, Value: fmt.Sprintf("%s:%d", sessMarker, seq), Start: time.Now()}
		op.Outcome, op.Err = publishQoS(c, sessTopicQ1, 1, false, op.Value, publishTimeout)
		op.End = time.Now()
		cp.h.Add(op)
		if op.Outcome == OK {
			acked[seq] = true
		} else {
			release(c)
			c = nil
		}
	}
	if c != nil {
		c.Close()
	}
	if len(acked) == 0 {
		return time.Since(began), fmt.Errorf("no drain marker was acknowledged within %s", settleTimeout)
	}
	err := poll(time.Until(deadline), func() error {
		got := map[string]bool{}
		cp.h.Scan(func(o Op) bool {
			if o.Kind == KindSessRecv && o.Publisher == sessMarker && acked[o.Seq] {
				got[o.Client] = true
			}
			return true
		})
		var missing []string
		for _, id := range subs {
			if !got[id] {
				missing = append(missing, id+" has not received the drain marker")
			}
		}
		if len(missing) == 0 {
			missing = cp.missingWills()
		}
		if len(missing) > 0 {
			return fmt.Errorf("%s", strings.Join(missing, "; "))
		}
		return nil
	})
	return time.Since(began), err
}

// missingWills lists the wills the faults so far require and the watcher
// has not received.
func (cp *campaign) missingWills() []string {
	cp.mu.Lock()
	faults := append([]faultEvent(nil), cp.faults...)
	cp.mu.Unlock()
	ops := cp.h.Ops()
	got := map[string]bool{}
	for _, o := range ops {
		if o.Kind == KindWillRecv {
			got[o.Value] = true
		}
	}
	var missing []string
	conns := classifyWills(ops, faults)
	for _, p := range sortedKeys(conns) {
		if conns[p].fate == willExpected && !got[p] {
			missing = append(missing, "will "+p+" not received")
		}
	}
	return missing
}

// sessionCounterNames are the /metrics counters that explain a session
// finding: messages dropped by a full queue, sessions served without
// replication, asynchronous session writes dropped, wills published.
var sessionCounterNames = []string{
	"broker_sessions_queue_dropped_total",
	"broker_sessions_open_failures_total",
	"broker_sessions_writes_dropped_total",
	"broker_sessions_wills_published_total",
}

// sessionCounters sums sessionCounterNames over the nodes (each since its
// last start); a node that does not answer is left out.
func (cp *campaign) sessionCounters() map[string]float64 {
	sums := map[string]float64{}
	for _, n := range cp.c.nodes {
		code, body, err := n.httpGet("/metrics")
		if err != nil || code != 200 {
			continue
		}
		for _, line := range strings.Split(string(body), "\n") {
			name, val, ok := strings.Cut(line, " ")
			if !ok {
				continue
			}
			for _, want := range sessionCounterNames {
				if name == want {
					if v, err := strconv.ParseFloat(strings.TrimSpace(val), 64); err == nil {
						sums[strings.TrimPrefix(name, "broker_sessions_")] += v
					}
				}
			}
		}
	}
	return sums
}

// nodeNotes are the lines of the nodes' logs (every start) that explain a
// finding, as history ops: each persistent session a node could not open
// in the log (noteServedLocally), and each SUBACK sent before every peer
// acknowledged the route (noteRouteAckTimeout, logged at most once per 10 s
// per node).
func (cp *campaign) nodeNotes() []Op {
	var notes []Op
	for _, n := range cp.c.nodes {
		for _, line := range strings.Split(n.log.String(), "\n") {
			if !strings.Contains(line, noteServedLocally) && !strings.Contains(line, noteRouteAckTimeout) {
				continue
			}
			var l struct {
				Time   time.Time `json:"time"`
				Msg    string    `json:"msg"`
				Client string    `json:"client"`
				Error  string    `json:"error"`
			}
			if json.Unmarshal([]byte(line), &l) != nil || (l.Msg != noteServedLocally && l.Msg != noteRouteAckTimeout) {
				continue
			}
			notes = append(notes, Op{Kind: KindNodeNote, Client: l.Client, Node: n.ID, Value: l.Msg, Err: l.Error,
				Start: l.Time, End: l.Time, Outcome: OK})
		}
	}
	return notes
}
