package node

import (
	"bytes"
	"testing"
)

// FuzzDecodeAppMeta: the bootstrap metadata every peer gossips decodes
// only when it re-encodes to the same bytes, or to fewer when the input
// padded its varint; whatever does not is refused (the member is left out
// of the bootstrap plan rather than guessed at). testdata/fuzz holds a
// has-state byte of 0x30, which decoded as "no raft state".
func FuzzDecodeAppMeta(f *testing.F) {
	f.Add(encodeAppMeta(3, true))
	f.Add(encodeAppMeta(0, false))
	f.Add(encodeAppMeta(1<<16, false))
	f.Add([]byte{1, 0x83, 0x00, 1}) // padded varint: 3
	f.Fuzz(func(t *testing.T, b []byte) {
		expect, has, ok := decodeAppMeta(b)
		if !ok {
			if expect != 0 || has {
				t.Fatalf("refused input decoded to %d, %v", expect, has)
			}
			return
		}
		enc := encodeAppMeta(expect, has)
		if len(enc) > len(b) || len(enc) == len(b) && !bytes.Equal(enc, b) {
			t.Fatalf("%x decoded to (%d, %v), which encodes as %x", b, expect, has, enc)
		}
		if e2, h2, ok2 := decodeAppMeta(enc); !ok2 || e2 != expect || h2 != has {
			t.Fatalf("(%d, %v) round-tripped into (%d, %v, %v)", expect, has, e2, h2, ok2)
		}
	})
}
