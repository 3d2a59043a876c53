package cluster

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/fuzzutil"
)

// Fuzz targets for what this package decodes from a peer: the cluster-port
// handshake (both sides, here), forwarding frames and gossip messages
// (codec_test.go), the route table gossip drives, and topic filters.
// `go test` runs their seeds; `make fuzz` runs each one for FUZZTIME.

var fuzzKey = []byte("fuzz cluster key")

func fuzzKeyIf(keyed bool) []byte {
	if keyed {
		return fuzzKey
	}
	return nil
}

// memConn is a net.Conn that reads a fixed input and records what is
// written, so a handshake side runs deterministically on one goroutine.
type memConn struct {
	r   io.Reader
	out bytes.Buffer
}

func (c *memConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *memConn) Write(p []byte) (int, error)      { return c.out.Write(p) }
func (c *memConn) Close() error                     { return nil }
func (c *memConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *memConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *memConn) SetDeadline(time.Time) error      { return nil }
func (c *memConn) SetReadDeadline(time.Time) error  { return nil }
func (c *memConn) SetWriteDeadline(time.Time) error { return nil }

// tapConn records what is written through it.
type tapConn struct {
	net.Conn
	out *bytes.Buffer
}

func (c tapConn) Write(p []byte) (int, error) {
	c.out.Write(p)
	return c.Conn.Write(p)
}

// recordHandshake runs a real handshake over net.Pipe between a client and
// a server with the given keys, the client speaking only clientVersion and
// the server every version, and returns the bytes each side sent (the
// client's start with the protocol byte).
func recordHandshake(tb testing.TB, clientKey, serverKey []byte, proto, clientVersion byte) (c2s, s2c []byte) {
	tb.Helper()
	cc, sc := net.Pipe()
	var cw, sw bytes.Buffer
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer sc.Close()
		var pb [1]byte
		if _, err := io.ReadFull(sc, pb[:]); err != nil {
			return
		}
		_, _, _ = fuzzMux("server", serverKey).serverHandshake(tapConn{sc, &sw}, pb[0])
	}()
	cx := fuzzMux("client", clientKey)
	cx.minVersion, cx.maxVersion = clientVersion, clientVersion
	_, _, _ = cx.clientHandshake(tapConn{cc, &cw}, proto, clientVersion)
	_ = cc.Close()
	<-done
	return cw.Bytes(), sw.Bytes()
}

// macLen is the length of a MAC in a handshake message: HMAC-SHA256 when
// one is due, none otherwise.
func macLen(due bool) int {
	if due {
		return 32
	}
	return 0
}

func fuzzMux(self string, key []byte) *Mux {
	return newMux(self, key, nil, time.Second, time.Second, discardLogger(), nil)
}

// handshakeMessages splits what a side wrote into handshake messages and
// fails unless it is a sequence of well-formed ones.
func handshakeMessages(t *testing.T, b []byte) [][]byte {
	t.Helper()
	var out [][]byte
	for len(b) > 0 {
		if len(b) < 2 {
			t.Fatalf("dangling byte after the handshake messages: %x", b)
		}
		n := int(binary.BigEndian.Uint16(b))
		if n == 0 || n > maxHandshakeLen || 2+n > len(b) {
			t.Fatalf("malformed handshake message of length %d in %x", n, b)
		}
		out = append(out, b[2:2+n])
		b = b[2+n:]
	}
	return out
}

// firstMessages returns the bodies of the first n handshake messages of
// in, or false if in does not start with n well-formed ones.
func firstMessages(in []byte, n int) ([][]byte, bool) {
	var out [][]byte
	for range n {
		if len(in) < 2 {
			return nil, false
		}
		k := int(binary.BigEndian.Uint16(in))
		if k == 0 || k > maxHandshakeLen || 2+k > len(in) {
			return nil, false
		}
		out = append(out, in[2:2+k])
		in = in[2+k:]
	}
	return out, true
}

type challenge struct {
	version, status byte
	nonce, mac      []byte
	serverID        string
}

// marked reports whether the challenge's nonce ends with downgradeMark.
func (c challenge) marked() bool { return bytes.HasSuffix(c.nonce, []byte(downgradeMark)) }

func parseChallenge(t *testing.T, b []byte) challenge {
	t.Helper()
	r := reader{b: b}
	magic := r.raw(len(handshakeMagic))
	c := challenge{version: r.u8(), status: r.u8()}
	c.nonce = r.raw(nonceLen)
	c.mac, c.serverID = r.bytes(), r.str()
	if r.err != nil || string(magic) != handshakeMagic || len(r.b) != 0 {
		t.Fatalf("malformed challenge %x (%v)", b, r.err)
	}
	return c
}

func checkHandshakeErr(t *testing.T, peer string, err error) {
	t.Helper()
	if peer != "" {
		t.Fatalf("peer %q returned with error %v", peer, err)
	}
	if !errors.Is(err, ErrHandshake) && !errors.Is(err, ErrAuth) && !errors.Is(err, ErrProtocolVersion) {
		t.Fatalf("error wraps no handshake sentinel: %v", err)
	}
}

// FuzzServerHandshake feeds arbitrary bytes after the protocol byte to the
// server side. A keyed server never accepts (the input cannot know the
// server's fresh nonce, so it cannot prove the key); an unkeyed one
// accepts exactly a well-formed hello of a version it speaks and an auth,
// and returns the hello's node id and version; everything it writes is
// well-formed: a refusal names its newest version, any other challenge the
// hello's, with downgradeMark when that is older; failures wrap a sentinel.
func FuzzServerHandshake(f *testing.F) {
	other := []byte("another key")
	for _, k := range [][2][]byte{{nil, nil}, {fuzzKey, fuzzKey}, {fuzzKey, nil}, {nil, fuzzKey}, {other, fuzzKey}} {
		c2s, _ := recordHandshake(f, k[0], k[1], ProtoForward, ProtocolVersion)
		f.Add(ProtoForward, k[1] != nil, c2s[1:])
	}
	c2s, _ := recordHandshake(f, nil, nil, ProtoRaft, ProtocolVersion)
	f.Add(ProtoRaft, false, c2s[1:])
	for _, k := range [][]byte{nil, fuzzKey} { // a version-1 client
		c2s, _ := recordHandshake(f, k, k, ProtoForward, 1)
		f.Add(ProtoForward, k != nil, c2s[1:])
	}
	f.Add(ProtoForward, false, []byte{0x04, 0x00})
	f.Add(ProtoForward, false, []byte{0x00, 0x19, 'M', 'Q', 'H', 'A', 9, 0})
	f.Fuzz(func(t *testing.T, proto byte, keyed bool, in []byte) {
		x := fuzzMux("server", fuzzKeyIf(keyed))
		c := &memConn{r: bytes.NewReader(in)}
		var peer string
		var agreed uint8
		var err error
		fuzzutil.AllocBound(t, fuzzutil.Limit(len(in), 8), func() { peer, agreed, err = x.serverHandshake(c, proto) })
		msgs := handshakeMessages(t, c.out.Bytes())
		if len(msgs) > 2 {
			t.Fatalf("server wrote %d messages", len(msgs))
		}
		if len(msgs) > 0 {
			ch := parseChallenge(t, msgs[0])
			if ch.status > hsBadHandshake || ch.serverID != "server" ||
				ch.status == hsVersion && ch.version != ProtocolVersion ||
				ch.status != hsVersion && (ch.version < MinProtocolVersion || ch.version > ProtocolVersion) ||
				ch.status != hsVersion && ch.marked() != (ch.version < ProtocolVersion) {
				t.Fatalf("bad challenge %+v", ch)
			}
			if len(ch.mac) != macLen(keyed && ch.status == hsOK) {
				t.Fatalf("challenge status %d keyed=%v carries a %d-byte MAC", ch.status, keyed, len(ch.mac))
			}
		}
		if len(msgs) == 2 && (len(msgs[1]) != 1 || msgs[1][0] != hsOK && msgs[1][0] != hsAuthFailed) {
			t.Fatalf("bad result message %x", msgs[1])
		}
		// A well-formed unkeyed exchange: a hello of a version we speak
		// naming a node, then an auth (an unkeyed server ignores its MAC,
		// as it ignores trailing bytes in both).
		wellFormed, id, offered := false, "", byte(0)
		if m, ok := firstMessages(in, 2); ok {
			hr := reader{b: m[0]}
			var magic []byte
			var flags byte
			magic, offered, flags = hr.raw(len(handshakeMagic)), hr.u8(), hr.u8()
			hr.raw(nonceLen)
			id = hr.str()
			ar := reader{b: m[1]}
			ar.bytes()
			wellFormed = hr.err == nil && ar.err == nil && string(magic) == handshakeMagic &&
				offered >= MinProtocolVersion && offered <= ProtocolVersion && flags&1 == 0 && id != ""
		}
		if err != nil {
			checkHandshakeErr(t, peer, err)
			if len(msgs) == 2 && msgs[1][0] == hsOK {
				t.Fatalf("server answered OK, then failed: %v", err)
			}
			if !keyed && wellFormed {
				t.Fatalf("unkeyed server refused a well-formed exchange from %q: %v", id, err)
			}
			return
		}
		if keyed {
			t.Fatalf("keyed server accepted %q without proof of the key", peer)
		}
		if !wellFormed || id != peer || agreed != offered {
			t.Fatalf("accepted peer %q at version %d from %x", peer, agreed, in)
		}
		if len(msgs) != 2 || parseChallenge(t, msgs[0]).status != hsOK || msgs[1][0] != hsOK {
			t.Fatalf("accepted without a full OK exchange: %x", c.out.Bytes())
		}
	})
}

// FuzzClientHandshake feeds an arbitrary challenge and result to the
// client side, which offers ProtocolVersion. A keyed client never accepts
// (the input cannot know the client's nonce); an unkeyed one accepts
// exactly an OK challenge of a version it speaks, no newer than its offer
// and without downgradeMark if older, without a MAC, followed by an OK
// result, and returns the challenge's server id and version; its hello and
// auth are well-formed.
func FuzzClientHandshake(f *testing.F) {
	for _, k := range [][2][]byte{{nil, nil}, {fuzzKey, fuzzKey}, {fuzzKey, nil}, {nil, fuzzKey}} {
		_, s2c := recordHandshake(f, k[0], k[1], ProtoForward, ProtocolVersion)
		f.Add(ProtoForward, k[0] != nil, s2c)
	}
	for _, k := range [][]byte{nil, fuzzKey} { // a challenge at version 1, with downgradeMark
		_, s2c := recordHandshake(f, k, k, ProtoForward, 1)
		f.Add(ProtoForward, k != nil, s2c)
	}
	f.Add(ProtoForward, false, []byte{0x00, 0x01, 0x00})
	f.Fuzz(func(t *testing.T, proto byte, keyed bool, in []byte) {
		x := fuzzMux("client", fuzzKeyIf(keyed))
		c := &memConn{r: bytes.NewReader(in)}
		var peer string
		var agreed uint8
		var err error
		fuzzutil.AllocBound(t, fuzzutil.Limit(len(in), 8), func() { peer, agreed, err = x.clientHandshake(c, proto, ProtocolVersion) })
		out := c.out.Bytes()
		if len(out) == 0 || out[0] != proto {
			t.Fatalf("client did not start with the protocol byte: %x", out)
		}
		msgs := handshakeMessages(t, out[1:])
		if len(msgs) == 0 || len(msgs) > 2 {
			t.Fatalf("client wrote %d messages", len(msgs))
		}
		hr := reader{b: msgs[0]}
		magic, version, flags := hr.raw(len(handshakeMagic)), hr.u8(), hr.u8()
		hr.raw(nonceLen)
		if id := hr.str(); hr.err != nil || string(magic) != handshakeMagic || version != ProtocolVersion ||
			(flags == 1) != keyed || flags > 1 || id != "client" || len(hr.b) != 0 {
			t.Fatalf("bad hello %x", msgs[0])
		}
		if len(msgs) == 2 {
			ar := reader{b: msgs[1]}
			if mac := ar.bytes(); ar.err != nil || len(ar.b) != 0 || len(mac) != macLen(keyed) {
				t.Fatalf("bad auth %x", msgs[1])
			}
		}
		// A well-formed unkeyed exchange: an OK challenge of a version we
		// speak, not above our offer, unmarked if older, without a MAC
		// (the client ignores trailing bytes), then an OK result.
		wellFormed, id, version := false, "", byte(0)
		if m, ok := firstMessages(in, 2); ok {
			cr := reader{b: m[0]}
			magic := cr.raw(len(handshakeMagic))
			var status byte
			version, status = cr.u8(), cr.u8()
			nonce := cr.raw(nonceLen)
			mac := cr.bytes()
			id = cr.str()
			downgraded := version < ProtocolVersion && bytes.HasSuffix(nonce, []byte(downgradeMark))
			wellFormed = cr.err == nil && string(magic) == handshakeMagic &&
				version >= MinProtocolVersion && version <= ProtocolVersion && !downgraded &&
				status == hsOK && len(mac) == 0 && bytes.Equal(m[1], []byte{hsOK})
		}
		if err != nil {
			checkHandshakeErr(t, peer, err)
			if !keyed && wellFormed {
				t.Fatalf("unkeyed client refused a well-formed exchange from %q: %v", id, err)
			}
			return
		}
		if keyed {
			t.Fatalf("keyed client accepted server %q without proof of the key", peer)
		}
		if len(msgs) != 2 {
			t.Fatal("accepted without sending auth")
		}
		if !wellFormed || id != peer || agreed != version {
			t.Fatalf("accepted server %q at version %d from %x", peer, agreed, in)
		}
	})
}

// FuzzReadFrameBody reads a frame body of a declared size from a stream:
// what it returns is exactly the stream's first size bytes, a stream that
// is too short is an error, and memory grows with the bytes that arrive,
// not with the size a peer declares.
func FuzzReadFrameBody(f *testing.F) {
	f.Add(uint32(3), []byte("abc"))
	f.Add(uint32(DefaultMaxFrameSize), []byte("a forged length"))
	f.Add(uint32(1<<20+1), bytes.Repeat([]byte{7}, 300))
	f.Add(uint32(0), []byte{})
	f.Fuzz(func(t *testing.T, declared uint32, stream []byte) {
		size := int(declared % (DefaultMaxFrameSize + 1)) // serveInbound refuses more
		var body []byte
		var err error
		// Up to 1 MiB is allocated at once (one exact allocation for small frames).
		limit := fuzzutil.Limit(len(stream), 8) + 1<<20
		fuzzutil.AllocBound(t, limit, func() { body, err = readFrameBody(bytes.NewReader(stream), size) })
		switch {
		case size > len(stream) && err == nil:
			t.Fatalf("read %d bytes from a stream of %d", size, len(stream))
		case size <= len(stream) && (err != nil || !bytes.Equal(body, stream[:size])):
			t.Fatalf("size %d of %d: err %v, body %d bytes", size, len(stream), err, len(body))
		}
	})
}

// FuzzRouteGossip applies a sequence of gossip messages (deltas, heads,
// full states, membership changes) to a route table and checks it after
// each: the trie answers exactly what Match over the stored filters
// answers, it counts what the entries hold, entries exist only for live
// members, and after a merge this node's own (incarnation, version) is
// newer than anything a peer claimed about it.
//
// Input: a sequence of u8 op | bytes message; op%3 is 0 NotifyMsg (delta
// or head), 1 MergeRemoteState, 2 member message alive (op&4) or gone.
// testdata/fuzz/FuzzRouteGossip holds a state claiming the largest
// incarnation for us, which wrapped ours to 0.
func FuzzRouteGossip(f *testing.F) {
	step := func(b []byte, op byte, msg []byte) []byte { return appendBytes(append(b, op), msg) }
	var seq []byte
	seq = step(seq, 0, appendDelta(nil, routeDelta{Node: "n1", Incarnation: 5, Version: 1, Op: opAdd, Filter: "a/#"}))
	seq = step(seq, 0, appendDelta(nil, routeDelta{Node: "n1", Incarnation: 5, Version: 3, Op: opAdd, Filter: "$share/g/a/+"}))
	seq = step(seq, 0, appendHead(nil, "n1", 5, 4))
	seq = step(seq, 0, appendDelta(nil, routeDelta{Node: "n1", Incarnation: 5, Version: 2, Op: opRemove, Filter: "a/#"}))
	seq = step(seq, 1, appendState(nil, []nodeRoutes{{Node: "n2", Incarnation: 9, Version: 2, Filters: []string{"+/b", "#"}},
		{Node: "self", Incarnation: 2000, Version: 1}}))
	seq = step(seq, 2, []byte("n2"))
	f.Add(seq, "a/b")
	f.Add(step(step(nil, 6, []byte("n3")), 0, appendDelta(nil, routeDelta{Node: "n3", Incarnation: 1, Version: 1, Op: opAdd, Filter: "$SYS/#"})), "$SYS/x")
	f.Fuzz(func(t *testing.T, in []byte, topic string) {
		rt := newRouteTable("self", 1000)
		rt.setMember("n1", true)
		rt.setMember("n2", true)
		r := reader{b: in}
		for len(r.b) > 0 {
			op, msg := r.u8(), r.bytes()
			if r.err != nil {
				return
			}
			switch op % 3 {
			case 0:
				if d, err := decodeDelta(msg); err == nil {
					rt.applyDelta(d)
				} else if node, inc, ver, err := decodeHead(msg); err == nil {
					rt.noteHead(node, inc, ver)
				}
			case 1:
				entries, err := decodeState(msg)
				if err != nil {
					break
				}
				inc0, _ := rt.head()
				rt.merge(entries)
				inc, ver := rt.head()
				if inc < inc0 {
					t.Fatalf("our incarnation went back from %d to %d", inc0, inc)
				}
				for _, e := range entries {
					if e.Node == "self" && e.Incarnation < math.MaxUint64 &&
						(inc < e.Incarnation || inc == e.Incarnation && ver < e.Version) {
						t.Fatalf("a peer claims (%d, %d) for us; ours is still (%d, %d)", e.Incarnation, e.Version, inc, ver)
					}
				}
			case 2:
				rt.setMember(string(msg), op&4 != 0)
			}
			checkRouteTable(t, rt, topic)
		}
	})
}

// checkRouteTable compares the route table's trie with a brute force over
// its entries.
func checkRouteTable(t *testing.T, rt *routeTable, topic string) {
	t.Helper()
	rt.mu.RLock()
	defer rt.mu.RUnlock()
	size := 0
	for node, e := range rt.remote {
		if !rt.members[node] {
			t.Fatalf("entry for %q, which is not a live member", node)
		}
		if len(e.pending) > maxPendingDeltas {
			t.Fatalf("%d pending deltas for %q", len(e.pending), node)
		}
		for f := range e.filters {
			if !ValidFilter(f) {
				t.Fatalf("invalid filter %q stored for %q", f, node)
			}
		}
		size += len(e.filters)
	}
	if rt.index.size != size {
		t.Fatalf("index holds %d routes, entries %d", rt.index.size, size)
	}
	for _, tp := range []string{topic, "a", "a/b", "$SYS/x", "/"} {
		if !ValidTopic(tp) {
			continue
		}
		wantPlain := map[string]bool{}
		wantShared := map[string]map[string]bool{}
		for node, e := range rt.remote {
			for f := range e.filters {
				if _, inner, ok := ParseShared(f); ok {
					if Match(inner, tp) {
						if wantShared[f] == nil {
							wantShared[f] = map[string]bool{}
						}
						wantShared[f][node] = true
					}
				} else if Match(f, tp) {
					wantPlain[node] = true
				}
			}
		}
		var res matchResult
		rt.index.match(tp, &res)
		if got, want := sortedSet(res.plain), sortedKeys(wantPlain); !slices.Equal(got, want) {
			t.Fatalf("topic %q: plain nodes %v, want %v", tp, got, want)
		}
		if len(res.shared) != len(wantShared) {
			t.Fatalf("topic %q: %d shared groups, want %d", tp, len(res.shared), len(wantShared))
		}
		for _, sm := range res.shared {
			if got, want := sortedSet(sm.Nodes), sortedKeys(wantShared[sm.Group]); !slices.Equal(got, want) {
				t.Fatalf("topic %q group %q: nodes %v, want %v", tp, sm.Group, got, want)
			}
		}
	}
}

// FuzzMatch checks filter validation, shared-filter parsing and matching
// against the plain reference of internal/fuzzutil (replication's matcher
// is checked against the same reference), then the trie against Match.
// The MQTT rules are asserted once more on their own: '#' only as the last
// level, '+' only as a whole level, and no wildcard at the first level
// matches a '$' topic. testdata/fuzz/FuzzMatch holds a NUL in a share
// group, which ValidFilter accepted.
func FuzzMatch(f *testing.F) {
	for _, s := range [][2]string{
		{"a/#", "a"}, {"a/+/c", "a//c"}, {"+/+", "/"}, {"#", "$SYS/x"}, {"+/x", "$a/x"}, {"$SYS/#", "$SYS"},
		{"$share/g/a/+", "a/b"}, {"$SHARE/g/#", "$x"}, {"$share/g", "g"}, {"$share//a", "a"}, {"$share/g+/a", "a"},
		{"$share/g/", "g"}, {"a/#/b", "a/x/b"}, {"a+/b", "a+/b"}, {"a\x00", "a\x00"},
		{"", ""}, {"/", "/"}, {"+", "x"}, {"#", "#"}, {"a/b/#", "a/b/c/d"}, {"+/+/+", "a/b"}, {"a", "A"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, filter, topic string) {
		valid := ValidFilter(filter)
		if want := fuzzutil.ValidFilter(filter); valid != want {
			t.Fatalf("ValidFilter(%q) = %v, reference %v", filter, valid, want)
		}
		if got, want := ValidTopic(topic), fuzzutil.ValidTopic(topic); got != want {
			t.Fatalf("ValidTopic(%q) = %v, reference %v", topic, got, want)
		}
		group, inner, shared := ParseShared(filter)
		if shared && (!strings.EqualFold(filter[:len(sharePrefix)], sharePrefix) || filter != filter[:len(sharePrefix)]+group+"/"+inner) {
			t.Fatalf("ParseShared(%q) = %q, %q", filter, group, inner)
		}
		if !valid {
			return
		}
		refInner, refShared := fuzzutil.SharedInner(filter)
		if shared != refShared || inner != refInner {
			t.Fatalf("ParseShared(%q) = %q, %v; reference %q, %v", filter, inner, shared, refInner, refShared)
		}
		plain := filter
		if shared {
			plain = inner
		}
		levels := strings.Split(plain, "/")
		for i, l := range levels {
			if strings.Contains(l, "#") && (l != "#" || i != len(levels)-1) || strings.Contains(l, "+") && l != "+" {
				t.Fatalf("ValidFilter accepted %q (level %q)", filter, l)
			}
		}
		if !ValidTopic(topic) {
			return
		}
		got := Match(plain, topic)
		if want := fuzzutil.Match(plain, topic); got != want {
			t.Fatalf("Match(%q, %q) = %v, reference %v", plain, topic, got, want)
		}
		if got && topic[0] == '$' && (plain[0] == '+' || plain[0] == '#') {
			t.Fatalf("wildcard filter %q matched $ topic %q", plain, topic)
		}
		var x routeIndex
		x.add(filter, "n")
		var res matchResult
		x.match(topic, &res)
		if hit := len(res.plain)+len(res.shared) > 0; hit != got ||
			got && shared && (len(res.shared) != 1 || res.shared[0].Group != filter) {
			t.Fatalf("trie with %q on topic %q: %+v, Match says %v", filter, topic, res, got)
		}
		if !x.remove(filter, "n") || !x.root.empty() || x.size != 0 {
			t.Fatalf("trie not empty after removing %q", filter)
		}
	})
}
