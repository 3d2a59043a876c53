package hooks

import "testing"

// TestPidForWraps: queue positions map to packet ids 1..65535 (never 0,
// which MQTT forbids), the same position always to the same id (another
// node resending a message uses the id the client saw), and any 65,535
// consecutive positions to distinct ids, across the wrap too.
func TestPidForWraps(t *testing.T) {
	for _, c := range []struct {
		seq uint64
		pid uint16
	}{{1, 1}, {2, 2}, {65535, 65535}, {65536, 1}, {65537, 2}, {2 * 65535, 65535}, {2*65535 + 1, 1}} {
		if got := pidFor(c.seq); got != c.pid {
			t.Errorf("pidFor(%d) = %d, want %d", c.seq, got, c.pid)
		}
	}
	for _, start := range []uint64{1, 60000, 65535, 1 << 40} {
		seen := make(map[uint16]uint64, 65535)
		for seq := start; seq < start+65535; seq++ {
			pid := pidFor(seq)
			if pid == 0 {
				t.Fatalf("pidFor(%d) = 0", seq)
			}
			if prev, dup := seen[pid]; dup {
				t.Fatalf("positions %d and %d share packet id %d", prev, seq, pid)
			}
			seen[pid] = seq
		}
	}
}
