package cluster

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
)

// The route table records, at node granularity, which topic filters each node
// has local subscribers for. Each node is the only writer of its own entry:
//
//   - locally, filters are reference counted (AddRoute/RemoveRoute); the first
//     reference announces the filter, the last withdraws it, and each change
//     bumps the node's version;
//   - every change is gossiped as a versioned delta (routeDelta) that applies
//     only on top of exactly the previous version;
//   - full entries (nodeRoutes) travel in memberlist push/pull as
//     anti-entropy, and the newer (incarnation, version) wins.
//
// The incarnation is the node's start time, so a restarted node's entry
// supersedes its previous life's entry without any coordination.

type routeOp uint8

// Route delta operations. Append-only: these values are on the wire.
const (
	opAdd    routeOp = 1
	opRemove routeOp = 2
)

// routeDelta is one change of one node's route set.
type routeDelta struct {
	Node        string
	Incarnation uint64
	Version     uint64 // version after applying this delta; 1 is the first change of an incarnation
	Op          routeOp
	Filter      string
}

// nodeRoutes is the full route set of one node at (Incarnation, Version).
type nodeRoutes struct {
	Node        string
	Incarnation uint64
	Version     uint64
	Filters     []string
}

type applyResult int

const (
	deltaApplied  applyResult = iota // applied (and maybe unblocked buffered ones)
	deltaStale                       // older than or equal to what we have: a gossip retransmission
	deltaBuffered                    // a gap: held until the missing deltas or a full state arrive
	deltaIgnored                     // about ourselves or about a node that is not a live member
	deltaInvalid                     // malformed (unknown op, invalid filter)
)

func (r applyResult) String() string {
	switch r {
	case deltaApplied:
		return "applied"
	case deltaStale:
		return "stale"
	case deltaBuffered:
		return "buffered"
	case deltaIgnored:
		return "ignored"
	default:
		return "invalid"
	}
}

// maxPendingDeltas bounds the out-of-order buffer per node. Gossip does not
// preserve order (memberlist even sends newer broadcasts first), so a burst of
// subscriptions routinely arrives as v5, v4, v3. Beyond the bound we give up
// and let anti-entropy repair the entry.
const maxPendingDeltas = 1024

type remoteEntry struct {
	incarnation uint64
	version     uint64
	filters     map[string]struct{}
	pendingInc  uint64
	pending     map[uint64]routeDelta // by version, deltas of pendingInc only
	headInc     uint64                // latest head the node announced
	headVer     uint64
	// syncing: a large snapshot is being applied in batches
	// (mergeSnapshot); deltas wait in pending, push/pull leaves it alone.
	syncing bool
}

// routeTable is safe for concurrent use. Lock order: routeTable.mu is a leaf;
// nothing is called out while holding it.
type routeTable struct {
	self string

	mu          sync.RWMutex
	incarnation uint64
	version     uint64
	local       map[string]int // filter -> reference count
	members     map[string]bool
	remote      map[string]*remoteEntry
	index       routeIndex

	// onRemote, if set (before use), is called without the lock after a
	// remote node's entry moved forward: route acknowledgements
	// (routeack.go) tell that node how far we are.
	onRemote func(node string)
}

func newRouteTable(self string, incarnation uint64) *routeTable {
	return &routeTable{
		self:        self,
		incarnation: incarnation,
		local:       make(map[string]int),
		members:     make(map[string]bool),
		remote:      make(map[string]*remoteEntry),
	}
}

var errInvalidFilter = errors.New("invalid topic filter")

// addLocal takes a reference on filter. On the first reference it returns the
// delta to gossip and true.
func (rt *routeTable) addLocal(filter string) (routeDelta, bool, error) {
	if !ValidFilter(filter) {
		return routeDelta{}, false, fmt.Errorf("%w: %q", errInvalidFilter, filter)
	}
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.local[filter]++
	if rt.local[filter] > 1 {
		return routeDelta{}, false, nil
	}
	rt.version++
	return routeDelta{Node: rt.self, Incarnation: rt.incarnation, Version: rt.version, Op: opAdd, Filter: filter}, true, nil
}

// removeLocal drops a reference on filter. On the last reference it returns
// the delta to gossip and true. Removing an unknown filter is a no-op: mochi
// reports unsubscribes for filters that never produced a subscribe (failed
// subscriptions, whole-client cleanup), and the caller should not have to
// track that.
func (rt *routeTable) removeLocal(filter string) (routeDelta, bool) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	n, ok := rt.local[filter]
	if !ok {
		return routeDelta{}, false
	}
	if n > 1 {
		rt.local[filter] = n - 1
		return routeDelta{}, false
	}
	delete(rt.local, filter)
	rt.version++
	return routeDelta{Node: rt.self, Incarnation: rt.incarnation, Version: rt.version, Op: opRemove, Filter: filter}, true
}

// hasLocal reports whether a local subscriber holds filter (for shared
// groups: whether this node has a member of the group).
func (rt *routeTable) hasLocal(filter string) bool {
	rt.mu.RLock()
	defer rt.mu.RUnlock()
	return rt.local[filter] > 0
}

// setMember marks a remote node as a live member (its routes are accepted) or
// as gone (its routes are removed and further gossip about it is ignored until
// it is a member again). This gating is what stops a peer that has not yet
// noticed a death from resurrecting the dead node's routes in push/pull.
func (rt *routeTable) setMember(node string, alive bool) {
	if node == rt.self {
		return
	}
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if alive {
		rt.members[node] = true
		return
	}
	delete(rt.members, node)
	if e := rt.remote[node]; e != nil {
		for f := range e.filters {
			rt.index.remove(f, node)
		}
		delete(rt.remote, node)
	}
}

// applyDelta applies a gossiped delta if it is the next version of the
// node's entry, buffers it if it is ahead, and drops it if it is old.
func (rt *routeTable) applyDelta(d routeDelta) applyResult {
	res := rt.applyDeltaQuiet(d)
	if res == deltaApplied && rt.onRemote != nil {
		rt.onRemote(d.Node)
	}
	return res
}

func (rt *routeTable) applyDeltaQuiet(d routeDelta) applyResult {
	if d.Op != opAdd && d.Op != opRemove || !ValidFilter(d.Filter) || d.Version == 0 {
		return deltaInvalid
	}
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if d.Node == rt.self || !rt.members[d.Node] {
		return deltaIgnored
	}
	e := rt.remote[d.Node]
	if e == nil {
		e = &remoteEntry{filters: make(map[string]struct{})}
		rt.remote[d.Node] = e
	}
	switch {
	case e.syncing:
		return e.bufferLocked(d)
	case d.Incarnation < e.incarnation, d.Incarnation == e.incarnation && d.Version <= e.version:
		return deltaStale
	case d.Incarnation == e.incarnation && d.Version == e.version+1,
		d.Incarnation > e.incarnation && d.Version == 1:
		if d.Incarnation > e.incarnation {
			// Every incarnation starts empty at version 0.
			rt.replaceLocked(d.Node, e, d.Incarnation, 0, nil)
		}
		rt.applyLocked(d.Node, e, d)
		rt.drainLocked(d.Node, e)
		return deltaApplied
	default:
		return e.bufferLocked(d)
	}
}

// bufferLocked holds a delta that does not apply yet.
func (e *remoteEntry) bufferLocked(d routeDelta) applyResult {
	if d.Incarnation != e.pendingInc || e.pending == nil {
		if d.Incarnation < e.pendingInc {
			return deltaStale
		}
		e.pendingInc = d.Incarnation
		e.pending = make(map[uint64]routeDelta)
	}
	if len(e.pending) >= maxPendingDeltas {
		return deltaStale // anti-entropy will bring the full entry
	}
	e.pending[d.Version] = d
	return deltaBuffered
}

func (rt *routeTable) applyLocked(node string, e *remoteEntry, d routeDelta) {
	switch d.Op {
	case opAdd:
		if _, ok := e.filters[d.Filter]; !ok {
			e.filters[d.Filter] = struct{}{}
			rt.index.add(d.Filter, node)
		}
	case opRemove:
		if _, ok := e.filters[d.Filter]; ok {
			delete(e.filters, d.Filter)
			rt.index.remove(d.Filter, node)
		}
	}
	e.version = d.Version
}

// drainLocked applies buffered deltas that now follow the entry's version and
// discards the ones that became stale.
func (rt *routeTable) drainLocked(node string, e *remoteEntry) {
	if e.pending == nil {
		return
	}
	if e.pendingInc != e.incarnation {
		if e.pendingInc < e.incarnation {
			e.pending = nil
		}
		return
	}
	for {
		d, ok := e.pending[e.version+1]
		if !ok {
			break
		}
		delete(e.pending, d.Version)
		rt.applyLocked(node, e, d)
	}
	for v := range e.pending {
		if v <= e.version {
			delete(e.pending, v)
		}
	}
	if len(e.pending) == 0 {
		e.pending = nil
	}
}

// replaceLocked swaps a node's filter set for filters, updating the index by
// difference so unchanged routes never disappear, even for a moment.
func (rt *routeTable) replaceLocked(node string, e *remoteEntry, inc, ver uint64, filters []string) {
	next := make(map[string]struct{}, len(filters))
	for _, f := range filters {
		if ValidFilter(f) {
			next[f] = struct{}{}
		}
	}
	for f := range e.filters {
		if _, ok := next[f]; !ok {
			rt.index.remove(f, node)
		}
	}
	for f := range next {
		if _, ok := e.filters[f]; !ok {
			rt.index.add(f, node)
		}
	}
	e.filters, e.incarnation, e.version = next, inc, ver
}

// noteHead records the head (incarnation, version) a node announced and
// reports whether our entry is behind it, i.e. we missed deltas.
func (rt *routeTable) noteHead(node string, inc, ver uint64) bool {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if node == rt.self || !rt.members[node] {
		return false
	}
	e := rt.remote[node]
	if e == nil {
		e = &remoteEntry{filters: make(map[string]struct{})}
		rt.remote[node] = e
	}
	if inc > e.headInc || inc == e.headInc && ver > e.headVer {
		e.headInc, e.headVer = inc, ver
	}
	return e.behindLocked()
}

// needsRepair reports whether node's entry waits for a missing delta or is
// older than the head the node announced.
func (rt *routeTable) needsRepair(node string) bool {
	rt.mu.RLock()
	defer rt.mu.RUnlock()
	e := rt.remote[node]
	return e != nil && (len(e.pending) > 0 && e.pendingInc >= e.incarnation || e.behindLocked())
}

func (e *remoteEntry) behindLocked() bool {
	return e.headInc > e.incarnation || e.headInc == e.incarnation && e.headVer > e.version
}

// remoteHead returns how far we hold node's entry.
func (rt *routeTable) remoteHead(node string) (inc, ver uint64) {
	rt.mu.RLock()
	defer rt.mu.RUnlock()
	if e := rt.remote[node]; e != nil {
		return e.incarnation, e.version
	}
	return 0, 0
}

// head returns our own (incarnation, version).
func (rt *routeTable) head() (uint64, uint64) {
	rt.mu.RLock()
	defer rt.mu.RUnlock()
	return rt.incarnation, rt.version
}

// snapshot returns the table (our own entry first) for push/pull, leaving
// out entries past budget filter bytes (0: no limit), even our own when it
// alone is larger: memberlist refuses a whole push/pull over 20 MiB, its
// membership state included. Entries left out reach peers of protocol 3 as
// route snapshots from their own node (routesync.go). The
// slices are copies, sorted after the lock is released (sorting a large
// entry under it stalled publishes).
func (rt *routeTable) snapshot(budget int) []nodeRoutes {
	out := rt.copyEntries(budget)
	for _, e := range out {
		slices.Sort(e.Filters)
	}
	return out
}

func (rt *routeTable) copyEntries(budget int) []nodeRoutes {
	rt.mu.RLock()
	defer rt.mu.RUnlock()
	out := make([]nodeRoutes, 0, 1+len(rt.remote))
	used := 0
	for f := range rt.local {
		used += sizeString(len(f))
	}
	if budget > 0 && used > budget {
		used = 0
	} else {
		own := nodeRoutes{Node: rt.self, Incarnation: rt.incarnation, Version: rt.version, Filters: make([]string, 0, len(rt.local))}
		for f := range rt.local {
			own.Filters = append(own.Filters, f)
		}
		out = append(out, own)
	}
	for node, e := range rt.remote {
		if e.version == 0 && len(e.filters) == 0 {
			continue
		}
		size := 0
		for f := range e.filters {
			size += sizeString(len(f))
		}
		if budget > 0 && used+size > budget {
			continue // left to its own node's snapshot (routesync.go)
		}
		used += size
		nr := nodeRoutes{Node: node, Incarnation: e.incarnation, Version: e.version, Filters: make([]string, 0, len(e.filters))}
		for f := range e.filters {
			nr.Filters = append(nr.Filters, f)
		}
		out = append(out, nr)
	}
	return out
}

// ownEntry returns our own entry: its head and an unsorted copy of its
// filters, taken in one step under the lock.
func (rt *routeTable) ownEntry() (inc, ver uint64, filters []string) {
	rt.mu.RLock()
	defer rt.mu.RUnlock()
	filters = make([]string, 0, len(rt.local))
	for f := range rt.local {
		filters = append(filters, f)
	}
	return rt.incarnation, rt.version, filters
}

// mergeResult summarises one anti-entropy merge.
type mergeResult struct {
	Replaced int  // entries that were newer than ours
	Bumped   bool // a peer held a newer entry for us: our incarnation was raised
	nodes    []string
}

// merge applies full entries received in push/pull: for each live member, the
// entry with the greater (incarnation, version) wins. Entries for nodes that
// are not live members are ignored (see setMember).
func (rt *routeTable) merge(entries []nodeRoutes) mergeResult {
	res := rt.mergeQuiet(entries)
	if rt.onRemote != nil {
		for _, node := range res.nodes {
			rt.onRemote(node)
		}
	}
	return res
}

func (rt *routeTable) mergeQuiet(entries []nodeRoutes) mergeResult {
	var res mergeResult
	rt.mu.Lock()
	defer rt.mu.Unlock()
	for _, nr := range entries {
		if nr.Node == rt.self {
			// A peer remembers a life of ours that looks newer than this one
			// (the clock went back across a restart, or two starts in the same
			// nanosecond). Jump past it so our entry wins again. The version
			// is kept: it is non-zero whenever the filter set is non-empty, so
			// "version 1 of an incarnation applies to the empty set" holds.
			// A claim at the largest incarnation cannot be outranked: +1
			// would wrap to 0 and every peer would then drop our deltas
			// as stale. Only a corrupt peer can send one; keep ours.
			if nr.Incarnation == math.MaxUint64 {
				continue
			}
			if nr.Incarnation > rt.incarnation || nr.Incarnation == rt.incarnation && nr.Version > rt.version {
				rt.incarnation = nr.Incarnation + 1
				res.Bumped = true
			}
			continue
		}
		if !rt.members[nr.Node] {
			continue
		}
		e := rt.remote[nr.Node]
		if e == nil {
			e = &remoteEntry{filters: make(map[string]struct{})}
			rt.remote[nr.Node] = e
		}
		if e.syncing || nr.Incarnation < e.incarnation || nr.Incarnation == e.incarnation && nr.Version <= e.version {
			continue
		}
		rt.replaceLocked(nr.Node, e, nr.Incarnation, nr.Version, nr.Filters)
		rt.drainLocked(nr.Node, e)
		res.Replaced++
		res.nodes = append(res.nodes, nr.Node)
	}
	return res
}

// mergeBatch is how many routes mergeSnapshot changes per hold of the
// lock: a million-filter entry applied in one step held it for seconds,
// and every publish's lookup waited.
const mergeBatch = 512

// mergeSnapshot applies a node's full entry like merge, in batches of
// mergeBatch changes with the lock released in between, so that lookups
// go on meanwhile (they may see part of the new entry: never a route the
// node did not have at one of the two versions). Deltas that arrive
// meanwhile are buffered and applied at the end; push/pull leaves the
// entry alone. It reports whether the entry was newer than ours.
func (rt *routeTable) mergeSnapshot(nr nodeRoutes) bool {
	if len(nr.Filters) <= mergeBatch {
		return rt.merge([]nodeRoutes{nr}).Replaced > 0
	}
	job := rt.startSnapshot(nr)
	return job != nil && job()
}

// startSnapshot does the first step of mergeSnapshot for a large entry:
// it marks the entry as syncing (from now on its deltas are buffered) and
// returns the rest, which applies the batches and reports whether the
// entry was newer; nil if it is not newer (or the node not a member, or a
// snapshot of it already being applied). The caller may run the rest on
// another goroutine: the deltas that follow the snapshot wait for it.
func (rt *routeTable) startSnapshot(nr nodeRoutes) func() bool {
	next := make(map[string]struct{}, len(nr.Filters))
	for _, f := range nr.Filters {
		if ValidFilter(f) {
			next[f] = struct{}{}
		}
	}
	rt.mu.Lock()
	e := rt.remote[nr.Node]
	if nr.Node == rt.self || !rt.members[nr.Node] || e != nil && (e.syncing ||
		nr.Incarnation < e.incarnation || nr.Incarnation == e.incarnation && nr.Version <= e.version) {
		rt.mu.Unlock()
		return nil
	}
	if e == nil {
		e = &remoteEntry{filters: make(map[string]struct{})}
		rt.remote[nr.Node] = e
	}
	e.syncing = true
	var gone []string
	for f := range e.filters {
		if _, ok := next[f]; !ok {
			gone = append(gone, f)
		}
	}
	rt.mu.Unlock()
	return func() bool { return rt.finishSnapshot(nr, e, next, gone) }
}

func (rt *routeTable) finishSnapshot(nr nodeRoutes, e *remoteEntry, next map[string]struct{}, gone []string) bool {
	// current reports, under the lock, whether e is still the node's
	// entry: a node declared dead meanwhile had it removed (setMember),
	// index included, and the rest is dropped.
	current := func() bool { return rt.remote[nr.Node] == e }
	batch := func(fs []string, add bool) bool {
		rt.mu.Lock()
		defer rt.mu.Unlock()
		if !current() {
			return false
		}
		for _, f := range fs {
			_, have := e.filters[f]
			switch {
			case add && !have:
				e.filters[f] = struct{}{}
				rt.index.add(f, nr.Node)
			case !add && have:
				delete(e.filters, f)
				rt.index.remove(f, nr.Node)
			}
		}
		return true
	}
	adds := make([]string, 0, len(next))
	for f := range next {
		adds = append(adds, f)
	}
	for _, list := range []struct {
		fs  []string
		add bool
	}{{adds, true}, {gone, false}} {
		for i := 0; i < len(list.fs); i += mergeBatch {
			if !batch(list.fs[i:min(i+mergeBatch, len(list.fs))], list.add) {
				return false
			}
		}
	}
	rt.mu.Lock()
	if !current() {
		rt.mu.Unlock()
		return false
	}
	e.syncing = false
	e.incarnation, e.version = nr.Incarnation, nr.Version
	if _, ok := e.pending[1]; ok && e.pendingInc > e.incarnation {
		// The node restarted meanwhile: its new life starts empty, and
		// the buffered deltas apply to that (found by review).
		rt.replaceLocked(nr.Node, e, e.pendingInc, 0, nil)
	}
	rt.drainLocked(nr.Node, e)
	rt.mu.Unlock()
	if rt.onRemote != nil {
		rt.onRemote(nr.Node)
	}
	return true
}

// match fills res with the remote nodes whose routes match topic.
func (rt *routeTable) match(topic string, res *matchResult) {
	rt.mu.RLock()
	rt.index.match(topic, res)
	rt.mu.RUnlock()
}

// routeInfo is what Status reports about one node's entry.
type routeInfo struct {
	Incarnation uint64
	Version     uint64
	Routes      int
}

func (rt *routeTable) info() (self routeInfo, remote map[string]routeInfo) {
	rt.mu.RLock()
	defer rt.mu.RUnlock()
	self = routeInfo{Incarnation: rt.incarnation, Version: rt.version, Routes: len(rt.local)}
	remote = make(map[string]routeInfo, len(rt.remote))
	for n, e := range rt.remote {
		remote[n] = routeInfo{Incarnation: e.incarnation, Version: e.version, Routes: len(e.filters)}
	}
	return self, remote
}

// remoteFilters returns a sorted copy of a remote node's filters (tests and
// debugging).
func (rt *routeTable) remoteFilters(node string) []string {
	rt.mu.RLock()
	defer rt.mu.RUnlock()
	e := rt.remote[node]
	if e == nil {
		return nil
	}
	out := make([]string, 0, len(e.filters))
	for f := range e.filters {
		out = append(out, f)
	}
	slices.Sort(out)
	return out
}

// localFilters returns a sorted copy of the local filters.
func (rt *routeTable) localFilters() []string {
	rt.mu.RLock()
	defer rt.mu.RUnlock()
	out := make([]string, 0, len(rt.local))
	for f := range rt.local {
		out = append(out, f)
	}
	slices.Sort(out)
	return out
}

// holders returns the nodes that route filter exactly: this node if a
// local client subscribed to it, and every remote node whose entry holds
// it, alive or not (sorted).
func (rt *routeTable) holders(filter string) []string {
	rt.mu.RLock()
	defer rt.mu.RUnlock()
	var out []string
	if rt.local[filter] > 0 {
		out = append(out, rt.self)
	}
	for node, e := range rt.remote {
		if _, ok := e.filters[filter]; ok {
			out = append(out, node)
		}
	}
	slices.Sort(out)
	return out
}
