package replication

import (
	"errors"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// TestHeartbeatGuardWaitsForHandler: close waits for a heartbeat handler
// that is running, and later heartbeats get an error without reaching raft
// (after close the log store may be closed; raft panics when it cannot
// read a committed entry).
func TestHeartbeatGuardWaitsForHandler(t *testing.T) {
	g := &heartbeatGuard{}
	entered, release := make(chan struct{}), make(chan struct{})
	calls := 0
	h := g.wrap(func(rpc raft.RPC) {
		calls++
		close(entered)
		<-release
		rpc.Respond(nil, nil)
	})
	go h(raft.RPC{RespChan: make(chan raft.RPCResponse, 1)})
	<-entered
	closed := make(chan struct{})
	go func() { g.close(); close(closed) }()
	select {
	case <-closed:
		t.Fatal("close returned while a heartbeat handler was running")
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("close did not return after the handler finished")
	}
	resp := make(chan raft.RPCResponse, 1)
	h(raft.RPC{RespChan: resp})
	if calls != 1 {
		t.Fatalf("handler called %d times, want 1 (none after close)", calls)
	}
	if r := <-resp; !errors.Is(r.Error, raft.ErrTransportShutdown) {
		t.Fatalf("heartbeat after close answered %v, want ErrTransportShutdown", r.Error)
	}
	if g.wrap(nil) != nil {
		t.Fatal("a nil handler must stay nil (the transport then queues heartbeats to raft)")
	}
}
