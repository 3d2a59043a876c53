package replication

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
)

// The wire primitives shared by commands, snapshots and the forwarding RPC.
// Hand-written rather than msgpack so that the bytes are exactly what the
// golden tests pin down, decoding allocates only what it keeps, and a
// corrupt entry is detected (every length is checked, trailing bytes are an
// error) instead of decoding into something plausible.
//
//	uvarint  encoding/binary unsigned varint
//	varint   encoding/binary zig-zag varint
//	str      uvarint length | bytes
//	bytes    uvarint length | bytes
//	u8       one byte

// errCorrupt is wrapped by every decoding error.
var errCorrupt = errors.New("corrupt encoding")

func appendUvarint(b []byte, v uint64) []byte { return binary.AppendUvarint(b, v) }

func appendVarint(b []byte, v int64) []byte { return binary.AppendVarint(b, v) }

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendBytes(b []byte, p []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(p)))
	return append(b, p...)
}

func appendBool(b []byte, v bool) []byte {
	if v {
		return append(b, 1)
	}
	return append(b, 0)
}

// reader decodes the primitives above. The first error sticks and every
// later read returns a zero value, so decoders read everything and check err
// once.
type reader struct {
	b   []byte
	err error
}

func (r *reader) fail(format string, args ...any) {
	if r.err == nil {
		r.err = fmt.Errorf("%w: %s", errCorrupt, fmt.Sprintf(format, args...))
	}
}

func (r *reader) u8() byte {
	if r.err != nil {
		return 0
	}
	if len(r.b) < 1 {
		r.fail("short u8")
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *reader) bool() bool {
	switch v := r.u8(); v {
	case 0:
		return false
	case 1:
		return true
	default:
		r.fail("bool %d", v)
		return false
	}
}

func (r *reader) uvarint() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail("bad uvarint")
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *reader) varint() int64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.fail("bad varint")
		return 0
	}
	r.b = r.b[n:]
	return v
}

// raw returns the next n bytes without copying (callers copy what they keep).
func (r *reader) raw(n uint64) []byte {
	if r.err != nil {
		return nil
	}
	if n > uint64(len(r.b)) {
		r.fail("length %d exceeds remaining %d", n, len(r.b))
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) str() string { return string(r.raw(r.uvarint())) }

// bytes returns a copy: decoded values outlive the buffer (raft may reuse
// log buffers), and stored payloads must never alias anything mutable.
// An empty value decodes as nil.
func (r *reader) bytes() []byte {
	p := r.raw(r.uvarint())
	if len(p) == 0 {
		return nil
	}
	return append([]byte(nil), p...)
}

// count reads a uvarint element count and bounds it by the bytes left, each
// element taking at least minSize bytes, so a corrupt count cannot make the
// decoder allocate gigabytes.
func (r *reader) count(minSize int) int {
	n := r.uvarint()
	if r.err != nil {
		return 0
	}
	if n > uint64(len(r.b)/max(minSize, 1)) {
		r.fail("count %d exceeds remaining %d bytes", n, len(r.b))
		return 0
	}
	return int(n)
}

// end fails on trailing bytes: a well-formed encoding is consumed exactly.
func (r *reader) end() error {
	if r.err == nil && len(r.b) != 0 {
		r.fail("%d trailing bytes", len(r.b))
	}
	return r.err
}

// readChunk is what readN allocates ahead of the bytes that arrived.
const readChunk = 64 << 10

// readN reads exactly n bytes from r into buf (reused when large enough)
// and returns them. A length read from a snapshot or a peer is not trusted
// with an allocation: beyond readChunk the buffer grows only as bytes
// arrive, at most doubling, so a corrupt or hostile length costs memory
// only when the bytes are really there.
func readN(r io.Reader, buf []byte, n int) ([]byte, error) {
	buf = buf[:0]
	for len(buf) < n {
		want := min(n-len(buf), max(readChunk, len(buf)))
		buf = slices.Grow(buf, want)
		k, err := io.ReadFull(r, buf[len(buf):len(buf)+want])
		buf = buf[:len(buf)+k]
		if err != nil {
			if err == io.EOF && len(buf) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return buf, err
		}
	}
	return buf, nil
}
