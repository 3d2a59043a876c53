package hooks

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/system"
	"github.com/prometheus/client_golang/prometheus"
)

func TestPacketScanner(t *testing.T) {
	connect := []byte{0x10, 0x0c, 0x00, 0x04, 'M', 'Q', 'T', 'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x00}
	ping := []byte{0xC0, 0x00}
	// PUBLISH with remaining length 200 (two length bytes: 0xC8 0x01).
	big := append([]byte{0x30, 0xC8, 0x01}, bytes.Repeat([]byte{'x'}, 200)...)
	cases := []struct {
		name         string
		stream       []byte
		max          uint32
		wantPackets  int
		wantOversize bool
	}{
		{"connect only", connect, 0, 1, false},
		{"connect and pings", append(append(append([]byte{}, connect...), ping...), ping...), 0, 3, false},
		{"partial connect", connect[:5], 0, 0, false},
		{"two-byte length under limit", append(append([]byte{}, connect...), big...), 1024, 2, false},
		{"over limit", append(append([]byte{}, connect...), big...), 100, 1, true},
		{"exactly at limit", append(append([]byte{}, connect...), big...), 201, 2, false},
		{"one over limit", append(append([]byte{}, connect...), big...), 200, 1, true},
	}
	for _, tc := range cases {
		// Every chunking must give the same answer: mochi reads through a
		// bufio.Reader, so packet boundaries never align with reads.
		for _, chunk := range []int{1, 2, 3, 7, len(tc.stream) + 1} {
			var s packetScanner
			for i := 0; i < len(tc.stream); i += chunk {
				s.feed(tc.stream[i:min(i+chunk, len(tc.stream))], tc.max)
			}
			if s.packets != tc.wantPackets || s.oversize != tc.wantOversize {
				t.Errorf("%s (chunk %d): packets=%d oversize=%v, want %d %v",
					tc.name, chunk, s.packets, s.oversize, tc.wantPackets, tc.wantOversize)
			}
		}
	}
}

func TestPacketScannerStopsOnMalformedLength(t *testing.T) {
	var s packetScanner
	s.feed([]byte{0x30, 0xff, 0xff, 0xff, 0xff, 0x01}, 0)
	if !s.stopped || !s.malformed || s.packets != 0 {
		t.Fatalf("stopped=%v packets=%d, want stopped with no packet", s.stopped, s.packets)
	}
}

// TestWriteStallClosesConnection: a write to a socket that takes nothing
// (a subscriber that stopped reading) fails after WriteStall and closes
// the connection, counted as write_stalled; one that takes its bytes
// slowly but steadily, a chunk at a time, is not cut off.
func TestWriteStallClosesConnection(t *testing.T) {
	const stall = 200 * time.Millisecond
	m := NewMetrics(prometheus.NewRegistry(), &system.Info{})
	server, client := net.Pipe() // unbuffered: a write waits for a read
	defer client.Close()
	gc := newGuardedConn(server, ConnGuard{WriteStall: stall, Metrics: m}, time.Now())
	start := time.Now()
	if _, err := gc.Write([]byte("nobody reads this")); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write to a reader that takes nothing: %v, want a deadline error", err)
	}
	if d := time.Since(start); d < stall/2 {
		t.Errorf("write gave up after %v, before half the stall (%v)", d, stall)
	}
	if _, err := client.Read(make([]byte, 1)); err == nil {
		t.Error("the stalled connection is still open")
	}
	if got := packetErrorCount(t, m, "write_stalled"); got != 1 {
		t.Errorf("write_stalled counted %v times, want 1", got)
	}

	server, client = net.Pipe()
	defer client.Close()
	gc = newGuardedConn(server, ConnGuard{WriteStall: stall, Metrics: m}, time.Now())
	// The reader takes one chunk per 60 ms: the whole write (5 chunks)
	// lasts longer than the stall, each chunk much less.
	go func() {
		buf := make([]byte, writeChunk)
		for {
			time.Sleep(60 * time.Millisecond)
			if _, err := io.ReadFull(client, buf); err != nil {
				return
			}
		}
	}()
	if _, err := gc.Write(make([]byte, 5*writeChunk)); err != nil {
		t.Fatalf("slow but steady reader: %v", err)
	}
}
