package hooks

import (
	"bytes"
	"testing"
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
