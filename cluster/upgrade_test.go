package cluster

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Rolling upgrades (DESIGN.md): nodes of protocol versions 1 and 2 talk
// raft and forwarding to each other in both directions.
//
// Version-1 peers come in two kinds here:
//   - frozen: v1ClientHandshake, v1ServerHandshake and v1MAC at the end of
//     this file are the handshake of commit 18dd68c, the last version-1
//     code, copied with only their names changed (mac to v1MAC,
//     ProtocolVersion to v1Version), so compatibility is checked against
//     the old code itself rather than against our reading of it;
//   - simulated: withProtocolVersion(1) narrows a Node's Mux to versions
//     [1, 1], which turns the current rules into the old ones. That is how
//     a whole version-1 node runs in TestMixedVersionCluster;
//     TestHandshakeAcrossVersions checks that simulated and frozen
//     version-1 peers behave alike against every kind of peer.

const v1Version uint8 = 1

// withProtocolVersion makes a node speak version v only: the test-only way
// to run a version-1 node (see Mux.minVersion). It applies after New and
// before Start, so the node also announces v in its metadata.
func withProtocolVersion(v uint8) nodeOption {
	return func(_ *Config, n *Node) {
		if n != nil {
			n.mux.minVersion, n.mux.maxVersion = v, v
		}
	}
}

// peerKind is the code a handshake peer runs.
type peerKind int

const (
	frozenV1 peerKind = iota // the version-1 code itself
	simV1                    // the current code narrowed to version 1
	current                  // the current code: versions 1 and 2
)

func (k peerKind) String() string { return [...]string{"frozen-v1", "simulated-v1", "v2"}[k] }

func (k peerKind) versions() (lo, hi uint8) {
	if k == current {
		return MinProtocolVersion, ProtocolVersion
	}
	return v1Version, v1Version
}

// bareMux is a Mux without a Node speaking versions [lo, hi].
func bareMux(t *testing.T, id string, key []byte, lo, hi uint8) *Mux {
	t.Helper()
	m, err := newMetrics(prometheus.NewRegistry(), newRouteTable(id, 1))
	if err != nil {
		t.Fatal(err)
	}
	x := newMux(id, key, nil, time.Second, time.Second, testLogger(t), m)
	x.minVersion, x.maxVersion = lo, hi
	return x
}

// hsFailures reads handshake_failures_total{direction, reason} of x.
func hsFailures(t *testing.T, x *Mux, direction, reason string) float64 {
	t.Helper()
	var m dto.Metric
	if err := x.m.handshake.WithLabelValues(direction, reason).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// accepted is a connection a test server let through the handshake.
type accepted struct {
	peer    string
	version uint8
}

// testServer serves ProtoRaft on loopback as kind k and reports every
// connection it accepts; refusals() counts the offers it refused for their
// version.
type testServer struct {
	addr     string
	accepted chan accepted
	refusals func() float64
}

func serveAs(t *testing.T, k peerKind, key []byte) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lo, hi := k.versions()
	x := bareMux(t, "srv", key, lo, hi)
	s := &testServer{addr: ln.Addr().String(), accepted: make(chan accepted, 16)}
	if k != frozenV1 {
		if err := x.start(ln); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(x.close)
		l, err := x.Listen(ProtoRaft)
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				pc := c.(*PeerConn)
				s.accepted <- accepted{pc.Peer(), pc.Version()}
				_ = pc.Close()
			}
		}()
		s.refusals = func() float64 { return hsFailures(t, x, "in", "version") }
		return s
	}
	var mu sync.Mutex
	refused := 0
	s.refusals = func() float64 {
		mu.Lock()
		defer mu.Unlock()
		return float64(refused)
	}
	serveRaw(t, ln, func(c net.Conn, proto byte) {
		peer, err := v1ServerHandshake(x, c, proto)
		switch {
		case err == nil:
			s.accepted <- accepted{peer, v1Version}
		case errors.Is(err, ErrProtocolVersion):
			mu.Lock()
			refused++
			mu.Unlock()
		}
	})
	return s
}

// serveRaw accepts connections on ln until the test ends and, one at a
// time, reads each one's protocol byte and hands the connection to serve,
// then closes it.
func serveRaw(t *testing.T, ln net.Listener, serve func(c net.Conn, proto byte)) {
	var wg sync.WaitGroup
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			var pb [1]byte
			if _, err := io.ReadFull(c, pb[:]); err == nil {
				serve(c, pb[0])
			}
			_ = c.Close()
		}
	}()
}

// dialAs connects to addr for ProtoRaft as kind k and returns the server's
// id and the agreed version; x is the client's Mux (nil for frozenV1).
func dialAs(t *testing.T, k peerKind, key []byte, addr string) (peer string, version uint8, x *Mux, err error) {
	t.Helper()
	lo, hi := k.versions()
	x = bareMux(t, "cli", key, lo, hi)
	if k != frozenV1 {
		pc, err := x.Dial(t.Context(), addr, ProtoRaft)
		if err != nil {
			return "", 0, x, err
		}
		defer pc.Close()
		return pc.Peer(), pc.Version(), x, nil
	}
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	peer, err = v1ClientHandshake(x, c, ProtoRaft)
	return peer, v1Version, nil, err
}

// TestHandshakeAcrossVersions: every pair of version-1 (frozen and
// simulated) and version-2 peers, with and without a cluster key, agrees
// on the lower version in both directions. A version-2 client reaches a
// version-1 server by one retry, which the old server counts as a refusal
// (it cannot know better) and the new client does not count at all.
func TestHandshakeAcrossVersions(t *testing.T) {
	kinds := []peerKind{frozenV1, simV1, current}
	for _, keyed := range []bool{false, true} {
		var key []byte
		if keyed {
			key = []byte("upgrade key")
		}
		for _, ck := range kinds {
			for _, sk := range kinds {
				t.Run(fmt.Sprintf("keyed=%v/%v->%v", keyed, ck, sk), func(t *testing.T) {
					srv := serveAs(t, sk, key)
					peer, version, x, err := dialAs(t, ck, key, srv.addr)
					if err != nil {
						t.Fatalf("dial: %v", err)
					}
					_, chi := ck.versions()
					_, shi := sk.versions()
					want := min(chi, shi)
					if peer != "srv" || version != want {
						t.Fatalf("client agreed with %q on version %d, want srv at %d", peer, version, want)
					}
					select {
					case a := <-srv.accepted:
						if a.peer != "cli" || a.version != want {
							t.Fatalf("server agreed with %q on version %d, want cli at %d", a.peer, a.version, want)
						}
					case <-time.After(5 * time.Second):
						t.Fatal("server accepted nothing")
					}
					wantRefusals := 0.0
					if chi > shi {
						wantRefusals = 1 // the retry's first offer
					}
					// A Mux counts a refusal after writing it, so the count
					// may trail the retry's success by a moment.
					eventually(t, 5*time.Second, func() bool { return srv.refusals() == wantRefusals },
						"server did not count %v refusals", wantRefusals)
					if x != nil {
						if got := hsFailures(t, x, "out", "version"); got != 0 {
							t.Fatalf("client counted %v version failures for a successful handshake", got)
						}
					}
				})
			}
		}
	}
}

// TestHandshakeRefusesVersionsOutsideItsRange: the server refuses an offer
// below MinProtocolVersion or above ProtocolVersion, names its newest
// version, and counts the refusal, as before negotiation.
func TestHandshakeRefusesVersionsOutsideItsRange(t *testing.T) {
	n1 := startNode(t, "n1", nil)
	for i, offered := range []byte{MinProtocolVersion - 1, ProtocolVersion + 1} {
		c := rawDial(t, n1.clusterAddr())
		hello := append([]byte(handshakeMagic), offered, 0)
		hello = append(hello, make([]byte, nonceLen)...)
		hello = appendString(hello, "other-version")
		_, _ = c.Write(append([]byte{ProtoForward}, binary.BigEndian.AppendUint16(nil, uint16(len(hello)))...))
		_, _ = c.Write(hello)
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		reply, err := readHandshake(c)
		if err != nil {
			t.Fatal(err)
		}
		if v, st := reply[len(handshakeMagic)], reply[len(handshakeMagic)+1]; st != hsVersion || v != ProtocolVersion {
			t.Fatalf("offer %d: status %d naming %d, want hsVersion naming %d", offered, st, v, ProtocolVersion)
		}
		expectClosed(t, c)
		eventually(t, 5*time.Second, func() bool {
			return n1.counter(n1.metrics.handshake.WithLabelValues("in", "version")) == float64(i+1)
		}, "refusal of offer %d not counted: %v", offered, handshakeCounts(n1))
	}
}

// scriptedServer answers each connection's hello with the challenge
// answer(offered) returns and, after an OK challenge, reads the auth and
// answers OK. offers() lists the versions offered so far.
func scriptedServer(t *testing.T, answer func(offered byte) []byte) (addr string, offers func() []byte) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var got []byte
	serveRaw(t, ln, func(s net.Conn, _ byte) {
		hello, err := readHandshake(s)
		if err != nil || len(hello) <= len(handshakeMagic) {
			return
		}
		offered := hello[len(handshakeMagic)]
		mu.Lock()
		got = append(got, offered)
		mu.Unlock()
		ch := answer(offered)
		_ = writeHandshake(s, ch)
		if ch[len(handshakeMagic)+1] == hsOK {
			if _, err := readHandshake(s); err == nil {
				_ = writeHandshake(s, []byte{hsOK})
			}
		}
	})
	return ln.Addr().String(), func() []byte {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(got)
	}
}

// scriptedChallenge is an unkeyed challenge naming version with status.
func scriptedChallenge(version, status byte, marked bool) []byte {
	nonce := make([]byte, nonceLen)
	if marked {
		copy(nonce[nonceLen-len(downgradeMark):], downgradeMark)
	}
	ch := append([]byte(handshakeMagic), version, status)
	ch = append(ch, nonce...)
	ch = appendBytes(ch, nil)
	return appendString(ch, "scripted")
}

// TestClientVersionNegotiation: the client accepts an agreed version it
// speaks and did not exceed, dials again once at a refusing server's
// version if it speaks that one, and otherwise fails with
// ErrProtocolVersion, counted once per Dial.
func TestClientVersionNegotiation(t *testing.T) {
	for _, tc := range []struct {
		name    string
		answer  func(offered byte) []byte
		offers  []byte
		agreed  uint8 // 0: Dial fails with ErrProtocolVersion
		counted float64
	}{
		{"server agrees on our offer", func(o byte) []byte { return scriptedChallenge(o, hsOK, false) },
			[]byte{ProtocolVersion}, ProtocolVersion, 0},
		{"version-1 server: retry at 1", func(o byte) []byte {
			if o != 1 {
				return scriptedChallenge(1, hsVersion, false)
			}
			return scriptedChallenge(1, hsOK, false)
		}, []byte{ProtocolVersion, 1}, 1, 0},
		{"server agrees on an older version we speak", func(byte) []byte { return scriptedChallenge(1, hsOK, false) },
			[]byte{ProtocolVersion}, 1, 0},
		{"refusal naming a newer version: no retry", func(byte) []byte { return scriptedChallenge(ProtocolVersion+1, hsVersion, false) },
			[]byte{ProtocolVersion}, 0, 1},
		{"refusal naming a version we dropped: no retry", func(byte) []byte { return scriptedChallenge(MinProtocolVersion-1, hsVersion, false) },
			[]byte{ProtocolVersion}, 0, 1},
		{"refusal naming our own version: no retry", func(byte) []byte { return scriptedChallenge(ProtocolVersion, hsVersion, false) },
			[]byte{ProtocolVersion}, 0, 1},
		{"refused again at the retry: one retry only", func(byte) []byte { return scriptedChallenge(1, hsVersion, false) },
			[]byte{ProtocolVersion, 1}, 0, 1},
		{"agreed above our offer", func(byte) []byte { return scriptedChallenge(ProtocolVersion+1, hsOK, false) },
			[]byte{ProtocolVersion}, 0, 1},
		{"agreed below what the server speaks (downgradeMark)", func(byte) []byte { return scriptedChallenge(1, hsOK, true) },
			[]byte{ProtocolVersion}, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, offers := scriptedServer(t, tc.answer)
			x := bareMux(t, "cli", nil, MinProtocolVersion, ProtocolVersion)
			pc, err := x.Dial(t.Context(), addr, ProtoForward)
			if tc.agreed == 0 {
				if !errors.Is(err, ErrProtocolVersion) {
					t.Fatalf("err = %v, want ErrProtocolVersion", err)
				}
			} else if err != nil || pc.Version() != tc.agreed {
				t.Fatalf("Dial = %v, %v; want version %d", pc, err, tc.agreed)
			}
			if pc != nil {
				_ = pc.Close()
			}
			if got := offers(); !bytes.Equal(got, tc.offers) {
				t.Fatalf("offered %v, want %v", got, tc.offers)
			}
			if got := hsFailures(t, x, "out", "version"); got != tc.counted {
				t.Fatalf("counted %v version failures, want %v", got, tc.counted)
			}
		})
	}
}

// tamperProxy forwards connections to upstream, setting the byte at
// offset c2s of the client-to-server stream and s2c of the other direction
// to val (a negative offset leaves that direction alone): a man in the
// middle rewriting the version of the hello or of the challenge.
func tamperProxy(t *testing.T, upstream string, c2s, s2c int, val byte) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", upstream)
			if err != nil {
				_ = c.Close()
				continue
			}
			pipe := func(dst, src net.Conn, off int) {
				defer wg.Done()
				_, _ = io.Copy(&tamperWriter{w: dst, off: off, val: val}, src)
				_ = dst.Close()
				_ = src.Close()
			}
			wg.Add(2)
			go pipe(u, c, c2s)
			go pipe(c, u, s2c)
		}
	}()
	return ln.Addr().String()
}

type tamperWriter struct {
	w      io.Writer
	n, off int
	val    byte
}

func (tw *tamperWriter) Write(p []byte) (int, error) {
	if tw.off >= tw.n && tw.off < tw.n+len(p) {
		p = slices.Clone(p)
		p[tw.off-tw.n] = tw.val
	}
	tw.n += len(p)
	return tw.w.Write(p)
}

// TestHandshakeResistsDowngrade: with a cluster key, nobody in the middle
// can make two version-2 nodes talk version 1 (downgradeMark) or agree on
// different versions (the MACs cover the version from version 2 on).
func TestHandshakeResistsDowngrade(t *testing.T) {
	key := []byte("downgrade key")
	srv := serveAs(t, current, key)
	const (
		helloVersion     = 1 + 2 + len(handshakeMagic) // after the protocol byte and the length
		challengeVersion = 2 + len(handshakeMagic)
	)
	for _, tc := range []struct {
		name     string
		c2s, s2c int
		want     error
	}{
		// The server agrees on 1 and marks its nonce; the client refuses.
		{"hello rewritten to version 1", helloVersion, -1, ErrProtocolVersion},
		// The server agreed on 2 and signed that; the client checks a MAC
		// of version 1 and refuses the server's proof.
		{"challenge rewritten to version 1", -1, challengeVersion, ErrAuth},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := tamperProxy(t, srv.addr, tc.c2s, tc.s2c, 1)
			x := bareMux(t, "cli", key, MinProtocolVersion, ProtocolVersion)
			if pc, err := x.Dial(t.Context(), addr, ProtoRaft); !errors.Is(err, tc.want) {
				t.Fatalf("Dial = %v, %v; want %v", pc, err, tc.want)
			}
		})
	}
	// A forged refusal naming 1 makes the client dial again at 1; the
	// server's mark gives the forgery away.
	x := bareMux(t, "cli", key, MinProtocolVersion, ProtocolVersion)
	if pc, _, err := x.dialAt(t.Context(), srv.addr, ProtoRaft, 1); !errors.Is(err, ErrProtocolVersion) {
		t.Fatalf("dial at 1 = %v, %v; want ErrProtocolVersion", pc, err)
	}
	select {
	case a := <-srv.accepted:
		t.Fatalf("server accepted %+v from a tampered handshake", a)
	default:
	}
}

// TestHandshakeMACGolden pins the MACs: at version 1 exactly what
// version-1 nodes compute, from version 2 on covering the version. The
// values were computed apart from this code (HMAC-SHA256 over the bytes
// the comment at the top of mux.go lists).
func TestHandshakeMACGolden(t *testing.T) {
	k := deriveKey("mqtt-ha cluster-port", []byte("k"))
	nc, ns := bytes.Repeat([]byte{1}, nonceLen), bytes.Repeat([]byte{2}, nonceLen)
	for _, tc := range []struct {
		role, version byte
		want          string
	}{
		{'S', 1, "ecd02f0d6774da3b3a16173af7cd64f9515bd74ebb2f6c111a3d5b04dd2ecff3"},
		{'C', 1, "e055350afb6db4991bd9f4bdafc193a807760434d63d74e585c0bcef9a89aebc"},
		{'S', 2, "f76bf619ee1f0825473faac19fab946889e277c8030f0273afe4eb2dda5ff7e5"},
		{'C', 2, "7d0b836e4755710d84e2c2f11ca673238a761b2d367d3982d918536867f79569"},
	} {
		got := mac(k, tc.role, ProtoForward, tc.version, nc, ns, "a", "b")
		if h := hex.EncodeToString(got); h != tc.want {
			t.Errorf("mac(%c, version %d) = %s, want %s", tc.role, tc.version, h, tc.want)
		}
		old := v1MAC(k, tc.role, ProtoForward, nc, ns, "a", "b")
		if hmac.Equal(got, old) != (tc.version == 1) {
			t.Errorf("mac(%c, version %d) equal to version 1's: %v", tc.role, tc.version, hmac.Equal(got, old))
		}
	}
}

// TestMixedVersionCluster: a version-1 node and a version-2 node (with a
// cluster key) forward to each other and talk raft over the mux in both
// directions, at version 1.
func TestMixedVersionCluster(t *testing.T) {
	key := withConfig(func(c *Config) { c.ClusterKey = []byte("upgrade") })
	old := startNode(t, "old", nil, key, withProtocolVersion(1))
	cur := startNode(t, "new", []string{old.selfGossip}, key)
	nodes := []*testNode{old, cur}
	waitMembers(t, nodes, 2)

	// Both announce 1, the only version a version-1 node forwards to.
	for _, tn := range nodes {
		for _, m := range tn.Status().Members {
			if !m.Self && m.ProtocolVersion != 1 {
				t.Fatalf("%s sees %s announce protocol %d; a version-1 node forwards only to members announcing 1, "+
					"so a node must announce MinProtocolVersion", tn.ID(), m.ID, m.ProtocolVersion)
			}
		}
	}
	if o, c := old.Status().ProtocolVersion, cur.Status().ProtocolVersion; o != 1 || c != int(ProtocolVersion) {
		t.Fatalf("status protocol versions old %d, new %d; want 1, %d", o, c, ProtocolVersion)
	}

	if err := old.AddRoute("to/old/#"); err != nil {
		t.Fatal(err)
	}
	if err := cur.AddRoute("to/new/#"); err != nil {
		t.Fatal(err)
	}
	waitRoutes(t, nodes, "old", "to/old/#")
	waitRoutes(t, nodes, "new", "to/new/#")
	for _, tc := range []struct{ from, to *testNode }{{old, cur}, {cur, old}} {
		topic := "to/" + tc.to.ID() + "/x"
		if got := tc.from.Forward(msg(topic, "across versions")); got != 1 {
			t.Fatalf("%s -> %s queued for %d nodes", tc.from.ID(), tc.to.ID(), got)
		}
		eventually(t, 5*time.Second, func() bool { return tc.to.rec.countTopic(topic) == 1 },
			"%s got nothing from %s", tc.to.ID(), tc.from.ID())
	}

	// Raft's way: its own protocol on the mux, both directions.
	for _, tc := range []struct{ client, server *testNode }{{old, cur}, {cur, old}} {
		ln, err := tc.server.Mux().Listen(ProtoRaft)
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan uint8, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				got <- 0
				return
			}
			got <- c.(*PeerConn).Version()
			_ = c.Close()
		}()
		pc, err := tc.client.Mux().Dial(t.Context(), tc.server.clusterAddr(), ProtoRaft)
		if err != nil {
			t.Fatalf("raft %s -> %s: %v", tc.client.ID(), tc.server.ID(), err)
		}
		if v := <-got; pc.Version() != 1 || v != 1 {
			t.Fatalf("raft %s -> %s agreed on %d (server %d), want 1", tc.client.ID(), tc.server.ID(), pc.Version(), v)
		}
		_ = pc.Close()
		_ = ln.Close()
	}

	// The new node's retries are no failures; the old node counts each
	// first offer of 2 as a refusal (it cannot know better).
	if f := cur.counter(cur.metrics.handshake.WithLabelValues("out", "version")); f != 0 {
		t.Fatalf("the new node counted %v version failures", f)
	}
	if f := old.counter(old.metrics.handshake.WithLabelValues("in", "version")); f < 1 {
		t.Fatalf("the old node counted %v version refusals, want the new node's first offers", f)
	}
}

// The handshake of protocol version 1 (commit 18dd68c, cluster/mux.go),
// frozen: do not edit below this line except to follow renames of the
// helpers it calls.

func v1ClientHandshake(x *Mux, c net.Conn, proto byte) (string, error) {
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
	b = append(b, v1Version, flags)
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
		return "", fmt.Errorf("%w: ours %d, theirs %d", ErrProtocolVersion, v1Version, version)
	case hsKeyMismatch, hsAuthFailed:
		return "", fmt.Errorf("%w: server %q refused (status %d)", ErrAuth, serverID, status)
	default:
		return "", fmt.Errorf("%w: server status %d", ErrHandshake, status)
	}
	if version != v1Version {
		return "", fmt.Errorf("%w: ours %d, theirs %d", ErrProtocolVersion, v1Version, version)
	}
	// The server proved its primary key; answer with the same key if it is
	// one of ours, else with our primary (the server then refuses us).
	var key, macC []byte
	for _, k := range x.keys {
		if hmac.Equal(macS, v1MAC(k, 'S', proto, nonceC[:], nonceS, x.self, serverID)) {
			key = k
			break
		}
	}
	if x.key != nil {
		k := key
		if k == nil {
			k = x.key
		}
		macC = v1MAC(k, 'C', proto, nonceC[:], nonceS, x.self, serverID)
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

func v1ServerHandshake(x *Mux, c net.Conn, proto byte) (string, error) {
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
		b := append([]byte(handshakeMagic), v1Version, status)
		b = append(b, nonceS[:]...)
		b = appendBytes(b, mac)
		b = appendString(b, x.self)
		return writeHandshake(c, b)
	}
	if version != v1Version {
		_ = reply(hsVersion, nil)
		return "", fmt.Errorf("%w: peer %q speaks %d, we speak %d", ErrProtocolVersion, clientID, version, v1Version)
	}
	if keyed := flags&1 != 0; keyed != (x.key != nil) {
		_ = reply(hsKeyMismatch, nil)
		return "", fmt.Errorf("%w: peer %q keyed=%v, we keyed=%v", ErrAuth, clientID, keyed, x.key != nil)
	}
	var macS []byte
	if x.key != nil {
		macS = v1MAC(x.key, 'S', proto, nonceC, nonceS[:], clientID, x.self)
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
		return hmac.Equal(macC, v1MAC(k, 'C', proto, nonceC, nonceS[:], clientID, x.self))
	}) {
		_ = writeHandshake(c, []byte{hsAuthFailed})
		return "", fmt.Errorf("%w: peer %q failed to prove the cluster key", ErrAuth, clientID)
	}
	if err := writeHandshake(c, []byte{hsOK}); err != nil {
		return "", err
	}
	return clientID, nil
}

func v1MAC(key []byte, role byte, proto byte, nonceC, nonceS []byte, clientID, serverID string) []byte {
	h := hmac.New(sha256.New, key)
	b := []byte{role, proto}
	b = append(b, nonceC...)
	b = append(b, nonceS...)
	b = appendString(b, clientID)
	b = appendString(b, serverID)
	h.Write(b)
	return h.Sum(nil)
}
