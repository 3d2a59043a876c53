package hooks

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mqtt-ha/broker/replication"
)

// Large durable messages: a payload over replication.BlobThreshold that
// must be queued for persistent sessions or retained is first written as
// a blob (its chunks committed by a majority), then the entry that queues
// or retains it refers to the blob (replication/blob.go). Up to
// durableLimit bytes (--replicated-size-limit); larger ones are refused
// like any write that cannot be stored (refusePublish).

// blobRate is the slowest upload a durable write's deadline allows for:
// a 256 MB message gets 32 s on top of the write timeout.
const blobRate = 8 << 20 // bytes per second

// durableTimeout is the deadline of a durable write of size bytes.
func durableTimeout(base time.Duration, size int) time.Duration {
	if size <= replication.BlobThreshold {
		return base
	}
	return base + time.Duration(size)*time.Second/blobRate
}

// withBlob returns cmd ready to apply: unchanged for a small payload; for
// a large one, the payload is written as a blob and cmd, with its payload
// removed by strip, is wrapped in a WithBlob. The payload must be the one
// cmd carries.
func withBlob(ctx context.Context, repl *replication.Node, limit int, payload []byte,
	cmd replication.Command, strip func()) (replication.Command, error) {
	if len(payload) <= replication.BlobThreshold {
		return cmd, nil
	}
	if len(payload) > limit {
		return nil, fmt.Errorf("%w: payload of %d bytes over --replicated-size-limit %d", replication.ErrTooLarge, len(payload), limit)
	}
	if !repl.BlobsAvailable(ctx) {
		return nil, fmt.Errorf("%w: payload of %d bytes: a server of the cluster does not store large messages yet (rolling upgrade)",
			replication.ErrTooLarge, len(payload))
	}
	ref, err := repl.PutBlob(ctx, payload)
	if err != nil {
		return nil, err
	}
	strip()
	return &replication.WithBlob{Ref: ref, Cmd: cmd}, nil
}

// applyDurable applies cmd (from withBlob); a blob swept between its
// upload and the entry that refers to it (a stall longer than the blob
// grace) is written once more.
func applyDurable(ctx context.Context, repl *replication.Node, cmd replication.Command, payload []byte) (replication.Result, error) {
	res, err := repl.Apply(ctx, cmd)
	if wb, ok := cmd.(*replication.WithBlob); ok && errors.Is(err, replication.ErrBlobMissing) {
		// This node's view of which chunks exist may be stale: write
		// them all.
		if _, err := repl.RewriteBlob(ctx, payload); err != nil {
			return res, err
		}
		return repl.Apply(ctx, wb)
	}
	return res, err
}

// ApplyDurable applies cmd, which carries payload, writing a large
// payload as a blob first (strip removes it from cmd); limit is
// --replicated-size-limit (0: any MQTT payload). For writes that do not
// come from a client: the importer of a Mosquitto file.
func ApplyDurable(ctx context.Context, repl *replication.Node, limit int, payload []byte,
	cmd replication.Command, strip func()) (replication.Result, error) {
	c, err := withBlob(ctx, repl, durableLimitOf(limit), payload, cmd, strip)
	if err != nil {
		return replication.Result{}, err
	}
	return applyDurable(ctx, repl, c, payload)
}

// durableLimitOf is the limit for a configured value (0: any MQTT payload).
func durableLimitOf(n int) int {
	if n <= 0 || n > replication.MaxBlobSize {
		return replication.MaxBlobSize
	}
	return n
}

func (h *Sessions) durableLimit() int { return durableLimitOf(h.cfg.DurableLimit) }

// blobLoadBudget is how many bytes of large payloads the pumps of a node
// hold at once: two of the largest MQTT messages. mochi encodes a packet
// into a buffer of its own before writing it, so the memory is about twice
// this at most.
const blobLoadBudget = 2 * replication.MaxBlobSize

// loadBudget is a byte budget: acquire waits until n bytes are free (a
// payload larger than the budget takes all of it).
type loadBudget struct {
	max  int64
	mu   sync.Mutex
	free int64
	wake chan struct{} // closed and replaced by release
}

func newLoadBudget(n int64) *loadBudget {
	return &loadBudget{max: n, free: n, wake: make(chan struct{})}
}

// acquire takes n bytes, waiting while they are not free; false if done
// closed first.
func (b *loadBudget) acquire(n int64, done <-chan struct{}) bool {
	n = min(n, b.max)
	for {
		b.mu.Lock()
		if b.free >= n {
			b.free -= n
			b.mu.Unlock()
			return true
		}
		wake := b.wake
		b.mu.Unlock()
		select {
		case <-wake:
		case <-done:
			return false
		}
	}
}

func (b *loadBudget) release(n int64) {
	n = min(n, b.max)
	b.mu.Lock()
	b.free += n
	close(b.wake)
	b.wake = make(chan struct{})
	b.mu.Unlock()
}

// A large retained value sits in mochi's retained index as a placeholder:
// a one-byte payload (mochi deletes a retained value with an empty one)
// and an Origin naming the blob. Origin is the publisher's client id in
// mochi, copied onto every copy of the packet and never encoded; MQTT
// forbids U+0000 in a client id, so no client's id starts with the prefix.
const blobOriginPrefix = "\x00blob\x00"

var blobPlaceholder = []byte{0}

func blobOrigin(ref replication.BlobRef) string {
	return fmt.Sprintf("%s%s:%d", blobOriginPrefix, ref.ID, ref.Size)
}

// blobOfOrigin parses blobOrigin.
func blobOfOrigin(origin string) (replication.BlobRef, bool) {
	rest, ok := strings.CutPrefix(origin, blobOriginPrefix)
	if !ok {
		return replication.BlobRef{}, false
	}
	id, size, ok := strings.Cut(rest, ":")
	raw, err := hex.DecodeString(id)
	n, nerr := strconv.ParseInt(size, 10, 64)
	var ref replication.BlobRef
	if !ok || err != nil || nerr != nil || len(raw) != len(ref.ID) || n <= 0 {
		return ref, false
	}
	copy(ref.ID[:], raw)
	ref.Size = n
	return ref, true
}
