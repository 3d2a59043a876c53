package node

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// TestRefusedDurablePublishIsAnsweredAtOnce: a QoS 1/2 message that cannot
// be stored durably (here: over the 1 MB replicated-size cap, retained or
// for a persistent subscriber) never leaves its publisher waiting. MQTT
// 3.1.1 cannot be told no: its connection is closed, so that the client
// reconnects and resends, instead of waiting for ever for a PUBACK (as
// mosquitto_pub did). MQTT 5 QoS 2 gets a PUBREC with 0x97, not the PUBACK
// mochi answered with.
func TestRefusedDurablePublishIsAnsweredAtOnce(t *testing.T) {
	tc := newTunedCluster(t, capDurable, "n1")
	tc.waitReady()
	addr := tc.nodes["n1"].Addr("mqtt")
	sub := testutil.Connect(t, addr, testutil.ClientOptions{ID: "big-sub", SessionExpiry: 600})
	sub.Sub(t, 1, "big/p")
	big := make([]byte, 2<<20)
	for _, tt := range []struct {
		name   string
		topic  string
		retain bool
	}{
		{"persistent subscriber", "big/p", false},
		{"retained", "big/r", true},
	} {
		t.Run("v311 qos1 "+tt.name, func(t *testing.T) {
			conn, _ := connect311(t, addr, "big-pub311", true)
			publish311(t, conn, tt.topic, 1, 7, tt.retain, big)
			_ = conn.SetReadDeadline(time.Now().Add(wait))
			b := make([]byte, 1)
			n, err := conn.Read(b)
			var ne net.Error
			switch {
			case n > 0:
				t.Fatalf("got a packet (type 0x%02x), want the connection closed", b[0])
			case errors.As(err, &ne) && ne.Timeout():
				t.Fatalf("connection still open after %v with the PUBLISH unacknowledged: the client would wait for ever", wait)
			case !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !errors.Is(err, os.ErrDeadlineExceeded):
				t.Logf("closed with %v", err) // a reset is a close too
			}
		})
		t.Run("v5 qos2 "+tt.name, func(t *testing.T) {
			c, _ := rawConnect(t, addr, "big-pub5", true, 0)
			cp := packets.NewControlPacket(packets.PUBLISH)
			p := cp.Content.(*packets.Publish)
			p.Topic, p.QoS, p.PacketID, p.Payload, p.Retain = tt.topic, 2, 9, big, tt.retain
			c.send(cp)
			ack := c.next()
			rec, ok := ack.Content.(*packets.Pubrec)
			if !ok || rec.PacketID != 9 || rec.ReasonCode != 0x97 {
				t.Fatalf("got %s, want PUBREC 0x97 for packet 9", ack)
			}
		})
	}
}

// publish311 writes an MQTT 3.1.1 PUBLISH.
func publish311(t *testing.T, conn net.Conn, topic string, qos byte, pid uint16, retain bool, payload []byte) {
	t.Helper()
	var body []byte
	body = binary.BigEndian.AppendUint16(body, uint16(len(topic)))
	body = append(body, topic...)
	if qos > 0 {
		body = binary.BigEndian.AppendUint16(body, pid)
	}
	body = append(body, payload...)
	hdr := 0x30 | qos<<1
	if retain {
		hdr |= 1
	}
	pkt := []byte{hdr}
	for n := len(body); ; {
		b := byte(n % 128)
		n /= 128
		if n > 0 {
			b |= 0x80
		}
		pkt = append(pkt, b)
		if n == 0 {
			break
		}
	}
	_ = conn.SetWriteDeadline(time.Now().Add(wait))
	if _, err := conn.Write(append(pkt, body...)); err != nil {
		t.Fatal(err)
	}
}

// capDurable sets --replicated-size-limit to 1 MB (by default it is the
// message size limit).
func capDurable(cfg *Config) { cfg.ReplicatedSizeLimit = 1 << 20 }
