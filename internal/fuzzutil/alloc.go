package fuzzutil

import (
	"runtime/metrics"
	"testing"
)

const heapAllocs = "/gc/heap/allocs:bytes"

// allocated returns the bytes allocated on the heap so far. The runtime
// counts a large allocation (over 32 KiB) when it happens and small ones a
// span at a time, so the difference of two readings is exact for the
// allocations that matter here (a make sized by a hostile count) and
// coarse, within some KiB, for the rest.
func allocated() uint64 {
	s := []metrics.Sample{{Name: heapAllocs}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// Slack is what Limit allows beyond its per-byte bound: the coarse
// accounting of small allocations, fixed-size buffers (a bufio.Reader), and
// whatever other goroutines of the test binary allocate meanwhile.
const Slack = 1 << 20

// Limit is perByte*inputLen + Slack: a decoder must never allocate more
// than a constant factor of its input, whatever a length or count in the
// input claims.
func Limit(inputLen, perByte int) uint64 {
	return uint64(perByte)*uint64(inputLen) + Slack
}

// AllocBound runs f and fails t if the heap it allocated exceeds limit
// bytes.
func AllocBound(t testing.TB, limit uint64, f func()) {
	t.Helper()
	before := allocated()
	f()
	if got := allocated() - before; got > limit {
		t.Fatalf("allocated %d bytes (limit %d)", got, limit)
	}
}
