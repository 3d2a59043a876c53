package replication

import (
	"fmt"
	"sync"

	"github.com/boltdb/bolt"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb"
)

// boltStore is raft's log and stable store in one bolt file (raft.db):
// hashicorp/raft-boltdb, the store Consul and Nomad run on. Every write is
// one fsync, which is what bounds the leader's entry rate and what group
// commit amortises.
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

func (c *logCache) GetLog(idx uint64, log *raft.Log) error {
	c.mu.RLock()
	cached := c.cache[idx%uint64(len(c.cache))]
	c.mu.RUnlock()
	if cached != nil && cached.Index == idx {
		*log = *cached
		return nil
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
