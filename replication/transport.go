package replication

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"

	"github.com/mqtt-ha/broker/internal/backoff"
)

// The caller hands us one demultiplexed listener and one dial function for
// the cluster port. Replication needs two protocols on it, raft's own
// transport and the forwarding RPC, so every connection starts with one
// more byte that selects between them. The caller's handshake has already
// authenticated the peer.
//
// Sub-protocol bytes. Append-only: values are on the wire.
const (
	subRaft byte = 1
	subRPC  byte = 2
)

// demux accepts connections on the caller's listener, reads the
// sub-protocol byte and routes them. It tracks every connection (both
// directions) so that Close really cuts this node off, as a crash would.
type demux struct {
	ln      net.Listener
	dial    func(ctx context.Context, addr string) (net.Conn, error)
	advert  string
	hsTO    time.Duration
	dialTO  time.Duration
	log     *slog.Logger
	onRPC   func(net.Conn)
	raftCh  chan net.Conn
	done    chan struct{}
	closeMu sync.Mutex
	closed  bool
	conns   map[*trackedConn]struct{}
	wg      sync.WaitGroup
	warn    rateLimit
}

func newDemux(cfg *Config, log *slog.Logger, onRPC func(net.Conn)) *demux {
	return &demux{
		ln: cfg.Listener, dial: cfg.Dial, advert: cfg.Advertise,
		hsTO: cfg.HandshakeTimeout, dialTO: cfg.DialTimeout, log: log, onRPC: onRPC,
		raftCh: make(chan net.Conn), done: make(chan struct{}),
		conns: make(map[*trackedConn]struct{}),
		warn:  rateLimit{every: time.Minute},
	}
}

func (d *demux) start() {
	d.wg.Add(1)
	go d.acceptLoop()
}

func (d *demux) acceptLoop() {
	defer d.wg.Done()
	var pause backoff.Accept
	for {
		c, err := d.ln.Accept()
		if err != nil {
			select {
			case <-d.done:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			d.log.Warn("replication accept failed", "err", err)
			select {
			case <-time.After(pause.Failed()):
			case <-d.done:
				return
			}
			continue
		}
		pause.Succeeded()
		tc, ok := d.track(c)
		if !ok {
			continue
		}
		d.wg.Add(1)
		go d.route(tc)
	}
}

// route reads the sub-protocol byte (bounded by HandshakeTimeout, so junk
// costs one goroutine for that long at most) and hands the connection on.
func (d *demux) route(c *trackedConn) {
	defer d.wg.Done()
	_ = c.SetReadDeadline(time.Now().Add(d.hsTO))
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		_ = c.Close()
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	switch b[0] {
	case subRaft:
		select {
		case d.raftCh <- c:
		case <-d.done:
			_ = c.Close()
		}
	case subRPC:
		d.onRPC(c)
	default:
		if d.warn.allow() {
			d.log.Warn("replication connection with unknown sub-protocol dropped",
				"remote", c.RemoteAddr().String(), "byte", b[0])
		}
		_ = c.Close()
	}
}

// dialSub dials addr through the caller's Dial and writes the sub-protocol
// byte.
func (d *demux) dialSub(ctx context.Context, addr string, sub byte) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, d.dialTO)
	defer cancel()
	c, err := d.dial(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetWriteDeadline(dl)
	}
	if _, err := c.Write([]byte{sub}); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	_ = c.SetWriteDeadline(time.Time{})
	tc, ok := d.track(c)
	if !ok {
		return nil, ErrClosed
	}
	return tc, nil
}

func (d *demux) track(c net.Conn) (*trackedConn, bool) {
	d.closeMu.Lock()
	defer d.closeMu.Unlock()
	if d.closed {
		_ = c.Close()
		return nil, false
	}
	tc := &trackedConn{Conn: c, d: d}
	d.conns[tc] = struct{}{}
	return tc, true
}

// close stops accepting and closes every tracked connection.
func (d *demux) close() {
	d.closeMu.Lock()
	if d.closed {
		d.closeMu.Unlock()
		return
	}
	d.closed = true
	close(d.done)
	conns := d.conns
	d.conns = nil
	d.closeMu.Unlock()
	_ = d.ln.Close()
	for c := range conns {
		c.closed.Store(true)
		_ = c.Conn.Close()
	}
	d.wg.Wait()
}

type trackedConn struct {
	net.Conn
	d      *demux
	once   sync.Once
	closed atomic.Bool
}

// Read reports a read cut short by our own Close as io.EOF, so raft's
// transport treats shutdown as a clean end of stream instead of logging an
// error per connection.
func (c *trackedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil && c.closed.Load() {
		err = io.EOF
	}
	return n, err
}

func (c *trackedConn) Close() error {
	var err error
	c.closed.Store(true)
	c.once.Do(func() {
		c.d.closeMu.Lock()
		delete(c.d.conns, c)
		c.d.closeMu.Unlock()
		err = c.Conn.Close()
	})
	return err
}

// streamLayer is raft's view of the demux.
type streamLayer struct {
	d *demux
}

var _ raft.StreamLayer = (*streamLayer)(nil)

func (s *streamLayer) Accept() (net.Conn, error) {
	select {
	case c := <-s.d.raftCh:
		return c, nil
	case <-s.d.done:
		return nil, net.ErrClosed
	}
}

// Close is called by raft's transport; the demux itself is closed by the
// Node after raft has shut down.
func (s *streamLayer) Close() error { return nil }

// Addr is the advertised address: raft uses it as this server's address.
func (s *streamLayer) Addr() net.Addr { return advertAddr(s.d.advert) }

func (s *streamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	ctx := context.Background()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	return s.d.dialSub(ctx, string(address), subRaft)
}

// advertAddr is a net.Addr whose String is the advertise "host:port",
// which may be a DNS name.
type advertAddr string

func (a advertAddr) Network() string { return "tcp" }
func (a advertAddr) String() string  { return string(a) }

// rateLimit allows one event per period (for log lines that could flood).
type rateLimit struct {
	mu    sync.Mutex
	every time.Duration
	last  time.Time
}

func (r *rateLimit) allow() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if !r.last.IsZero() && now.Sub(r.last) < r.every {
		return false
	}
	r.last = now
	return true
}

// raftTransport is raft's network transport with our guards: raft's
// heartbeat handler (heartbeatGuard), votes (voteGate), the read lease's
// bookkeeping, and pipelined replication that cannot deadlock (pipeline).
type raftTransport struct {
	*raft.NetworkTransport
	hb    *heartbeatGuard
	votes *voteGate
	lease *readLease
	// pipeline: pipelined replication on (Config.Pipeline); off, raft
	// sends one AppendEntries at a time per follower, each carrying up to
	// MaxAppendEntries entries.
	pipeline bool
	notice   *commitNotice // nil with pipeline on
}

// AppendEntries records, for the read lease, when a request the follower
// accepted was sent (readLease).
// Heartbeats do not count: the follower answers them on the transport's
// goroutine, beside its main loop, which may be deciding at that moment
// that the leader is gone (raft.go runFollower); other AppendEntries, sent
// every CommitTimeout even when there is nothing new, are answered by the
// main loop in order with that decision.
func (t raftTransport) AppendEntries(id raft.ServerID, target raft.ServerAddress, args *raft.AppendEntriesRequest, resp *raft.AppendEntriesResponse) error {
	sent := time.Now()
	t.notice.begin(id, target, args)
	err := t.NetworkTransport.AppendEntries(id, target, args, resp)
	t.notice.end(id, args, resp, err)
	if err == nil && renewsLease(args, resp) {
		t.lease.acked(id, args.Term, sent)
	}
	return err
}

// renewsLease: the follower's answer resp to args counts for the read
// lease (see AppendEntries).
func renewsLease(args *raft.AppendEntriesRequest, resp *raft.AppendEntriesResponse) bool {
	return resp.Success && resp.Term == args.Term && !mayBeHeartbeat(args) && carriesTerm(args)
}

// carriesTerm: a follower that accepted args holds an entry of args.Term
// (the leader's no-op at least), so raft's up-to-date check makes it
// refuse its vote to any candidate whose log lacks one. A request sent
// before that (the first of a term, before the no-op is on disk) does not
// count: its follower could still elect such a candidate.
func carriesTerm(args *raft.AppendEntriesRequest) bool {
	if args.PrevLogTerm == args.Term {
		return true
	}
	n := len(args.Entries)
	return n > 0 && args.Entries[n-1] != nil && args.Entries[n-1].Term == args.Term
}

// mayBeHeartbeat: the receiving NetworkTransport may treat args as a
// heartbeat (net_transport.go handleCommand), whose answer comes from
// outside the follower's main loop.
func mayBeHeartbeat(args *raft.AppendEntriesRequest) bool {
	return args.PrevLogEntry == 0 && args.PrevLogTerm == 0 && len(args.Entries) == 0 && args.LeaderCommitIndex == 0
}

// TimeoutNow tags the request with the term in which this node began the
// transfer (the term whose lease it gave up): raft's TimeoutNow carries no
// term, and one that arrives late (a paused or slow target) would start
// an election that followers join although they still know a leader,
// whose lease would then be wrong. The receiver's voteGate accepts it only
// from its current leader in that very term.
func (t raftTransport) TimeoutNow(id raft.ServerID, target raft.ServerAddress, args *raft.TimeoutNowRequest, resp *raft.TimeoutNowResponse) error {
	tagged := *args
	tagged.Addr = appendTransferTag(slices.Clip(args.Addr), t.lease.blocked.Load())
	return t.NetworkTransport.TimeoutNow(id, target, &tagged, resp)
}

// transferTag separates the sender's address from the transfer's term in
// a TimeoutNow's header (an address never holds a NUL byte).
const transferTag = "\x00transfer-term="

func appendTransferTag(addr []byte, term uint64) []byte {
	return strconv.AppendUint(append(addr, transferTag...), term, 10)
}

// cutTransferTag returns the address without the tag and the tagged term
// (ok false: no tag, a sender that does not tag).
func cutTransferTag(addr []byte) (plain []byte, term uint64, ok bool) {
	plain, tag, found := bytes.Cut(addr, []byte(transferTag))
	if !found {
		return addr, 0, false
	}
	term, err := strconv.ParseUint(string(tag), 10, 64)
	return plain, term, err == nil
}

// Consumer is raft's inbound RPCs with vote requests refused while the
// node holds its votes (voteGate).
func (t raftTransport) Consumer() <-chan raft.RPC {
	return t.votes.filter(t.NetworkTransport.Consumer())
}

// voteGate refuses vote requests (pre-votes too) while held is set: a
// node that started without raft state must not vote before it has caught
// up (Node.releaseVotes), except for the first leader of a new cluster
// (a candidate whose log holds only the bootstrap configuration) as long
// as strict is not set. It also refuses every vote during the read lease's
// length after the node started (readLease.votesRefused). Every other RPC
// passes, in order.
type voteGate struct {
	held   *atomic.Bool
	strict *atomic.Bool
	lease  *readLease
	// transfer reports whether a TimeoutNow from a node, tagged with a
	// term, may start an election here: from the current leader, in the
	// current term (raftTransport.TimeoutNow).
	transfer func(from raft.ServerID, term uint64) bool
	// state is raft's state and current term (nil: none yet).
	state func() (raft.RaftState, uint64, bool)
	// lastEntry is the index and term of the node's last log entry
	// (snapshot included); ok is false when not known.
	lastEntry func() (index, term uint64, ok bool)
	stop      <-chan struct{}
	once      sync.Once
	out       chan raft.RPC
}

func newVoteGate(held, strict *atomic.Bool, lease *readLease, transfer func(raft.ServerID, uint64) bool, stop <-chan struct{}) *voteGate {
	return &voteGate{held: held, strict: strict, lease: lease, transfer: transfer, stop: stop, out: make(chan raft.RPC)}
}

var errTransferCandidate = errors.New("replication: a leadership-transfer candidate takes no AppendEntries of its term (read lease)")

// pass hands rpc to raft. With the read lease on, it also waits for
// raft's answer (and passes it on) before the gate reads the next request,
// so that the gate's checks see raft's state after every earlier request:
// raft handles them one at a time anyway. ok is false when the node stops.
func (g *voteGate) pass(rpc raft.RPC) (resp raft.RPCResponse, ok bool) {
	wait := g.lease.dur > 0 && rpc.RespChan != nil
	orig := rpc.RespChan
	var mine chan raft.RPCResponse
	if wait {
		mine = make(chan raft.RPCResponse, 1)
		rpc.RespChan = mine
	}
	select {
	case g.out <- rpc:
	case <-g.stop:
		return resp, false
	}
	if !wait {
		return resp, true
	}
	select {
	case resp = <-mine:
		orig <- resp // the transport's answer channel holds one
		return resp, true
	case <-g.stop:
		return resp, false
	}
}

// staleTransferVote reports whether req is a leadership-transfer vote
// (which skips raft's "I know a leader" check) from a candidate whose log
// is less up to date than this node's, with the read lease on. raft
// refuses that vote too, but only after a higher term has made this node
// a follower without a leader (raft.go requestVote): it would then grant
// the next ordinary pre-vote and vote, to a candidate that holds the
// term's entry, while the leader still counts on it for its lease. The
// gate refuses it before raft sees it; raft would have refused it anyway.
func (g *voteGate) staleTransferVote(req *raft.RequestVoteRequest) bool {
	if g.lease.dur <= 0 || !req.LeadershipTransfer || g.lastEntry == nil {
		return false
	}
	idx, term, ok := g.lastEntry()
	return ok && (term > req.LastLogTerm || term == req.LastLogTerm && idx > req.LastLogIndex)
}

var (
	errStaleTransferVote = errors.New("replication: leadership-transfer vote from a candidate whose log is behind this node's: refused (read lease)")
	errVotesHeld         = errors.New("replication: started without raft state and not caught up yet: no vote")
	errJustStarted       = errors.New("replication: started less than a read lease ago: no vote yet")
	errStaleTimeout      = errors.New("replication: TimeoutNow not from the current leader in the current term: ignored")
)

func (g *voteGate) filter(in <-chan raft.RPC) <-chan raft.RPC {
	g.once.Do(func() {
		go func() {
			transferred := false // a TimeoutNow made this node a candidate
			for {
				var rpc raft.RPC
				select {
				case rpc = <-in:
				case <-g.stop:
					return
				}
				var last uint64
				vote := false
				switch req := rpc.Command.(type) {
				case *raft.RequestVoteRequest:
					last, vote = req.LastLogIndex, true
					if g.staleTransferVote(req) {
						rpc.Respond(nil, errStaleTransferVote)
						continue
					}
				case *raft.RequestPreVoteRequest:
					last, vote = req.LastLogIndex, true
				case *raft.TimeoutNowRequest:
					plain, term, ok := cutTransferTag(req.Addr)
					if !ok || !g.transfer(raft.ServerID(req.ID), term) {
						rpc.Respond(nil, errStaleTimeout)
						continue
					}
					req.Addr = plain
					resp, ok := g.pass(rpc)
					if !ok {
						return
					}
					transferred = g.lease.dur > 0 && resp.Error == nil
					continue
				case *raft.AppendEntriesRequest:
					// A candidate started by a TimeoutNow accepts an
					// AppendEntries of its own term from another leader
					// without becoming a follower (raft.go appendEntries,
					// candidateFromLeadershipTransfer), and its election
					// timer runs on: its answer must not count toward that
					// leader's lease, so it gets none, for as long as it is
					// a candidate: raft ends the transfer candidacy only
					// after its election timer, which starts after the
					// candidacy's own disk writes (a time bound here
					// could end first: found by review). A later term's
					// request makes it a follower as usual, and an earlier
					// term's is refused by raft, which tells its sender the
					// newer term.
					if transferred {
						st, cur, known := raft.Follower, uint64(0), false
						if g.state != nil {
							st, cur, known = g.state()
						}
						switch {
						case !known || st != raft.Candidate:
							transferred = false
						case req.Term == cur:
							rpc.Respond(nil, errTransferCandidate)
							continue
						}
					}
				}
				// A candidate whose log holds at most the bootstrap
				// configuration (index 1) belongs to a cluster that has
				// committed nothing, unless a peer showed a longer log
				// (strict): one that bootstrapped and was then down
				// for the cluster's whole life.
				if vote && g.held.Load() && (last > 1 || g.strict.Load()) {
					rpc.Respond(nil, errVotesHeld)
					continue
				}
				if vote && g.lease.votesRefused(time.Now()) {
					rpc.Respond(nil, errJustStarted)
					continue
				}
				if _, ok := g.pass(rpc); !ok {
					return
				}
			}
		}()
	})
	return g.out
}

// AppendEntriesPipeline returns raft's pipeline to the follower, wrapped
// so that it cannot deadlock (pipeline).
func (t raftTransport) AppendEntriesPipeline(id raft.ServerID, target raft.ServerAddress) (raft.AppendPipeline, error) {
	if !t.pipeline {
		return nil, raft.ErrPipelineReplicationNotSupported
	}
	inner, err := t.NetworkTransport.AppendEntriesPipeline(id, target)
	if err != nil {
		return nil, err
	}
	return newPipeline(inner, id, t.lease), nil
}

// SetHeartbeatHandler installs raft's handler behind the guard.
func (t raftTransport) SetHeartbeatHandler(fn func(raft.RPC)) {
	t.NetworkTransport.SetHeartbeatHandler(t.hb.wrap(fn))
}

// heartbeatGuard lets shutdown wait for raft's heartbeat handler. The
// transport runs it on its connection goroutines, which raft's Shutdown
// does not wait for: a heartbeat past the handler's shutdown check that
// carries a newer term writes it to the stable store, and raft panics when
// that write fails ("failed to save current term"), as it does once the
// store is closed; the CI run whose internal/node tests crashed with a
// goroutine dump ending in processHeartbeat fits this (the dump's head was
// cut off, so it is the likeliest cause, not a proven one). After close
// the handler answers every heartbeat with an error, and close returns
// only once no handler runs.
type heartbeatGuard struct {
	mu     sync.RWMutex
	closed bool
}

func (g *heartbeatGuard) wrap(fn func(raft.RPC)) func(raft.RPC) {
	if fn == nil {
		return nil
	}
	return func(rpc raft.RPC) {
		g.mu.RLock()
		defer g.mu.RUnlock()
		if g.closed {
			rpc.Respond(nil, raft.ErrTransportShutdown)
			return
		}
		fn(rpc)
	}
}

// close waits for the handlers running and turns later ones away. Call it
// after raft's Shutdown (which unblocks a handler waiting on raft).
func (g *heartbeatGuard) close() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
}
