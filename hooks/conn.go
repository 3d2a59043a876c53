package hooks

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// guardedConn is the net.Conn mochi sees for every client. It adds what
// mochi lacks at the socket level:
//
//   - a deadline for the whole first packet: mochi sets no read deadline
//     until CONNECT has been read, so a socket that never speaks, or
//     trickles its CONNECT a byte at a time, would be held forever (and a
//     flood of them would exhaust the node). The deadline is fixed at
//     accept; bytes arriving do not extend it;
//   - a bound on memory before CONNECT (firstPacket): the first packet is
//     held back until complete, and refused from its fixed header when it
//     is not a CONNECT or is larger than MaxConnectSize, without reading
//     its body. After it the guard steps aside (c.first is nil);
//   - the MQTT 5 DISCONNECT with reason 0x95 (Packet too large): mochi
//     rejects an over-size packet from its fixed header, before allocating
//     it, but only closes the socket. The guard follows the inbound byte
//     stream's packet framing, so when mochi closes the connection it knows
//     why and writes the DISCONNECT first;
//   - a bound on a write that makes no progress (WriteStall): mochi's write
//     loop holds the client's lock while it writes, and every QoS 1/2
//     message to the client takes that lock, so a subscriber that stopped
//     reading (its socket full) stalled whoever delivered to it: all
//     messages forwarded from one peer node, or a local publisher's
//     acknowledgements, until keepalive reaped it (found by review). Such
//     a connection is closed after WriteStall without progress, as a dead
//     one would be.
type guardedConn struct {
	net.Conn
	guard ConnGuard

	// Touched only by Read, which mochi calls from one goroutine.
	first *firstPacket // nil once the first packet has been handed over
	scan  packetScanner

	writeMu   sync.Mutex // serialises our DISCONNECT with mochi's whole-packet writes
	writeSet  time.Time  // when Write last set the write deadline (WriteStall), under writeMu
	version   atomic.Uint32
	oversize  atomic.Bool
	firstDone atomic.Bool
	refused   atomic.Pointer[string] // why the first packet was refused
	closeOnce sync.Once
	// inRead: mochi's reader is blocked in Read. mochi reads through a
	// bufio.Reader and handles one packet at a time, so then every byte
	// the client sent before has been read and handled (WaitingForInput).
	inRead atomic.Bool
}

// WaitingForInput reports whether the connection's reader waits for the
// client: no packet it received is still being handled (or buffered).
// A takeover uses it to tell a live connection from one whose DISCONNECT
// is queued behind a slow packet (session_takeover.go).
func (c *guardedConn) WaitingForInput() bool { return c.inRead.Load() }

// newGuardedConn wraps c, accepted at the given time: the first packet must
// be complete within ConnectTimeout of it.
func newGuardedConn(c net.Conn, g ConnGuard, accepted time.Time) *guardedConn {
	gc := &guardedConn{Conn: c, guard: g, first: &firstPacket{}}
	if g.ConnectTimeout > 0 {
		// mochi replaces this with the keepalive deadline once CONNECT is in.
		_ = c.SetDeadline(accepted.Add(g.ConnectTimeout))
	}
	return gc
}

// SetProtocolVersion records the client's protocol version once its CONNECT
// has been parsed, so Close knows whether a DISCONNECT is allowed.
func (c *guardedConn) SetProtocolVersion(v byte) { c.version.Store(uint32(v)) }

func (c *guardedConn) Read(p []byte) (int, error) {
	c.inRead.Store(true)
	defer c.inRead.Store(false)
	if c.first != nil {
		return c.readFirst(p)
	}
	n, err := c.Conn.Read(p)
	if n > 0 && !c.scan.stopped {
		c.scanned(p[:n])
	}
	return n, err
}

// readFirst reads until the first packet is complete (or refused), then
// hands it over; once all of it has been, the guard steps aside.
func (c *guardedConn) readFirst(p []byte) (int, error) {
	f := c.first
	if f.fail != nil {
		return 0, f.fail
	}
	for !f.complete() {
		if f.err != nil {
			return 0, f.err
		}
		f.err = f.fill(c.Conn)
		if reason, declared := f.check(c.guard.MaxPacketSize); reason != "" {
			c.refuse(reason, declared, f.buf[0])
			f.fail = fmt.Errorf("%w: %s", ErrRefusedBeforeConnect, reason)
			f.buf = nil
			return 0, f.fail
		}
	}
	n := copy(p, f.buf[f.off:])
	f.off += n
	c.scanned(p[:n])
	if f.off < len(f.buf) {
		return n, nil
	}
	c.first = nil
	c.firstDone.Store(true)
	return n, f.err
}

func (c *guardedConn) scanned(p []byte) {
	c.scan.feed(p, c.guard.MaxPacketSize)
	if c.scan.oversize {
		c.oversize.Store(true)
	}
}

// refuse records why the first packet was refused, for Close to count,
// and logs it (the guard's logger is rate-limited).
func (c *guardedConn) refuse(reason string, declared int, first byte) {
	c.refused.Store(&reason)
	if log := c.guard.Log; log != nil {
		log.Warn("connection refused before CONNECT", "reason", reason, "remote", c.RemoteAddr().String(),
			"packet_type", first>>4, "remaining_length", declared, "max_connect_size", MaxConnectSize)
	}
}

// writeChunk bounds each write under WriteStall: a client must take at
// least this much per WriteStall (a TLS record's worth, about 1.6 KB/s at
// 10 s), so that a large packet going out slowly but steadily is not
// taken for a stalled reader.
const writeChunk = 16 << 10

// SetDeadline: mochi sets the read and write deadlines together before
// every packet it reads (its keepalive: now + 1.5 × keepalive, or none for
// keepalive 0), which would move or clear the deadline of a write that is
// blocked meanwhile (found by review: a stuck subscriber that still
// published was never cut off). Under WriteStall the write deadline is
// Write's own.
func (c *guardedConn) SetDeadline(t time.Time) error {
	if c.guard.WriteStall > 0 {
		return c.Conn.SetReadDeadline(t)
	}
	return c.Conn.SetDeadline(t)
}

func (c *guardedConn) Write(p []byte) (int, error) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	stall := c.guard.WriteStall
	if stall <= 0 {
		return c.Conn.Write(p)
	}
	n := 0
	for n < len(p) {
		// Each chunk gets at least 7/8 of the stall: moving the deadline
		// costs a timer update, so not for every write.
		if now := time.Now(); now.Sub(c.writeSet) >= stall/8 {
			c.writeSet = now
			_ = c.Conn.SetWriteDeadline(now.Add(stall))
		}
		k, err := c.Conn.Write(p[n:min(len(p), n+writeChunk)])
		n += k
		if err != nil {
			// gorilla/websocket reports a deadline as its own net.Error
			// (Timeout true), not wrapping os.ErrDeadlineExceeded.
			var ne net.Error
			if errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout() {
				c.writeStalled()
			}
			return n, err
		}
	}
	return n, nil
}

// writeStalled closes a connection whose socket took nothing for
// WriteStall: mochi then ends the client as if the connection had dropped
// (its will is published). mochi's later Close is a no-op.
func (c *guardedConn) writeStalled() {
	c.guard.Metrics.packetError("write_stalled")
	if log := c.guard.Log; log != nil {
		log.Warn("client connection closed: it took no data for the write stall timeout",
			"remote", c.RemoteAddr().String(), "write_timeout", c.guard.WriteStall)
	}
	_ = c.Conn.Close()
}

func (c *guardedConn) Close() error {
	var err error
	c.closeOnce.Do(func() {
		m := c.guard.Metrics
		switch {
		case c.oversize.Load():
			m.packetError("too_large")
			if c.version.Load() == 5 {
				c.writeMu.Lock()
				_ = c.Conn.SetWriteDeadline(time.Now().Add(time.Second))
				// DISCONNECT, remaining length 2, reason 0x95, no properties.
				_, _ = c.Conn.Write([]byte{0xE0, 0x02, 0x95, 0x00})
				c.writeMu.Unlock()
			}
			c.lingerClose()
		case c.refused.Load() != nil:
			m.packetError(*c.refused.Load())
		case !c.firstDone.Load():
			// Timed out, or closed, before a first packet was complete.
			m.packetError("no_connect")
		}
		err = c.Conn.Close()
	})
	return err
}

// lingerClose half-closes and discards what the client is still sending
// (the rest of the over-size packet) for a moment before the socket is
// closed: closing with unread input makes the kernel send RST, which can
// destroy the DISCONNECT in flight before the client reads it.
func (c *guardedConn) lingerClose() {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	_ = c.Conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	_, _ = io.CopyN(io.Discard, c.Conn, 1<<20)
}

// packetScanner follows MQTT fixed-header framing over a byte stream without
// buffering: a type byte, a 1-4 byte variable length, then that many bytes.
type packetScanner struct {
	state     uint8 // 0: type byte next, 1: length bytes, 2: body
	lenBytes  uint8
	mult      uint32
	remaining uint32
	packets   int
	oversize  bool
	malformed bool
	stopped   bool // framing lost or limit hit: mochi closes the connection anyway
}

func (s *packetScanner) feed(p []byte, max uint32) {
	for i := 0; i < len(p) && !s.stopped; {
		switch s.state {
		case 0:
			s.state, s.lenBytes, s.mult, s.remaining = 1, 0, 1, 0
			i++
		case 1:
			b := p[i]
			i++
			s.remaining += uint32(b&0x7f) * s.mult
			s.mult *= 128
			s.lenBytes++
			switch {
			case b&0x80 != 0 && s.lenBytes == 4:
				s.malformed, s.stopped = true, true // mochi rejects it too
			case b&0x80 != 0:
			case max > 0 && s.remaining+1 > max: // the same test mochi applies
				s.oversize, s.stopped = true, true
			case s.remaining == 0:
				s.complete()
			default:
				s.state = 2
			}
		case 2:
			n := uint32(len(p) - i)
			if n > s.remaining {
				n = s.remaining
			}
			i += int(n)
			s.remaining -= n
			if s.remaining == 0 {
				s.complete()
			}
		}
	}
}

func (s *packetScanner) complete() {
	s.state = 0
	if s.packets < 1<<30 {
		s.packets++
	}
}
