package replication

import (
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// TestNoticeKeepsToItsTerm (found by review): the notifier paired a
// follower's match recorded while this node led an earlier term with the
// commit index of its current term. Story, five voters: L leads term 1 cut
// off with F only, and F accepts L's uncommitted entries 2..10. Another
// node is elected, L's log is cut back to the committed one, L leads again
// (term 2, a shorter log) while its requests to F fail, so F's state stays
// as of term 1. On L's next commit a notice of term 1, PrevLogEntry 10,
// LeaderCommitIndex 2 went to F, which, still in term 1, passed the check
// and applied its own uncommitted term-1 entry 2, not the committed one.
// A notice is owed only for a match of the leader's current term, and a
// late answer of an earlier term does not overwrite a later one.
func TestNoticeKeepsToItsTerm(t *testing.T) {
	lAddr, lTrans := raft.NewInmemTransport("L")
	lc := raft.DefaultConfig()
	lc.LocalID = "L"
	logs, stable, snaps := raft.NewInmemStore(), raft.NewInmemStore(), raft.NewInmemSnapshotStore()
	if err := raft.BootstrapCluster(lc, logs, stable, snaps, lTrans, raft.Configuration{Servers: []raft.Server{{Suffrage: raft.Voter, ID: "L", Address: lAddr}}}); err != nil {
		t.Fatal(err)
	}
	lr, err := raft.NewRaft(lc, nopFSM{}, logs, stable, snaps, lTrans)
	if err != nil {
		t.Fatal(err)
	}
	defer lr.Shutdown()
	c := newCommitNotice(lTrans.AppendEntries, func() *raft.Raft { return lr }, func() {})
	defer c.close()
	deadline := time.Now().Add(10 * time.Second)
	for lr.State() != raft.Leader || lr.CommitIndex() < lr.LastIndex() {
		if time.Now().After(deadline) {
			t.Fatal("L did not lead")
		}
		time.Sleep(5 * time.Millisecond)
	}
	term := lr.CurrentTerm()
	if term < 2 {
		t.Fatalf("L leads term %d; the story needs a term after 1", term)
	}

	// What L's transport saw in term 1: F accepted entries up to 10.
	hdr := raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("L"), Addr: lTrans.EncodePeer("L", lAddr)}
	var old []*raft.Log
	for i := uint64(2); i <= 10; i++ {
		old = append(old, &raft.Log{Index: i, Term: 1, Type: raft.LogCommand})
	}
	args := &raft.AppendEntriesRequest{RPCHeader: hdr, Term: 1, PrevLogEntry: 1, PrevLogTerm: 1, Entries: old, LeaderCommitIndex: 1}
	c.begin("F", "F", args)
	c.end("F", args, &raft.AppendEntriesResponse{Term: 1, Success: true}, nil)
	c.mu.Lock()
	p := c.peers["F"]
	c.mu.Unlock()
	if req, _, ok := c.due(p, false); ok {
		t.Fatalf("a notice is owed in term %d for F's match of term 1: %+v (commit %d)", term, req, lr.CommitIndex())
	}

	// In the current term F accepted entry 1; a late answer of term 1
	// must not put the old match back.
	now := &raft.AppendEntriesRequest{RPCHeader: hdr, Term: term, PrevLogEntry: 1, PrevLogTerm: 1, LeaderCommitIndex: 1}
	c.begin("F", "F", now)
	c.end("F", now, &raft.AppendEntriesResponse{Term: term, Success: true}, nil)
	c.begin("F", "F", args)
	c.end("F", args, &raft.AppendEntriesResponse{Term: 1, Success: true}, nil)
	c.mu.Lock()
	got, gotTerm := p.match, p.term
	c.mu.Unlock()
	if gotTerm != term || got != 1 {
		t.Fatalf("after a late answer of term 1, F's match is %d of term %d, want 1 of term %d", got, gotTerm, term)
	}
}
