package replication

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkApply measures retained writes through raft on a three-node
// in-process cluster (real bolt files, real fsyncs, TCP on 127.0.0.1) with
// many parallel callers. Reported:
//
//	cmds/s        commands committed per second (what clients see)
//	entries/s     log entries per second (bounded by the fsync rate)
//	cmds/entry    mean group-commit batch size
//	p50-ms/p99-ms Apply latency as seen by one caller
//	fsync/s       this disk's fsync rate, measured in the same run
//
// Run: go test -run '^$' -bench Apply -benchtime 5000x ./replication/
func BenchmarkApply(b *testing.B) {
	fsyncRate := measureFsync(b, 200)
	for _, bc := range []struct {
		name     string
		via      string // "leader" or "follower"
		linger   time.Duration
		parallel int // goroutines per GOMAXPROCS
	}{
		{"leader/linger=1ms/callers=64", "leader", time.Millisecond, 32},
		{"leader/linger=0/callers=64", "leader", -1, 32},
		{"follower/linger=1ms/callers=64", "follower", time.Millisecond, 32},
		{"leader/linger=1ms/callers=2", "leader", time.Millisecond, 1},
	} {
		b.Run(bc.name, func(b *testing.B) {
			c := newTestCluster(b, 3)
			c.log = slog.New(slog.DiscardHandler)
			c.mutate = func(cfg *Config) {
				cfg.BatchLinger = bc.linger
				// Production raft timings: tight test timings would cause
				// elections under a saturated CPU and measure those instead.
				cfg.HeartbeatTimeout, cfg.ElectionTimeout, cfg.LeaderLeaseTimeout = time.Second, time.Second, 500*time.Millisecond
			}
			c.startNew("n1", "n2", "n3")
			lead := c.leader()
			target := lead
			if bc.via == "follower" {
				target = c.follower(lead)
			}
			n := target.node()
			ctx := ctxT(b, 5*time.Minute)
			payload := make([]byte, 128)
			var seq atomic.Int64
			var mu sync.Mutex
			var lat []time.Duration
			startIdx := lead.node().raft.LastIndex()
			b.SetParallelism(bc.parallel)
			b.ResetTimer()
			start := time.Now()
			b.RunParallel(func(pb *testing.PB) {
				var mine []time.Duration
				for pb.Next() {
					i := seq.Add(1)
					cmd := &RetainSet{Msg: RetainedMessage{Topic: fmt.Sprintf("bench/%d", i%10000), Payload: payload, QoS: 1}}
					t0 := time.Now()
					if _, err := n.Apply(ctx, cmd); err != nil {
						b.Error(err)
						return
					}
					mine = append(mine, time.Since(t0))
				}
				mu.Lock()
				lat = append(lat, mine...)
				mu.Unlock()
			})
			elapsed := time.Since(start)
			b.StopTimer()
			entries := lead.node().raft.LastIndex() - startIdx
			slices.Sort(lat)
			pct := func(p float64) float64 {
				if len(lat) == 0 {
					return 0
				}
				return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000
			}
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "cmds/s")
			b.ReportMetric(float64(entries)/elapsed.Seconds(), "entries/s")
			b.ReportMetric(float64(b.N)/float64(max(entries, 1)), "cmds/entry")
			b.ReportMetric(pct(0.5), "p50-ms")
			b.ReportMetric(pct(0.99), "p99-ms")
			b.ReportMetric(fsyncRate, "fsync/s")
		})
	}
}

// measureFsync writes and fdatasyncs a small file n times in the test's
// temp dir (the same disk the benchmark's raft.db lives on).
func measureFsync(b *testing.B, n int) float64 {
	f, err := os.Create(filepath.Join(b.TempDir(), "fsync"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	start := time.Now()
	for i := range n {
		if _, err := f.WriteAt(buf, int64(i%16)*4096); err != nil {
			b.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
	}
	return float64(n) / time.Since(start).Seconds()
}

// BenchmarkSmallWritesDuringBlob measures what a large durable message
// costs everyone else: the latency of small writes from one client (a
// follower, one at a time, like a QoS 1 publisher waiting for PUBACK)
// while nothing else runs, then while another follower uploads blobs of
// BENCH_BLOB_MB megabytes (default 64) back to back. Reported: p50 and p99
// of both phases in ms, their p99 ratio (during/alone: 1 means
// unaffected), and the upload rate in MB/s.
//
// Run: go test -run '^$' -bench SmallWritesDuringBlob -benchtime 1x ./replication/
// (BENCH_BLOB_MB=256 for the figure; needs about 3 GB of disk).
func BenchmarkSmallWritesDuringBlob(b *testing.B) {
	mb := 64
	if v := os.Getenv("BENCH_BLOB_MB"); v != "" {
		if _, err := fmt.Sscan(v, &mb); err != nil || mb <= 0 {
			b.Fatalf("BENCH_BLOB_MB=%q", v)
		}
	}
	const phase = 10 * time.Second
	for range b.N {
		c := newTestCluster(b, 3)
		c.log = slog.New(slog.DiscardHandler)
		c.mutate = func(cfg *Config) {
			cfg.HeartbeatTimeout, cfg.ElectionTimeout, cfg.LeaderLeaseTimeout = time.Second, time.Second, 500*time.Millisecond
		}
		c.startNew("n1", "n2", "n3")
		lead := c.leader()
		var small, big *testNode
		for _, tn := range c.up() {
			switch {
			case tn == lead:
			case small == nil:
				small = tn
			default:
				big = tn
			}
		}
		ctx := ctxT(b, 10*time.Minute)
		measure := func(stop <-chan struct{}) []time.Duration {
			var lat []time.Duration
			payload := make([]byte, 64)
			end := time.After(phase)
			for i := 0; ; i++ {
				select {
				case <-end:
					return lat
				case <-stop:
					return lat
				default:
				}
				t0 := time.Now()
				if _, err := small.node().Apply(ctx, &RetainSet{Msg: RetainedMessage{Topic: fmt.Sprintf("small/%d", i%100), Payload: payload, QoS: 1}}); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(t0))
			}
		}
		alone := measure(nil)
		var uploaded atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		p := randomPayload(mb<<20, 1) // made before: the phases measure raft, not this
		wg.Go(func() {
			for seed := uint64(1); ; seed++ {
				select {
				case <-stop:
					return
				default:
				}
				p[0], p[1], p[2] = byte(seed), byte(seed>>8), byte(seed>>16) // a new blob each time
				if _, err := big.node().PutBlob(ctx, p); err != nil {
					b.Error(err)
					return
				}
				uploaded.Add(int64(len(p)))
			}
		})
		start := time.Now()
		during := measure(nil)
		elapsed := time.Since(start)
		close(stop)
		wg.Wait()
		pct := func(lat []time.Duration, p float64) float64 {
			slices.Sort(lat)
			return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000
		}
		b.ReportMetric(pct(alone, 0.5), "alone-p50-ms")
		b.ReportMetric(pct(alone, 0.99), "alone-p99-ms")
		b.ReportMetric(pct(during, 0.5), "during-p50-ms")
		b.ReportMetric(pct(during, 0.99), "during-p99-ms")
		b.ReportMetric(pct(during, 0.99)/pct(alone, 0.99), "p99-ratio")
		b.ReportMetric(float64(uploaded.Load())/elapsed.Seconds()/1e6, "upload-MB/s")
		c.closeAll()
	}
}
