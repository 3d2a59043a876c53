package cluster

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"
)

// The cluster port carries several protocols, like rqlite's mux: the first
// byte of every connection selects one. Every protocol then gets the same
// handshake, so raft registered here is versioned and authenticated for free:
//
//	client -> server  u8 protocol
//	client -> server  hello      u16 len | "MQHA" | u8 version | u8 flags(bit0 keyed) | nonceC[16] | str nodeID
//	server -> client  challenge  u16 len | "MQHA" | u8 version | u8 status | nonceS[16] | bytes macS | str nodeID
//	client -> server  auth       u16 len | bytes macC
//	server -> client  result     u16 len | u8 status
//
// macS = HMAC(k, "S" | proto | nonceC | nonceS | str clientID | str serverID)
// macC = HMAC(k, "C" | proto | nonceC | nonceS | str clientID | str serverID)
// with k = sha256("mqtt-ha cluster-port" | ClusterKey), empty when no key is
// configured. Fresh nonces on both sides prevent replay; each side proves the
// key to the other, so a stranger can neither inject nor receive traffic.
//
// Key rotation: a node proves its primary key and accepts any of its keys.
// The server signs macS with its primary; the client accepts it under any
// of its keys and signs macC with the key that matched; the server checks
// macC against all of its keys. So while every node accepts both the old
// and the new key, primaries can be switched one node at a time.

// Protocol bytes. Append-only: values are on the wire.
const (
	// ProtoForward is the node-to-node publish forwarding protocol.
	ProtoForward byte = 1
	// ProtoRaft is reserved for the replication package's raft transport.
	ProtoRaft byte = 2
)

const (
	handshakeMagic  = "MQHA"
	maxHandshakeLen = 1024
	nonceLen        = 16
	// maxPendingHandshakes bounds the connections in the handshake at once
	// (a cluster has a few peers, each dialing a few connections).
	maxPendingHandshakes = 256

	hsOK           byte = 0
	hsVersion      byte = 1 // protocol version mismatch
	hsKeyMismatch  byte = 2 // one side has a cluster key, the other not
	hsAuthFailed   byte = 3 // wrong MAC
	hsBadHandshake byte = 4
)

var (
	// ErrProtocolVersion is returned when a peer speaks another protocol version.
	ErrProtocolVersion = errors.New("cluster protocol version mismatch")
	// ErrAuth is returned when the cluster-key authentication fails.
	ErrAuth = errors.New("cluster authentication failed")
	// ErrHandshake is returned for a malformed handshake.
	ErrHandshake = errors.New("cluster handshake failed")
	// ErrClosed is returned by operations on a closed Node or Mux.
	ErrClosed = errors.New("cluster: closed")
	// ErrProtoInUse is returned by Mux.Listen for a protocol that already
	// has a listener.
	ErrProtoInUse = errors.New("cluster: protocol already has a listener")
)

// PeerConn is a connection that passed the handshake; Peer is the remote
// node id it proved (with a cluster key) or claimed (without one).
type PeerConn struct {
	net.Conn
	peer    string
	version uint8 // the protocol version both sides agreed on in the handshake
}

// Peer returns the remote node id.
func (c *PeerConn) Peer() string { return c.peer }

// Version returns the protocol version agreed in the handshake (the lower
// of the two sides' during a rolling upgrade).
func (c *PeerConn) Version() uint8 { return c.version }

// Mux owns the cluster-port listener and hands authenticated connections to
// per-protocol listeners.
type Mux struct {
	self      string
	key       []byte   // derived HMAC key of the primary, nil without ClusterKey
	keys      [][]byte // key first, then the keys still accepted (rotation)
	tlsServer *tls.Config
	tlsClient *tls.Config
	log       *slog.Logger
	m         *metrics
	hsTimeout time.Duration
	dialTO    time.Duration
	warnLimit *perKeyLimiter // one refusal line per remote address per minute

	mu        sync.Mutex
	ln        net.Listener
	listeners map[byte]*muxListener
	pending   map[net.Conn]struct{} // connections still in the handshake
	closed    bool
	wg        sync.WaitGroup
}

func newMux(self string, clusterKey []byte, extraKeys [][]byte, hsTimeout, dialTimeout time.Duration, log *slog.Logger, m *metrics) *Mux {
	x := &Mux{
		self: self, log: log, m: m, hsTimeout: hsTimeout, dialTO: dialTimeout,
		listeners: make(map[byte]*muxListener),
		pending:   make(map[net.Conn]struct{}),
		warnLimit: newPerKeyLimiter(time.Minute, 1024),
	}
	if len(clusterKey) > 0 {
		x.key = deriveKey("mqtt-ha cluster-port", clusterKey)
		x.keys = append(x.keys, x.key)
		for _, k := range extraKeys {
			if len(k) > 0 {
				x.keys = append(x.keys, deriveKey("mqtt-ha cluster-port", k))
			}
		}
	}
	return x
}

func deriveKey(domain string, secret []byte) []byte {
	h := sha256.New()
	h.Write([]byte(domain))
	h.Write([]byte{0})
	h.Write(secret)
	return h.Sum(nil)
}

// Listen returns a listener for connections whose first byte is proto. It
// may be called before the Node starts; connections are dispatched once it
// has. Closing the listener unregisters the protocol.
func (x *Mux) Listen(proto byte) (net.Listener, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.closed {
		return nil, ErrClosed
	}
	if _, ok := x.listeners[proto]; ok {
		return nil, fmt.Errorf("%w: %d", ErrProtoInUse, proto)
	}
	l := &muxListener{x: x, proto: proto, ch: make(chan net.Conn), done: make(chan struct{})}
	x.listeners[proto] = l
	return l, nil
}

// Addr is the bound cluster-port address (nil before Start).
func (x *Mux) Addr() net.Addr {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.ln == nil {
		return nil
	}
	return x.ln.Addr()
}

// Dial connects to addr's cluster port for proto and runs the client side of
// the handshake. The returned *PeerConn names the server's node id.
func (x *Mux) Dial(ctx context.Context, addr string, proto byte) (*PeerConn, error) {
	if x.dialTO > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, x.dialTO)
		defer cancel()
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true) // we batch ourselves
	}
	deadline := time.Now().Add(x.hsTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	_ = c.SetDeadline(deadline)
	// Abort the handshake promptly when ctx ends.
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	if x.tlsClient != nil {
		cfg := x.tlsClient.Clone()
		if cfg.ServerName == "" {
			cfg.ServerName, _, _ = net.SplitHostPort(addr)
		}
		tc := tls.Client(c, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			stop()
			_ = c.Close()
			x.m.handshake.WithLabelValues("out", "tls").Inc()
			return nil, fmt.Errorf("tls handshake with %s: %w: %w", addr, ErrAuth, err)
		}
		c = tc
	}
	peer, err := x.clientHandshake(c, proto)
	stop()
	if err != nil {
		_ = c.Close()
		x.m.handshake.WithLabelValues("out", hsReason(err)).Inc()
		return nil, fmt.Errorf("handshake with %s: %w", addr, err)
	}
	_ = c.SetDeadline(time.Time{})
	return &PeerConn{Conn: c, peer: peer, version: ProtocolVersion}, nil
}

func (x *Mux) clientHandshake(c net.Conn, proto byte) (string, error) {
	var nonceC [nonceLen]byte
	_, _ = rand.Read(nonceC[:])
	b := make([]byte, 0, 64)
	b = append(b, proto)
	b = append(b, 0, 0) // length placeholder
	b = append(b, handshakeMagic...)
	flags := byte(0)
	if x.key != nil {
		flags = 1
	}
	b = append(b, ProtocolVersion, flags)
	b = append(b, nonceC[:]...)
	b = appendString(b, x.self)
	binary.BigEndian.PutUint16(b[1:3], uint16(len(b)-3))
	if _, err := c.Write(b); err != nil {
		return "", fmt.Errorf("%w: write hello: %w", ErrHandshake, err)
	}
	body, err := readHandshake(c)
	if err != nil {
		return "", err
	}
	r := reader{b: body}
	magic := r.raw(len(handshakeMagic))
	version, status := r.u8(), r.u8()
	nonceS := r.raw(nonceLen)
	macS := r.bytes()
	serverID := r.str()
	if r.err != nil || string(magic) != handshakeMagic {
		return "", fmt.Errorf("%w: malformed challenge", ErrHandshake)
	}
	switch status {
	case hsOK:
	case hsVersion:
		return "", fmt.Errorf("%w: ours %d, theirs %d", ErrProtocolVersion, ProtocolVersion, version)
	case hsKeyMismatch, hsAuthFailed:
		return "", fmt.Errorf("%w: server %q refused (status %d)", ErrAuth, serverID, status)
	default:
		return "", fmt.Errorf("%w: server status %d", ErrHandshake, status)
	}
	if version != ProtocolVersion {
		return "", fmt.Errorf("%w: ours %d, theirs %d", ErrProtocolVersion, ProtocolVersion, version)
	}
	// The server proved its primary key; answer with the same key if it is
	// one of ours, else with our primary (the server then refuses us).
	var key, macC []byte
	for _, k := range x.keys {
		if hmac.Equal(macS, mac(k, 'S', proto, nonceC[:], nonceS, x.self, serverID)) {
			key = k
			break
		}
	}
	if x.key != nil {
		k := key
		if k == nil {
			k = x.key
		}
		macC = mac(k, 'C', proto, nonceC[:], nonceS, x.self, serverID)
	}
	// Answer before judging the server, so that a server with another key
	// also sees (and counts) the failure instead of a bare EOF.
	if err := writeHandshake(c, appendBytes(nil, macC)); err != nil {
		return "", err
	}
	if x.key != nil {
		if key == nil {
			return "", fmt.Errorf("%w: server %q failed to prove the cluster key", ErrAuth, serverID)
		}
	} else if len(macS) != 0 {
		return "", fmt.Errorf("%w: server %q expects a cluster key", ErrAuth, serverID)
	}
	res, err := readHandshake(c)
	if err != nil {
		return "", err
	}
	if len(res) != 1 || res[0] != hsOK {
		return "", fmt.Errorf("%w: server %q rejected our key", ErrAuth, serverID)
	}
	return serverID, nil
}

func mac(key []byte, role byte, proto byte, nonceC, nonceS []byte, clientID, serverID string) []byte {
	h := hmac.New(sha256.New, key)
	b := []byte{role, proto}
	b = append(b, nonceC...)
	b = append(b, nonceS...)
	b = appendString(b, clientID)
	b = appendString(b, serverID)
	h.Write(b)
	return h.Sum(nil)
}

func writeHandshake(c net.Conn, body []byte) error {
	b := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(body)), uint16(len(body)))
	if _, err := c.Write(append(b, body...)); err != nil {
		return fmt.Errorf("%w: %w", ErrHandshake, err)
	}
	return nil
}

func readHandshake(c net.Conn) ([]byte, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrHandshake, err)
	}
	n := int(binary.BigEndian.Uint16(hdr[:]))
	if n == 0 || n > maxHandshakeLen {
		return nil, fmt.Errorf("%w: message length %d", ErrHandshake, n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrHandshake, err)
	}
	return b, nil
}

func hsReason(err error) string {
	switch {
	case errors.Is(err, ErrProtocolVersion):
		return "version"
	case errors.Is(err, ErrAuth):
		return "auth"
	default:
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return "timeout"
		}
		return "malformed"
	}
}

// start serves ln in the background until close.
func (x *Mux) start(ln net.Listener) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.closed {
		return ErrClosed
	}
	x.ln = ln
	x.wg.Add(1)
	go func() {
		defer x.wg.Done()
		x.serve(ln)
	}()
	return nil
}

// serve accepts connections until ln is closed.
func (x *Mux) serve(ln net.Listener) {
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and friends: back off instead of spinning or quitting.
			x.log.Warn("cluster port accept failed", "err", err)
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		x.mu.Lock()
		if x.closed {
			x.mu.Unlock()
			_ = c.Close()
			return
		}
		if len(x.pending) >= maxPendingHandshakes {
			// A flood of connections that never finish the handshake must
			// not cost a goroutine (and a TLS handshake) each for
			// HandshakeTimeout: beyond the bound they are dropped at once.
			x.mu.Unlock()
			x.reject(c, "too_many_pending", fmt.Errorf("%d handshakes in progress", maxPendingHandshakes))
			_ = c.Close()
			continue
		}
		x.pending[c] = struct{}{}
		x.wg.Add(1)
		x.mu.Unlock()
		go x.handle(c)
	}
}

// handle runs the server side of the handshake and dispatches c. Any failure
// drops the connection, is counted, and is logged at a bounded rate: junk on
// the port must never cost more than one goroutine for HandshakeTimeout.
func (x *Mux) handle(raw net.Conn) {
	defer x.wg.Done()
	dispatched := false
	defer func() {
		x.mu.Lock()
		delete(x.pending, raw)
		x.mu.Unlock()
		if !dispatched {
			_ = raw.Close()
		}
	}()
	c := raw
	_ = c.SetDeadline(time.Now().Add(x.hsTimeout))
	if x.tlsServer != nil {
		tc := tls.Server(raw, x.tlsServer)
		if err := tc.Handshake(); err != nil {
			x.reject(raw, "tls", fmt.Errorf("%w: tls: %w", ErrAuth, err))
			return
		}
		c = tc
	}
	var pb [1]byte
	if _, err := io.ReadFull(c, pb[:]); err != nil {
		x.reject(c, hsReason(err), err)
		return
	}
	x.mu.Lock()
	l := x.listeners[pb[0]]
	x.mu.Unlock()
	if l == nil {
		x.reject(c, "unknown_protocol", fmt.Errorf("first byte %#02x", pb[0]))
		return
	}
	peer, err := x.serverHandshake(c, pb[0])
	if err != nil {
		x.reject(c, hsReason(err), err)
		return
	}
	_ = c.SetDeadline(time.Time{})
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	// A protocol whose owner stopped accepting must not pin connections
	// (and goroutines) forever.
	t := time.NewTimer(x.hsTimeout)
	defer t.Stop()
	select {
	case l.ch <- &PeerConn{Conn: c, peer: peer, version: ProtocolVersion}:
		dispatched = true
	case <-l.done:
	case <-t.C:
		x.reject(c, "not_accepted", fmt.Errorf("protocol %d listener did not accept within %v", pb[0], x.hsTimeout))
	}
}

func (x *Mux) reject(c net.Conn, reason string, err error) {
	x.m.handshake.WithLabelValues("in", reason).Inc()
	remote := c.RemoteAddr().String()
	host, _, splitErr := net.SplitHostPort(remote)
	if splitErr != nil {
		host = remote
	}
	if x.warnLimit.allow(host) {
		x.log.Warn("cluster port connection refused (further refusals from this address are counted, logged again after a minute)",
			"remote", remote, "reason", reason, "err", err)
	}
}

func (x *Mux) serverHandshake(c net.Conn, proto byte) (string, error) {
	body, err := readHandshake(c)
	if err != nil {
		return "", err
	}
	r := reader{b: body}
	magic := r.raw(len(handshakeMagic))
	version, flags := r.u8(), r.u8()
	nonceC := r.raw(nonceLen)
	clientID := r.str()
	if r.err != nil || string(magic) != handshakeMagic || clientID == "" {
		return "", fmt.Errorf("%w: malformed hello", ErrHandshake)
	}
	var nonceS [nonceLen]byte
	_, _ = rand.Read(nonceS[:])
	reply := func(status byte, mac []byte) error {
		b := append([]byte(handshakeMagic), ProtocolVersion, status)
		b = append(b, nonceS[:]...)
		b = appendBytes(b, mac)
		b = appendString(b, x.self)
		return writeHandshake(c, b)
	}
	if version != ProtocolVersion {
		_ = reply(hsVersion, nil)
		return "", fmt.Errorf("%w: peer %q speaks %d, we speak %d", ErrProtocolVersion, clientID, version, ProtocolVersion)
	}
	if keyed := flags&1 != 0; keyed != (x.key != nil) {
		_ = reply(hsKeyMismatch, nil)
		return "", fmt.Errorf("%w: peer %q keyed=%v, we keyed=%v", ErrAuth, clientID, keyed, x.key != nil)
	}
	var macS []byte
	if x.key != nil {
		macS = mac(x.key, 'S', proto, nonceC, nonceS[:], clientID, x.self)
	}
	if err := reply(hsOK, macS); err != nil {
		return "", err
	}
	ab, err := readHandshake(c)
	if err != nil {
		return "", err
	}
	ar := reader{b: ab}
	macC := ar.bytes()
	if ar.err != nil {
		return "", fmt.Errorf("%w: malformed auth", ErrHandshake)
	}
	if x.key != nil && !slices.ContainsFunc(x.keys, func(k []byte) bool {
		return hmac.Equal(macC, mac(k, 'C', proto, nonceC, nonceS[:], clientID, x.self))
	}) {
		_ = writeHandshake(c, []byte{hsAuthFailed})
		return "", fmt.Errorf("%w: peer %q failed to prove the cluster key", ErrAuth, clientID)
	}
	if err := writeHandshake(c, []byte{hsOK}); err != nil {
		return "", err
	}
	return clientID, nil
}

// close stops accepting, closes every protocol listener and every connection
// still in the handshake, and waits for the handshake goroutines.
func (x *Mux) close() {
	x.mu.Lock()
	if x.closed {
		x.mu.Unlock()
		return
	}
	x.closed = true
	if x.ln != nil {
		_ = x.ln.Close()
	}
	for _, l := range x.listeners {
		l.closeLocked()
	}
	for c := range x.pending {
		_ = c.Close()
	}
	x.mu.Unlock()
	x.wg.Wait()
}

// muxListener is the net.Listener for one protocol byte.
type muxListener struct {
	x     *Mux
	proto byte
	ch    chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func (l *muxListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *muxListener) Close() error {
	l.x.mu.Lock()
	defer l.x.mu.Unlock()
	l.closeLocked()
	return nil
}

func (l *muxListener) closeLocked() {
	l.once.Do(func() {
		close(l.done)
		if l.x.listeners[l.proto] == l {
			delete(l.x.listeners, l.proto)
		}
	})
}

func (l *muxListener) Addr() net.Addr {
	if a := l.x.Addr(); a != nil {
		return a
	}
	return &net.TCPAddr{}
}
