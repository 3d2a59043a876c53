package replication

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// r3Layer: a TCP stream layer whose outgoing dials can be cut.
type r3Layer struct {
	ln   net.Listener
	self string
	net  *r3Net
}

type r3Net struct {
	mu    sync.Mutex
	cut   map[[2]string]bool     // from id -> to addr
	conns map[net.Conn][2]string // dialed conns
	ids   map[string]string      // addr -> id
}

func (l *r3Layer) Accept() (net.Conn, error) { return l.ln.Accept() }
func (l *r3Layer) Close() error              { return l.ln.Close() }
func (l *r3Layer) Addr() net.Addr            { return l.ln.Addr() }
func (l *r3Layer) Dial(a raft.ServerAddress, to time.Duration) (net.Conn, error) {
	n := l.net
	n.mu.Lock()
	k := [2]string{l.self, n.ids[string(a)]}
	if n.cut[k] {
		n.mu.Unlock()
		return nil, errors.New("cut")
	}
	n.mu.Unlock()
	c, err := net.DialTimeout("tcp", string(a), to)
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	n.conns[c] = k
	n.mu.Unlock()
	return c, nil
}

func (n *r3Net) set(from, to string) {
	n.mu.Lock()
	n.cut[[2]string{from, to}] = true
	var cl []net.Conn
	for c, k := range n.conns {
		if k == [2]string{from, to} {
			cl = append(cl, c)
			delete(n.conns, c)
		}
	}
	n.mu.Unlock()
	for _, c := range cl {
		_ = c.Close()
	}
}

// slowStable: a stable store whose SetUint64 takes delay (a slow fsync).
type slowStable struct {
	*raft.InmemStore
	delay atomic.Int64
}

func (s *slowStable) SetUint64(k []byte, v uint64) error {
	if d := s.delay.Load(); d > 0 {
		time.Sleep(time.Duration(d))
	}
	return s.InmemStore.SetUint64(k, v)
}

type nopFSM struct{}

func (nopFSM) Apply(*raft.Log) any                 { return nil }
func (nopFSM) Snapshot() (raft.FSMSnapshot, error) { return nil, errors.New("no") }
func (nopFSM) Restore(r io.ReadCloser) error       { return r.Close() }

type lineLog struct {
	mu    sync.Mutex
	lines []string
}

func (l *lineLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	l.lines = append(l.lines, string(bytes.TrimSpace(p)))
	l.mu.Unlock()
	return len(p), nil
}

func (l *lineLog) has(s string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, x := range l.lines {
		if strings.Contains(x, s) {
			return true
		}
	}
	return false
}

type r3Node struct {
	id     string
	r      *raft.Raft
	lease  *readLease
	stable *slowStable
	log    *lineLog
	trans  *raft.NetworkTransport
	stop   chan struct{}
}

// TestReview3SlowElectSelfOutlivesGate: the gate ends a transfer
// candidacy 2*ElectionTimeout+100ms after raft answered the TimeoutNow,
// but raft starts the candidate's election timer only after electSelf has
// persisted the new term and its own vote (raft.go runCandidate: electSelf
// before randomTimeout). With a stable store slower than 100 ms there (a
// slow fsync), the node is still a transfer candidate when the gate starts
// passing AppendEntries of its term again, acknowledges another leader's
// request of that term without becoming its follower, and that leader
// counts it toward its lease: the hole of TestTransferCandidateAckNotCounted.
func r3Cluster(t *testing.T, ht, et time.Duration) (map[string]*r3Node, map[string]net.Listener, *r3Net) {
	ids := []string{"a", "b", "c"}
	nw := &r3Net{cut: map[[2]string]bool{}, conns: map[net.Conn][2]string{}, ids: map[string]string{}}
	var servers []raft.Server
	lns := map[string]net.Listener{}
	for _, id := range ids {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns[id] = ln
		nw.ids[ln.Addr().String()] = id
		servers = append(servers, raft.Server{ID: raft.ServerID(id), Address: raft.ServerAddress(ln.Addr().String())})
	}
	nodes := map[string]*r3Node{}
	for _, id := range ids {
		n := &r3Node{id: id, stable: &slowStable{InmemStore: raft.NewInmemStore()}, log: &lineLog{}, stop: make(chan struct{})}
		logs := raft.NewInmemStore()
		snaps := raft.NewInmemSnapshotStore()
		n.trans = raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
			Stream: &r3Layer{ln: lns[id], self: id, net: nw}, MaxPool: 3, Timeout: 2 * time.Second,
			Logger: hclog.NewNullLogger(),
		})
		rc := raft.DefaultConfig()
		rc.LocalID = raft.ServerID(id)
		rc.HeartbeatTimeout, rc.ElectionTimeout, rc.LeaderLeaseTimeout = ht, et, ht/2
		rc.CommitTimeout = 5 * time.Millisecond
		rc.Logger = hclog.New(&hclog.LoggerOptions{Name: id, Output: n.log, Level: hclog.Info})
		if err := raft.BootstrapCluster(rc, logs, n.stable, snaps, n.trans, raft.Configuration{Servers: servers}); err != nil {
			t.Fatal(err)
		}
		n.lease = newReadLease(ht / 2)
		var held, strict atomic.Bool
		var rp atomic.Pointer[raft.Raft]
		gate := newVoteGate(&held, &strict, n.lease, func(from raft.ServerID, term uint64) bool {
			r := rp.Load()
			_, l := r.LeaderWithID()
			return l == from && l != "" && r.CurrentTerm() == term
		}, n.stop)
		gate.state = func() (raft.RaftState, uint64, bool) {
			r := rp.Load()
			if r == nil {
				return raft.Follower, 0, false
			}
			return r.State(), r.CurrentTerm(), true
		}
		r, err := raft.NewRaft(rc, nopFSM{}, logs, n.stable, snaps, raftTransport{n.trans, &heartbeatGuard{}, gate, n.lease, false, nil})
		if err != nil {
			t.Fatal(err)
		}
		rp.Store(r)
		n.r = r
		nodes[id] = n
	}
	t.Cleanup(func() {
		for _, n := range nodes {
			close(n.stop)
			_ = n.r.Shutdown().Error()
			_ = n.trans.Close()
		}
	})
	return nodes, lns, nw
}

// TestReview3SlowElectSelfOutlivesGate (found by the third review): raft
// ends a transfer candidacy only after its election timer, which starts
// after the candidacy's own disk writes; a gate that stopped refusing
// AppendEntries of the candidacy's term after a fixed time let a slow
// disk (600 ms per write here) outlast it, and the new leader counted the
// candidate's acknowledgement. Real raft nodes with the project's transport
// wrapper and vote gate.
func TestReview3SlowElectSelfOutlivesGate(t *testing.T) {
	const (
		ht = 600 * time.Millisecond
		et = time.Second
	)
	ids := []string{"a", "b", "c"}
	nodes, lns, nw := r3Cluster(t, ht, et)
	voters := []raft.ServerID{"a", "b", "c"}
	var lead *r3Node
	for end := time.Now().Add(10 * time.Second); lead == nil; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("no leader")
		}
		for _, n := range nodes {
			if n.r.State() == raft.Leader && n.lease.holds(raft.ServerID(n.id), n.r.CurrentTerm(), voters, time.Now()) {
				lead = n
			}
		}
	}
	term := lead.r.CurrentTerm()
	var x, m *r3Node
	for _, id := range ids {
		if id == lead.id {
			continue
		}
		if x == nil {
			x = nodes[id]
		} else {
			m = nodes[id]
		}
	}
	// x's vote requests go nowhere (as in TestTransferCandidateAckNotCounted),
	// and its disk is slow: 600 ms per term/vote write.
	nw.set(x.id, lead.id)
	nw.set(x.id, m.id)
	x.stable.delay.Store(int64(600 * time.Millisecond))
	lead.lease.block(term)
	t0 := time.Now()
	_ = lead.r.LeadershipTransferToServer(raft.ServerID(x.id), raft.ServerAddress(lns[x.id].Addr().String()))
	var w *r3Node
	for end := time.Now().Add(6 * time.Second); ; time.Sleep(time.Millisecond) {
		if time.Now().After(end) {
			t.Skipf("no counted ack; x state %v term %d; w %v", x.r.State(), x.r.CurrentTerm(), w != nil)
		}
		if w == nil {
			for _, n := range []*r3Node{lead, m} {
				if n.r.State() == raft.Leader && n.r.CurrentTerm() == term+1 {
					w = n
					t.Logf("%s leads term %d at +%v", w.id, term+1, time.Since(t0).Round(time.Millisecond))
				}
			}
			continue
		}
		w.lease.mu.Lock()
		a := w.lease.acks[raft.ServerID(x.id)]
		w.lease.mu.Unlock()
		if a.term != term+1 {
			continue
		}
		st, cur := x.r.State(), x.r.CurrentTerm()
		restarted := x.log.has("Election timeout reached")
		msg := fmt.Sprintf("%s counted an ack of term %d from %s (sent at +%v); %s is now %v in term %d, its first candidacy timer fired: %t",
			w.id, term+1, x.id, a.sent.Sub(t0).Round(time.Millisecond), x.id, st, cur, restarted)
		if st == raft.Candidate && cur == term+1 && !restarted {
			t.Fatal("HOLE: " + msg)
		}
		t.Log(msg)
		return
	}
}
