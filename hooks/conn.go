package hooks

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// guardedConn is the net.Conn mochi sees for every client. It adds what
// mochi lacks at the socket level:
//
//   - a deadline for the first CONNECT: mochi sets no read deadline until
//     CONNECT has been read, so a socket that never speaks would be held
//     forever (and a flood of them would exhaust the node);
//   - the MQTT 5 DISCONNECT with reason 0x95 (Packet too large): mochi
//     rejects an over-size packet from its fixed header, before allocating
//     it, but only closes the socket. The guard follows the inbound byte
//     stream's packet framing, so when mochi closes the connection it knows
//     why and writes the DISCONNECT first.
type guardedConn struct {
	net.Conn
	guard ConnGuard

	scan packetScanner // touched only by Read, which mochi calls from one goroutine

	writeMu   sync.Mutex // serialises our DISCONNECT with mochi's whole-packet writes
	version   atomic.Uint32
	oversize  atomic.Bool
	malformed atomic.Bool
	firstDone atomic.Bool
	closeOnce sync.Once
}

func newGuardedConn(c net.Conn, g ConnGuard) *guardedConn {
	gc := &guardedConn{Conn: c, guard: g}
	if g.ConnectTimeout > 0 {
		// mochi replaces this with the keepalive deadline once CONNECT is in.
		_ = c.SetDeadline(time.Now().Add(g.ConnectTimeout))
	}
	return gc
}

// SetProtocolVersion records the client's protocol version once its CONNECT
// has been parsed, so Close knows whether a DISCONNECT is allowed.
func (c *guardedConn) SetProtocolVersion(v byte) { c.version.Store(uint32(v)) }

func (c *guardedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 && !c.scan.stopped {
		c.scan.feed(p[:n], c.guard.MaxPacketSize)
		if c.scan.packets > 0 {
			c.firstDone.Store(true)
		}
		if c.scan.oversize {
			c.oversize.Store(true)
		}
		if c.scan.malformed {
			c.malformed.Store(true)
		}
	}
	return n, err
}

func (c *guardedConn) Write(p []byte) (int, error) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	return c.Conn.Write(p)
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
		case c.malformed.Load() && !c.firstDone.Load():
			// Later malformed packets are counted by the metrics hook
			// from mochi's error; before CONNECT there is no session.
			m.packetError("malformed")
		case !c.firstDone.Load():
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
