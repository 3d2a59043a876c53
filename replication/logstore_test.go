package replication

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/hashicorp/raft-wal/fs"
	"github.com/hashicorp/raft-wal/segment"
	"github.com/hashicorp/raft-wal/types"
)

// within fails the test if f does not return within d: the bugs these
// tests guard against hang rather than fail.
func within(t *testing.T, d time.Duration, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); f() }()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s did not return within %v", what, d)
	}
}

// TestLogStoreKeepsItsKind: a data dir is never opened as the other kind
// of store, and the refusal says how to fix it.
func TestLogStoreKeepsItsKind(t *testing.T) {
	for _, tc := range []struct{ have, want string }{{LogStoreBolt, LogStoreWAL}, {LogStoreWAL, LogStoreBolt}} {
		t.Run(tc.have, func(t *testing.T) {
			dir := t.TempDir()
			s, err := openLogStore(dir, tc.have)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			_, err = openLogStore(dir, tc.want)
			if !errors.Is(err, ErrLogStoreMismatch) {
				t.Fatalf("opened a %s dir as %s: %v", tc.have, tc.want, err)
			}
			if want := "--raft-log-store=" + tc.have; !strings.Contains(err.Error(), want) {
				t.Fatalf("error %q does not say %q", err, want)
			}
			s, err = openLogStore(dir, tc.have)
			if err != nil {
				t.Fatalf("reopen as %s: %v", tc.have, err)
			}
			_ = s.Close()
		})
	}
	// Both at once is refused whatever is configured.
	dir := t.TempDir()
	b, err := openLogStore(dir, LogStoreBolt)
	if err != nil {
		t.Fatal(err)
	}
	_ = b.Close()
	w, err := openWAL(filepath.Join(dir, walDirName))
	if err != nil {
		t.Fatal(err)
	}
	_ = w.Close()
	for _, kind := range []string{LogStoreBolt, LogStoreWAL} {
		if _, err := openLogStore(dir, kind); !errors.Is(err, ErrLogStoreMismatch) {
			t.Fatalf("a dir with both stores opened as %s: %v", kind, err)
		}
	}
}

// openTestWAL opens dir's WAL, first closing prev (a reopen), and fails
// the test if that does not return (the bugs below hang rather than fail).
// The store is closed when the test ends.
func openTestWAL(t *testing.T, dir string, prev logStore) logStore {
	t.Helper()
	if prev != nil {
		if err := prev.Close(); err != nil {
			t.Fatal(err)
		}
	}
	var s logStore
	var err error
	within(t, 5*time.Second, "opening the WAL", func() { s, err = openLogStore(dir, LogStoreWAL) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// TestWALReopens: what was written is there after a close and a reopen in
// the same process. raft-wal v0.4.0's Close left its meta file open and
// locked, so the reopen waited forever.
func TestWALReopens(t *testing.T) {
	dir := t.TempDir()
	s := openTestWAL(t, dir, nil)
	logs := []*raft.Log{{Index: 1, Term: 1, Data: []byte("a")}, {Index: 2, Term: 1, Data: []byte("b")}}
	if err := s.StoreLogs(logs); err != nil {
		t.Fatal(err)
	}
	if err := s.SetUint64([]byte("CurrentTerm"), 7); err != nil {
		t.Fatal(err)
	}
	s = openTestWAL(t, dir, s)
	var l raft.Log
	if err := s.GetLog(2, &l); err != nil || string(l.Data) != "b" {
		t.Fatalf("entry 2 after reopen: %q, %v", l.Data, err)
	}
	if term, err := s.GetUint64([]byte("CurrentTerm")); err != nil || term != 7 {
		t.Fatalf("term after reopen: %d, %v", term, err)
	}
}

// TestWALReopensAfterTailTruncation: a follower whose uncommitted suffix
// is replaced by a new leader's entries starts again with the new ones.
// raft-wal v0.4.0 sealed the segment in the truncation without writing its
// index, and the reopened store failed every read of it ("sealed segment
// has no index block": raft panicked at start; the chaos suite hit it on
// a rolling restart).
func TestWALReopensAfterTailTruncation(t *testing.T) {
	dir := t.TempDir()
	s := openTestWAL(t, dir, nil)
	var logs []*raft.Log
	for i := uint64(1); i <= 10; i++ {
		logs = append(logs, &raft.Log{Index: i, Term: 1, Data: []byte(fmt.Sprintf("t1-%d", i))})
	}
	if err := s.StoreLogs(logs); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteRange(8, 10); err != nil { // as raft clears a conflicting suffix
		t.Fatal(err)
	}
	logs = logs[:0]
	for i := uint64(8); i <= 12; i++ {
		logs = append(logs, &raft.Log{Index: i, Term: 2, Data: []byte(fmt.Sprintf("t2-%d", i))})
	}
	if err := s.StoreLogs(logs); err != nil {
		t.Fatal(err)
	}
	s = openTestWAL(t, dir, s)
	for i := uint64(1); i <= 12; i++ {
		want := fmt.Sprintf("t1-%d", i)
		if i >= 8 {
			want = fmt.Sprintf("t2-%d", i)
		}
		var l raft.Log
		if err := s.GetLog(i, &l); err != nil || string(l.Data) != want {
			t.Fatalf("entry %d after reopen: %q, %v; want %q", i, l.Data, err, want)
		}
	}
}

// TestWALRefusesASecondOpener: a second open of a WAL in use fails
// within boltOpenTO (bbolt alone would wait for its lock forever).
func TestWALRefusesASecondOpener(t *testing.T) {
	dir := t.TempDir()
	s, err := openLogStore(dir, LogStoreWAL)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var err2 error
	within(t, 5*time.Second, "a second open", func() {
		var s2 logStore
		if s2, err2 = openLogStore(dir, LogStoreWAL); s2 != nil {
			_ = s2.Close()
		}
	})
	if err2 == nil {
		t.Fatal("a WAL in use opened a second time")
	}
}

// TestHasStateWAL: HasState sees a WAL's term, creates nothing in an
// empty dir, and can be asked again before Start (it closes what it opens).
func TestHasStateWAL(t *testing.T) {
	dir := t.TempDir()
	if ok, err := HasState(dir); ok || err != nil {
		t.Fatalf("empty dir: %v, %v", ok, err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("HasState created %d files", len(ents))
	}
	s, err := openLogStore(dir, LogStoreWAL)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetUint64([]byte("CurrentTerm"), 3); err != nil {
		t.Fatal(err)
	}
	_ = s.Close()
	for i := range 2 {
		var ok bool
		within(t, 5*time.Second, fmt.Sprintf("HasState #%d", i+1), func() { ok, err = HasState(dir) })
		if !ok || err != nil {
			t.Fatalf("HasState #%d after a term was stored: %v, %v", i+1, ok, err)
		}
	}
}

// TestWALFollowerCatchesUpBySnapshot: a follower on raft-wal that missed
// what the leader compacted installs the snapshot and then takes new
// entries. raft-wal refuses a gap in the log; raft deletes the old log on
// a snapshot install only if the store says it is monotonic, which our
// log cache must pass on.
func TestWALFollowerCatchesUpBySnapshot(t *testing.T) {
	c := newTestCluster(t, 3)
	c.mutate = func(cfg *Config) {
		cfg.LogStore = LogStoreWAL
		cfg.TrailingLogs = 2
	}
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	ctx := ctxT(t, 4*waitFor)
	want := map[string]string{}
	write := func(n int) {
		for i := range n {
			topic := fmt.Sprintf("t%d", len(want)+i)
			if _, err := c.leader().node().Apply(ctx, setRetained(topic, "v")); err != nil {
				t.Fatal(err)
			}
			want[topic] = "v"
		}
	}
	write(3)
	c.waitRetained(want)
	lag := c.follower(lead)
	lag.stop(true)
	write(20)
	if err := c.leader().node().raft.Snapshot().Error(); err != nil {
		t.Fatal(err)
	}
	write(5)
	if err := lag.start(); err != nil {
		t.Fatal(err)
	}
	c.waitRetained(want)
	if lag.node().fsm.Restores() == 0 {
		t.Fatal("the lagging node caught up without a snapshot")
	}
	write(5) // appended after the snapshot on the follower's log
	c.waitRetained(want)
	lag.restart(t) // and it reads its log back
	c.waitRetained(want)
}

// failingFS fails the next failWrites segment writes with ENOSPC.
type failingFS struct {
	*fs.FS
	failWrites *atomic.Int32
}

type failingFile struct {
	types.WritableFile
	failWrites *atomic.Int32
}

func (v failingFS) Create(dir, name string, size uint64) (types.WritableFile, error) {
	f, err := v.FS.Create(dir, name, size)
	return failingFile{f, v.failWrites}, err
}

func (v failingFS) OpenWriter(dir, name string) (types.WritableFile, error) {
	f, err := v.FS.OpenWriter(dir, name)
	return failingFile{f, v.failWrites}, err
}

func (f failingFile) WriteAt(b []byte, off int64) (int, error) {
	if f.failWrites.Add(-1) >= 0 {
		return 0, syscall.ENOSPC
	}
	return f.WritableFile.WriteAt(b, off)
}

// TestWALRecoversFromAFailedWrite: after one failed write (a full disk),
// raft's retry of the same entries succeeds and the log reads back whole:
// raft-wal rolls its in-memory end of log back when a write fails, as bolt
// rolls its transaction back.
func TestWALRecoversFromAFailedWrite(t *testing.T) {
	var failWrites atomic.Int32
	walTestFiler = func(dir string) types.SegmentFiler {
		return segment.NewFiler(dir, failingFS{fs.New(), &failWrites})
	}
	t.Cleanup(func() { walTestFiler = nil })
	s, err := openLogStore(t.TempDir(), LogStoreWAL)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	entry := func(i uint64) *raft.Log { return &raft.Log{Index: i, Term: 1, Data: []byte(fmt.Sprint("e", i))} }
	if err := s.StoreLogs([]*raft.Log{entry(1), entry(2), entry(3)}); err != nil {
		t.Fatal(err)
	}
	failWrites.Store(1)
	if err := s.StoreLogs([]*raft.Log{entry(4)}); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("the failing write: %v, want ENOSPC", err)
	}
	for try := range 2 { // the disk takes writes again
		if err := s.StoreLogs([]*raft.Log{entry(4)}); err != nil {
			t.Fatalf("retry %d: %v", try+1, err)
		}
		if try == 0 {
			if err := s.StoreLogs([]*raft.Log{entry(5)}); err != nil {
				t.Fatalf("the next entry: %v", err)
			}
			if err := s.DeleteRange(5, 5); err != nil {
				t.Fatal(err)
			}
			if err := s.DeleteRange(4, 4); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i := uint64(1); i <= 4; i++ {
		var l raft.Log
		if err := s.GetLog(i, &l); err != nil || string(l.Data) != fmt.Sprint("e", i) {
			t.Fatalf("entry %d: %q, %v", i, l.Data, err)
		}
	}
	if last, err := s.LastIndex(); last != 4 || err != nil {
		t.Fatalf("last index %d, %v; want 4", last, err)
	}
}
