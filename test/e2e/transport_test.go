package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"strings"
	"testing"

	"github.com/eclipse/paho.golang/paho"
	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestTLS: the --tls-addr listener with a certificate from a CA the test
// generates. mosquitto_pub/mosquitto_sub with --cafile talk MQTT 3.1.1 and
// 5 over it (and meet plain-TCP clients on the same node); an untrusted CA
// and plain MQTT on the TLS port fail. With --tls-client-ca a client
// certificate from that CA is required: none, or one from another CA, is
// refused.
func TestTLS(t *testing.T) {
	t.Parallel()
	pki := testutil.NewPKI(t)

	t.Run("server_auth", func(t *testing.T) {
		t.Parallel()
		tlsAddr := freeAddr(t)
		b := startBroker(t, "--tls-addr", tlsAddr, "--tls-cert", pki.ServerCert, "--tls-key", pki.ServerKey)
		tlsHost := []string{"-h", "127.0.0.1", "-p", portOf(tlsAddr), "--cafile", pki.CAFile}

		// The node presents the certificate the test issued.
		pool := x509.NewCertPool()
		caPEM, err := os.ReadFile(pki.CAFile)
		if err != nil {
			t.Fatal(err)
		}
		pool.AppendCertsFromPEM(caPEM)
		conn, err := tls.Dial("tcp", tlsAddr, &tls.Config{RootCAs: pool, ServerName: "localhost"})
		if err != nil {
			t.Fatalf("Go TLS handshake with %s: %v", tlsAddr, err)
		}
		if cn := conn.ConnectionState().PeerCertificates[0].Subject.CommonName; cn != "localhost" {
			t.Errorf("server certificate CN %q, want localhost", cn)
		}
		_ = conn.Close()

		for _, v := range mqttVersions {
			topic := "e2e/tls/" + v
			s := startSub(t, tlsHost, "-V", v, "-q", "1", "-t", topic, "-C", "2")
			mustSucceed(t, mosquittoPub(t, "", append(tlsHost, "-V", v, "-q", "1", "-t", topic, "-m", "over tls")...))
			b.mustPub(t, "-q", "1", "-t", topic, "-m", "over plain tcp")
			assertMessages(t, s.wait(t), msg(topic, 1, false, "over tls"), msg(topic, 1, false, "over plain tcp"))
		}

		r := mosquittoPub(t, "", "-h", "127.0.0.1", "-p", portOf(tlsAddr), "--cafile", pki.OtherCAFile, "-t", "e2e/tls/x", "-m", "x")
		if r.ExitCode == 0 {
			t.Errorf("a server certificate from an untrusted CA was accepted:\n%s", r)
		}
		r = mosquittoPub(t, "", "-h", "127.0.0.1", "-p", portOf(tlsAddr), "-q", "1", "-t", "e2e/tls/x", "-m", "x")
		if r.ExitCode == 0 {
			t.Errorf("plain MQTT on the TLS port succeeded:\n%s", r)
		}
		b.assertServing(t)
	})

	t.Run("mutual", func(t *testing.T) {
		t.Parallel()
		tlsAddr := freeAddr(t)
		b := startBroker(t, "--tls-addr", tlsAddr, "--tls-cert", pki.ServerCert, "--tls-key", pki.ServerKey,
			"--tls-client-ca", pki.CAFile)
		tlsHost := []string{"-h", "127.0.0.1", "-p", portOf(tlsAddr), "--cafile", pki.CAFile}
		withCert := append(append([]string{}, tlsHost...), "--cert", pki.ClientCert, "--key", pki.ClientKey)
		topic := "e2e/mtls"
		s := startSub(t, withCert, "-q", "1", "-t", topic, "-C", "1")

		for name, args := range map[string][]string{
			"no client certificate":            tlsHost,
			"certificate from an untrusted CA": append(append([]string{}, tlsHost...), "--cert", pki.OtherClientCert, "--key", pki.OtherClientKey),
		} {
			r := mosquittoPub(t, "", append(args, "-q", "1", "-t", topic, "-m", "must not arrive")...)
			if r.ExitCode == 0 {
				t.Errorf("%s: publish succeeded:\n%s", name, r)
			}
		}
		mustSucceed(t, mosquittoPub(t, "", append(withCert, "-q", "1", "-t", topic, "-m", "with client cert")...))
		// Anything refused above that got through would arrive first.
		assertMessages(t, s.wait(t), msg(topic, 1, false, "with client cert"))
		b.assertServing(t) // the plain listener needs no client certificate
	})
}

// TestWebSocket: a paho.golang MQTT 5 client over ws:// (subprotocol
// "mqtt", path /mqtt) subscribes and publishes, and exchanges messages
// with mosquitto clients on the TCP listener, including a 64 KB payload
// that spans many websocket frames.
func TestWebSocket(t *testing.T) {
	t.Parallel()
	wsAddr := freeAddr(t)
	b := startBroker(t, "--ws-addr", wsAddr)

	c, err := connectV5Conn(t, dialWS(t, "ws://"+wsAddr+"/mqtt"), v5Options{ClientID: "e2e-ws"})
	if err != nil {
		t.Fatalf("MQTT 5 connect over websocket: %v", err)
	}
	if got := c.subscribe(t, paho.SubscribeOptions{Topic: "e2e/ws/#", QoS: 1}); string(got) != "\x01" {
		t.Fatalf("SUBACK over websocket % x, want 01", got)
	}

	tcpSub := b.sub(t, "-q", "1", "-t", "e2e/ws/from-ws", "-C", "1")
	if rc := c.publish(t, "e2e/ws/from-ws", 1, false, []byte("hello over websocket")); rc >= 0x80 {
		t.Fatalf("PUBACK over websocket 0x%02X", rc)
	}
	c.expect(t, msg("e2e/ws/from-ws", 1, false, "hello over websocket"))
	assertMessages(t, tcpSub.wait(t), msg("e2e/ws/from-ws", 1, false, "hello over websocket"))

	b.mustPub(t, "-q", "1", "-t", "e2e/ws/from-tcp", "-m", "hello from tcp")
	c.expect(t, msg("e2e/ws/from-tcp", 1, false, "hello from tcp"))

	big := strings.Repeat("0123456789abcdef", 4096)
	if rc := c.publish(t, "e2e/ws/big", 1, false, []byte(big)); rc >= 0x80 {
		t.Fatalf("PUBACK for 64 KB over websocket 0x%02X", rc)
	}
	if got := c.next(t); got.Topic != "e2e/ws/big" || got.Payload != big {
		t.Fatalf("64 KB over websocket: got topic %q with %d bytes, want e2e/ws/big with %d identical bytes",
			got.Topic, len(got.Payload), len(big))
	}
}
