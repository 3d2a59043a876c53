package hooks

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	paho "github.com/eclipse/paho.golang/packets"
	mochi "github.com/mochi-mqtt/server/v2/packets"
	"github.com/mochi-mqtt/server/v2/system"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// streamConn is a net.Conn that serves a fixed byte stream, at most chunk
// bytes per Read (0: as many as asked), and records what was read.
type streamConn struct {
	net.Conn // nil: only what the guard calls is implemented
	data     []byte
	chunk    int
	consumed int
	lastBuf  *byte // the first byte of the buffer the last Read was given
}

func (c *streamConn) Read(p []byte) (int, error) {
	if c.consumed == len(c.data) {
		return 0, io.EOF
	}
	if len(p) > 0 {
		c.lastBuf = &p[0]
	}
	if c.chunk > 0 && len(p) > c.chunk {
		p = p[:c.chunk]
	}
	n := copy(p, c.data[c.consumed:])
	c.consumed += n
	return n, nil
}

func (c *streamConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *streamConn) Close() error                     { return nil }
func (c *streamConn) RemoteAddr() net.Addr             { return &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 1} }
func (c *streamConn) SetDeadline(time.Time) error      { return nil }
func (c *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }

// recordHandler keeps the messages and "reason" attributes logged to it.
type recordHandler struct {
	mu      sync.Mutex
	reasons []string
}

func (h *recordHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "reason" {
			h.reasons = append(h.reasons, a.Value.String())
		}
		return true
	})
	return nil
}
func (h *recordHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *recordHandler) WithGroup(string) slog.Handler      { return h }

// packetErrorCount reads broker_mqtt_packet_errors_total{reason}.
func packetErrorCount(t *testing.T, m *Metrics, reason string) float64 {
	t.Helper()
	var d dto.Metric
	if err := m.packetErrors.WithLabelValues(reason).Write(&d); err != nil {
		t.Fatal(err)
	}
	return d.GetCounter().GetValue()
}

// remainingLength encodes n as MQTT's variable byte integer.
func remainingLength(n int) []byte {
	var out []byte
	for {
		b := byte(n % 128)
		n /= 128
		if n > 0 {
			b |= 0x80
		}
		out = append(out, b)
		if n == 0 {
			return out
		}
	}
}

// header is a fixed header: the type byte, then the remaining length.
func header(typ byte, remaining int) []byte {
	return append([]byte{typ}, remainingLength(remaining)...)
}

// readLikeMochi reads the stream through gc the way mochi does (a 1 KB
// bufio.Reader, then io.ReadFull of each body) until an error, and returns
// what it got.
func readLikeMochi(gc net.Conn) ([]byte, error) {
	var out bytes.Buffer
	_, err := io.Copy(&out, bufio.NewReaderSize(gc, 1024))
	return out.Bytes(), err
}

// TestFirstPacketRefusedFromHeader: a first packet that is not a CONNECT,
// is larger than MaxConnectSize (or message_size_limit), or has a
// malformed fixed header is refused before anything past its fixed header
// is read from the socket (at most 5 bytes), however the header is split
// across reads; the reader gets ErrRefusedBeforeConnect and no byte; the
// refusal is logged and counted by reason when the connection is closed.
func TestFirstPacketRefusedFromHeader(t *testing.T) {
	body := bytes.Repeat([]byte{'x'}, 4096)
	cases := []struct {
		name      string
		stream    []byte
		maxPacket uint32
		reason    string
	}{
		{"connect declaring 256 MB", []byte{0x10, 0xFF, 0xFF, 0xFF, 0x7F}, 256 << 20, reasonConnectTooLarge},
		{"connect one byte over MaxConnectSize", append(header(0x10, MaxConnectSize+1), body...), 0, reasonConnectTooLarge},
		{"connect over message_size_limit", append(header(0x10, 2000), body...), 1024, reasonTooLarge},
		{"publish first", append(header(0x30, 200), body...), 0, reasonNotConnect},
		{"publish declaring 256 MB", []byte{0x30, 0xFF, 0xFF, 0xFF, 0x7F}, 256 << 20, reasonNotConnect},
		{"pingreq first", append([]byte{0xC0, 0x00}, body...), 0, reasonNotConnect},
		{"http request", []byte("GET / HTTP/1.1\r\nHost: broker\r\n\r\n"), 0, reasonNotConnect},
		{"connect with reserved flags", append(header(0x12, 100), body...), 0, reasonMalformed},
		{"fifth length byte", append([]byte{0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01}, body...), 0, reasonMalformed},
	}
	for _, tc := range cases {
		for _, chunk := range []int{1, 2, 3, 0} {
			reg := prometheus.NewRegistry()
			m := NewMetrics(reg, &system.Info{})
			logs := &recordHandler{}
			sc := &streamConn{data: tc.stream, chunk: chunk}
			gc := newGuardedConn(sc, ConnGuard{MaxPacketSize: tc.maxPacket, Metrics: m, Log: slog.New(logs)}, time.Now())

			got, err := readLikeMochi(gc)
			if !errors.Is(err, ErrRefusedBeforeConnect) || !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("%s (chunk %d): read error %v, want %v (%s)", tc.name, chunk, err, ErrRefusedBeforeConnect, tc.reason)
			}
			if len(got) != 0 {
				t.Errorf("%s (chunk %d): %d bytes handed to the reader, want none", tc.name, chunk, len(got))
			}
			if sc.consumed > maxFixedHeader {
				t.Errorf("%s (chunk %d): %d bytes read from the socket, want at most the 5 of a fixed header", tc.name, chunk, sc.consumed)
			}
			if _, err := gc.Read(make([]byte, 10)); !errors.Is(err, ErrRefusedBeforeConnect) {
				t.Errorf("%s (chunk %d): a read after the refusal: %v, want the refusal again", tc.name, chunk, err)
			}
			_ = gc.Close()
			if n := packetErrorCount(t, m, tc.reason); n != 1 {
				t.Errorf("%s (chunk %d): packet_errors_total{reason=%s} = %v, want 1", tc.name, chunk, tc.reason, n)
			}
			if n := packetErrorCount(t, m, "no_connect"); n != 0 {
				t.Errorf("%s (chunk %d): also counted as no_connect", tc.name, chunk)
			}
			if len(logs.reasons) != 1 || logs.reasons[0] != tc.reason {
				t.Errorf("%s (chunk %d): logged reasons %v, want [%s]", tc.name, chunk, logs.reasons, tc.reason)
			}
		}
	}
}

// largestConnect is a legal MQTT 5 CONNECT whose client id, will topic,
// will payload, username and password are each 65,535 bytes (MQTT's
// maximum), with about 60 KB of CONNECT and will properties.
func largestConnect(t *testing.T) []byte {
	t.Helper()
	cp := paho.NewControlPacket(paho.CONNECT)
	c := cp.Content.(*paho.Connect)
	max := func(b byte) string { return strings.Repeat(string(b), 65535) }
	c.ClientID, c.CleanStart, c.KeepAlive = max('c'), true, 30
	c.WillFlag, c.WillQOS, c.WillTopic, c.WillMessage = true, 1, max('t'), []byte(max('w'))
	c.UsernameFlag, c.Username = true, max('u')
	c.PasswordFlag, c.Password = true, []byte(max('p'))
	expiry := uint32(3600)
	c.Properties = &paho.Properties{
		SessionExpiryInterval: &expiry,
		User:                  []paho.User{{Key: "origin", Value: strings.Repeat("o", 20000)}},
		AuthMethod:            "none",
	}
	c.WillProperties = &paho.Properties{
		ContentType:     "text/plain",
		ResponseTopic:   strings.Repeat("r", 20000),
		CorrelationData: bytes.Repeat([]byte{'d'}, 20000),
	}
	var b bytes.Buffer
	if _, err := cp.WriteTo(&b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestFirstPacketLegalLargeConnectPasses: the largest CONNECT MaxConnectSize
// is meant for passes unchanged, however it is split across reads, with
// the packets pipelined after it; mochi's decoder accepts it; and once it
// has been handed over the guard steps aside: later reads go straight into
// the caller's buffer. A CONNECT exactly at MaxConnectSize passes too.
func TestFirstPacketLegalLargeConnectPasses(t *testing.T) {
	connect := largestConnect(t)
	rem := len(connect) - 1 - len(remainingLength(MaxConnectSize))
	if rem > MaxConnectSize {
		t.Fatalf("the largest legal CONNECT has remaining length %d, over MaxConnectSize %d", rem, MaxConnectSize)
	}
	t.Logf("largest CONNECT: %d bytes (MaxConnectSize %d)", len(connect), MaxConnectSize)

	// It is the CONNECT it claims to be.
	var fh mochi.FixedHeader
	if err := fh.Decode(connect[0]); err != nil {
		t.Fatal(err)
	}
	hdr := 1 + len(remainingLength(rem))
	pk := mochi.Packet{FixedHeader: fh}
	if err := pk.ConnectDecode(connect[hdr:]); err != nil {
		t.Fatalf("mochi refuses the test's CONNECT: %v", err)
	}
	if len(pk.Connect.WillPayload) != 65535 || len(pk.Connect.Password) != 65535 || len(pk.Connect.ClientIdentifier) != 65535 {
		t.Fatalf("decoded will %d, password %d, client id %d bytes; want 65535 each",
			len(pk.Connect.WillPayload), len(pk.Connect.Password), len(pk.Connect.ClientIdentifier))
	}

	atLimit := append(header(0x10, MaxConnectSize), make([]byte, MaxConnectSize)...)
	ping := []byte{0xC0, 0x00}
	for name, first := range map[string][]byte{"largest legal": connect, "exactly MaxConnectSize": atLimit} {
		stream := append(append(append([]byte{}, first...), ping...), ping...)
		for _, chunk := range []int{1, 7, 1500, 0} {
			sc := &streamConn{data: stream, chunk: chunk}
			gc := newGuardedConn(sc, ConnGuard{MaxPacketSize: 256 << 20}, time.Now())
			got, err := readLikeMochi(gc)
			if err != nil || !bytes.Equal(got, stream) {
				t.Fatalf("%s (chunk %d): read %d of %d bytes (equal %v), error %v",
					name, chunk, len(got), len(stream), bytes.Equal(got, stream), err)
			}
			if gc.first != nil || !gc.firstDone.Load() || gc.refused.Load() != nil {
				t.Fatalf("%s (chunk %d): the guard did not step aside after the first packet", name, chunk)
			}
			if gc.scan.packets != 3 {
				t.Fatalf("%s (chunk %d): framing followed %d packets, want 3", name, chunk, gc.scan.packets)
			}
		}
	}

	// After the first packet a read is the socket's read, into the
	// caller's buffer: no copy.
	sc := &streamConn{data: append(append([]byte{}, connect...), bytes.Repeat(ping, 100)...)}
	gc := newGuardedConn(sc, ConnGuard{}, time.Now())
	if _, err := io.ReadFull(gc, make([]byte, len(connect))); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 64)
	if n, err := gc.Read(p); err != nil || n != len(p) || sc.lastBuf != &p[0] {
		t.Fatalf("read after CONNECT: n=%d err=%v, into the caller's buffer: %v", n, err, sc.lastBuf == &p[0])
	}
}

// TestFirstPacketBufferFollowsBytesReceived: a CONNECT header declaring
// MaxConnectSize costs the guard what the client has actually sent (at
// most twice that, from 4 KB), not the length it declares, and nothing of
// it reaches mochi before the packet is complete.
func TestFirstPacketBufferFollowsBytesReceived(t *testing.T) {
	for _, sent := range []int{0, 100, 10 << 10, 100 << 10} {
		hdr := header(0x10, MaxConnectSize)
		sc := &streamConn{data: append(hdr, make([]byte, sent)...)}
		gc := newGuardedConn(sc, ConnGuard{}, time.Now())
		got, err := readLikeMochi(gc) // the stream ends before the packet does
		if err != nil || len(got) != 0 {
			t.Fatalf("sent %d: %d bytes handed over (error %v), want none", sent, len(got), err)
		}
		if c, bound := cap(gc.first.buf), max(2*(len(hdr)+sent), 4<<10); c > bound {
			t.Errorf("sent %d of a declared %d: guard buffer %d bytes, want at most %d", sent, MaxConnectSize, c, bound)
		}
	}
}

// TestFirstPacketDeadline: the connect timeout covers the whole first
// packet from accept: a client trickling a CONNECT one byte every 100 ms
// (1 s of it would take 100 s) is cut off at 10 s with the deadline error,
// nothing handed to mochi, and counted as no_connect; the same trickle of
// a 30-byte CONNECT completes in 3 s and passes.
func TestFirstPacketDeadline(t *testing.T) {
	const timeout = 10 * time.Second
	trickle := func(w net.Conn, data []byte) {
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for i := range data {
			<-tick.C
			if _, err := w.Write(data[i : i+1]); err != nil {
				return // the guard closed the connection
			}
		}
	}
	t.Run("cut_at_deadline", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			server, client := net.Pipe()
			m := NewMetrics(prometheus.NewRegistry(), &system.Info{})
			start := time.Now()
			gc := newGuardedConn(server, ConnGuard{ConnectTimeout: timeout, Metrics: m}, start)
			done := make(chan struct{})
			go func() {
				defer close(done)
				trickle(client, append(header(0x10, 1000), make([]byte, 1000)...))
			}()

			got, err := readLikeMochi(gc)
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("read error %v, want the deadline", err)
			}
			if elapsed := time.Since(start); elapsed != timeout {
				t.Errorf("cut after %s, want %s", elapsed, timeout)
			}
			if len(got) != 0 {
				t.Errorf("%d bytes handed over before the deadline, want none", len(got))
			}
			_ = gc.Close()
			<-done // its next write fails
			_ = client.Close()
			if n := packetErrorCount(t, m, "no_connect"); n != 1 {
				t.Errorf("no_connect = %v, want 1", n)
			}
		})
	})
	t.Run("slow_but_in_time", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			server, client := net.Pipe()
			connect := []byte{0x10, 0x1C, 0x00, 0x04, 'M', 'Q', 'T', 'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x10}
			connect = append(connect, []byte("slow-but-in-time")...)
			gc := newGuardedConn(server, ConnGuard{ConnectTimeout: timeout}, time.Now())
			done := make(chan struct{})
			go func() {
				defer close(done)
				trickle(client, connect)
				_ = client.Close()
			}()
			got, err := readLikeMochi(gc)
			if err != nil || !bytes.Equal(got, connect) {
				t.Errorf("got % x (%v), want the CONNECT", got, err)
			}
			<-done
			_ = gc.Close()
		})
	})
}

// BenchmarkGuardedConnRead compares reading a stream of 1 KB PUBLISH
// packets (after CONNECT) from the socket directly and through the guard.
func BenchmarkGuardedConnRead(b *testing.B) {
	pub := append(header(0x30, 1021), make([]byte, 1021)...)
	stream := bytes.Repeat(pub, 64)
	buf := make([]byte, 4096)
	read := func(b *testing.B, c net.Conn, sc *streamConn) {
		b.SetBytes(int64(len(stream)))
		for b.Loop() {
			sc.consumed = 0
			for {
				if _, err := c.Read(buf); err != nil {
					break
				}
			}
		}
	}
	b.Run("bare", func(b *testing.B) {
		sc := &streamConn{data: stream}
		read(b, sc, sc)
	})
	b.Run("guarded", func(b *testing.B) {
		sc := &streamConn{data: stream}
		gc := newGuardedConn(sc, ConnGuard{MaxPacketSize: 256 << 20}, time.Now())
		gc.first, gc.scan.packets = nil, 1 // CONNECT has been handed over
		read(b, gc, sc)
	})
}
