package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
)

const packetErrors = "broker_mqtt_packet_errors_total"

// maxPacketSize is the Maximum Packet Size of the client's CONNACK, or
// "absent".
func maxPacketSize(c *v5Client) string {
	if p := c.Connack.Properties; p != nil && p.MaximumPacketSize != nil {
		return fmt.Sprint(*p.MaximumPacketSize)
	}
	return "absent"
}

// publishV311 is a hand-made MQTT 3.1.1 QoS 0 PUBLISH.
func publishV311(topic string, payload []byte) []byte {
	var body bytes.Buffer
	body.Write([]byte{byte(len(topic) >> 8), byte(len(topic))})
	body.WriteString(topic)
	body.Write(payload)
	out := []byte{0x30}
	for n := body.Len(); ; {
		b := byte(n % 128)
		n /= 128
		if n > 0 {
			b |= 0x80
		}
		out = append(out, b)
		if n == 0 {
			break
		}
	}
	return append(out, body.Bytes()...)
}

// connectRawV311 dials addr, sends a 3.1.1 CONNECT and checks the CONNACK.
func connectRawV311(t testing.TB, addr, clientID string, keepalive uint16) net.Conn {
	t.Helper()
	conn := dialTCP(t, addr)
	t.Cleanup(func() { _ = conn.Close() })
	if _, err := conn.Write(connectV311(clientID, keepalive)); err != nil {
		t.Fatalf("write CONNECT: %v", err)
	}
	ack := make([]byte, 4)
	if err := conn.SetReadDeadline(time.Now().Add(msgTimeout)); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Read(ack); err != nil || !bytes.Equal(ack, []byte{0x20, 0x02, 0x00, 0x00}) {
		t.Fatalf("3.1.1 CONNACK: got % x (%v), want 20 02 00 00", ack, err)
	}
	return conn
}

// TestOversizePacket: with --message-size-limit 1KB the node advertises
// Maximum Packet Size 1024 in CONNACK, delivers a message that fits, and
// answers a 4 KB PUBLISH from an MQTT 5 client with DISCONNECT 0x95 and a
// closed socket (MQTT 3.1.1: a closed socket, no DISCONNECT). Nothing
// over-size is delivered, every case is counted, and the node keeps
// serving.
func TestOversizePacket(t *testing.T) {
	t.Parallel()
	b := startBroker(t, "--message-size-limit", "1KB")
	big := bytes.Repeat([]byte("x"), 4096)
	watcher := b.sub(t, "-q", "1", "-t", "e2e/size/#", "-C", "2")

	c := connectV5(t, b.MQTTAddr, v5Options{ClientID: "e2e-oversize-paho"})
	if got := maxPacketSize(c); got != "1024" {
		t.Errorf("CONNACK Maximum Packet Size = %s, want 1024: an MQTT 5 client cannot know the limit otherwise", got)
	}
	fits := strings.Repeat("f", 900)
	if rc := c.publish(t, "e2e/size/fits", 1, false, []byte(fits)); rc >= 0x80 {
		t.Fatalf("900-byte publish under a 1KB limit: PUBACK 0x%02X", rc)
	}

	t.Run("paho_v5", func(t *testing.T) {
		// The broker rejects the packet from its fixed header and closes
		// the connection, possibly before the client has written it all, so
		// the client's own write may fail: only the DISCONNECT matters.
		ctx, cancel := context.WithTimeout(context.Background(), msgTimeout)
		_, _ = c.Publish(ctx, &paho.Publish{Topic: "e2e/size/big", QoS: 0, Payload: big})
		cancel()
		select {
		case d := <-c.Disconnects:
			if d.ReasonCode != 0x95 {
				t.Errorf("DISCONNECT reason 0x%02X, want 0x95 (packet too large)", d.ReasonCode)
			}
		case <-time.After(msgTimeout):
			t.Fatalf("no DISCONNECT within %s after a 4 KB publish", msgTimeout)
		}
		select {
		case <-c.Done():
		case <-time.After(msgTimeout):
			t.Fatalf("connection still up %s after DISCONNECT 0x95", msgTimeout)
		}
	})

	t.Run("raw_v5", func(t *testing.T) {
		cp := packets.NewControlPacket(packets.CONNECT).Content.(*packets.Connect)
		cp.ClientID, cp.CleanStart, cp.KeepAlive = "e2e-oversize-raw", true, 30
		conn := rawConnectV5(t, b.MQTTAddr, cp)
		pub := packets.NewControlPacket(packets.PUBLISH)
		pub.Content.(*packets.Publish).Topic = "e2e/size/big"
		pub.Content.(*packets.Publish).Payload = big
		if _, err := pub.WriteTo(conn); err != nil {
			t.Fatalf("write 4 KB PUBLISH: %v", err)
		}
		p, err := readPacket(conn, msgTimeout)
		if err != nil {
			t.Fatalf("want DISCONNECT 0x95, got read error: %v", err)
		}
		d, ok := p.Content.(*packets.Disconnect)
		if !ok || d.ReasonCode != 0x95 {
			t.Fatalf("want DISCONNECT 0x95, got %s", p)
		}
		if r, err := readUntilClosed(conn, msgTimeout); err != nil || len(r.Data) > 0 {
			t.Fatalf("after DISCONNECT 0x95: %v, extra bytes % x", err, r.Data)
		}
	})

	t.Run("raw_v311", func(t *testing.T) {
		conn := connectRawV311(t, b.MQTTAddr, "e2e-oversize-v311", 30)
		if _, err := conn.Write(publishV311("e2e/size/big", big)); err != nil {
			t.Fatalf("write 4 KB PUBLISH: %v", err)
		}
		r, err := readUntilClosed(conn, msgTimeout)
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Data) > 0 {
			t.Errorf("MQTT 3.1.1 client got bytes % x before the close; 3.1.1 has no server DISCONNECT", r.Data)
		}
	})

	t.Run("mosquitto_pub", func(t *testing.T) {
		file := t.TempDir() + "/big"
		writeFile(t, file, string(big))
		b.pub(t, "-t", "e2e/size/big", "-f", file) // the exit status is mosquitto_pub's guess
	})

	b.mustPub(t, "-q", "1", "-t", "e2e/size/marker", "-m", "marker")
	assertMessages(t, watcher.wait(t), msg("e2e/size/fits", 1, false, fits), msg("e2e/size/marker", 1, false, "marker"))
	b.eventuallyMetric(t, 4, packetErrors, "reason", "too_large")
	b.assertServing(t)
}

// TestBadConnections: junk on the MQTT port, a connection that never sends
// CONNECT, one that stops half-way through it (--connect-timeout 1s), and
// an idle client past 1.5 x its 2 s keepalive are all closed by the server
// and counted by reason; a client that pings in time stays connected; the
// node keeps serving and its connection gauge returns to zero.
func TestBadConnections(t *testing.T) {
	t.Parallel()
	b := startBroker(t, "--connect-timeout", "1s")
	total := func(t *testing.T, want float64) {
		t.Helper()
		b.eventuallyMetric(t, want, packetErrors)
	}

	t.Run("malformed_length", func(t *testing.T) {
		conn := dialTCP(t, b.MQTTAddr)
		defer conn.Close()
		// A CONNECT whose remaining length has five continuation bytes.
		if _, err := conn.Write([]byte{0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01}); err != nil {
			t.Fatal(err)
		}
		if _, err := readUntilClosed(conn, 5*time.Second); err != nil {
			t.Fatal(err)
		}
		b.eventuallyMetric(t, 1, packetErrors, "reason", "malformed")
		if n := b.mustMetric(t, packetErrors, "reason", "no_connect"); n != 0 {
			t.Errorf("malformed CONNECT counted as no_connect (%v)", n)
		}
	})

	t.Run("http_request", func(t *testing.T) {
		conn := dialTCP(t, b.MQTTAddr)
		defer conn.Close()
		if _, err := fmt.Fprint(conn, "GET / HTTP/1.1\r\nHost: broker\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		if _, err := readUntilClosed(conn, 5*time.Second); err != nil {
			t.Fatal(err)
		}
		total(t, 2)
	})

	t.Run("never_connects", func(t *testing.T) {
		before := b.mustMetric(t, packetErrors, "reason", "no_connect")
		conn := dialTCP(t, b.MQTTAddr)
		defer conn.Close()
		r, err := readUntilClosed(conn, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if r.Elapsed < 900*time.Millisecond || r.Elapsed > 5*time.Second {
			t.Errorf("silent connection closed after %s, want about 1s (--connect-timeout)", r.Elapsed)
		}
		if len(r.Data) > 0 {
			t.Errorf("server sent % x to a connection that never sent CONNECT", r.Data)
		}
		b.eventuallyMetric(t, before+1, packetErrors, "reason", "no_connect")
	})

	t.Run("partial_connect", func(t *testing.T) {
		conn := dialTCP(t, b.MQTTAddr)
		defer conn.Close()
		if _, err := conn.Write(connectV311("e2e-partial", 30)[:5]); err != nil {
			t.Fatal(err)
		}
		r, err := readUntilClosed(conn, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if r.Elapsed > 5*time.Second {
			t.Errorf("half-sent CONNECT closed after %s, want about 1s (--connect-timeout)", r.Elapsed)
		}
		total(t, 4)
	})

	t.Run("keepalive", func(t *testing.T) {
		// A client that pings in time must survive the same period.
		alive := connectV5(t, b.MQTTAddr, v5Options{ClientID: "e2e-pinging", KeepAlive: 2})
		conn := connectRawV311(t, b.MQTTAddr, "e2e-idle", 2)
		r, err := readUntilClosed(conn, 15*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if r.Elapsed < 2*time.Second || r.Elapsed > 8*time.Second {
			t.Errorf("idle client (keepalive 2s) closed after %s, want about 3s", r.Elapsed)
		}
		if len(r.Data) > 0 {
			t.Errorf("idle MQTT 3.1.1 client got % x before the close; want a plain close", r.Data)
		}
		b.eventuallyMetric(t, 1, packetErrors, "reason", "keepalive_timeout")
		select {
		case <-alive.Done():
			t.Fatalf("a client pinging every 2s was disconnected too")
		default:
		}
		if rc := alive.publish(t, "e2e/keepalive/ok", 1, false, []byte("alive")); rc >= 0x80 {
			t.Errorf("pinging client: PUBACK 0x%02X", rc)
		}
		if err := alive.Disconnect(&paho.Disconnect{ReasonCode: 0}); err != nil {
			t.Errorf("disconnect: %v", err)
		}
	})

	total(t, 5)
	b.assertServing(t)
	b.eventuallyMetric(t, 0, "broker_mqtt_connections")
}

// TestDurablePublishOverReplicatedCap: a QoS 1 message larger than
// --replicated-size-limit for a persistent subscriber, or retained, is
// refused. The publisher must not be left waiting: mosquitto_pub with
// MQTT 3.1.1 sees its connection closed and exits (it used to wait for a
// PUBACK until killed), with MQTT 5 it gets "Quota exceeded" (0x97).
func TestDurablePublishOverReplicatedCap(t *testing.T) {
	t.Parallel()
	b := startBroker(t, "--replicated-size-limit", "1MB")
	sess := b.sub(t, "-i", "e2e-cap-sub", "-c", "-q", "1", "-t", "e2e/cap/p", "-E")
	sess.wait(t)
	file := t.TempDir() + "/3mb"
	writeFile(t, file, strings.Repeat("b", 3<<20))
	for _, args := range [][]string{
		{"-t", "e2e/cap/p"},       // for the persistent session
		{"-t", "e2e/cap/r", "-r"}, // retained
	} {
		args = append([]string{"-q", "1", "-f", file}, args...)
		r := b.pub(t, args...)
		if r.TimedOut || r.ExitCode == 0 {
			t.Fatalf("MQTT 3.1.1 publisher not told (closed connection, non-zero exit):\n%s", r)
		}
		r = b.pub(t, append([]string{"-V", "mqttv5"}, args...)...)
		if r.TimedOut || !strings.Contains(r.Stderr, "Quota exceeded") {
			t.Fatalf("MQTT 5 publisher not told 0x97:\n%s", r)
		}
	}
	b.assertServing(t)
}
