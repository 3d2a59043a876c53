package replication

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
)

// Log format versions. A node panics on a log entry type it does not know
// (applying something different from the others would be worse), and the
// entry stays in the log, so it would panic again at every restart. A
// command type newer than version 1 is therefore proposed only once every
// server of the configuration has said it applies it (rpcLogVersion), so
// that a rolling upgrade never feeds an older node an entry it cannot
// read. Versions:
//
//	1  everything up to type 22
//	2  CmdQoS2PublishIf (23): QoS2Publish fenced to its connection
//	3  CmdSessionOpenIf (24): SessionOpen fenced to the state its CONNECT read
//	4  CmdBlobChunk, CmdWithBlob, CmdBlobDrop (25-27): large messages as
//	   blobs, and snapshot version 3 (blob records) once a blob exists
//	5  CmdSessionOpenOwe, CmdOweWill (28, 29): owed wills (owed_will.go),
//	   and their snapshot
//	   records (kind 8) once one exists
//	6  CmdSessionOpenAsOf (30): opens fenced to the state as of an index
//	   (touched.go), and snapshot records 9 and 10 once one was applied
//	7  CmdLogFormat (31): the leader records in the log that every server
//	   applies this format (logformat.go), and snapshot record 11 (and 12)
//	   once it did; from that entry on, an owed will yields its retained
//	   value to newer retained writes (owed_will.go)
const logVersion = 7

// rpcLogVersion asks a node for the newest log format it applies; a node
// that predates the question answers "unknown rpc kind": version 1.
const rpcLogVersion byte = 6

// logVersionInterval is how often a node asks the others (a server added
// since the last round counts as version 1 from the next one on).
const logVersionInterval = 2 * time.Second

// logVersions tracks the newest log format every server of the
// configuration applies.
type logVersions struct {
	min   atomic.Uint32 // over the configuration, this node included; 1 until known
	mu    sync.Mutex
	known map[raft.ServerID]uint32 // last answer of each server
	wake  chan struct{}            // asks logVersionLoop for a round now
}

// QoS2Fence reports whether every server applies QoS2Publish.IfOpened
// (type 23); until then the hooks propose QoS2Publish without it.
func (n *Node) QoS2Fence() bool { return n.logVers.min.Load() >= 2 }

// OpenFence reports whether every server applies SessionOpen.Fenced
// (type 24); until then the hooks propose SessionOpen without it.
func (n *Node) OpenFence() bool { return n.logVers.min.Load() >= 3 }

// logVersionLoop keeps logVers.min current.
func (n *Node) logVersionLoop() {
	defer n.wg.Done()
	t := time.NewTicker(logVersionInterval)
	defer t.Stop()
	for {
		ctx, cancel := context.WithTimeout(n.life, logVersionInterval)
		n.refreshLogVersions(ctx)
		cancel()
		n.recordLogFormat()
		select {
		case <-t.C:
		case <-n.logVers.wake:
		case <-n.stop:
			return
		}
	}
}

// awaitLogVersion reports whether every server applies log format v,
// asking them again now (rather than at the next round) while it is not
// known, until ctx ends or about two rounds passed: a cluster that just
// started has not asked yet.
func (n *Node) awaitLogVersion(ctx context.Context, v uint32) bool {
	ctx, cancel := context.WithTimeout(ctx, 2*logVersionInterval)
	defer cancel()
	for n.logVers.min.Load() < v {
		select {
		case n.logVers.wake <- struct{}{}:
		default:
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(50 * time.Millisecond):
		}
	}
	return true
}

// refreshLogVersions asks every other server of the configuration. A
// server that does not answer keeps its last answer (a node changes its
// version only by restarting, and downgrades are not supported); one never
// heard from counts as version 1.
func (n *Node) refreshLogVersions(ctx context.Context) {
	cfg, err := n.configuration(ctx)
	if err != nil {
		return
	}
	if _, ok := findServer(cfg, n.cfg.NodeID); !ok {
		return // not bootstrapped or not (yet) a member: nothing is known
	}
	lv := &n.logVers
	low := uint32(logVersion)
	if n.cfg.asOldLogFormat {
		low = 1
	}
	for _, s := range cfg.Servers {
		if string(s.ID) == n.cfg.NodeID {
			continue
		}
		v, err := n.askLogVersion(ctx, string(s.Address))
		lv.mu.Lock()
		if err == nil {
			lv.known[s.ID] = v
		} else if last, ok := lv.known[s.ID]; ok {
			v = last
		} else {
			v = 1
		}
		lv.mu.Unlock()
		low = min(low, v)
	}
	if old := lv.min.Swap(low); old != low {
		n.log.Info("log format available to every server", "version", low)
	}
}

func (n *Node) askLogVersion(ctx context.Context, addr string) (uint32, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	resp, err := n.rpcc.call(ctx, addr, rpcLogVersion, nil)
	if err != nil {
		return 0, err
	}
	r := reader{b: resp}
	if err := r.error(); err != nil {
		if errors.Is(err, ErrInvalidCommand) {
			return 1, nil // a node that predates the question
		}
		return 0, err
	}
	v := r.uvarint()
	if err := r.end(); err != nil || v == 0 || v > 1<<16 {
		return 0, errCorrupt
	}
	return uint32(v), nil
}
