package hooks

import (
	"errors"
	"io"

	"github.com/mochi-mqtt/server/v2/packets"
)

// MaxConnectSize is the largest remaining length accepted for a
// connection's first packet, before its CONNECT has been read: 384 KB. It
// fits any CONNECT whose client id, will topic, will payload, username and
// password are each at MQTT's 65,535-byte maximum (327,685 bytes with their
// length prefixes), with 64 KB to spare for the variable header and the
// CONNECT and will properties. message_size_limit applies instead when it
// is smaller.
//
// mochi allocates a packet's declared length as soon as it has read the
// fixed header, before the body arrives; with the default 256 MB
// message_size_limit, a few sockets each sending a 5-byte header held
// gigabytes. The guard therefore refuses a larger first packet from its
// header, and holds a smaller one back until all of it has arrived.
const MaxConnectSize = 384 << 10

// ErrRefusedBeforeConnect is the read error mochi gets for a connection
// whose first packet the guard refused; the connection is then closed.
var ErrRefusedBeforeConnect = errors.New("connection refused before CONNECT")

// Reasons a first packet is refused, as counted in
// broker_mqtt_packet_errors_total.
const (
	reasonNotConnect      = "not_connect"       // MQTT-3.1.0-1: the first packet must be CONNECT
	reasonConnectTooLarge = "connect_too_large" // over MaxConnectSize
	reasonTooLarge        = "too_large"         // over message_size_limit
	reasonMalformed       = "malformed"         // reserved flags set, or a fifth length byte
)

// maxFixedHeader is a type byte and a remaining length of at most 4 bytes.
const maxFixedHeader = 5

// firstPacket holds back a connection's first packet until all of it has
// arrived and its fixed header passed check. mochi then only ever sees a
// complete first packet, so the buffer it allocates from the header is
// never larger than what the client has actually sent, and before that the
// guard's own buffer grows with the bytes received, not the length claimed.
type firstPacket struct {
	buf  []byte // the bytes received so far
	need int    // fixed header plus remaining length, once the header is complete
	off  int    // bytes of buf already handed to the reader
	err  error  // a read error that came with the packet's last bytes, returned after them
	fail error  // set once the packet was refused: every later read returns it
}

func (f *firstPacket) complete() bool { return f.need > 0 && len(f.buf) >= f.need }

// fill reads more of the packet from r. Until the fixed header is complete
// it reads at most its 5 bytes, and afterwards never past the packet's end,
// so the next packets stay in the socket; the buffer at most doubles per
// read, from 4 KB, so it stays within twice what has been received.
func (f *firstPacket) fill(r io.Reader) error {
	if len(f.buf) == cap(f.buf) {
		want := maxFixedHeader
		if f.need > 0 {
			want = min(f.need, max(2*cap(f.buf), 4<<10))
		}
		nb := make([]byte, len(f.buf), want)
		copy(nb, f.buf)
		f.buf = nb
	}
	n, err := r.Read(f.buf[len(f.buf):cap(f.buf)])
	f.buf = f.buf[:len(f.buf)+n]
	return err
}

// check reads the fixed header in what has arrived. It returns the reason
// to refuse the connection, or ""; once the remaining length is complete it
// sets need. maxPacket is message_size_limit (0: none). The header is
// judged from its first byte on, so a refused packet is never read further
// than its fixed header.
func (f *firstPacket) check(maxPacket uint32) (reason string, declared int) {
	if len(f.buf) == 0 {
		return "", 0
	}
	if f.buf[0]>>4 != packets.Connect {
		return reasonNotConnect, 0
	}
	if f.buf[0]&0x0f != 0 {
		return reasonMalformed, 0 // MQTT-2.2.2-2: CONNECT's flags are reserved (0)
	}
	if f.need > 0 {
		return "", 0
	}
	rem, mult := 0, 1
	for i := 1; i < len(f.buf) && i < maxFixedHeader; i++ {
		b := f.buf[i]
		rem += int(b&0x7f) * mult
		mult *= 128
		if b&0x80 != 0 {
			continue
		}
		switch {
		case maxPacket > 0 && uint64(rem)+1 > uint64(maxPacket): // mochi's own test
			return reasonTooLarge, rem
		case rem > MaxConnectSize:
			return reasonConnectTooLarge, rem
		}
		f.need = 1 + i + rem
		return "", rem
	}
	if len(f.buf) >= maxFixedHeader {
		return reasonMalformed, 0 // a continuation bit on the fourth length byte
	}
	return "", 0
}
