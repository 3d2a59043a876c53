package replication

import (
	"fmt"
	"io"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
)

// FSM is the raft state machine: a thin wrapper that decodes entries, hands
// them to the deterministic state.applyCommand under one lock, and notifies
// observers after the lock is released (rqlite's split between the FSM and a
// stateless command processor).
type FSM struct {
	// mu guards st. Apply takes it for writing, reads and Snapshot for
	// reading. Lock order: Node.mu, then FSM.mu; observers run with no lock.
	mu sync.RWMutex
	st *state

	obs      observers
	m        *metrics
	log      *slog.Logger
	restores atomic.Uint64

	// synced is the index of the last entry whose effects, observers
	// included, are visible on this node. raft's own AppliedIndex moves
	// when entries are handed to the FSM goroutine, before they are
	// applied, so it cannot tell a reader that the state holds an entry.
	// Only entries raft hands to the FSM (commands and configuration
	// changes) move it; see Node.ReadBarrier for how a target index is
	// chosen so that waiting for it terminates.
	synced     atomic.Uint64
	syncedTerm atomic.Uint64 // term of the entry at synced
	// subsChanged is the index of the last applied entry that opened or
	// deleted a persistent session or changed its subscriptions
	// (Node.SessionsBarrier).
	subsChanged atomic.Uint64
	subsUnknown atomic.Bool // set by a restore without synced: see Restore
	syncedMu    sync.Mutex
	syncedWake  chan struct{} // closed and replaced whenever synced moves
}

// observers are the caller's callbacks; they run on raft's FSM goroutine,
// in log order, and must not block for long or call Node.Apply (Apply waits
// for this very goroutine).
type observers struct {
	onRetained func(RetainedChange)
	onOwner    func(OwnerChange)
	onSession  func(SessionChange)
	onRestore  func()
}

// Compile-time assertions.
var (
	_ raft.FSM         = (*FSM)(nil)
	_ raft.BatchingFSM = (*FSM)(nil)
	_ raft.FSMSnapshot = (*fsmSnapshot)(nil)
)

func newFSM(obs observers, m *metrics, log *slog.Logger) *FSM {
	return &FSM{st: newState(), obs: obs, m: m, log: log, syncedWake: make(chan struct{})}
}

// setSynced records that every entry up to index is visible and wakes the
// waiters.
func (f *FSM) setSynced(index uint64) {
	f.syncedMu.Lock()
	if index > f.synced.Load() {
		f.synced.Store(index)
	}
	close(f.syncedWake)
	f.syncedWake = make(chan struct{})
	f.syncedMu.Unlock()
}

// syncedState returns the synced index and a channel closed when it moves.
func (f *FSM) syncedState() (uint64, <-chan struct{}) {
	f.syncedMu.Lock()
	defer f.syncedMu.Unlock()
	return f.synced.Load(), f.syncedWake
}

// decodeEntry decodes a command entry or panics: an entry this node cannot
// decode was committed by a quorum, and skipping it would make this replica
// silently diverge from the others.
func decodeEntry(l *raft.Log) Command {
	c, err := DecodeCommand(l.Data)
	if err != nil {
		panic(fmt.Errorf("replication: undecodable log entry at index %d (term %d): %w", l.Index, l.Term, err))
	}
	return c
}

// Apply applies one committed entry and returns its Result.
func (f *FSM) Apply(l *raft.Log) any {
	return f.ApplyBatch([]*raft.Log{l})[0]
}

// ApplyBatch applies consecutive committed entries under one lock
// acquisition. Every entry is decoded before anything is mutated, so an
// undecodable entry stops the node without applying half a batch.
func (f *FSM) ApplyBatch(logs []*raft.Log) []any {
	cmds := make([]Command, len(logs))
	for i, l := range logs {
		if l.Type == raft.LogCommand {
			cmds[i] = decodeEntry(l)
		}
	}
	out := make([]any, len(logs))
	var evs []event
	n := 0
	f.mu.Lock()
	for i, l := range logs {
		if l.Type != raft.LogCommand {
			continue // configuration entries: raft tracks them itself
		}
		if cmds[i] == nil { // unknown skippable command
			out[i] = Result{Index: l.Index}
			continue
		}
		if c, ok := cmds[i].(*BlobChunk); ok {
			if path, write := f.st.chunkFile(c, l.Index); write {
				f.mu.Unlock()
				writeBlob(path, c.ID, c.Offset, c.Data)
				c.written = true
				f.mu.Lock()
			}
		}
		var res Result
		before := len(evs)
		res, evs = f.st.applyCommand(cmds[i], l.Index, evs)
		out[i] = res
		if changesSessions(evs[before:]) || f.subsUnknown.Swap(false) {
			f.subsChanged.Store(l.Index)
		}
		n += commandCount(cmds[i])
	}
	f.mu.Unlock()
	f.m.appliedEntries.Add(float64(len(logs)))
	f.m.appliedCommands.Add(float64(n))
	f.notify(evs)
	if len(logs) > 0 {
		f.syncedTerm.Store(logs[len(logs)-1].Term)
		f.setSynced(logs[len(logs)-1].Index)
	}
	return out
}

// changesSessions reports whether an entry's events change which
// persistent sessions exist or what they subscribe to (what a publish
// matches, and what a clean CONNECT must discard).
func changesSessions(evs []event) bool {
	for _, e := range evs {
		if e.session == nil {
			continue
		}
		switch e.session.Kind {
		case SessionSubscribed, SessionUnsubscribed, SessionDeleted, SessionOpened:
			return true
		}
	}
	return false
}

func commandCount(c Command) int {
	if b, ok := c.(*Batch); ok {
		return len(b.Commands)
	}
	return 1
}

func (f *FSM) notify(evs []event) {
	for _, e := range evs {
		switch {
		case e.retained != nil && f.obs.onRetained != nil:
			f.obs.onRetained(*e.retained)
		case e.owner != nil && f.obs.onOwner != nil:
			f.obs.onOwner(*e.owner)
		case e.session != nil && f.obs.onSession != nil:
			f.obs.onSession(*e.session)
		}
	}
}

// Snapshot copies the state under the read lock; Persist then encodes the
// copy while Apply goes on. The live maps are never handed out.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	st := f.st.clone()
	if st.store != nil {
		st.store.pin() // Release unpins
	}
	f.mu.RUnlock()
	// Snapshot runs on the FSM goroutine: synced is the last entry this
	// snapshot holds that the FSM saw (the snapshot's own index may be a
	// later no-op entry the FSM never sees).
	st.synced = f.synced.Load()
	return &fsmSnapshot{st: st, m: f.m}, nil
}

// Restore decodes a snapshot into a NEW state and swaps it in atomically: a
// failed restore leaves the current state untouched, and readers never see a
// half-restored one. It never blocks on a channel; the OnRestore observer
// runs after the swap so the caller can resync from Retained().
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	start := time.Now()
	f.mu.RLock()
	store := f.st.store
	f.mu.RUnlock()
	st, err := readSnapshotInto(rc, store)
	if err != nil {
		return fmt.Errorf("replication: restore snapshot: %w", err)
	}
	f.mu.Lock()
	old := f.st
	f.st = st
	f.mu.Unlock()
	if old.dir != nil {
		old.store.removeLater(old.dir.path)
	}
	f.restores.Add(1)
	f.log.Info("restored state from snapshot", "retained", len(st.retained), "owners", len(st.owners),
		"sessions", len(st.sessions), "duration", time.Since(start))
	if f.obs.onRestore != nil {
		f.obs.onRestore()
	}
	// A restore may move the state backwards (a user restore) or forwards
	// (a follower catching up): synced follows it either way.
	f.syncedMu.Lock()
	f.synced.Store(st.synced)
	f.subsChanged.Store(st.synced) // anything up to the snapshot may have
	if st.synced == 0 {
		// A snapshot without a synced record (a backup: its indexes are
		// another cluster's) says nothing about where the sessions
		// changed: until the next applied entry, the sessions barrier
		// asks for the whole read index, which a follower reaches only
		// once it holds this state and an entry after it.
		f.subsChanged.Store(math.MaxUint64)
		f.subsUnknown.Store(true)
	}
	close(f.syncedWake)
	f.syncedWake = make(chan struct{})
	f.syncedMu.Unlock()
	return nil
}

// Retained returns a copy of every retained message, sorted by topic,
// including expired ones not swept yet (filter with Expired).
func (f *FSM) Retained() []RetainedMessage {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]RetainedMessage, 0, len(f.st.retained))
	for _, t := range f.st.sortedTopics() {
		out = append(out, f.st.retained[t])
	}
	return out
}

// RetainedMessage returns the retained message of topic.
func (f *FSM) RetainedMessage(topic string) (RetainedMessage, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	m, ok := f.st.retained[topic]
	return m, ok
}

// Owner returns the owner of clientID.
func (f *FSM) Owner(clientID string) (Owner, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	o, ok := f.st.owners[clientID]
	return o, ok
}

// Owners returns a copy of the client-id ownership table.
func (f *FSM) Owners() map[string]Owner {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make(map[string]Owner, len(f.st.owners))
	for k, v := range f.st.owners {
		out[k] = v
	}
	return out
}

// Restores counts snapshot restores since the node started (including the
// one at start-up when a snapshot exists).
func (f *FSM) Restores() uint64 { return f.restores.Load() }

func (f *FSM) counts() (retained, owners int) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return len(f.st.retained), len(f.st.owners)
}

// expired returns up to limit retained messages whose deadline passed.
func (f *FSM) expired(now time.Time, limit int) []RetainedMessage {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []RetainedMessage
	for _, m := range f.st.retained {
		if m.Expired(now) {
			out = append(out, m)
			if len(out) >= limit {
				break
			}
		}
	}
	return out
}
