package hooks

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/replication"
)

// startSingleNode starts a one-voter replication node on a loopback port
// with short raft timeouts, waits until it leads, and closes it when the
// test ends. with, if not nil, completes the configuration (observers).
func startSingleNode(t *testing.T, with func(*replication.Config)) *replication.Node {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	cfg := replication.Config{NodeID: "n1", Advertise: addr, DataDir: t.TempDir(),
		BootstrapExpect: 1, Listener: ln,
		HeartbeatTimeout: 150 * time.Millisecond, ElectionTimeout: 150 * time.Millisecond,
		LeaderLeaseTimeout: 100 * time.Millisecond, CommitTimeout: 5 * time.Millisecond, ExpirySweepInterval: -1,
		Dial: func(ctx context.Context, a string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", a)
		}}
	if with != nil {
		with(&cfg)
	}
	n, err := replication.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	deadline := time.Now().Add(20 * time.Second)
	for !n.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatal("the single node did not become leader within 20 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return n
}
