package replication

import (
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// Commit notices. A follower learns that an entry is committed only from
// the leader's next AppendEntries: raft sends one with the next entries
// or, when none come, once CommitTimeout (5-10 ms) has passed. A node that
// waits to apply an entry (a persistent subscriber's node delivering a
// QoS 1 message, a follower whose forwarded write just returned) waits
// that long whenever the cluster is not busy: one publisher that waits for
// each PUBACK paid it on every message.
//
// The leader's transport sees every AppendEntries raft sends and knows,
// per follower, the last entry the follower accepted in this term. Once
// the commit index passes what the follower was last told, no request to
// it is in flight, and raft has no newer entry to send it (whose request
// would carry the commit), the notifier sends at once the request raft's
// CommitTimeout would send later: no entries, PrevLogEntry the follower's
// last accepted entry (so its consistency check passes, and the log
// matching property says everything up to there matches the leader's), and
// LeaderCommitIndex capped there, so the follower marks as committed only
// entries it holds as the leader does. Answers are ignored: a follower
// that refuses (a newer term, a log that diverged) is raft's own business
// through its own requests.
//
// Pipelined replication (Config.Pipeline) sends outside AppendEntries, so
// there the notifier is off.
type commitNotice struct {
	send  func(raft.ServerID, raft.ServerAddress, *raft.AppendEntriesRequest, *raft.AppendEntriesResponse) error
	raft  func() *raft.Raft // nil until raft runs
	sent  func()            // counts a notice (metrics)
	stop  chan struct{}
	mu    sync.Mutex
	peers map[raft.ServerID]*noticePeer
	done  bool
	wg    sync.WaitGroup
}

// noticePeer is one follower's replication as the leader's transport saw
// it; fields under commitNotice.mu.
type noticePeer struct {
	addr     raft.ServerAddress
	kick     chan struct{}
	header   raft.RPCHeader
	term     uint64 // of the requests below
	match    uint64 // last entry the follower accepted in term
	matchT   uint64 // its term
	told     uint64 // highest LeaderCommitIndex sent in term
	inflight int    // raft's own requests on the wire
}

func newCommitNotice(send func(raft.ServerID, raft.ServerAddress, *raft.AppendEntriesRequest, *raft.AppendEntriesResponse) error,
	rf func() *raft.Raft, sent func()) *commitNotice {
	return &commitNotice{send: send, raft: rf, sent: sent, stop: make(chan struct{}), peers: map[raft.ServerID]*noticePeer{}}
}

// begin records that raft sends args to id.
func (c *commitNotice) begin(id raft.ServerID, target raft.ServerAddress, args *raft.AppendEntriesRequest) {
	if c == nil || mayBeHeartbeat(args) {
		return
	}
	c.mu.Lock()
	if p := c.peer(id, target); p != nil {
		p.inflight++
	}
	c.mu.Unlock()
}

// end records the follower's answer resp to args (err: none came).
func (c *commitNotice) end(id raft.ServerID, args *raft.AppendEntriesRequest, resp *raft.AppendEntriesResponse, err error) {
	if c == nil || mayBeHeartbeat(args) {
		return
	}
	c.mu.Lock()
	p := c.peers[id]
	if p == nil {
		c.mu.Unlock()
		return
	}
	p.inflight--
	if err == nil && resp.Term == args.Term && args.Term >= p.term {
		if args.Term != p.term {
			p.term, p.match, p.matchT, p.told = args.Term, 0, 0, 0
		}
		if resp.Success {
			last, lastT := args.PrevLogEntry, args.PrevLogTerm
			if n := len(args.Entries); n > 0 && args.Entries[n-1] != nil {
				last, lastT = args.Entries[n-1].Index, args.Entries[n-1].Term
			}
			// Within a term the leader never rewrites its log, so what the
			// follower accepted keeps matching: match only grows.
			if last >= p.match {
				p.match, p.matchT = last, lastT
			}
			p.header = args.RPCHeader // its Addr names the leader
			p.told = max(p.told, args.LeaderCommitIndex)
		} else {
			p.match, p.matchT = 0, 0 // diverged: raft repairs it first
		}
	}
	c.mu.Unlock()
	c.kickOne(p)
}

// committed wakes every follower's notifier (the commit index may have
// moved).
func (c *commitNotice) committed() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range c.peers {
		c.kickOne(p)
	}
}

func (c *commitNotice) kickOne(p *noticePeer) {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// peer returns id's state, starting its notifier the first time (nil once
// closed). Call with mu held.
func (c *commitNotice) peer(id raft.ServerID, addr raft.ServerAddress) *noticePeer {
	p := c.peers[id]
	if p == nil {
		if c.done {
			return nil
		}
		p = &noticePeer{kick: make(chan struct{}, 1)}
		c.peers[id] = p
		c.wg.Add(1)
		go c.run(id, p)
	}
	p.addr = addr
	return p
}

func (c *commitNotice) run(id raft.ServerID, p *noticePeer) {
	defer c.wg.Done()
	for {
		select {
		case <-p.kick:
		case <-c.stop:
			return
		}
		if _, _, ok := c.due(p, false); !ok {
			continue
		}
		// Under load raft's next request, carrying the commit, usually
		// starts within the grace: a notice then would only double the
		// requests (measured: 1.8 notices per entry without the grace).
		t := time.NewTimer(noticeGrace)
		select {
		case <-t.C:
		case <-c.stop:
			t.Stop()
			return
		}
		req, addr, ok := c.due(p, true)
		if !ok {
			continue
		}
		var resp raft.AppendEntriesResponse
		if err := c.send(id, addr, &req, &resp); err == nil {
			c.sent()
		}
	}
}

// noticeGrace is how long a notice waits for raft's own next request.
const noticeGrace = time.Millisecond

// due returns the notice p is owed, if any; claim records it as sent.
func (c *commitNotice) due(p *noticePeer, claim bool) (raft.AppendEntriesRequest, raft.ServerAddress, bool) {
	r := c.raft()
	if r == nil || r.State() != raft.Leader {
		return raft.AppendEntriesRequest{}, "", false
	}
	term := r.CurrentTerm()
	commit, last := r.CommitIndex(), r.LastIndex()
	if r.State() != raft.Leader || r.CurrentTerm() != term {
		return raft.AppendEntriesRequest{}, "", false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	to := min(commit, p.match)
	if p.inflight > 0 || p.term != term || to <= p.told || last > p.match {
		return raft.AppendEntriesRequest{}, "", false
	}
	if claim {
		p.told = to
	}
	return raft.AppendEntriesRequest{RPCHeader: p.header, Term: p.term,
		PrevLogEntry: p.match, PrevLogTerm: p.matchT, LeaderCommitIndex: to}, p.addr, true
}

// close stops the notifiers; call it once the node's connections are
// closed (demux.close), which ends a send in progress.
func (c *commitNotice) close() {
	if c == nil {
		return
	}
	c.mu.Lock()
	if !c.done {
		c.done = true
		close(c.stop)
	}
	c.mu.Unlock()
	c.wg.Wait()
}
