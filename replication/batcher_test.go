package replication

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// stuckProposer is a leader whose futures never answer, like raft v1.8's
// for a commit queued to its FSM goroutine when Shutdown came
// (hashicorp/raft#498).
type stuckProposer struct{ applied chan struct{} }

func (p *stuckProposer) State() raft.RaftState { return raft.Leader }

func (p *stuckProposer) Apply([]byte, time.Duration) raft.ApplyFuture {
	close(p.applied)
	return stuckFuture{}
}

type stuckFuture struct{ raft.ApplyFuture }

func (stuckFuture) Error() error { select {} }

// TestBatcherCloseDoesNotWaitForUnansweredFuture: a leader's Close hung
// for 19 minutes in CI (TestApplyAcrossLeaderCrash) because the batcher
// waited on such a future.
func TestBatcherCloseDoesNotWaitForUnansweredFuture(t *testing.T) {
	cfg := testConfig()
	cfg.MaxBatchCommands, cfg.MaxBatchBytes = 16, 1<<20
	p := &stuckProposer{applied: make(chan struct{})}
	b := newBatcher(p, &cfg, newMetrics())
	b.start()
	req := &applyReq{cmds: []Command{setRetained("t", "v")}, enc: [][]byte{EncodeCommand(setRetained("t", "v"))}, done: make(chan applyReply, 1)}
	errc := make(chan error, 1)
	go func() {
		_, err := b.submit(context.Background(), req)
		errc <- err
	}()
	select {
	case <-p.applied:
	case <-time.After(10 * time.Second):
		t.Fatal("never proposed")
	}
	closed := make(chan struct{})
	go func() { b.close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("close waited for a future that never answers")
	}
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) || !errors.Is(err, ErrUnknownOutcome) {
			t.Fatalf("submit: %v, want ErrClosed with an unknown outcome", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the caller was never answered")
	}
}
