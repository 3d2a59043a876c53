package replication

import (
	"testing"
)

// BenchmarkReadBarrier: one caller at a time, on a follower and on the
// leader (the cost a lone QoS 1 publisher pays per message).
func BenchmarkReadBarrier(b *testing.B) {
	c := newTestCluster(b, 3)
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	for _, tc := range []struct {
		name string
		n    *testNode
	}{{"follower", c.follower(lead)}, {"leader", lead}} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := ctxT(b, waitFor*6)
			for b.Loop() {
				if err := tc.n.node().ReadBarrier(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
