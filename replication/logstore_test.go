package replication

import (
	"bytes"
	"errors"
	"log/slog"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
)

func TestBoltStore(t *testing.T) {
	path := filepath.Join(t.TempDir(), raftDBFile)
	s, err := openBoltStore(path, false)
	if err != nil {
		t.Fatal(err)
	}
	if first, _ := s.FirstIndex(); first != 0 {
		t.Fatalf("empty first %d", first)
	}
	if last, _ := s.LastIndex(); last != 0 {
		t.Fatalf("empty last %d", last)
	}
	var l raft.Log
	if err := s.GetLog(1, &l); !errors.Is(err, raft.ErrLogNotFound) {
		t.Fatalf("missing log: %v", err)
	}
	// raft compares the text of this error.
	if _, err := s.GetUint64([]byte("CurrentTerm")); err == nil || err.Error() != "not found" {
		t.Fatalf("missing key: %v", err)
	}
	at := time.Unix(1_700_000_000, 123)
	var logs []*raft.Log
	for i := uint64(1); i <= 10; i++ {
		logs = append(logs, &raft.Log{Index: i, Term: 2, Type: raft.LogCommand, Data: []byte{byte(i)}, AppendedAt: at})
	}
	logs[3].Extensions = []byte("ext")
	logs[4].Type, logs[4].Data, logs[4].AppendedAt = raft.LogConfiguration, nil, time.Time{}
	if err := s.StoreLogs(logs); err != nil {
		t.Fatal(err)
	}
	for _, want := range logs {
		var got raft.Log
		if err := s.GetLog(want.Index, &got); err != nil {
			t.Fatal(err)
		}
		if got.Index != want.Index || got.Term != want.Term || got.Type != want.Type ||
			!bytes.Equal(got.Data, want.Data) || !bytes.Equal(got.Extensions, want.Extensions) || !got.AppendedAt.Equal(want.AppendedAt) {
			t.Fatalf("log %d: got %+v want %+v", want.Index, got, *want)
		}
	}
	if err := s.DeleteRange(1, 3); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteRange(9, 10); err != nil {
		t.Fatal(err)
	}
	if first, _ := s.FirstIndex(); first != 4 {
		t.Fatalf("first after delete %d", first)
	}
	if last, _ := s.LastIndex(); last != 8 {
		t.Fatalf("last after delete %d", last)
	}
	if err := s.SetUint64([]byte("CurrentTerm"), 7); err != nil {
		t.Fatal(err)
	}
	if err := s.Set([]byte("LastVoteCand"), []byte("n2")); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Durable across reopen; read-only open works on a closed store.
	ro, err := openBoltStore(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if v, err := ro.GetUint64([]byte("CurrentTerm")); err != nil || v != 7 {
		t.Fatalf("term after reopen %d %v", v, err)
	}
	if v, err := ro.Get([]byte("LastVoteCand")); err != nil || string(v) != "n2" {
		t.Fatalf("vote after reopen %q %v", v, err)
	}
	if ok, err := raft.HasExistingState(ro, ro, raft.NewDiscardSnapshotStore()); !ok || err != nil {
		t.Fatalf("HasExistingState %v %v", ok, err)
	}
}

func TestBoltStoreCorruptEntry(t *testing.T) {
	s, err := openBoltStore(filepath.Join(t.TempDir(), raftDBFile), false)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_ = s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketLogs).Put(u64Key(1), []byte{9, 9}) })
	var l raft.Log
	if err := s.GetLog(1, &l); !errors.Is(err, errCorrupt) {
		t.Fatalf("corrupt entry: %v", err)
	}
}

func TestMetricsRegistered(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := newTestCluster(t, 1)
	c.mutate = func(cfg *Config) { cfg.Registerer = reg }
	tn := c.startNew("solo")[0]
	c.leader()
	if _, err := tn.node().Apply(ctxT(t, waitFor), setRetained("m", "1")); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, mf := range mfs {
		have[mf.GetName()] = true
	}
	for _, name := range []string{
		"broker_replication_commit_latency_seconds", "broker_replication_batch_commands",
		"broker_replication_applied_entries_total", "broker_replication_leader_changes_total",
		"broker_replication_is_leader", "broker_replication_applied_index", "broker_replication_apply_duration_seconds",
	} {
		if !have[name] {
			t.Errorf("metric %s missing (have %v)", name, have)
		}
	}
	// Close unregisters, so a restarted node can register again.
	tn.restart(t)
	c.leader()
}

func TestHclogAdapter(t *testing.T) {
	var buf bytes.Buffer
	l := newHclog(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})), "")
	l.Named("net").With("peer", "n2").Warn("failed", "servers", hclog.Fmt("%d servers", 3))
	l.Debug("hidden")
	l.StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true}).Print("[ERR] raft: boom")
	out := buf.String()
	for _, want := range []string{`level=WARN msg=failed raft=net peer=n2 servers="3 servers"`, `level=ERROR msg="raft: boom"`} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
	if strings.Contains(out, "hidden") || l.IsDebug() || !l.IsWarn() {
		t.Errorf("levels not honoured:\n%s", out)
	}
	if !reflect.DeepEqual(l.With("a", 1).ImpliedArgs(), []any{"a", 1}) {
		t.Error("implied args")
	}
}
