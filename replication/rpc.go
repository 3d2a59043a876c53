package replication

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// The forwarding RPC: followers send writes (and RemoveServer) to the
// leader, and the leader asks non-voters how far their log is. One
// connection per peer carries any number of concurrent calls, matched by
// request id, so concurrent forwarded writes share a connection and reach
// the leader's batcher together.
//
//	frame:    u32 len | u8 kind | uvarint id | body
//	apply:    uvarint timeout_ms | bytes entry        -> result
//	remove:   uvarint timeout_ms | str server_id      -> (nothing)
//	status:   (empty)                                 -> uvarint last | uvarint applied | uvarint term | uvarint commit
//	response: kind|0x80, body = error | payload
//	error:    uvarint sentinel_mask | str message     (mask 0: success)
//
// Kinds and mask bits are append-only (on the wire between versions).
const (
	rpcApply     byte = 1
	rpcRemove    byte = 2
	rpcStatus    byte = 3
	rpcReadIndex byte = 4
	rpcWhoAmI    byte = 5 // the answering node's id (an older node: unknown kind)
	// rpcLogVersion (6, features.go): the newest log format the node applies.
	rpcReply byte = 0x80

	maxRPCFrameSlack = 64 << 10
	maxRPCInFlight   = 4096
)

// errSentinels is the table behind sentinel_mask: bit i is errSentinels[i].
// Append-only.
var errSentinels = []error{
	ErrNotLeader, ErrNoLeader, ErrTimeout, ErrUnknownOutcome, ErrClosed,
	ErrTooLarge, ErrInvalidCommand, ErrNotMember, ErrLastVoter, ErrNoSession,
	ErrReopened, ErrBlobMissing,
}

// remoteError is an error decoded from the wire: its message is the
// remote's, and it matches the same sentinels with errors.Is.
type remoteError struct {
	msg       string
	sentinels []error
}

func (e *remoteError) Error() string   { return e.msg }
func (e *remoteError) Unwrap() []error { return e.sentinels }

// errNoMessage stands in for the message of an error that has none: mask 0
// with an empty message is the success encoding, which an error must never
// be encoded as, nor decode back into.
const errNoMessage = "error without a message"

func appendError(b []byte, err error) []byte {
	if err == nil {
		return append(appendUvarint(b, 0), 0)
	}
	var mask uint64
	for i, s := range errSentinels {
		if errors.Is(err, s) {
			mask |= 1 << i
		}
	}
	b = appendUvarint(b, mask)
	msg := err.Error()
	if msg == "" {
		msg = errNoMessage
	}
	return appendString(b, msg)
}

func (r *reader) error() error {
	mask, msg := r.uvarint(), r.str()
	if mask == 0 && msg == "" {
		return nil
	}
	if msg == "" {
		msg = errNoMessage // only sentinel bits this version does not know
	}
	e := &remoteError{msg: msg}
	for i, s := range errSentinels {
		if mask&(1<<i) != 0 {
			e.sentinels = append(e.sentinels, s)
		}
	}
	return e
}

// appendResult encodes a Result for the apply reply:
//
//	uvarint index | bool changed | uvarint epoch | str prev_node |
//	uvarint prev_epoch | varint prev_since | error | bool present |
//	uvarint n | n x uvarint seq | uvarint dropped | uvarint k | k x result
//
// present, seqs and dropped were added with persistent sessions: a node of
// the previous version cannot decode them (upgrade all nodes together).
func appendResult(b []byte, r *Result) []byte {
	b = appendUvarint(b, r.Index)
	b = appendBool(b, r.Changed)
	b = appendUvarint(b, r.Epoch)
	b = appendString(b, r.Prev.Node)
	b = appendUvarint(b, r.Prev.Epoch)
	b = appendVarint(b, r.Prev.Since)
	b = appendError(b, r.Err)
	b = appendBool(b, r.Present)
	b = appendUvarint(b, uint64(len(r.Seqs)))
	for _, s := range r.Seqs {
		b = appendUvarint(b, s)
	}
	b = appendUvarint(b, r.Dropped)
	b = appendUvarint(b, uint64(len(r.Results)))
	for i := range r.Results {
		b = appendResult(b, &r.Results[i])
	}
	return b
}

func (r *reader) result(depth int) Result {
	res := Result{Index: r.uvarint(), Changed: r.bool(), Epoch: r.uvarint()}
	res.Prev = Owner{Node: r.str(), Epoch: r.uvarint(), Since: r.varint()}
	res.Err = r.error()
	res.Present = r.bool()
	if n := r.count(1); n > 0 {
		res.Seqs = make([]uint64, n)
		for i := range res.Seqs {
			res.Seqs[i] = r.uvarint()
		}
	}
	res.Dropped = r.uvarint()
	if n := r.count(8); n > 0 {
		if depth > 0 {
			r.fail("nested results")
			return res
		}
		res.Results = make([]Result, n)
		for i := range res.Results {
			res.Results[i] = r.result(depth + 1)
		}
	}
	return res
}

// peerStatus is what a node reports about its log (to the leader judging
// a non-voter's progress, and to a follower judging its own readiness).
type peerStatus struct {
	LastIndex    uint64
	AppliedIndex uint64
	Term         uint64
	CommitIndex  uint64
}

func writeFrame(w *bufio.Writer, kind byte, id uint64, body []byte) error {
	var hdr [5 + binary.MaxVarintLen64]byte
	n := binary.PutUvarint(hdr[5:], id)
	binary.BigEndian.PutUint32(hdr[:4], uint32(1+n+len(body)))
	hdr[4] = kind
	if _, err := w.Write(hdr[:5+n]); err != nil {
		return err
	}
	if _, err := w.Write(body); err != nil {
		return err
	}
	return w.Flush()
}

func readFrame(r *bufio.Reader, maxLen int) (kind byte, id uint64, body []byte, err error) {
	var hdr [4]byte
	if _, err = io.ReadFull(r, hdr[:]); err != nil {
		return 0, 0, nil, err
	}
	n := int(binary.BigEndian.Uint32(hdr[:]))
	if n < 2 || n > maxLen {
		return 0, 0, nil, fmt.Errorf("%w: rpc frame length %d", errCorrupt, n)
	}
	buf, err := readN(r, nil, n)
	if err != nil {
		return 0, 0, nil, err
	}
	rd := reader{b: buf[1:]}
	id = rd.uvarint()
	if rd.err != nil {
		return 0, 0, nil, rd.err
	}
	return buf[0], id, rd.b, nil
}

func timeoutMs(ctx context.Context) uint64 {
	if dl, ok := ctx.Deadline(); ok {
		return uint64(max(time.Until(dl).Milliseconds(), 1))
	}
	return 0
}

// rpcConn is the client side of one connection.
type rpcConn struct {
	c   net.Conn
	wmu sync.Mutex // serialises frame writes
	bw  *bufio.Writer

	mu      sync.Mutex
	pending map[uint64]chan rpcResp
	nextID  uint64
	err     error // set once the connection failed
}

type rpcResp struct {
	body []byte
	err  error
}

// errNotSent marks call failures where the request certainly did not reach
// the peer (dial failed), so retrying cannot apply a command twice.
var errNotSent = errors.New("request not sent")

// rpcClient keeps one connection per peer address.
type rpcClient struct {
	d        *demux
	maxFrame int

	mu     sync.Mutex
	conns  map[string]*rpcConn
	closed bool
}

func newRPCClient(d *demux, maxFrame int) *rpcClient {
	return &rpcClient{d: d, maxFrame: maxFrame, conns: make(map[string]*rpcConn)}
}

func (c *rpcClient) conn(ctx context.Context, addr string) (*rpcConn, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	if rc := c.conns[addr]; rc != nil {
		c.mu.Unlock()
		return rc, nil
	}
	c.mu.Unlock()
	nc, err := c.d.dialSub(ctx, addr, subRPC)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errNotSent, err)
	}
	rc := &rpcConn{c: nc, bw: bufio.NewWriterSize(nc, 32<<10), pending: make(map[uint64]chan rpcResp)}
	c.mu.Lock()
	if old := c.conns[addr]; old != nil || c.closed { // lost a dial race, or closed meanwhile
		c.mu.Unlock()
		_ = nc.Close()
		if old == nil {
			return nil, ErrClosed
		}
		return old, nil
	}
	c.conns[addr] = rc
	c.mu.Unlock()
	go c.readLoop(addr, rc)
	return rc, nil
}

func (c *rpcClient) readLoop(addr string, rc *rpcConn) {
	br := bufio.NewReaderSize(rc.c, 32<<10)
	var err error
	for {
		var kind byte
		var id uint64
		var body []byte
		kind, id, body, err = readFrame(br, c.maxFrame)
		if err != nil {
			break
		}
		if kind&rpcReply == 0 {
			err = fmt.Errorf("%w: unexpected rpc kind %d", errCorrupt, kind)
			break
		}
		rc.mu.Lock()
		ch := rc.pending[id]
		delete(rc.pending, id)
		rc.mu.Unlock()
		if ch != nil {
			ch <- rpcResp{body: body}
		}
	}
	c.drop(addr, rc, err)
}

// drop fails every pending call on rc and forgets it.
func (c *rpcClient) drop(addr string, rc *rpcConn, err error) {
	_ = rc.c.Close()
	c.mu.Lock()
	if c.conns[addr] == rc {
		delete(c.conns, addr)
	}
	c.mu.Unlock()
	rc.mu.Lock()
	if rc.err == nil {
		rc.err = fmt.Errorf("connection lost: %w", err)
	}
	for id, ch := range rc.pending {
		ch <- rpcResp{err: rc.err}
		delete(rc.pending, id)
	}
	rc.mu.Unlock()
}

// call sends one request and waits for its reply or ctx. Errors wrap
// errNotSent when the request certainly was not delivered.
func (c *rpcClient) call(ctx context.Context, addr string, kind byte, body []byte) ([]byte, error) {
	rc, err := c.conn(ctx, addr)
	if err != nil {
		return nil, err
	}
	ch := make(chan rpcResp, 1)
	rc.mu.Lock()
	if rc.err != nil {
		rc.mu.Unlock()
		return nil, fmt.Errorf("%w: %w", errNotSent, rc.err)
	}
	rc.nextID++
	id := rc.nextID
	rc.pending[id] = ch
	rc.mu.Unlock()

	rc.wmu.Lock()
	if dl, ok := ctx.Deadline(); ok {
		_ = rc.c.SetWriteDeadline(dl)
	}
	err = writeFrame(rc.bw, kind, id, body)
	rc.wmu.Unlock()
	if err != nil {
		// A frame the peer did not receive completely is discarded with
		// the connection, so a failed write never executes.
		c.drop(addr, rc, err)
		return nil, fmt.Errorf("%w: write to %s: %w", errNotSent, addr, err)
	}
	select {
	case r := <-ch:
		return r.body, r.err
	case <-ctx.Done():
		rc.mu.Lock()
		delete(rc.pending, id)
		rc.mu.Unlock()
		return nil, ctx.Err()
	}
}

func (c *rpcClient) close() {
	c.mu.Lock()
	c.closed = true
	conns := c.conns
	c.conns = map[string]*rpcConn{}
	c.mu.Unlock()
	for addr, rc := range conns {
		c.drop(addr, rc, ErrClosed)
	}
}

// rpcServer handles inbound RPC connections.
type rpcServer struct {
	n        *Node
	maxFrame int
}

// serveConn reads requests and answers each on its own goroutine (an apply
// may wait for a commit), writing replies under a mutex.
func (s *rpcServer) serveConn(c net.Conn) {
	defer c.Close()
	br := bufio.NewReaderSize(c, 32<<10)
	bw := bufio.NewWriterSize(c, 32<<10)
	var wmu sync.Mutex
	var wg sync.WaitGroup
	defer wg.Wait()
	// Bound the calls in progress per connection: a peer that floods us
	// is slowed down (we stop reading) instead of costing unbounded
	// goroutines.
	sem := make(chan struct{}, maxRPCInFlight)
	for {
		kind, id, body, err := readFrame(br, s.maxFrame)
		if err != nil {
			return
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			reply := s.handle(kind, body)
			wmu.Lock()
			defer wmu.Unlock()
			_ = c.SetWriteDeadline(time.Now().Add(s.n.cfg.IOTimeout))
			if err := writeFrame(bw, kind|rpcReply, id, reply); err != nil {
				_ = c.Close()
			}
		}()
	}
}

func (s *rpcServer) handle(kind byte, body []byte) []byte {
	r := reader{b: body}
	switch kind {
	case rpcApply:
		ms := r.uvarint()
		entry := r.raw(r.uvarint())
		if err := r.end(); err != nil {
			return appendError(nil, fmt.Errorf("%w: %w", ErrInvalidCommand, err))
		}
		ctx, cancel := s.n.rpcContext(ms)
		defer cancel()
		cmds, batch, err := decodeForwarded(entry)
		if err != nil {
			return appendError(nil, err)
		}
		res, err := s.n.applyOnLeader(ctx, cmds, batch)
		if err != nil && (res.Err == nil || err != res.Err) {
			return appendError(nil, err)
		}
		// Committed, even when the command itself failed (res.Err: a
		// fence refused it): the result carries its index, which the
		// caller may wait for (hooks: a refused SessionOpenIf catches up
		// to it), and the error, which forwardApply returns.
		return appendResult(appendError(nil, nil), &res)
	case rpcRemove:
		ms := r.uvarint()
		id := r.str()
		if err := r.end(); err != nil {
			return appendError(nil, fmt.Errorf("%w: %w", ErrInvalidCommand, err))
		}
		ctx, cancel := s.n.rpcContext(ms)
		defer cancel()
		return appendError(nil, s.n.removeOnLeader(ctx, id))
	case rpcReadIndex:
		ms := r.uvarint()
		if err := r.end(); err != nil {
			return appendError(nil, fmt.Errorf("%w: %w", ErrInvalidCommand, err))
		}
		if s.n.raft.State() != raft.Leader {
			return appendError(nil, ErrNotLeader)
		}
		ctx, cancel := s.n.rpcContext(ms)
		defer cancel()
		ri, err := s.n.joinReadRound(ctx)
		if err != nil {
			return appendError(nil, err)
		}
		return appendUvarint(appendUvarint(appendError(nil, nil), ri.read), ri.subs)
	case rpcWhoAmI:
		return appendString(appendError(nil, nil), s.n.cfg.NodeID)
	case rpcLogVersion:
		if s.n.cfg.asOldLogFormat {
			break // answers as a node that predates the question
		}
		return appendUvarint(appendError(nil, nil), logVersion)
	case rpcStatus:
		st := s.n.peerStatus()
		b := appendError(nil, nil)
		b = appendUvarint(b, st.LastIndex)
		b = appendUvarint(b, st.AppliedIndex)
		b = appendUvarint(b, st.Term)
		return appendUvarint(b, st.CommitIndex)
	}
	return appendError(nil, fmt.Errorf("%w: unknown rpc kind %d", ErrInvalidCommand, kind))
}

// decodeForwarded decodes a forwarded entry into the caller's commands.
// An undecodable forwarded entry is the sender's problem (a domain error),
// not a reason to stop: it never reached the log.
func decodeForwarded(entry []byte) ([]Command, bool, error) {
	c, err := DecodeCommand(entry)
	if err != nil {
		return nil, false, fmt.Errorf("%w: forwarded entry: %w", ErrInvalidCommand, err)
	}
	if c == nil {
		return nil, false, fmt.Errorf("%w: forwarded entry of unknown type", ErrInvalidCommand)
	}
	if b, ok := c.(*Batch); ok {
		return b.Commands, true, nil
	}
	return []Command{c}, false, nil
}
