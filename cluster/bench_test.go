package cluster

import (
	"encoding/binary"
	"os"
	"runtime"
	"slices"
	"sync/atomic"
	"testing"
	"time"
)

// Transport-level benchmarks: Forward on one node to Deliver on another,
// in one process over loopback. The broker-level cross-node vs same-node
// comparison (MQTT clients on both ends) belongs to the hooks/e2e layer.

func benchPair(b *testing.B, deliver func(*Message)) (*testNode, *testNode) {
	n1 := startNode(b, "n1", nil, withConfig(func(c *Config) {
		if fi := os.Getenv("CLUSTER_BENCH_FLUSH"); fi != "" {
			c.FlushInterval, _ = time.ParseDuration(fi)
		}
	}))
	n2 := startNode(b, "n2", []string{n1.selfGossip})
	n2.rec.onDeliver = func(_ string, m *Message) { deliver(m) }
	if err := n2.AddRoute("bench/#"); err != nil {
		b.Fatal(err)
	}
	waitRoutes(b, []*testNode{n1, n2}, "n2", "bench/#")
	eventually(b, 5*time.Second, func() bool { return n1.Status().Members[1].Connected }, "not connected")
	n2.rec.mu.Lock()
	n2.rec.got = nil // the recorder would keep every message; benchmarks only count
	n2.rec.mu.Unlock()
	return n1, n2
}

// BenchmarkForwardThroughput pushes b.N 256-byte messages as fast as
// Forward accepts them and waits for the last delivery.
func BenchmarkForwardThroughput(b *testing.B) {
	var got atomic.Int64
	done := make(chan struct{})
	var target int64
	n1, n2 := benchPair(b, nil)
	n2.rec.onDeliver = func(_ string, m *Message) {
		if got.Add(1) == atomic.LoadInt64(&target) {
			close(done)
		}
	}
	payload := make([]byte, 256)
	atomic.StoreInt64(&target, int64(b.N))
	b.SetBytes(int64(len(payload)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		// A window of outstanding messages stands in for the publishers'
		// own flow control, so the queue never overflows.
		for int64(i)-got.Load() > 8000 {
			runtime.Gosched()
		}
		if n1.Forward(&Message{Topic: "bench/t", Payload: payload, QoS: 1}) != 1 {
			b.Fatal("not queued")
		}
	}
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		b.Fatalf("delivered %d of %d", got.Load(), b.N)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msg/s")
}

// BenchmarkForwardLatency paces messages at 5,000/s and reports the p50 and
// p99 Forward-to-Deliver latency.
func BenchmarkForwardLatency(b *testing.B) {
	const rate = 5000
	lat := make([]time.Duration, 0, b.N)
	var mu = make(chan struct{}, 1)
	mu <- struct{}{}
	var got atomic.Int64
	done := make(chan struct{})
	n1, n2 := benchPair(b, nil)
	n2.rec.onDeliver = func(_ string, m *Message) {
		sent := time.Unix(0, int64(binary.BigEndian.Uint64(m.Payload)))
		<-mu
		lat = append(lat, time.Since(sent))
		mu <- struct{}{}
		if got.Add(1) == int64(b.N) {
			close(done)
		}
	}
	tick := time.NewTicker(time.Second / rate)
	defer tick.Stop()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		<-tick.C
		p := binary.BigEndian.AppendUint64(make([]byte, 0, 64), uint64(time.Now().UnixNano()))
		n1.Forward(&Message{Topic: "bench/lat", Payload: p[:64], QoS: 1})
	}
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		b.Fatalf("delivered %d of %d", got.Load(), b.N)
	}
	b.StopTimer()
	<-mu
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}

func BenchmarkEncodeFrame(b *testing.B) {
	m, shared := goldenMessage()
	m.Payload = make([]byte, 256)
	buf := make([]byte, 0, 512)
	for b.Loop() {
		buf = appendPublishFrame(buf[:0], m, shared)
	}
}
