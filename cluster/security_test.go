package cluster

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestClusterKeyRotation: a node proves its primary key and accepts its
// other keys, so keys rotate one node at a time: every node first accepts
// both keys, then primaries switch, then the old key is dropped.
func TestClusterKeyRotation(t *testing.T) {
	oldK, newK := []byte("old key"), []byte("new key")
	keys := func(primary []byte, accepted ...[]byte) nodeOption {
		return withConfig(func(c *Config) { c.ClusterKey, c.AcceptedKeys = primary, accepted })
	}
	// Mid-rotation: n1 still proves the old key, n2 already the new one.
	n1 := startNode(t, "n1", nil, keys(oldK, newK))
	n2 := startNode(t, "n2", []string{n1.selfGossip}, keys(newK, oldK))
	nodes := []*testNode{n1, n2}
	waitMembers(t, nodes, 2)
	if err := n1.AddRoute("rot/#"); err != nil {
		t.Fatal(err)
	}
	waitRoutes(t, nodes, "n1", "rot/#")
	n2.Forward(msg("rot/x", "across keys"))
	eventually(t, 5*time.Second, func() bool { return n1.rec.count() == 1 }, "no delivery between nodes mid-rotation")

	// Handshake matrix (dialer -> server), both directions of each pair.
	for _, tc := range []struct {
		name           string
		dialer, server [][]byte // primary first
		ok             bool
	}{
		{"same key", [][]byte{oldK}, [][]byte{oldK}, true},
		{"dialer accepts the server's primary", [][]byte{newK, oldK}, [][]byte{oldK}, true},
		{"server accepts the dialer's primary", [][]byte{newK, oldK}, [][]byte{oldK, newK}, true},
		// The server proves its primary first: a dialer that dropped it
		// too early is refused (so step 3 waits for step 2 everywhere).
		{"dialer dropped the server's primary", [][]byte{newK}, [][]byte{oldK, newK}, false},
		{"no common key", [][]byte{newK}, [][]byte{oldK}, false},
		{"old key dropped on the server", [][]byte{oldK}, [][]byte{newK}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := startNode(t, "srv", nil, keys(tc.server[0], tc.server[1:]...))
			x := intruder(t, tc.dialer[0])
			x.keys = nil
			x.key = deriveKey("mqtt-ha cluster-port", tc.dialer[0])
			for _, k := range tc.dialer {
				x.keys = append(x.keys, deriveKey("mqtt-ha cluster-port", k))
			}
			pc, err := x.Dial(t.Context(), srv.clusterAddr(), ProtoForward)
			if tc.ok != (err == nil) {
				t.Fatalf("dial: err = %v, want ok=%v", err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrAuth) {
				t.Fatalf("dial: err = %v, want ErrAuth", err)
			}
			if pc != nil {
				_ = pc.Close()
			}
		})
	}
}

func tlsConfigs(t *testing.T, certFile, keyFile, caFile string) (server, client *tls.Config) {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	server = &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}
	client = &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS12}
	return server, client
}

// TestClusterTLS: with cluster TLS, peers talk over mutual TLS (then the key
// handshake); a plaintext dialer and a dialer whose certificate another CA
// signed are refused and counted before any handshake byte is read.
func TestClusterTLS(t *testing.T) {
	pki := testutil.NewPKI(t)
	srvTLS, cliTLS := tlsConfigs(t, pki.PeerCert, pki.PeerKey, pki.CAFile)
	opt := withConfig(func(c *Config) {
		c.ClusterKey = []byte("k")
		c.TLSServer, c.TLSClient = srvTLS, cliTLS
	})
	nodes := startCluster(t, 2, opt)
	n1, n2 := nodes[0], nodes[1]
	if err := n2.AddRoute("tls/#"); err != nil {
		t.Fatal(err)
	}
	waitRoutes(t, nodes, "n2", "tls/#")
	n1.Forward(msg("tls/x", "encrypted"))
	eventually(t, 5*time.Second, func() bool { return n2.rec.count() == 1 }, "no delivery over cluster TLS")

	// Plaintext dialer with the right key.
	if _, err := intruder(t, []byte("k")).Dial(t.Context(), n1.clusterAddr(), ProtoForward); err == nil {
		t.Fatal("plaintext dial accepted by a TLS cluster port")
	}
	// TLS dialer whose certificate no node trusts.
	_, otherCli := tlsConfigs(t, pki.OtherPeerCert, pki.OtherPeerKey, pki.CAFile)
	x := intruder(t, []byte("k"))
	x.tlsClient = otherCli
	if _, err := x.Dial(t.Context(), n1.clusterAddr(), ProtoForward); err == nil {
		t.Fatal("dial with an untrusted client certificate accepted")
	}
	eventually(t, 5*time.Second, func() bool { return n1.counter(n1.metrics.handshake.WithLabelValues("in", "tls")) == 2 },
		"TLS refusals not counted: %v", handshakeCounts(n1))
	if n2.rec.count() != 1 || n1.rec.count() != 0 {
		t.Fatal("refused connections delivered traffic")
	}
}

func TestPerKeyLimiter(t *testing.T) {
	l := newPerKeyLimiter(time.Hour, 2)
	if !l.allow("a") || l.allow("a") {
		t.Fatal("a: want one event per period")
	}
	if !l.allow("b") {
		t.Fatal("b is another address: allowed at once")
	}
	if l.allow("c") {
		t.Fatal("over the bound with no expired entry: must not log (bounded memory)")
	}
	l.last["a"] = time.Now().Add(-2 * time.Hour)
	if !l.allow("c") || len(l.last) != 2 {
		t.Fatalf("expired entries must make room: %v", l.last)
	}
}

// TestPendingHandshakesBounded: connections that never finish the
// handshake hold at most maxPendingHandshakes slots; the rest are dropped
// at once and counted, and the port serves peers again once they are gone.
func TestPendingHandshakesBounded(t *testing.T) {
	n1 := startNode(t, "n1", nil, withConfig(func(c *Config) { c.HandshakeTimeout = 3 * time.Second }))
	var conns []net.Conn
	for range maxPendingHandshakes + 50 {
		c, err := net.DialTimeout("tcp", n1.clusterAddr(), time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	eventually(t, 5*time.Second, func() bool {
		return n1.counter(n1.metrics.handshake.WithLabelValues("in", "too_many_pending")) >= 50
	}, "excess handshakes not dropped: %v", handshakeCounts(n1))
	n1.mux.mu.Lock()
	pending := len(n1.mux.pending)
	n1.mux.mu.Unlock()
	if pending > maxPendingHandshakes {
		t.Fatalf("%d handshakes pending, bound %d", pending, maxPendingHandshakes)
	}
	for _, c := range conns {
		_ = c.Close()
	}
	eventually(t, 10*time.Second, func() bool {
		pc, err := intruder(t, nil).Dial(t.Context(), n1.clusterAddr(), ProtoForward)
		if err == nil {
			_ = pc.Close()
		}
		return err == nil
	}, "the port does not serve peers after the flood")
}
