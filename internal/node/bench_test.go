package node

import (
	"encoding/binary"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// BenchmarkDelivery compares delivery to a subscriber on the publishing
// node ("same") with delivery to one on another node ("cross"), at QoS 0
// and 1. Compare the two in one run: ratios, not absolute numbers, mean
// something on a shared machine. Reported: msgs/s, and p50/p99
// publish-to-delivery latency in microseconds.
//
// "paced" publishes at 5,000 msg/s, the latency target point; the
// others publish as fast as one client can (QoS 1 waits for each PUBACK).
//
// The nodes keep mochi's outbound queue of 8,192 packets: unpaced QoS 0
// outruns the subscriber, and with the default queue (2,314) some messages
// are dropped as for a slow consumer, which this benchmark of delivery
// cost would wait for (the load tool's fan-in reports what the drop policy
// does).
func BenchmarkDelivery(b *testing.B) {
	tc := newTunedCluster(b, func(cfg *Config) { cfg.MaxPendingWrites = 8192 }, "n1", "n2")
	for _, mode := range []string{"same", "cross"} {
		for _, qos := range []byte{0, 1} {
			for _, paced := range []bool{false, true} {
				name := fmt.Sprintf("%s/qos%d", mode, qos)
				if paced {
					name += "/paced5k"
				}
				b.Run(name, func(b *testing.B) {
					subNode := map[string]string{"same": "n1", "cross": "n2"}[mode]
					runDelivery(b, tc, subNode, qos, paced)
				})
			}
		}
	}
}

var benchSeq int

func runDelivery(b *testing.B, tc *testCluster, subNode string, qos byte, paced bool) {
	benchSeq++
	topic := fmt.Sprintf("bench/%d", benchSeq)
	sub := testutil.Connect(b, tc.nodes[subNode].Addr("mqtt"), testutil.ClientOptions{
		ID: fmt.Sprintf("bsub-%d", benchSeq), CleanStart: true, Buffer: 1 << 16})
	sub.Sub(b, qos, topic)
	if subNode != "n1" {
		tc.waitRoutes(b, "n1", subNode, 1)
	}
	pub := testutil.Connect(b, tc.nodes["n1"].Addr("mqtt"), testutil.ClientOptions{ID: fmt.Sprintf("bpub-%d", benchSeq), CleanStart: true})

	lat := make([]time.Duration, 0, b.N)
	done := make(chan error, 1)
	go func() {
		for range b.N {
			p, err := sub.Next(10 * time.Second)
			if err != nil {
				done <- fmt.Errorf("after %d messages: %w", len(lat), err)
				return
			}
			lat = append(lat, time.Duration(time.Now().UnixNano()-int64(binary.BigEndian.Uint64(p.Payload))))
		}
		done <- nil
	}()
	payload := make([]byte, 64)
	start := time.Now()
	b.ResetTimer()
	for i := range b.N {
		if paced {
			// 5,000 msg/s: message i is due at start + i*200us.
			if d := time.Until(start.Add(time.Duration(i) * 200 * time.Microsecond)); d > 0 {
				time.Sleep(d)
			}
		}
		binary.BigEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
		if err := pub.TryPub(topic, qos, false, slices.Clone(payload)); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		b.Fatalf("%v\ncluster at n1: %+v\nat %s: %+v", err, tc.nodes["n1"].ClusterStatus(), subNode, tc.nodes[subNode].ClusterStatus())
	}
	elapsed := time.Since(start)
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-us")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-us")
	sub.Close()
	pub.Close()
}
