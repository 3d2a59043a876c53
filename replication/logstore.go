package replication

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/boltdb/bolt"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb"
	wal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/types"
)

// The log store holds raft's log and its stable values (term, vote). Two
// are offered, chosen when a data dir is first used and kept for its life:
//
//   - LogStoreBolt (the default): hashicorp/raft-boltdb, one bolt file
//     (raft.db), the store Consul and Nomad have run on for years. A
//     write is a bolt transaction: two fdatasyncs (pages, then meta).
//   - LogStoreWAL: hashicorp/raft-wal, append-only segment files plus a
//     small bolt file for their index and the stable values (wal/). A
//     write is one append and one fsync. Upstream still calls it
//     experimental. Durable QoS 1 went up 1.2-1.75 × on it (BENCHMARKS.md),
//     because every commit waits for the leader's and a follower's
//     writes in turn. v0.4.1, not v0.4.0, which left a segment it sealed
//     in a tail truncation without its index, so that the node could not
//     start again (raft-wal#31; the chaos suite hit it); v0.4.2 imports
//     go-metrics' compat package, which the go-metrics of raft v1.8.0 no
//     longer has.
//
// A data dir holding one kind is never opened as the other: switching
// means emptying the data dir and letting the node catch up from its
// peers (README, "Log store").
const (
	LogStoreBolt = "bolt"
	LogStoreWAL  = "wal"
)

// maxWALEntry is below raft-wal's segment.MaxEntrySize (64 MiB), with room
// for an entry's framing around the largest batch.
const maxWALEntry = 60 << 20

const (
	raftDBFile = "raft.db" // the bolt store
	walDirName = "wal"     // the WAL's segments and meta file
	walLock    = "lock"    // under walDirName: one process at a time
)

// logStore is raft's log and stable store in one.
type logStore interface {
	raft.LogStore
	raft.StableStore
	io.Closer
}

// ErrLogStoreMismatch: the data dir holds a log store of another kind
// than the configured one.
var ErrLogStoreMismatch = errors.New("log store mismatch")

// existingLogStore reports which kind of log store dir holds ("" for
// none).
func existingLogStore(dir string) (string, error) {
	var found []string
	if _, err := os.Stat(filepath.Join(dir, raftDBFile)); err == nil {
		found = append(found, LogStoreBolt)
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("replication: %w", err)
	}
	if _, err := os.Stat(filepath.Join(dir, walDirName, "wal-meta.db")); err == nil {
		found = append(found, LogStoreWAL)
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("replication: %w", err)
	}
	switch len(found) {
	case 0:
		return "", nil
	case 1:
		return found[0], nil
	}
	return "", fmt.Errorf("%w: %s holds both %s and %s/: remove the one not in use (the node logs which it opened)",
		ErrLogStoreMismatch, dir, raftDBFile, walDirName)
}

// openLogStore opens (creating if need be) the log store of kind under
// dir, refusing one of another kind.
func openLogStore(dir, kind string) (logStore, error) {
	have, err := existingLogStore(dir)
	if err != nil {
		return nil, err
	}
	if have != "" && have != kind {
		return nil, fmt.Errorf("%w: %s holds a %s log store and this node is configured for %s (--raft-log-store): "+
			"set --raft-log-store=%s, or empty the data dir so that the node catches up from its peers",
			ErrLogStoreMismatch, dir, have, kind, have)
	}
	return openStoreOfKind(dir, kind, false)
}

// openStoreOfKind opens dir's log store of kind; readOnly applies to bolt
// (raft-wal has no read-only mode: HasState runs its recovery).
func openStoreOfKind(dir, kind string, readOnly bool) (logStore, error) {
	// Explicit nils: a nil *walStore in the interface is not nil.
	if kind == LogStoreWAL {
		s, err := openWAL(filepath.Join(dir, walDirName))
		if err != nil {
			return nil, err
		}
		return s, nil
	}
	s, err := openBoltStore(filepath.Join(dir, raftDBFile), readOnly)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// boltStore is raft-boltdb's store.
//
// raft-boltdb is built on boltdb/bolt v1.3.1, whose unsafe pointer
// arithmetic trips Go's checkptr instrumentation (which -race turns on) in
// Bucket.write. That is a false positive of the instrumentation, not a data
// race, so the Makefile runs -race tests with checkptr off
// (-gcflags=all=-d=checkptr=0). raft-boltdb/v2 (bbolt) would avoid it but
// does not build with raft v1.8.0.
type boltStore = raftboltdb.BoltStore

func openBoltStore(path string, readOnly bool) (*boltStore, error) {
	s, err := raftboltdb.New(raftboltdb.Options{
		Path:        path,
		BoltOptions: &bolt.Options{Timeout: boltOpenTO, ReadOnly: readOnly},
	})
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return s, nil
}

// walStore is raft-wal's store with a lock file held while it is open:
// bbolt opens raft-wal's meta file without a timeout, so a second process
// on the same dir would wait forever instead of failing; our lock fails
// it after boltOpenTO.
type walStore struct {
	*wal.WAL
	lock *os.File
}

// walTestFiler, when set (tests), gives wal.Open the segment files: a
// file system that fails writes on purpose.
var walTestFiler func(dir string) types.SegmentFiler

func openWAL(dir string) (*walStore, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, walLock), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	// Wait a little, as bolt does (boltOpenTO): HasState may hold the
	// lock for a moment while Start opens the store.
	for deadline := time.Now().Add(boltOpenTO); ; {
		err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) || time.Now().After(deadline) {
			_ = lock.Close()
			return nil, fmt.Errorf("open %s: in use by another process: %w", dir, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	var w *wal.WAL
	if walTestFiler != nil {
		w, err = wal.Open(dir, wal.WithSegmentFiler(walTestFiler(dir)))
	} else {
		w, err = wal.Open(dir)
	}
	if err != nil {
		_ = lock.Close()
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	return &walStore{WAL: w, lock: lock}, nil
}

func (s *walStore) Close() error {
	err := s.WAL.Close() // closes the meta file too (since v0.4.1)
	_ = s.lock.Close()   // releases the flock
	if err != nil {
		return fmt.Errorf("close wal: %w", err)
	}
	return nil
}

// logCache keeps recent log entries in memory like raft.LogCache (the
// leader reads them back to replicate), but not entries larger than
// maxCachedEntry: with blob chunks (256 KiB each) a cache of 512 entries
// would hold up to 128 MiB of payload on every node.
type logCache struct {
	raft.LogStore
	mu    sync.RWMutex
	cache []*raft.Log
}

const maxCachedEntry = 64 << 10

func newLogCache(size int, store raft.LogStore) (*logCache, error) {
	if size <= 0 {
		return nil, fmt.Errorf("log cache size %d", size)
	}
	return &logCache{LogStore: store, cache: make([]*raft.Log, size)}, nil
}

// IsMonotonic passes on raft.MonotonicLogStore, which raft-wal implements
// (it refuses a gap between entries): raft then deletes the whole log when
// it installs a snapshot, instead of leaving entries below the snapshot
// that the next append would follow with a gap.
func (c *logCache) IsMonotonic() bool {
	m, ok := c.LogStore.(raft.MonotonicLogStore)
	return ok && m.IsMonotonic()
}

func (c *logCache) GetLog(idx uint64, log *raft.Log) error {
	c.mu.RLock()
	cached := c.cache[idx%uint64(len(c.cache))]
	c.mu.RUnlock()
	if cached != nil && cached.Index == idx {
		*log = *cached
		return nil
	}
	// raft-wal (the monotonic store) truncates its head logically and
	// still reads entries below its first index from the open tail
	// segment. raft would then send a lagging follower entries it
	// compacted away rather than the snapshot; the entries are genuine,
	// but both stores should behave alike, so what is below the first
	// index is gone for raft.
	if c.IsMonotonic() {
		if first, err := c.LogStore.FirstIndex(); err == nil && idx < first {
			return raft.ErrLogNotFound
		}
	}
	return c.LogStore.GetLog(idx, log)
}

func (c *logCache) StoreLog(log *raft.Log) error { return c.StoreLogs([]*raft.Log{log}) }

func (c *logCache) StoreLogs(logs []*raft.Log) error {
	if err := c.LogStore.StoreLogs(logs); err != nil {
		return fmt.Errorf("store logs: %w", err)
	}
	c.mu.Lock()
	for _, l := range logs {
		slot := l.Index % uint64(len(c.cache))
		if len(l.Data) > maxCachedEntry {
			c.cache[slot] = nil
		} else {
			c.cache[slot] = l
		}
	}
	c.mu.Unlock()
	return nil
}

func (c *logCache) DeleteRange(lo, hi uint64) error {
	c.mu.Lock()
	clear(c.cache)
	c.mu.Unlock()
	return c.LogStore.DeleteRange(lo, hi)
}
