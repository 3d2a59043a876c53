package replication

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/raft"
)

// manageLoop runs every ReconcileInterval (and once at start): bootstrap
// while that is still a question, membership reconciliation and the expiry
// sweep on the leader, and the "state but not a member" check.
func (n *Node) manageLoop() {
	defer n.wg.Done()
	t := time.NewTicker(n.cfg.ReconcileInterval)
	defer t.Stop()
	nextSweep := time.Now().Add(n.cfg.ExpirySweepInterval)
	for {
		if !n.bootDone.Load() {
			n.maybeBootstrap()
		}
		if n.raft.State() == raft.Leader {
			n.reconcile()
			if n.cfg.ExpirySweepInterval > 0 && time.Now().After(nextSweep) {
				n.sweepExpired()
				n.sweepSessions()
				n.sweepBlobs(time.Now())
				nextSweep = time.Now().Add(n.cfg.ExpirySweepInterval)
			}
		}
		n.checkMember()
		n.clearOwnDeparture()
		n.releaseVotes()
		n.ticks.Add(1)
		select {
		case <-t.C:
		case <-n.stop:
			return
		}
	}
}

// peers returns what membership sees, with this node's own entry replaced
// by its own truth (and added if the caller left it out).
func (n *Node) peers() []Peer {
	var in []Peer
	if n.cfg.Peers != nil {
		in = n.cfg.Peers()
	}
	out := make([]Peer, 0, len(in)+1)
	for _, p := range in {
		if p.ID != "" && p.ID != n.cfg.NodeID {
			out = append(out, p)
		}
	}
	return append(out, Peer{ID: n.cfg.NodeID, Addr: n.cfg.Advertise, BootstrapExpect: n.cfg.BootstrapExpect, HasState: n.HasState()})
}

// bootstrapPlan decides whether self should bootstrap, and with which
// voters. It is a pure function of what membership shows, so every node
// that sees the same peers computes the same configuration (Consul and
// Nomad's bootstrap_expect):
//
//   - never with state of our own, never when any visible peer has state
//     (a cluster exists: wait for its leader to add us);
//   - peers with BootstrapExpect 0 are join-only and ignored; a peer with
//     another non-zero value aborts (misconfiguration);
//   - wait for at least expect candidates; the voters are the expect
//     candidates with the lowest ids, and only those bootstrap: a node
//     outside them waits for the leader to add it.
//
// It returns the servers and "" when self should bootstrap now, else nil
// and the reason.
func bootstrapPlan(self Peer, expect int, peers []Peer) ([]raft.Server, string) {
	if expect <= 0 {
		return nil, "bootstrap disabled (bootstrap_expect 0): waiting to be added"
	}
	if self.HasState {
		return nil, "this node has raft state"
	}
	byID := make(map[string]Peer, len(peers))
	var cands []Peer
	for _, p := range peers {
		if prev, dup := byID[p.ID]; dup {
			if prev.Addr != p.Addr {
				return nil, fmt.Sprintf("node id %q seen with two addresses (%s, %s)", p.ID, prev.Addr, p.Addr)
			}
			continue
		}
		byID[p.ID] = p
		switch {
		case p.HasState:
			return nil, fmt.Sprintf("peer %s has raft state: waiting for the cluster's leader to add this node", p.ID)
		case p.BootstrapExpect == 0:
			continue
		case p.BootstrapExpect != expect:
			return nil, fmt.Sprintf("peer %s has bootstrap_expect %d, this node %d: not bootstrapping", p.ID, p.BootstrapExpect, expect)
		case p.Addr == "":
			return nil, fmt.Sprintf("peer %s has no address yet", p.ID)
		}
		cands = append(cands, p)
	}
	if len(cands) < expect {
		return nil, fmt.Sprintf("waiting for bootstrap peers: %d of %d visible", len(cands), expect)
	}
	slices.SortFunc(cands, func(a, b Peer) int { return cmp.Compare(a.ID, b.ID) })
	chosen := cands[:expect]
	if !slices.ContainsFunc(chosen, func(p Peer) bool { return p.ID == self.ID }) {
		return nil, fmt.Sprintf("not among the %d lowest ids: waiting for the leader to add this node", expect)
	}
	servers := make([]raft.Server, len(chosen))
	for i, p := range chosen {
		servers[i] = raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(p.ID), Address: raft.ServerAddress(p.Addr)}
	}
	return servers, ""
}

func planKey(servers []raft.Server) string {
	var b strings.Builder
	for _, s := range servers {
		b.WriteString(string(s.ID) + "=" + string(s.Address) + ";")
	}
	return b.String()
}

// maybeBootstrap bootstraps when the plan says so and the plan was the same
// on the previous tick too (for expect > 1): one interval of settling lets
// "has state" and late joiners propagate through gossip before a
// configuration is written that can never be taken back.
func (n *Node) maybeBootstrap() {
	if n.HasState() {
		n.bootDone.Store(true)
		return
	}
	servers, reason := bootstrapPlan(Peer{ID: n.cfg.NodeID, HasState: false}, n.cfg.BootstrapExpect, n.peers())
	n.memberMu.Lock()
	key, prev := planKey(servers), n.lastPlan
	n.lastPlan = key
	n.memberMu.Unlock()
	if servers == nil {
		if n.planLog.allow() {
			n.log.Info("not bootstrapping", "reason", reason)
		}
		return
	}
	if n.cfg.BootstrapExpect > 1 && key != prev {
		return // settle: confirm on the next tick
	}
	err := n.raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error()
	switch {
	case err == nil:
		n.bootDone.Store(true)
		n.hadState.Store(true)
		n.votesHeld.Store(false) // every voter of a new cluster starts empty
		n.log.Info("bootstrapped the cluster", "voters", key)
	case errors.Is(err, raft.ErrCantBootstrap):
		n.bootDone.Store(true)
	default:
		n.log.Error("bootstrap failed", "err", err)
	}
}

// reconcile runs on the leader: add visible peers that are not in the
// configuration as non-voters, fix changed addresses, promote caught-up
// non-voters, and remove servers that left gracefully and stayed away
// (removeDeparted). A peer that merely vanished (failed, cut off) is never
// removed: it may be restarting or briefly unreachable.
func (n *Node) reconcile() {
	ctx, cancel := context.WithTimeout(n.life, max(n.cfg.ReconcileInterval, 500*time.Millisecond))
	defer cancel()
	cfg, err := n.configuration(ctx)
	if err != nil {
		return
	}
	peers := n.peers()
	visible := make(map[string]bool, len(peers))
	for _, p := range peers {
		visible[p.ID] = true
	}
	n.memberMu.Lock()
	for id := range n.tombstones {
		if !visible[id] {
			delete(n.tombstones, id) // it left; it may come back fresh
		}
	}
	n.memberMu.Unlock()

	timeout := n.cfg.IOTimeout
	for _, p := range peers {
		if p.ID == n.cfg.NodeID || p.Addr == "" {
			continue
		}
		s, in := findServer(cfg, p.ID)
		switch {
		case !in:
			n.memberMu.Lock()
			_, removed := n.tombstones[p.ID]
			n.memberMu.Unlock()
			if removed {
				continue
			}
			if err := waitFuture(ctx, n.raft.AddNonvoter(raft.ServerID(p.ID), raft.ServerAddress(p.Addr), 0, timeout)); err != nil {
				n.log.Warn("adding non-voter failed", "server", p.ID, "addr", p.Addr, "err", err)
				return
			}
			n.m.membership.WithLabelValues("add_nonvoter").Inc()
			n.log.Info("added server as non-voter", "server", p.ID, "addr", p.Addr)
		case string(s.Address) != p.Addr:
			if n.stillAnswers(ctx, p.ID, string(s.Address)) {
				// Two members claim one id: never silently replace a
				// server that is alive where the configuration says.
				n.m.membership.WithLabelValues("address_conflict").Inc()
				if n.conflictLog.allow() {
					n.log.Error("a member claims the node id of a server that still answers at its configured address; not replacing it "+
						"(if this is a replacement, stop the old one or remove it with broker cluster remove-node)",
						"server", p.ID, "configured_addr", string(s.Address), "claimed_addr", p.Addr)
				}
				continue
			}
			// AddNonvoter keeps a voter a voter and only updates the address.
			if err := waitFuture(ctx, n.raft.AddNonvoter(s.ID, raft.ServerAddress(p.Addr), 0, timeout)); err != nil {
				n.log.Warn("updating server address failed", "server", p.ID, "err", err)
				return
			}
			n.m.membership.WithLabelValues("update_address").Inc()
			n.log.Warn("server address changed", "server", p.ID, "old", string(s.Address), "new", p.Addr)
		}
	}
	servers := make([]string, len(cfg.Servers))
	for i, s := range cfg.Servers {
		servers[i] = string(s.ID)
	}
	// Left on purpose (the log's record, or this leader's membership) and
	// missing since, on this leader's clock.
	left := n.absentFor(servers, visible)
	// Departed: left gracefully and away for RemoveLeftAfter, not just
	// restarting (a voter restarting still counts, or a rolling restart
	// would promote a waiting non-voter and leave the voters even).
	departed := func(id string) bool {
		since, ok := left[id]
		return ok && !visible[id] && n.cfg.RemoveLeftAfter >= 0 && time.Since(since) >= n.cfg.RemoveLeftAfter
	}
	n.promote(ctx, cfg, departed)
	n.removeDeparted(ctx, cfg, departed, left)
	inConfig := make(map[string]bool, len(cfg.Servers))
	for _, s := range cfg.Servers {
		inConfig[string(s.ID)] = true
	}
	n.syncDepartures(ctx, inConfig, visible)
}

// removeDeparted removes one server that membership saw leave gracefully
// at least RemoveLeftAfter ago and that is not visible again: a StatefulSet
// scaled down (Consul autopilot's dead-server clean-up, for left servers
// only). A rolling restart leaves too, but comes back within the bound and
// stays a voter. A voter goes only while MinVoters remain: below that, the
// quorum of what is left would be too small to lose another node. One per
// round, so the configuration changes one server at a time. A removed
// server that comes back is added again as a non-voter, as a new one.
func (n *Node) removeDeparted(ctx context.Context, cfg raft.Configuration, departed func(string) bool, left map[string]time.Time) {
	if n.cfg.RemoveLeftAfter < 0 {
		return
	}
	voters := 0
	for _, s := range cfg.Servers {
		if s.Suffrage == raft.Voter {
			voters++
		}
	}
	for _, s := range cfg.Servers {
		id := string(s.ID)
		since := left[id]
		if !departed(id) || id == n.cfg.NodeID {
			continue
		}
		if s.Suffrage == raft.Voter && voters-1 < n.cfg.MinVoters {
			if n.keepLog.allow() {
				n.log.Warn("a voter left and did not come back, but removing it would leave fewer voters than the minimum; "+
					"keeping it (remove it with broker cluster remove-node if it is gone for good)",
					"server", id, "voters", voters, "min_voters", n.cfg.MinVoters)
			}
			continue
		}
		if err := waitFuture(ctx, n.raft.RemoveServer(s.ID, 0, n.cfg.IOTimeout)); err != nil {
			n.log.Warn("removing a departed server failed", "server", id, "err", err)
			return
		}
		n.m.membership.WithLabelValues("remove_departed").Inc()
		n.log.Info("removed a server that left and did not come back", "server", id, "left_ago", time.Since(since).Round(time.Second),
			"voter", s.Suffrage == raft.Voter)
		return
	}
}

// promote makes non-voters voters once their log has stayed within
// CatchUpThreshold entries of the leader's for StabilizationTime (what
// autopilot calls server stabilization), so an empty new node never counts
// toward the quorum while it is still catching up.
func (n *Node) promote(ctx context.Context, cfg raft.Configuration, departed func(string) bool) {
	now := time.Now()
	nonvoters := map[string]bool{}
	voters := 0 // present ones: a voter that left counts as gone
	var ready []raft.Server
	for _, s := range cfg.Servers {
		if s.Suffrage == raft.Voter && !departed(string(s.ID)) {
			voters++
		}
		if s.Suffrage != raft.Nonvoter {
			continue
		}
		id := string(s.ID)
		nonvoters[id] = true
		st, err := n.fetchPeerStatus(ctx, string(s.Address))
		last := n.raft.LastIndex()
		n.memberMu.Lock()
		since, seen := n.caughtUp[id]
		switch {
		case err != nil || st.LastIndex+n.cfg.CatchUpThreshold < last:
			delete(n.caughtUp, id)
			seen = false
		case !seen:
			n.caughtUp[id] = now
		}
		n.memberMu.Unlock()
		if !seen || now.Sub(since) < n.cfg.StabilizationTime {
			continue
		}
		ready = append(ready, s)
	}
	// Keep the voters odd from three on: a fourth voter raises the quorum
	// to three without tolerating a second failure, so it waits as a
	// non-voter (replicating, not voting) until a fifth is ready too.
	if voters >= 3 && len(ready) > 0 && (voters+len(ready))%2 == 0 {
		if len(ready) == 1 && n.oddLog.allow() {
			n.log.Info("caught-up non-voter stays a non-voter until another is ready: an even number of voters tolerates no more failures than one fewer",
				"server", string(ready[0].ID), "voters", voters)
		}
		ready = ready[:len(ready)-1]
	}
	if voters >= 4 && voters%2 == 0 && len(ready) == 0 && voters-1 >= n.cfg.MinVoters {
		n.demoteOne(ctx, cfg, departed)
		return
	}
	for _, s := range ready {
		id := string(s.ID)
		if err := waitFuture(ctx, n.raft.AddVoter(s.ID, s.Address, 0, n.cfg.IOTimeout)); err != nil {
			n.log.Warn("promoting non-voter failed", "server", id, "err", err)
			return
		}
		n.memberMu.Lock()
		delete(n.caughtUp, id)
		n.memberMu.Unlock()
		n.m.membership.WithLabelValues("promote").Inc()
		n.log.Info("promoted server to voter", "server", id, "leader_last_index", n.raft.LastIndex())
	}
	n.memberMu.Lock()
	for id := range n.caughtUp {
		if !nonvoters[id] {
			delete(n.caughtUp, id)
		}
	}
	n.memberMu.Unlock()
}

// demoteOne makes one present voter a non-voter when the voters are even
// (a scale-down from 5 to 4): four voters need three for a quorum and
// survive one failure, like three. The last voter by id that is not this
// leader goes; it keeps replicating and is promoted again with the next
// node that is ready.
func (n *Node) demoteOne(ctx context.Context, cfg raft.Configuration, departed func(string) bool) {
	var victim raft.ServerID
	for _, s := range cfg.Servers {
		if s.Suffrage == raft.Voter && string(s.ID) != n.cfg.NodeID && !departed(string(s.ID)) && s.ID > victim {
			victim = s.ID
		}
	}
	if victim == "" {
		return
	}
	if err := waitFuture(ctx, n.raft.DemoteVoter(victim, 0, n.cfg.IOTimeout)); err != nil {
		n.log.Warn("demoting a voter to keep the voters odd failed", "server", string(victim), "err", err)
		return
	}
	n.m.membership.WithLabelValues("demote").Inc()
	n.log.Info("demoted a voter to a non-voter: an even number of voters tolerates no more failures than one fewer", "server", string(victim))
}

// fetchPeerStatus asks a node for its log position.
func (n *Node) fetchPeerStatus(ctx context.Context, addr string) (peerStatus, error) {
	resp, err := n.rpcc.call(ctx, addr, rpcStatus, nil)
	if err != nil {
		return peerStatus{}, err
	}
	r := reader{b: resp}
	if err := r.error(); err != nil {
		return peerStatus{}, err
	}
	st := peerStatus{LastIndex: r.uvarint(), AppliedIndex: r.uvarint(), Term: r.uvarint(), CommitIndex: r.uvarint()}
	return st, r.end()
}

// peerStatus is this node's answer to fetchPeerStatus.
func (n *Node) peerStatus() peerStatus {
	// AppliedIndex is what the state machine holds (FSM.synced), not raft's
	// AppliedIndex, which moves before the FSM has applied anything.
	return peerStatus{LastIndex: n.raft.LastIndex(), AppliedIndex: n.fsm.synced.Load(),
		Term: n.raft.CurrentTerm(), CommitIndex: n.raft.CommitIndex()}
}

// releaseVotes lets a node that started without raft state vote once it
// is clear that it forgot nothing. Such a node is one of three things:
//   - a member of a new cluster: when it first sees its peers, none has
//     raft state either (they bootstrap together): it votes at once;
//   - a new member of an existing cluster (a scale-up): a non-voter,
//     never asked for a vote;
//   - a voter that lost its volume (a pod rescheduled with an empty disk
//     keeps its id and address, so the configuration still lists it).
//     Raft assumes a voter never forgets what it acknowledged: granting
//     its vote now could elect a candidate that lacks entries committed
//     with the help of its lost copy. It votes once its log reaches the
//     leader's commit index, which covers everything it ever acknowledged.
//
// Until it has seen a peer it stays held (it cannot tell yet).
func (n *Node) releaseVotes() {
	if !n.votesHeld.Load() {
		return
	}
	if !n.votesDecided {
		others, withState := 0, 0
		for _, p := range n.peers() {
			if p.ID == n.cfg.NodeID {
				continue
			}
			others++
			if p.HasState {
				withState++
			}
		}
		if others == 0 {
			return
		}
		n.votesDecided = true
		if withState == 0 {
			n.votesHeld.Store(false)
			n.votesStrict.Store(false)
			return
		}
		n.log.Info("started without raft state while the cluster has some: granting no votes until caught up with the leader "+
			"(this may be a voter that lost its data)", "peers_with_state", withState)
	}
	if n.raft.State() == raft.Leader {
		n.votesHeld.Store(false) // elected: its log is the reference now
		return
	}
	n.checkVotesStrict()
	ctx, cancel := context.WithTimeout(n.life, time.Second)
	defer cancel()
	lc, err := n.leaderCommit(ctx)
	if err != nil || lc == 0 || n.raft.LastIndex() < lc {
		return
	}
	n.votesHeld.Store(false)
	n.log.Info("caught up with the leader; granting votes from now on", "leader_commit", lc)
}

// checkVotesStrict decides, while votes are held, whether candidates
// holding only the bootstrap configuration may still get this node's vote.
// It asks every peer with raft state for its log position (in parallel,
// each bounded, so that a peer that does not answer cannot starve the
// catch-up check that follows). Once one shows a log past the bootstrap
// configuration, the cluster has committed writes, and such a candidate (a
// node that bootstrapped and was down ever since) must not get the vote:
// it could win and overwrite writes this node's lost copy helped commit.
// Only while every peer with state answers with nothing past it (a new
// cluster electing its first leader, one node having bootstrapped first)
// are they allowed. A node starts strict: until it knows, it refuses.
func (n *Node) checkVotesStrict() {
	if n.votesPast.Load() {
		return
	}
	var peers []Peer
	for _, p := range n.peers() {
		if p.ID != n.cfg.NodeID && p.HasState && p.Addr != "" {
			peers = append(peers, p)
		}
	}
	if len(peers) == 0 {
		return
	}
	type answer struct {
		id   string
		last uint64
		err  error
	}
	answers := make(chan answer, len(peers))
	for _, p := range peers {
		go func() {
			ctx, cancel := context.WithTimeout(n.life, 300*time.Millisecond)
			defer cancel()
			st, err := n.fetchPeerStatus(ctx, p.Addr)
			answers <- answer{p.ID, st.LastIndex, err}
		}()
	}
	all := true
	for range peers {
		a := <-answers
		switch {
		case a.err != nil:
			all = false
		case a.last > 1:
			n.votesPast.Store(true)
			n.votesStrict.Store(true)
			n.log.Info("a peer's log is past the bootstrap configuration: no votes for candidates holding only that either, until caught up",
				"peer", a.id, "peer_last_index", a.last)
		}
	}
	if all && !n.votesPast.Load() {
		n.votesStrict.Store(false) // a new cluster: its first leader needs these votes
	}
}

// checkMember logs loudly (once a minute) when this node has raft state but
// is not in its latest configuration: it then neither votes nor serves
// writes until the leader re-adds it, which happens when it is visible in
// membership and was not removed on purpose.
func (n *Node) checkMember() {
	if n.left.Load() || !n.bootDone.Load() || !n.HasState() {
		return
	}
	ctx, cancel := context.WithTimeout(n.life, time.Second)
	defer cancel()
	cfg, err := n.configuration(ctx)
	if err != nil {
		return
	}
	if _, ok := findServer(cfg, n.cfg.NodeID); ok || len(cfg.Servers) == 0 && n.raft.LastIndex() == 0 {
		return
	}
	if n.notMember.allow() {
		n.log.Error("this node has raft state but is not in the raft configuration; it will not vote or take writes "+
			"until the leader re-adds it (the leader does so when it sees this node in membership, unless it was removed on purpose; "+
			"to rejoin a removed node, wipe its data dir)",
			"servers", len(cfg.Servers), "last_index", n.raft.LastIndex(), "data_dir", n.cfg.DataDir)
	}
}

// sweepExpired clears retained messages whose expiry passed, with
// conditional clears so that a value replaced meanwhile survives.
func (n *Node) sweepExpired() {
	exp := n.fsm.expired(time.Now(), 1000)
	if len(exp) == 0 {
		return
	}
	b := &Batch{Commands: make([]Command, len(exp))}
	for i, m := range exp {
		b.Commands[i] = &RetainClear{Topic: m.Topic, IfIndex: m.Index}
	}
	ctx, cancel := context.WithTimeout(n.life, n.cfg.IOTimeout)
	defer cancel()
	if _, err := n.Apply(ctx, b); err != nil {
		n.log.Warn("clearing expired retained messages failed", "count", len(exp), "err", err)
		return
	}
	n.log.Debug("cleared expired retained messages", "count", len(exp))
}

// stillAnswers reports whether the node at addr says it is id: then a
// member claiming id from another address is not its replacement. An
// unreachable address, another node there (a reused pod IP), or a node
// too old to say, all allow the address update.
func (n *Node) stillAnswers(ctx context.Context, id, addr string) bool {
	ctx, cancel := context.WithTimeout(ctx, max(n.cfg.HeartbeatTimeout, 200*time.Millisecond))
	defer cancel()
	resp, err := n.rpcc.call(ctx, addr, rpcWhoAmI, nil)
	if err != nil {
		return false
	}
	r := reader{b: resp}
	if r.error() != nil {
		return false
	}
	got := r.str()
	return r.end() == nil && got == id
}
