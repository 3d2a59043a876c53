package cluster

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// errShort is returned by decoders when input ends early. Every decoder in
// this package reports truncation as an error and never panics: bytes come
// from the network.
var errShort = errors.New("truncated input")

func appendUvarint(b []byte, v uint64) []byte { return binary.AppendUvarint(b, v) }

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendBytes(b, v []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(v)))
	return append(b, v...)
}

func sizeUvarint(v uint64) int {
	n := 1
	for v >= 0x80 {
		v >>= 7
		n++
	}
	return n
}

func sizeString(n int) int { return sizeUvarint(uint64(n)) + n }

// reader decodes the compact formats of this package. The first error sticks
// (later reads return zero values), so decoders check r.err once at the end.
type reader struct {
	b   []byte
	err error
}

func (r *reader) fail(err error) {
	if r.err == nil {
		r.err = err
	}
}

func (r *reader) u8() byte {
	if r.err != nil {
		return 0
	}
	if len(r.b) < 1 {
		r.fail(errShort)
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *reader) uvarint() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		if n == 0 {
			r.fail(errShort)
		} else {
			r.fail(errors.New("varint overflow"))
		}
		return 0
	}
	r.b = r.b[n:]
	return v
}

// count reads a uvarint element count and rejects counts that cannot possibly
// fit in the remaining input (each element takes at least minSize bytes), so
// a hostile count never drives a large allocation.
func (r *reader) count(minSize int) int {
	n := r.uvarint()
	if r.err != nil {
		return 0
	}
	if minSize < 1 {
		minSize = 1
	}
	if n > uint64(len(r.b)/minSize) {
		r.fail(fmt.Errorf("count %d exceeds input: %w", n, errShort))
		return 0
	}
	return int(n)
}

func (r *reader) raw(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.b) {
		r.fail(errShort)
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) bytes() []byte {
	n := r.uvarint()
	if r.err != nil {
		return nil
	}
	if n > uint64(len(r.b)) {
		r.fail(errShort)
		return nil
	}
	return r.raw(int(n))
}

func (r *reader) str() string { return string(r.bytes()) }
