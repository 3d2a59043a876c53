package hooks

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/replication"
)

// Ownership keeps at most one live connection per client id cluster-wide:
// every session established here claims the client id in the raft log
// (ClaimOwner); every node watches the committed claims (Apply) and
// disconnects its own connection for a client id that a later claim gave to
// another node, with MQTT 5 reason 0x8E (session taken over).
//
// The claim is made after CONNACK and does not delay it. Without a quorum
// the claim fails and the connection stays up: ownership is then best
// effort and settles when the log is writable again (the client's next
// connect claims again). Only a connection whose own claim has been applied
// here is ever disconnected, and only by a claim with a higher epoch, so two
// nodes racing for one id cannot both drop their clients.
//
// The later claim in log order wins. A claim that could not be committed
// is retried as a ReclaimOwner, which never takes the id from a connection
// established later elsewhere (see replication.ReclaimOwner, and the known
// gap in command below). Persistent sessions are fenced by their
// SessionOpen as well (hooks.Sessions), which moves their queue.
type Ownership struct {
	mqtt.HookBase
	server  *mqtt.Server
	self    string
	repl    *replication.Node
	timeout time.Duration
	log     *slog.Logger

	mu sync.Mutex
	// owned: client id -> this node's committed claim for its live
	// connection. latestOther: the highest epoch another node claimed for a
	// client id that has a live connection here (bounded by local clients).
	owned       map[string]owned
	latestOther map[string]uint64
	takeovers   map[string][]time.Time // recent takeovers away from this node, for flap throttling
	stop        <-chan struct{}
	// BeforeClaim, if set, runs before each claim is written (tests).
	BeforeClaim func(clientID string)
	// Pace spaces the claim entries once a burst of claimBurst is spent
	// (claimPace, set by NewOwnership; tests lengthen it). Set it before
	// SetReplication.
	Pace time.Duration

	qmu   sync.Mutex
	queue []claim       // claims and releases for the workers, in order
	wake  chan struct{} // signalled when the queue grows
	// The entries' budget (claimPace): tokens left, as of refilled.
	tokens   float64
	refilled time.Time
}

type owned struct {
	cl    *mqtt.Client
	epoch uint64
}

type claim struct {
	cl      *mqtt.Client
	at      int64 // Unix ms: when the connection was established
	release bool
	retry   bool
	epoch   uint64 // a release of this claim's epoch (ownership.claimed)
}

// claimRetry is how often a claim that could not be committed is retried.
const claimRetry = 2 * time.Second

// Flap throttling: a client id taken over from this node flapMax times
// within flapWindow (two instances with one id, reconnecting in turn on two
// nodes) is refused here for flapWindow, so the other instance keeps its
// connection instead of both ping-ponging forever.
const (
	flapMax    = 3
	flapWindow = time.Minute
)

// NewOwnership returns the hook for node self.
func NewOwnership(s *mqtt.Server, self string, timeout time.Duration, log *slog.Logger) *Ownership {
	return &Ownership{server: s, self: self, timeout: timeout, log: log.With("component", "ownership"),
		owned: map[string]owned{}, latestOther: map[string]uint64{}, takeovers: map[string][]time.Time{},
		wake: make(chan struct{}, 1), Pace: claimPace, tokens: claimBurst}
}

// SetReplication attaches the raft node and starts the claim workers.
func (h *Ownership) SetReplication(r *replication.Node, stop <-chan struct{}) {
	h.repl, h.stop = r, stop
	// Two workers, each writing whatever is queued as one entry: one
	// prepares its batch while the other's commits.
	for range 2 {
		go h.work(stop)
	}
}

// ID implements mqtt.Hook.
func (h *Ownership) ID() string { return "ownership" }

// Provides implements mqtt.Hook.
func (h *Ownership) Provides(b byte) bool {
	return b == mqtt.OnConnect || b == mqtt.OnSessionEstablished || b == mqtt.OnDisconnect
}

// OnConnect refuses a client id that keeps being taken over from this node
// (see flapMax). MQTT 5 gets 0x97 (quota exceeded), 3.1.1 "server
// unavailable"; the client's other instance, on another node, stays up.
func (h *Ownership) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	h.mu.Lock()
	recent := h.recentTakeoversLocked(cl.ID, time.Now())
	h.mu.Unlock()
	if recent < flapMax {
		return nil
	}
	h.log.Warn("client id flapping between nodes; connection refused here for a while", "client", cl.ID,
		"takeovers", recent, "window", flapWindow)
	code := packets.ErrQuotaExceeded
	if cl.Properties.ProtocolVersion < 5 {
		code = packets.ErrServerUnavailable
	}
	_ = h.server.SendConnack(cl, code, false, nil)
	return code
}

// recentTakeoversLocked prunes and counts id's takeovers within flapWindow.
func (h *Ownership) recentTakeoversLocked(id string, now time.Time) int {
	ts := h.takeovers[id]
	i := 0
	for i < len(ts) && now.Sub(ts[i]) > flapWindow {
		i++
	}
	ts = ts[i:]
	if len(ts) == 0 {
		delete(h.takeovers, id)
	} else {
		h.takeovers[id] = ts
	}
	return len(ts)
}

// OnSessionEstablished queues the claim for the new connection, unless
// an earlier hook refused it (Sessions stops a connection whose CONNACK it
// refused): a refused CONNECT owns nothing.
func (h *Ownership) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	if cl.Closed() {
		return
	}
	h.enqueue(claim{cl: cl, at: time.Now().UnixMilli()})
}

// OnDisconnect releases the client id if this connection still holds it,
// unless the connection was taken over (the new owner holds it then).
func (h *Ownership) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	if cl.Net.Inline || cl.StopCause() == packets.ErrSessionTakenOver {
		return
	}
	h.enqueue(claim{cl: cl, release: true})
}

// enqueue queues a claim or release for the workers. The queue is not
// bounded: each connection puts at most a claim, a release and, without a
// quorum, one retry at a time in it.
func (h *Ownership) enqueue(c claim) {
	h.qmu.Lock()
	h.queue = append(h.queue, c)
	h.qmu.Unlock()
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

// maxClaimBatch bounds the claims and releases written in one entry.
const maxClaimBatch = 512

// claimPace and claimBurst budget the entries the workers write. Each is
// a commit (a bolt commit on the leader and on a follower), and one per
// connect cost a node of three more than the connect itself: connects one
// after another ran at 401 a second with claims and 1,032 without (and the
// heartbeat rounds of the sessions barrier waited behind the commits).
// So a node writes up to claimBurst entries at once, then one per
// claimPace: in a connect storm the claims queued meanwhile share the next
// entry. Not every claim is paced: a claim held back while the client's
// newer connection on another node claimed the id lands last and wins
// (the known gap in command), and a plain pace (every entry within 10 ms
// of the previous one held back) made a client that connected to a busy
// node and then to another lose its newer connection in 58 of 60 rounds,
// against 1-3 in 60 with the first node quiet (found by review).
const (
	claimPace  = 10 * time.Millisecond
	claimBurst = 16
)

func (h *Ownership) work(stop <-chan struct{}) {
	for {
		h.qmu.Lock()
		if wait := h.budgetLocked(); len(h.queue) > 0 && wait > 0 {
			h.qmu.Unlock()
			t := time.NewTimer(wait)
			select {
			case <-stop:
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		n := min(len(h.queue), maxClaimBatch)
		batch := h.queue[:n:n]
		h.queue = h.queue[n:]
		if len(h.queue) == 0 {
			h.queue = nil
		}
		if n > 0 {
			h.tokens--
		}
		h.qmu.Unlock()
		if n > 0 {
			select {
			case h.wake <- struct{}{}: // more for another worker
			default:
			}
			if !h.do(batch) {
				// Nothing to write (claims of connections gone,
				// releases of ids not held): the entry is not spent.
				h.qmu.Lock()
				h.tokens = min(claimBurst, h.tokens+1)
				h.qmu.Unlock()
			}
			continue
		}
		select {
		case <-stop:
			return
		case <-h.wake:
		}
	}
}

// budgetLocked refills the entries' budget and returns how long until it
// holds a whole entry (0: now).
func (h *Ownership) budgetLocked() time.Duration {
	now := time.Now()
	if h.Pace <= 0 {
		return 0
	}
	h.tokens = min(claimBurst, h.tokens+float64(now.Sub(h.refilled))/float64(h.Pace))
	h.refilled = now
	if h.tokens >= 1 {
		return 0
	}
	return time.Duration((1 - h.tokens) * float64(h.Pace))
}

// do writes a batch of claims and releases as one entry (a connect storm,
// a thousand devices back after a node loss, costs a few commits, not one
// per client), and reports whether it had anything to write.
func (h *Ownership) do(batch []claim) bool {
	ctx, cancel := context.WithTimeout(context.Background(), h.timeout)
	defer cancel()
	var cmds []replication.Command
	var of []claim // the claim of each command
	for _, c := range batch {
		if cmd := h.command(c); cmd != nil {
			cmds = append(cmds, cmd)
			of = append(of, c)
		}
	}
	var results []replication.Result
	var err error
	switch len(cmds) {
	case 0:
		return false
	case 1:
		var res replication.Result
		res, err = h.repl.Apply(ctx, cmds[0])
		results = []replication.Result{res}
	default:
		var res replication.Result
		res, err = h.repl.Apply(ctx, &replication.Batch{Commands: cmds})
		results = res.Results
		if err == nil && len(results) != len(cmds) {
			err = fmt.Errorf("ownership batch: %d results for %d commands", len(results), len(cmds))
		}
	}
	for i, c := range of {
		if c.release {
			continue // nothing to do after a release, written or not
		}
		if err != nil {
			h.claimFailed(c, err)
			continue
		}
		h.claimed(c, results[i])
	}
	return true
}

// command is what c writes: a ReleaseOwner if this connection still holds
// the id, a claim if it is still open.
func (h *Ownership) command(c claim) replication.Command {
	if c.release && c.epoch != 0 {
		return &replication.ReleaseOwner{ClientID: c.cl.ID, Node: h.self, Epoch: c.epoch}
	}
	if c.release {
		h.mu.Lock()
		o, ok := h.owned[c.cl.ID]
		if ok && o.cl == c.cl {
			delete(h.owned, c.cl.ID)
			delete(h.latestOther, c.cl.ID)
		}
		h.mu.Unlock()
		if ok && o.cl == c.cl {
			return &replication.ReleaseOwner{ClientID: c.cl.ID, Node: h.self, Epoch: o.epoch}
		}
		return nil
	}
	if c.cl.Closed() {
		return nil
	}
	if h.BeforeClaim != nil {
		h.BeforeClaim(c.cl.ID)
	}
	// A retry (the first attempt found no quorum) must not take the id
	// from a connection made since on another node: the client may have
	// given up on this one long ago (ReclaimOwner compares connect times).
	//
	// Known gap: a first claim wins by log order. Claims are written after
	// CONNACK, so a slow claim of a client's old connection can be written
	// after its new connection's claim on another node and drop the new
	// connection (TestLateClaimDoesNotTakeOverNewerConnection, skipped).
	// Writing every claim as a ReclaimOwner fixed that test but made the
	// chaos campaign of seed 444047167 fail in 2 runs of 15 (a resume
	// after a clean connection found a session), against 0 of 19 without
	// it; not understood yet, so not shipped.
	if c.retry {
		return &replication.ReclaimOwner{ClientID: c.cl.ID, Node: h.self, At: c.at}
	}
	return &replication.ClaimOwner{ClientID: c.cl.ID, Node: h.self, At: c.at}
}

// claimFailed retries a claim that could not be committed.
func (h *Ownership) claimFailed(c claim, err error) {
	if !c.retry {
		h.log.Warn("client id not claimed; retrying until the log is writable", "client", c.cl.ID, "error", err)
	}
	// Reconciliation after a partition: the claim is retried while the
	// connection lives, so once a quorum is back the later of two
	// connections made on either side wins.
	go func() {
		select {
		case <-time.After(claimRetry):
			c.retry = true
			h.enqueue(c)
		case <-h.stop:
		}
	}()
}

// claimed records a committed claim.
func (h *Ownership) claimed(c claim, res replication.Result) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if cur, ok := h.server.Clients.Get(c.cl.ID); !ok || cur != c.cl || c.cl.Closed() {
		// Gone or replaced meanwhile (its successor claims for itself).
		// Its release may have been written before this claim: release
		// this epoch, which leaves any later claim alone.
		if res.Changed {
			h.enqueue(claim{cl: c.cl, release: true, epoch: res.Epoch})
		}
		return
	}
	if !res.Changed {
		// The reclaim lost to a newer connection elsewhere: this one is
		// stale (the client reconnected there while we were cut off).
		h.log.Info("client id held by a newer connection on another node; disconnecting", "client", c.cl.ID,
			"owner", res.Prev.Node)
		atomic.StoreUint32(&c.cl.Properties.Will.Flag, 0)
		cl := c.cl
		go func() { _ = h.server.DisconnectClient(cl, packets.ErrSessionTakenOver) }()
		return
	}
	if o, had := h.owned[c.cl.ID]; had && o.epoch > res.Epoch {
		return
	}
	h.owned[c.cl.ID] = owned{cl: c.cl, epoch: res.Epoch}
	// The observer may already have applied a later claim by another node.
	if h.latestOther[c.cl.ID] > res.Epoch {
		h.disconnectLocked(c.cl.ID)
	}
}

// Apply is the replication observer for ownership changes, in log order.
func (h *Ownership) Apply(ch replication.OwnerChange) {
	if ch.Owner.Node == "" || ch.Owner.Node == h.self {
		return
	}
	if cl, ok := h.server.Clients.Get(ch.ClientID); !ok || cl.Closed() {
		return // no live connection here to fence
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.latestOther[ch.ClientID] = max(h.latestOther[ch.ClientID], ch.Owner.Epoch)
	if o, ok := h.owned[ch.ClientID]; ok && o.epoch < ch.Owner.Epoch {
		h.disconnectLocked(ch.ClientID)
	}
}

// disconnectLocked drops this node's connection for id; the caller holds mu.
func (h *Ownership) disconnectLocked(id string) {
	o, ok := h.owned[id]
	if !ok {
		return
	}
	delete(h.owned, id)
	delete(h.latestOther, id)
	h.recentTakeoversLocked(id, time.Now())
	h.takeovers[id] = append(h.takeovers[id], time.Now())
	if len(h.takeovers) > 100_000 { // bounded even under an id-cycling storm
		clear(h.takeovers)
	}
	cl := o.cl
	h.log.Info("client id taken over by another node; disconnecting", "client", id)
	// Off the observer goroutine: DisconnectClient writes to the socket
	// and runs mochi hooks, which must not block the raft apply loop.
	// The client lives on elsewhere: no will for this connection.
	atomic.StoreUint32(&cl.Properties.Will.Flag, 0)
	go func() { _ = h.server.DisconnectClient(cl, packets.ErrSessionTakenOver) }()
}
