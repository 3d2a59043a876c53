package replication

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/raft"
	bolt "go.etcd.io/bbolt"
)

// boltStore is raft's log and stable store in one bbolt file (raft.db),
// laid out like hashicorp/raft-boltdb: bucket "logs" maps big-endian
// uint64 indexes to encoded entries, bucket "conf" holds the stable keys
// (current term, last vote). Why not raft-boltdb itself: it is built on
// boltdb/bolt v1.3.1, which violates Go's checkptr rules and crashes every
// test run under -race; bbolt is the maintained fork with those bugs fixed
// (raft-boltdb/v2 uses it too but does not build with raft v1.8.0). Every
// Update is one fsync, which is what bounds the leader's entry rate and
// what group commit amortises.
type boltStore struct {
	db *bolt.DB
}

var (
	_ raft.LogStore    = (*boltStore)(nil)
	_ raft.StableStore = (*boltStore)(nil)

	bucketLogs = []byte("logs")
	bucketConf = []byte("conf")

	// errKeyNotFound must read exactly "not found": raft compares the text
	// (HasExistingState, NewRaft).
	errKeyNotFound = errors.New("not found")
)

// logEncodingVersion prefixes every stored entry so the layout can evolve.
const logEncodingVersion = 1

func openBoltStore(path string, readOnly bool) (*boltStore, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout:  boltOpenTO,
		ReadOnly: readOnly,
		// The freelist is rebuilt on open instead of written on every
		// commit: fewer pages per fsync on the hot path (etcd does this).
		NoFreelistSync: true,
		FreelistType:   bolt.FreelistMapType,
	})
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	s := &boltStore{db: db}
	if !readOnly {
		err = db.Update(func(tx *bolt.Tx) error {
			if _, err := tx.CreateBucketIfNotExists(bucketLogs); err != nil {
				return err
			}
			_, err := tx.CreateBucketIfNotExists(bucketConf)
			return err
		})
		if err != nil {
			_ = db.Close()
			return nil, fmt.Errorf("init %s: %w", path, err)
		}
	}
	return s, nil
}

func (s *boltStore) Close() error { return s.db.Close() }

func u64Key(v uint64) []byte {
	return binary.BigEndian.AppendUint64(make([]byte, 0, 8), v)
}

// FirstIndex returns the first stored index, 0 if none.
func (s *boltStore) FirstIndex() (uint64, error) {
	return s.edgeIndex(true)
}

// LastIndex returns the last stored index, 0 if none.
func (s *boltStore) LastIndex() (uint64, error) {
	return s.edgeIndex(false)
}

func (s *boltStore) edgeIndex(first bool) (uint64, error) {
	var idx uint64
	err := s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketLogs)
		if b == nil {
			return nil
		}
		c := b.Cursor()
		var k []byte
		if first {
			k, _ = c.First()
		} else {
			k, _ = c.Last()
		}
		if len(k) == 8 {
			idx = binary.BigEndian.Uint64(k)
		}
		return nil
	})
	return idx, err
}

// GetLog reads the entry at index into log.
func (s *boltStore) GetLog(index uint64, log *raft.Log) error {
	return s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketLogs)
		if b == nil {
			return raft.ErrLogNotFound
		}
		v := b.Get(u64Key(index))
		if v == nil {
			return raft.ErrLogNotFound
		}
		return decodeLog(v, log)
	})
}

// StoreLog stores one entry.
func (s *boltStore) StoreLog(log *raft.Log) error {
	return s.StoreLogs([]*raft.Log{log})
}

// StoreLogs stores entries in one transaction (one fsync).
func (s *boltStore) StoreLogs(logs []*raft.Log) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketLogs)
		for _, l := range logs {
			if err := b.Put(u64Key(l.Index), encodeLog(l)); err != nil {
				return err
			}
		}
		return nil
	})
}

// DeleteRange deletes entries lo..hi inclusive.
func (s *boltStore) DeleteRange(lo, hi uint64) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketLogs).Cursor()
		for k, _ := c.Seek(u64Key(lo)); k != nil && binary.BigEndian.Uint64(k) <= hi; k, _ = c.Next() {
			if err := c.Delete(); err != nil {
				return err
			}
		}
		return nil
	})
}

// Set stores a stable key.
func (s *boltStore) Set(k, v []byte) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketConf).Put(k, v)
	})
}

// Get returns a stable key (a copy: bbolt's slices die with the
// transaction).
func (s *boltStore) Get(k []byte) ([]byte, error) {
	var out []byte
	err := s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketConf)
		if b == nil {
			return errKeyNotFound
		}
		v := b.Get(k)
		if v == nil {
			return errKeyNotFound
		}
		out = append([]byte{}, v...)
		return nil
	})
	return out, err
}

func (s *boltStore) SetUint64(key []byte, val uint64) error {
	return s.Set(key, u64Key(val))
}

func (s *boltStore) GetUint64(key []byte) (uint64, error) {
	v, err := s.Get(key)
	if err != nil {
		return 0, err
	}
	if len(v) != 8 {
		return 0, fmt.Errorf("%w: stable key %q has %d bytes", errCorrupt, key, len(v))
	}
	return binary.BigEndian.Uint64(v), nil
}

// encodeLog: u8 version | uvarint index | uvarint term | u8 type |
// bytes data | bytes extensions | varint appended_at (unix ns, 0 = zero).
func encodeLog(l *raft.Log) []byte {
	b := make([]byte, 0, len(l.Data)+len(l.Extensions)+32)
	b = append(b, logEncodingVersion)
	b = appendUvarint(b, l.Index)
	b = appendUvarint(b, l.Term)
	b = append(b, byte(l.Type))
	b = appendBytes(b, l.Data)
	b = appendBytes(b, l.Extensions)
	var at int64
	if !l.AppendedAt.IsZero() {
		at = l.AppendedAt.UnixNano()
	}
	return appendVarint(b, at)
}

func decodeLog(v []byte, l *raft.Log) error {
	r := reader{b: v}
	if ver := r.u8(); ver != logEncodingVersion && r.err == nil {
		return fmt.Errorf("%w: log encoding version %d", errCorrupt, ver)
	}
	l.Index = r.uvarint()
	l.Term = r.uvarint()
	l.Type = raft.LogType(r.u8())
	l.Data = r.bytes()
	l.Extensions = r.bytes()
	at := r.varint()
	l.AppendedAt = time.Time{}
	if at != 0 {
		l.AppendedAt = time.Unix(0, at)
	}
	return r.end()
}
