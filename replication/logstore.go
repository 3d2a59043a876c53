package replication

import (
	"fmt"

	"github.com/boltdb/bolt"
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
