package replication

import (
	"errors"
	"testing"
	"time"
)

// TestQoS2FenceWaitsForEveryServer: the fenced QoS2Publish (type 23) is
// used only once every server of the configuration applies it. A node of
// log format 1 (a rolling upgrade not done) panics on an entry of a type
// it does not know, at every restart: while one is in the configuration,
// no node may propose it. Nor may the leader record log format 7
// (LogFormat) before n3 applies it, and it does once n3 does.
func TestQoS2FenceWaitsForEveryServer(t *testing.T) {
	c := newTestCluster(t, 3)
	c.mutate = func(cfg *Config) {
		if cfg.NodeID == "n3" {
			cfg.asOldLogFormat = true
		}
	}
	c.startNew("n1", "n2", "n3")
	c.leader()
	eventually(t, 10*time.Second, func() error {
		for _, tn := range c.up() {
			if tn.node().logVers.known == nil {
				return errors.New("not started")
			}
		}
		n1 := c.node("n1").node()
		n1.logVers.mu.Lock()
		_, asked := n1.logVers.known["n3"]
		n1.logVers.mu.Unlock()
		if !asked {
			return errors.New("n1 has not asked n3 yet")
		}
		return nil
	})
	for _, tn := range c.up() {
		if tn.node().QoS2Fence() {
			t.Fatalf("%s uses the fence while n3 applies log format 1", tn.id)
		}
		if v := tn.node().LogFormat(); v != 0 {
			t.Fatalf("%s: log format %d recorded while n3 applies log format 1", tn.id, v)
		}
	}
	// n3 is upgraded: every node starts using it.
	c.node("n3").stop(false)
	c.mutate = nil
	c.node("n3").restart(t)
	eventually(t, 20*time.Second, func() error {
		for _, tn := range c.up() {
			if !tn.node().QoS2Fence() {
				return errors.New(tn.id + " does not use the fence yet")
			}
			if tn.node().LogFormat() != logVersion {
				return errors.New(tn.id + " has not applied the log format's record yet")
			}
		}
		return nil
	})
}
