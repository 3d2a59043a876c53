package replication

import (
	"testing"
)

// BenchmarkReadBarrier: one caller at a time, on a follower and on the
// leader (the cost a lone QoS 1 publisher pays per message), with the
// leader confirming each read index by a heartbeat round (the default) and
// by its read lease (--read-lease).
func BenchmarkReadBarrier(b *testing.B) {
	for _, lease := range []bool{false, true} {
		c := newTestCluster(b, 3)
		c.mutate = func(cfg *Config) { cfg.ReadLease = lease }
		c.startNew("n1", "n2", "n3")
		lead := c.leader()
		name := map[bool]string{false: "round", true: "lease"}[lease]
		for _, tc := range []struct {
			name string
			n    *testNode
		}{{"follower", c.follower(lead)}, {"leader", lead}} {
			b.Run(name+"/"+tc.name, func(b *testing.B) {
				ctx := ctxT(b, waitFor*6)
				for b.Loop() {
					if err := tc.n.node().ReadBarrier(ctx); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
		c.closeAll()
	}
}

// BenchmarkReadBarrierSoleVoter: the same on a one-node cluster, whose
// leader needs no round (soleVoter).
func BenchmarkReadBarrierSoleVoter(b *testing.B) {
	c := newTestCluster(b, 1)
	tn := c.startNew("solo")[0]
	c.leader()
	ctx := ctxT(b, waitFor*6)
	for b.Loop() {
		if err := tn.node().ReadBarrier(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
