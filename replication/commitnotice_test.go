package replication

import (
	"fmt"
	"testing"
	"time"
)

// TestFollowerLearnsACommitAtOnce: a follower learns that an entry is
// committed from the leader's next AppendEntries, which raft sends with
// the next entries or after CommitTimeout. With CommitTimeout at a minute
// and nothing else written, only the leader's commit notice
// (commitnotice.go) can tell the followers in time: every follower must
// apply each write within the test's bound.
func TestFollowerLearnsACommitAtOnce(t *testing.T) {
	c := newTestCluster(t, 3)
	c.mutate = func(cfg *Config) { cfg.CommitTimeout = time.Minute }
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	for i := range 5 {
		res, err := lead.node().Apply(ctxT(t, 10*time.Second), setRetained("t", fmt.Sprint(i)))
		if err != nil {
			t.Fatal(err)
		}
		for _, tn := range c.up() {
			if err := tn.node().WaitSynced(ctxT(t, 5*time.Second), res.Index); err != nil {
				t.Fatalf("write %d (index %d) on %s: %v", i, res.Index, tn.id, err)
			}
		}
	}
	if n := counterValue(t, lead.node().m.commitNotices); n == 0 {
		t.Fatal("the leader counted no commit notice")
	}
}
