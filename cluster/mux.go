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

	"github.com/mqtt-ha/broker/internal/backoff"
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
// macS = HMAC(k, "S" | proto | nonceC | nonceS | str clientID | str serverID [| u8 version])
// macC = HMAC(k, "C" | proto | nonceC | nonceS | str clientID | str serverID [| u8 version])
// with k = sha256("mqtt-ha cluster-port" | ClusterKey), empty when no key is
// configured. Fresh nonces on both sides prevent replay; each side proves the
// key to the other, so a stranger can neither inject nor receive traffic.
//
// Versions: the hello offers the client's newest version. A server that
// speaks it answers OK with the agreed version (the offer: the lower of the
// two newest versions, as it refuses offers above its own); otherwise it
// refuses with hsVersion and names its newest version, and a client that
// still speaks that one dials again at it, once. A version-1 node (the code
// before negotiation) required equal versions on both sides and named 1 in
// its refusal, so a version-2 client reaches it by the retry and a version-1
// client reaches a version-2 server directly. The MACs cover the agreed
// version from version 2 on (bracketed above; version 1 keeps the formula
// version-1 nodes compute). A server that agreed below its newest version
// ends nonceS with downgradeMark, so that a keyed client that also speaks
// something newer detects a man in the middle who forged a refusal or
// rewrote the hello to downgrade it.
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
	hsVersion      byte = 1 // protocol version mismatch; the challenge names the server's newest
	hsKeyMismatch  byte = 2 // one side has a cluster key, the other not
	hsAuthFailed   byte = 3 // wrong MAC
	hsBadHandshake byte = 4

	// downgradeMark ends nonceS when the server agreed on a version below
	// its newest (TLS 1.3's downgrade sentinel). A version-1 client never
	// looks at it; a client that agreed below its own newest version refuses
	// it, since then both sides speak a newer version than the agreed one
	// and only an attacker (or a peer restarting between our two dials)
	// brings that about. nonceS is under the MACs, so with a cluster key the
	// mark cannot be stripped; the other 8 bytes and nonceC stay random.
	downgradeMark = "MQHAdown"
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
	resolver  *net.Resolver  // names in dialled addresses (raft's are DNS names)
	warnLimit *perKeyLimiter // one refusal line per remote address per minute
	// minVersion and maxVersion are the protocol versions this Mux speaks:
	// MinProtocolVersion and ProtocolVersion. Only tests change them (both
	// to 1, through withProtocolVersion, before Start) to run a version-1
	// node: with a single version these rules are exactly the old code's
	// (offer 1, accept only 1 back, refuse any other offer naming 1, no
	// retry, no downgradeMark). onJoin and Status read them too.
	minVersion, maxVersion uint8

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
		listeners:  make(map[byte]*muxListener),
		pending:    make(map[net.Conn]struct{}),
		warnLimit:  newPerKeyLimiter(time.Minute, 1024),
		minVersion: MinProtocolVersion, maxVersion: ProtocolVersion,
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
// the handshake. The returned *PeerConn names the server's node id and the
// agreed protocol version. A server that refuses our newest version but
// names an older one we speak (a version-1 node during a rolling upgrade)
// is dialled again at that version, within the same ctx.
func (x *Mux) Dial(ctx context.Context, addr string, proto byte) (*PeerConn, error) {
	if x.dialTO > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, x.dialTO)
		defer cancel()
	}
	pc, reason, err := x.dialAt(ctx, addr, proto, x.maxVersion)
	if v, ok := x.retryVersion(err); ok {
		// Expected for every connection to an older node until the upgrade
		// completes (that node counts and logs the refusal on its side).
		x.log.Debug("cluster peer speaks an older protocol version; dialling again at it",
			"addr", addr, "version", v)
		pc, reason, err = x.dialAt(ctx, addr, proto, v)
	}
	if reason != "" {
		x.m.handshake.WithLabelValues("out", reason).Inc()
	}
	return pc, err
}

// retryVersion reports the version to dial again at after err: the one a
// server named when it refused our offer, if we speak it and it is older
// than what we offered (so there is at most one retry).
func (x *Mux) retryVersion(err error) (uint8, bool) {
	var vr *versionRefusal
	if !errors.As(err, &vr) || vr.theirs < x.minVersion || vr.theirs >= vr.offered {
		return 0, false
	}
	return vr.theirs, true
}

// dialAt makes one connection and handshake offering version. reason is
// the handshake_failures_total label of a failed handshake ("" when there
// is nothing to count: success, or the TCP dial failed).
func (x *Mux) dialAt(ctx context.Context, addr string, proto, version byte) (pc *PeerConn, reason string, err error) {
	d := net.Dialer{Resolver: x.resolver}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, "", fmt.Errorf("dial %s: %w", addr, err)
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
			return nil, "tls", fmt.Errorf("tls handshake with %s: %w: %w", addr, ErrAuth, err)
		}
		c = tc
	}
	peer, agreed, err := x.clientHandshake(c, proto, version)
	stop()
	if err != nil {
		_ = c.Close()
		return nil, hsReason(err), fmt.Errorf("handshake with %s: %w", addr, err)
	}
	_ = c.SetDeadline(time.Time{})
	return &PeerConn{Conn: c, peer: peer, version: agreed}, "", nil
}

// versionRefusal is a server's hsVersion answer to our offer. theirs is the
// version it named: its newest, the only one of a version-1 server.
type versionRefusal struct{ offered, theirs uint8 }

func (e *versionRefusal) Error() string {
	return fmt.Sprintf("%v: we offered %d, the server speaks up to %d", ErrProtocolVersion, e.offered, e.theirs)
}

func (e *versionRefusal) Unwrap() error { return ErrProtocolVersion }

// clientHandshake offers version and returns the server's node id and the
// version it agreed to.
func (x *Mux) clientHandshake(c net.Conn, proto, version byte) (string, uint8, error) {
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
	b = append(b, version, flags)
	b = append(b, nonceC[:]...)
	b = appendString(b, x.self)
	binary.BigEndian.PutUint16(b[1:3], uint16(len(b)-3))
	if _, err := c.Write(b); err != nil {
		return "", 0, fmt.Errorf("%w: write hello: %w", ErrHandshake, err)
	}
	body, err := readHandshake(c)
	if err != nil {
		return "", 0, err
	}
	r := reader{b: body}
	magic := r.raw(len(handshakeMagic))
	agreed, status := r.u8(), r.u8()
	nonceS := r.raw(nonceLen)
	macS := r.bytes()
	serverID := r.str()
	if r.err != nil || string(magic) != handshakeMagic {
		return "", 0, fmt.Errorf("%w: malformed challenge", ErrHandshake)
	}
	switch status {
	case hsOK:
	case hsVersion:
		return "", 0, &versionRefusal{offered: version, theirs: agreed}
	case hsKeyMismatch, hsAuthFailed:
		return "", 0, fmt.Errorf("%w: server %q refused (status %d)", ErrAuth, serverID, status)
	default:
		return "", 0, fmt.Errorf("%w: server status %d", ErrHandshake, status)
	}
	// A server agrees on the lower of its newest version and our offer, so
	// never on more than we offered.
	if agreed < x.minVersion || agreed > version {
		return "", 0, fmt.Errorf("%w: we offered %d, server %q agreed to %d", ErrProtocolVersion, version, serverID, agreed)
	}
	// We speak a newer version and so does the server (see downgradeMark):
	// checked before the MAC, as a forged mark only costs what dropping
	// the connection would.
	if agreed < x.maxVersion && string(nonceS[nonceLen-len(downgradeMark):]) == downgradeMark {
		return "", 0, fmt.Errorf("%w: server %q speaks a newer version than the agreed %d (downgraded on the way?)",
			ErrProtocolVersion, serverID, agreed)
	}
	// The server proved its primary key; answer with the same key if it is
	// one of ours, else with our primary (the server then refuses us).
	var key, macC []byte
	for _, k := range x.keys {
		if hmac.Equal(macS, mac(k, 'S', proto, agreed, nonceC[:], nonceS, x.self, serverID)) {
			key = k
			break
		}
	}
	if x.key != nil {
		k := key
		if k == nil {
			k = x.key
		}
		macC = mac(k, 'C', proto, agreed, nonceC[:], nonceS, x.self, serverID)
	}
	// Answer before judging the server, so that a server with another key
	// also sees (and counts) the failure instead of a bare EOF.
	if err := writeHandshake(c, appendBytes(nil, macC)); err != nil {
		return "", 0, err
	}
	if x.key != nil {
		if key == nil {
			return "", 0, fmt.Errorf("%w: server %q failed to prove the cluster key", ErrAuth, serverID)
		}
	} else if len(macS) != 0 {
		return "", 0, fmt.Errorf("%w: server %q expects a cluster key", ErrAuth, serverID)
	}
	res, err := readHandshake(c)
	if err != nil {
		return "", 0, err
	}
	if len(res) != 1 || res[0] != hsOK {
		return "", 0, fmt.Errorf("%w: server %q rejected our key", ErrAuth, serverID)
	}
	return serverID, agreed, nil
}

// mac computes macS (role 'S') or macC (role 'C') for a handshake that
// agreed on version. From version 2 on the MACs cover the version, so that
// nobody in the middle can make the two sides settle on different ones;
// version 1 keeps the formula version-1 nodes compute. The version goes
// last: the fields before it are self-delimiting, so no version-1 input
// equals a version-2 one.
func mac(key []byte, role, proto, version byte, nonceC, nonceS []byte, clientID, serverID string) []byte {
	h := hmac.New(sha256.New, key)
	b := []byte{role, proto}
	b = append(b, nonceC...)
	b = append(b, nonceS...)
	b = appendString(b, clientID)
	b = appendString(b, serverID)
	if version >= 2 {
		b = append(b, version)
	}
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
	var pause backoff.Accept
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and friends: back off instead of spinning or quitting.
			x.log.Warn("cluster port accept failed", "err", err)
			time.Sleep(pause.Failed())
			continue
		}
		pause.Succeeded()
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
	peer, version, err := x.serverHandshake(c, pb[0])
	if err != nil {
		x.reject(c, hsReason(err), err)
		return
	}
	if version < x.maxVersion {
		// Expected during a rolling upgrade; per connection, so Debug.
		x.log.Debug("cluster peer speaks an older protocol version", "peer", peer, "remote", c.RemoteAddr().String(), "version", version)
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
	case l.ch <- &PeerConn{Conn: c, peer: peer, version: version}:
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

// serverHandshake returns the client's node id and the agreed version.
func (x *Mux) serverHandshake(c net.Conn, proto byte) (string, uint8, error) {
	body, err := readHandshake(c)
	if err != nil {
		return "", 0, err
	}
	r := reader{b: body}
	magic := r.raw(len(handshakeMagic))
	offered, flags := r.u8(), r.u8()
	nonceC := r.raw(nonceLen)
	clientID := r.str()
	if r.err != nil || string(magic) != handshakeMagic || clientID == "" {
		return "", 0, fmt.Errorf("%w: malformed hello", ErrHandshake)
	}
	var nonceS [nonceLen]byte
	_, _ = rand.Read(nonceS[:])
	reply := func(version, status byte, mac []byte) error {
		b := append([]byte(handshakeMagic), version, status)
		b = append(b, nonceS[:]...)
		b = appendBytes(b, mac)
		b = appendString(b, x.self)
		return writeHandshake(c, b)
	}
	if offered < x.minVersion || offered > x.maxVersion {
		// Name our newest version: a newer client that still speaks it
		// dials again at it (as a version-2 client does with the 1 a
		// version-1 server names).
		_ = reply(x.maxVersion, hsVersion, nil)
		return "", 0, fmt.Errorf("%w: peer %q offered %d, we speak %d to %d",
			ErrProtocolVersion, clientID, offered, x.minVersion, x.maxVersion)
	}
	// The lower of the two newest versions is the offer, as we refused
	// offers above ours. A version-1 client requires exactly 1 back.
	agreed := offered
	if agreed < x.maxVersion {
		// Tell a client that speaks a newer version too that it was
		// downgraded on the way (see downgradeMark).
		copy(nonceS[nonceLen-len(downgradeMark):], downgradeMark)
	}
	if keyed := flags&1 != 0; keyed != (x.key != nil) {
		_ = reply(agreed, hsKeyMismatch, nil)
		return "", 0, fmt.Errorf("%w: peer %q keyed=%v, we keyed=%v", ErrAuth, clientID, keyed, x.key != nil)
	}
	var macS []byte
	if x.key != nil {
		macS = mac(x.key, 'S', proto, agreed, nonceC, nonceS[:], clientID, x.self)
	}
	if err := reply(agreed, hsOK, macS); err != nil {
		return "", 0, err
	}
	ab, err := readHandshake(c)
	if err != nil {
		return "", 0, err
	}
	ar := reader{b: ab}
	macC := ar.bytes()
	if ar.err != nil {
		return "", 0, fmt.Errorf("%w: malformed auth", ErrHandshake)
	}
	if x.key != nil && !slices.ContainsFunc(x.keys, func(k []byte) bool {
		return hmac.Equal(macC, mac(k, 'C', proto, agreed, nonceC, nonceS[:], clientID, x.self))
	}) {
		_ = writeHandshake(c, []byte{hsAuthFailed})
		return "", 0, fmt.Errorf("%w: peer %q failed to prove the cluster key", ErrAuth, clientID)
	}
	if err := writeHandshake(c, []byte{hsOK}); err != nil {
		return "", 0, err
	}
	return clientID, agreed, nil
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
