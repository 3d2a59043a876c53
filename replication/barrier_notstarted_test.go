package replication

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

// TestBarrierNotStarted: ErrClosed is documented as "the node is
// closed or not started", and Apply returns it on a Node that New made but
// that was never started (or whose Start failed before raft was created).
// Barriers must too (found by review: the sole voter's shortcut asked
// n.raft, still nil, before anything checked that the node runs).
func TestBarrierNotStarted(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c := testConfig()
	c.NodeID, c.Advertise, c.DataDir, c.Listener = "n", "n.test:7947", t.TempDir(), ln
	c.Dial = (&testCluster{}).dial
	n, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := n.Apply(ctx, setRetained("t", "x")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Apply on a node not started: %v, want ErrClosed", err)
	}
	for name, f := range map[string]func(context.Context) error{"ReadBarrier": n.ReadBarrier, "SessionsBarrier": n.SessionsBarrier} {
		func() {
			defer func() {
				if r := recover(); r != nil {
					t.Errorf("%s on a node not started panics: %v (want ErrClosed)", name, r)
				}
			}()
			if err := f(ctx); !errors.Is(err, ErrClosed) {
				t.Errorf("%s on a node not started: %v, want ErrClosed", name, err)
			}
		}()
	}
}
