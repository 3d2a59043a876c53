package cluster

import (
	"testing"
	"time"
)

// TestDefaultTimingsDetectDeadNodeWithin5s runs three nodes with the
// production failure-detection defaults (only addresses differ) and checks
// that a killed node is declared dead, and its routes removed, within the
// 5 seconds the issue asks for.
func TestDefaultTimingsDetectDeadNodeWithin5s(t *testing.T) {
	if testing.Short() {
		t.Skip("takes about 5 seconds")
	}
	defaults := withConfig(func(c *Config) {
		d := Config{}
		d.Sanitize()
		c.ProbeInterval, c.ProbeTimeout = d.ProbeInterval, d.ProbeTimeout
		c.SuspicionMult, c.SuspicionMaxTimeoutMult = d.SuspicionMult, d.SuspicionMaxTimeoutMult
		c.GossipInterval, c.PushPullInterval = d.GossipInterval, d.PushPullInterval
		c.RetransmitMult = d.RetransmitMult
	})
	nodes := startCluster(t, 3, defaults)
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]
	if err := n3.AddRoute("victim/#"); err != nil {
		t.Fatal(err)
	}
	waitRoutes(t, nodes, "n3", "victim/#")
	start := time.Now()
	n3.kill()
	waitRoutes(t, []*testNode{n1, n2}, "n3")
	took := time.Since(start)
	t.Logf("dead node detected and its routes removed after %v", took)
	if took > 5*time.Second {
		t.Fatalf("detection took %v, want <= 5s", took)
	}
}
