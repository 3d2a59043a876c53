package node

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestPreConnectFloodBoundsHeap: sockets on every client listener (50 on
// TCP, 10 on TLS, 10 on WebSocket) each send the 5-byte fixed header of a
// CONNECT declaring 268,435,455 bytes, which the seed config's 256 MB
// message_size_limit lets past mochi's own check, and nothing more. mochi
// allocates a packet's declared length before it reads the body, so
// without the listeners' guard each socket pinned 256 MB (50 TCP sockets
// alone: the heap grew by 12.5 GB). With it, every socket is refused and
// closed from its header, the heap never grows by more than 64 MB, each
// refusal is counted, and an ordinary client still connects and publishes.
func TestPreConnectFloodBoundsHeap(t *testing.T) {
	const heapBound = 64 << 20
	cert, key, pool := selfSignedCert(t)
	tc := newTunedCluster(t, func(c *Config) {
		c.MaxPacketSize = 256 << 20
		c.WSAddr, c.TLSAddr, c.TLSCert, c.TLSKey = "127.0.0.1:0", "127.0.0.1:0", cert, key
	}, "n1")
	tc.waitReady()
	n := tc.nodes["n1"]

	header := []byte{0x10, 0xFF, 0xFF, 0xFF, 0x7F} // CONNECT, remaining length 268,435,455
	var closed atomic.Int64
	// watch counts c as closed once a read on it ends (the node closed it).
	watch := func(read func() error, closeFn func() error) {
		t.Cleanup(func() { _ = closeFn() })
		go func() {
			for read() == nil {
			}
			closed.Add(1)
		}()
	}
	base := heapAfterGC()
	flood := map[string]int{"mqtt": 50, "tls": 10, "ws": 10}
	for i := 0; i < flood["mqtt"]; i++ {
		c, err := net.DialTimeout("tcp", n.Addr("mqtt"), 5*time.Second)
		if err != nil {
			t.Fatalf("dial mqtt %d: %v", i, err)
		}
		if _, err := c.Write(header); err != nil {
			t.Fatalf("write header %d: %v", i, err)
		}
		watch(func() error { _, err := c.Read(make([]byte, 64)); return err }, c.Close)
	}
	for i := 0; i < flood["tls"]; i++ {
		d := &net.Dialer{Timeout: 5 * time.Second}
		c, err := tls.DialWithDialer(d, "tcp", n.Addr("tls"), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
		if err != nil {
			t.Fatalf("dial tls %d: %v", i, err)
		}
		if _, err := c.Write(header); err != nil {
			t.Fatalf("write header over tls %d: %v", i, err)
		}
		watch(func() error { _, err := c.Read(make([]byte, 64)); return err }, c.Close)
	}
	for i := 0; i < flood["ws"]; i++ {
		d := websocket.Dialer{Subprotocols: []string{"mqtt"}, HandshakeTimeout: 5 * time.Second}
		ws, _, err := d.Dial("ws://"+n.Addr("ws")+"/mqtt", nil)
		if err != nil {
			t.Fatalf("dial ws %d: %v", i, err)
		}
		if err := ws.WriteMessage(websocket.BinaryMessage, header); err != nil {
			t.Fatalf("write header over ws %d: %v", i, err)
		}
		watch(func() error { _, _, err := ws.NextReader(); return err }, ws.Close)
	}
	total := int64(flood["mqtt"] + flood["tls"] + flood["ws"])

	// Wait until the node has closed every socket, watching the heap all
	// along: it must never grow past the bound, closed or not.
	var peak uint64
	testutil.Eventually(t, wait, func() error {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		peak = max(peak, ms.HeapAlloc)
		if grown := int64(peak) - int64(base); grown > heapBound {
			t.Fatalf("heap grew by %d MB (bound %d MB) with %d of %d flooding sockets closed",
				grown>>20, heapBound>>20, closed.Load(), total)
		}
		if k := closed.Load(); k < total {
			return fmt.Errorf("%d of %d flooding sockets still open", total-k, total)
		}
		return nil
	})
	t.Logf("heap before %d MB, peak %d MB (grew %d KB)", base>>20, peak>>20, (int64(peak)-int64(base))>>10)

	if got := counterValue(t, n.reg, "broker_mqtt_packet_errors_total", "reason", "connect_too_large"); got != float64(total) {
		t.Errorf("packet_errors_total{reason=connect_too_large} = %v, want %d", got, total)
	}

	c := tc.client("n1", "after-flood")
	c.Sub(t, 1, "flood/ok")
	c.Pub(t, "flood/ok", 1, false, []byte("served"))
	if m := c.MustNext(t, wait); string(m.Payload) != "served" {
		t.Fatalf("got %q, want served", m.Payload)
	}
}

func heapAfterGC() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// counterValue sums the samples of the counter name whose label key has
// value val in reg.
func counterValue(t testing.TB, reg prometheus.Gatherer, name, key, val string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather metrics: %v", err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == key && l.GetValue() == val {
					sum += m.GetCounter().GetValue()
				}
			}
		}
	}
	return sum
}

// selfSignedCert writes a certificate for 127.0.0.1 and its key to files,
// and returns them with a pool that trusts the certificate.
func selfSignedCert(t testing.TB) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	for file, block := range map[string]*pem.Block{
		certFile: {Type: "CERTIFICATE", Bytes: der},
		keyFile:  {Type: "EC PRIVATE KEY", Bytes: kder},
	} {
		if err := os.WriteFile(file, pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}
