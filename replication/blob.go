package replication

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Large durable messages (issue 15). A payload above BlobThreshold is not
// put into the entry that queues or retains it: it is first written as a
// blob, in chunks of BlobChunkSize, each its own log entry (so other
// clients' entries interleave and no entry is large), and the entry that
// queues or retains the message refers to the complete blob by hash and
// size (WithBlob). Every node writes the chunks it applies to a file under
// its data dir; the state holds only which chunks are present, so queued
// and retained payloads do not live in memory. Unreferenced blobs (an
// upload whose publisher gave up, a message acknowledged by every
// session) are dropped by the leader after BlobGrace (BlobDrop). See
// DESIGN.md "Large messages: blobs".

const (
	// BlobChunkSize is the size of every chunk of a blob but the last. It
	// is part of the log format: a chunk's offset is a multiple of it.
	// Raft sends up to MaxAppendEntries (32) entries in one message, so a
	// follower catching up over chunks gets at most 8 MiB at a time: with
	// 512 KiB chunks and 64 entries, 32 MiB messages to a slow follower
	// timed out again and again and nothing committed (e2e, leader killed
	// during a 50 MB upload).
	BlobChunkSize = 256 << 10
	// BlobThreshold: the hooks write payloads larger than this as blobs.
	BlobThreshold = 256 << 10
	// MaxBlobSize is the largest blob: the largest MQTT payload.
	MaxBlobSize = 268_435_455

	// blobWindow is how many chunks of one upload are in flight at once:
	// more is faster for the upload and slower for everyone else (small
	// writes queue behind the chunks ahead of them; measured with
	// BenchmarkSmallWritesDuringBlob, 2 cores: window 1, 2, 4 gave 27, 34,
	// 40 MB/s and small-write p50 9, 14, 22 ms against 1.5 ms alone).
	blobWindow = 2
	// maxBlobDrop bounds the ids of one BlobDrop (32 KiB of ids).
	maxBlobDrop = 1024
)

// Log format 4 (features.go).
const (
	// CmdBlobChunk writes one chunk of a blob.
	CmdBlobChunk CommandType = 25
	// CmdWithBlob applies a RetainSet, Enqueue or QoS2Publish whose
	// payload is a complete blob.
	CmdWithBlob CommandType = 26
	// CmdBlobDrop removes blobs nothing refers to.
	CmdBlobDrop CommandType = 27
)

// ErrBlobMissing: a WithBlob named a blob the state does not hold whole
// (its upload did not finish, or it was dropped as unreferenced). Always
// with ErrInvalidCommand: the publisher is refused and sends again.
var ErrBlobMissing = errors.New("replication: blob missing")

// BlobID names a blob: the SHA-256 of its content, so that a publisher's
// resend of the same message finds the chunks its first try wrote.
type BlobID [32]byte

// BlobIDOf returns the id of payload.
func BlobIDOf(payload []byte) BlobID { return sha256.Sum256(payload) }

func (id BlobID) String() string { return hex.EncodeToString(id[:]) }

// BlobRef refers to a complete blob.
type BlobRef struct {
	ID   BlobID
	Size int64
}

// BlobChunk writes Data at Offset of the blob ID of Size bytes. Offset is
// a multiple of BlobChunkSize and Data is BlobChunkSize bytes long, or
// what is left for the last chunk. A chunk already present changes
// nothing (a retry). The same ID with another size is refused.
//
//	32 bytes id | uvarint size | uvarint offset | bytes data
type BlobChunk struct {
	ID     BlobID
	Size   int64
	Offset int64
	Data   []byte

	written bool // the FSM wrote Data already (chunkFile); not encoded
}

// WithBlob applies Cmd, a RetainSet, Enqueue or QoS2Publish (with an
// Enqueue) whose payload is empty, with the blob Ref as its payload: the
// retained value or the queued messages refer to the blob. If the state
// does not hold the blob whole, nothing is applied (ErrBlobMissing).
//
//	32 bytes id | uvarint size | bytes (type byte | payload of Cmd)
type WithBlob struct {
	Ref BlobRef
	Cmd Command
}

// BlobDrop removes the listed blobs that no queued message and no
// retained value refers to (checked at apply: a reference made after the
// leader chose them keeps its blob).
//
//	uvarint n | n x 32 bytes id
type BlobDrop struct {
	IDs []BlobID
}

var (
	_ Command = (*BlobChunk)(nil)
	_ Command = (*WithBlob)(nil)
	_ Command = (*BlobDrop)(nil)
)

func (*BlobChunk) Type() CommandType { return CmdBlobChunk }
func (*WithBlob) Type() CommandType  { return CmdWithBlob }
func (*BlobDrop) Type() CommandType  { return CmdBlobDrop }

func (c *BlobChunk) appendPayload(b []byte) []byte {
	b = append(b, c.ID[:]...)
	b = appendUvarint(b, uint64(c.Size))
	b = appendUvarint(b, uint64(c.Offset))
	return appendBytes(b, c.Data)
}

func (c *WithBlob) appendPayload(b []byte) []byte {
	b = append(b, c.Ref.ID[:]...)
	b = appendUvarint(b, uint64(c.Ref.Size))
	inner := c.Cmd.appendPayload([]byte{byte(c.Cmd.Type())})
	return appendBytes(b, inner)
}

func (c *BlobDrop) appendPayload(b []byte) []byte {
	b = appendUvarint(b, uint64(len(c.IDs)))
	for _, id := range c.IDs {
		b = append(b, id[:]...)
	}
	return b
}

func (r *reader) blobID() (id BlobID) {
	copy(id[:], r.raw(uint64(len(id))))
	return id
}

// size reads a uvarint that must be a valid blob size or offset.
func (r *reader) size() int64 {
	v := r.uvarint()
	if v > MaxBlobSize {
		r.fail("blob size or offset %d over %d", v, MaxBlobSize)
		return 0
	}
	return int64(v)
}

func decodeBlobCommand(t CommandType, r *reader) (Command, bool) {
	switch t {
	case CmdBlobChunk:
		c := &BlobChunk{ID: r.blobID(), Size: r.size(), Offset: r.size()}
		c.Data = r.bytes()
		return c, true
	case CmdWithBlob:
		c := &WithBlob{Ref: BlobRef{ID: r.blobID(), Size: r.size()}}
		inner := r.raw(r.uvarint())
		if r.err != nil {
			return c, true
		}
		if len(inner) > 0 && (CommandType(inner[0]) == CmdWithBlob || CommandType(inner[0]) == CmdBatch) {
			r.fail("with_blob around %v", CommandType(inner[0]))
			return c, true
		}
		cmd, err := DecodeCommand(inner)
		if err != nil || cmd == nil {
			r.fail("with_blob command: %v", err)
			return c, true
		}
		c.Cmd = cmd
		return c, true
	case CmdBlobDrop:
		n := r.count(32)
		c := &BlobDrop{IDs: make([]BlobID, n)}
		for i := range c.IDs {
			c.IDs[i] = r.blobID()
		}
		return c, true
	}
	return nil, false
}

func chunksOf(size int64) int { return int((size + BlobChunkSize - 1) / BlobChunkSize) }

func (c *BlobChunk) validate() error {
	want := min(int64(BlobChunkSize), c.Size-c.Offset)
	if c.Size <= 0 || c.Size > MaxBlobSize || c.Offset < 0 || c.Offset%BlobChunkSize != 0 ||
		c.Offset >= c.Size || int64(len(c.Data)) != want {
		return invalid(c.Type(), "chunk of %d bytes at %d of a %d-byte blob", len(c.Data), c.Offset, c.Size)
	}
	return nil
}

func (c *WithBlob) validate() error {
	if c.Ref.Size <= 0 || c.Ref.Size > MaxBlobSize {
		return invalid(c.Type(), "blob size %d", c.Ref.Size)
	}
	switch in := c.Cmd.(type) {
	case *RetainSet:
		if len(in.Msg.Payload) != 0 {
			return invalid(c.Type(), "retain_set with a payload of its own")
		}
		m := *in
		m.Msg.Payload = []byte{0} // the blob is the payload
		return m.validate()
	case *Enqueue:
		if len(in.Payload) != 0 {
			return invalid(c.Type(), "enqueue with a payload of its own")
		}
		return in.validate()
	case *QoS2Publish:
		if in.Enqueue == nil || len(in.Enqueue.Payload) != 0 {
			return invalid(c.Type(), "qos2_publish without an enqueue, or with a payload of its own")
		}
		return in.validate()
	}
	return invalid(c.Type(), "around %T", c.Cmd)
}

func (c *BlobDrop) validate() error {
	if len(c.IDs) == 0 {
		return invalid(c.Type(), "no blobs")
	}
	return nil
}

// blobEntry is the state of one blob: which chunks the log has written.
type blobEntry struct {
	size int64
	got  []uint64 // bitmap of the chunks present
	n    int      // chunks present
	// file is this node's file for the blob: named by the id and the log
	// index that created the entry, so that a blob dropped and written
	// again never shares a file with the old one, which a snapshot may
	// still be reading (its removal waits for that).
	file string
}

func newBlobEntry(size int64, file string) *blobEntry {
	return &blobEntry{size: size, got: make([]uint64, (chunksOf(size)+63)/64), file: file}
}

func (b *blobEntry) has(i int) bool { return b.got[i/64]&(1<<(i%64)) != 0 }
func (b *blobEntry) complete() bool { return b.n == chunksOf(b.size) }
func (b *blobEntry) clone() *blobEntry {
	return &blobEntry{size: b.size, got: slices.Clone(b.got), n: b.n, file: b.file}
}

func (b *blobEntry) set(i int) {
	if !b.has(i) {
		b.got[i/64] |= 1 << (i % 64)
		b.n++
	}
}

// applyBlobChunk writes the chunk's data to the blob's file, unless
// FSM.ApplyBatch already did (chunkFile).
func (s *state) applyBlobChunk(c *BlobChunk, idx uint64, res *Result) {
	b := s.blobs[c.ID]
	if b != nil && b.size != c.Size {
		res.Err = invalid(c.Type(), "blob %s has %d bytes, not %d", c.ID, b.size, c.Size)
		return
	}
	if b == nil {
		b = newBlobEntry(c.Size, s.files().newFile(c.ID, idx))
		s.blobs[c.ID] = b
	}
	i := int(c.Offset / BlobChunkSize)
	if b.has(i) {
		return // a retried chunk
	}
	if !c.written {
		writeBlob(b.file, c.ID, c.Offset, c.Data)
	}
	b.set(i)
	res.Changed = true
}

// chunkFile prepares the entry for c at log index idx (the blob's entry
// is created if it does not exist) and returns the file its data goes
// to, or false when applying c writes nothing (a chunk already present,
// or an invalid one). FSM.ApplyBatch writes the data with the state lock
// released, then applies c: only the FSM goroutine changes the state, so
// nothing can change it in between, and readers meanwhile see the state
// before the entry (a blob without that chunk). A write into the page
// cache can block for long under memory pressure; holding the lock
// through it stalled every reader (metrics scrapes took seconds).
func (s *state) chunkFile(c *BlobChunk, idx uint64) (string, bool) {
	if c.validate() != nil {
		return "", false
	}
	b := s.blobs[c.ID]
	if b != nil && (b.size != c.Size || b.has(int(c.Offset/BlobChunkSize))) {
		return "", false
	}
	if b == nil {
		b = newBlobEntry(c.Size, s.files().newFile(c.ID, idx))
		s.blobs[c.ID] = b
	}
	return b.file, true
}

// applyWithBlob applies c.Cmd with the blob as its payload.
func (s *state) applyWithBlob(c *WithBlob, idx uint64, res *Result, evs []event) []event {
	b := s.blobs[c.Ref.ID]
	if b == nil || !b.complete() || b.size != c.Ref.Size {
		res.Err = fmt.Errorf("%w: %w: %s (%d bytes)", ErrInvalidCommand, ErrBlobMissing, c.Ref.ID, c.Ref.Size)
		return evs
	}
	ref := c.Ref
	s.blob = &ref
	defer func() { s.blob = nil }()
	switch in := c.Cmd.(type) {
	case *RetainSet:
		evs = s.applyRetainSet(in.Msg, idx, res, evs)
	case *Enqueue:
		evs = s.applyEnqueue(in, res, evs)
	case *QoS2Publish:
		evs = s.applyQoS2Publish(in, res, evs)
	}
	return evs
}

// applyBlobDrop removes the listed blobs nothing refers to.
func (s *state) applyBlobDrop(c *BlobDrop, res *Result) {
	asked := make(map[BlobID]bool, len(c.IDs))
	for _, id := range c.IDs {
		if s.blobs[id] != nil {
			asked[id] = true
		}
	}
	if len(asked) == 0 {
		return
	}
	for id := range s.blobRefs() {
		delete(asked, id)
	}
	for _, id := range c.IDs {
		if asked[id] {
			delete(asked, id)
			s.files().store.removeLater(s.blobs[id].file)
			delete(s.blobs, id)
			res.Changed = true
		}
	}
}

// blobRefs returns the blobs queued messages and retained values refer to.
func (s *state) blobRefs() map[BlobID]bool {
	refs := map[BlobID]bool{}
	if len(s.blobs) == 0 {
		return refs
	}
	for _, m := range s.retained {
		if m.Blob != nil {
			refs[m.Blob.ID] = true
		}
	}
	for _, e := range s.sessions {
		for i := range e.Queue {
			if b := e.Queue[i].Blob; b != nil {
				refs[b.ID] = true
			}
		}
	}
	return refs
}

func (s *state) sortedBlobs() []BlobID {
	ids := make([]BlobID, 0, len(s.blobs))
	for id := range s.blobs {
		ids = append(ids, id)
	}
	slices.SortFunc(ids, func(a, b BlobID) int { return slices.Compare(a[:], b[:]) })
	return ids
}

// files returns the directory of this state's blob files, creating it (in
// a temporary directory for a state without a store: tests).
func (s *state) files() *blobDir {
	if s.dir == nil {
		if s.store == nil {
			s.store = newBlobStore("")
		}
		s.dir = s.store.newDir()
	}
	return s.dir
}

// blobStore owns the blob directory under the data dir: one generation
// directory per state (a restore decodes into a new one and the old one
// goes once no snapshot reads it).
type blobStore struct {
	root string

	mu     sync.Mutex
	gen    int
	pins   int      // snapshots being persisted
	doomed []string // paths to remove once pins is 0
}

func newBlobStore(root string) *blobStore { return &blobStore{root: root} }

// reset removes every blob file: a node rebuilds its blobs from the
// snapshot and the log it restores at start.
func (bs *blobStore) reset() error {
	if bs.root == "" {
		return nil
	}
	if err := os.RemoveAll(bs.root); err != nil {
		return fmt.Errorf("replication: clear blob dir: %w", err)
	}
	return nil
}

// newDir creates the next generation directory. An I/O error panics: the
// state cannot be applied without it (like a failed log write).
func (bs *blobStore) newDir() *blobDir {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	if bs.root == "" {
		dir, err := os.MkdirTemp("", "mqtt-blobs-")
		if err != nil {
			panic(fmt.Errorf("replication: blob dir: %w", err))
		}
		bs.root = dir
	}
	bs.gen++
	dir := filepath.Join(bs.root, fmt.Sprintf("g%d", bs.gen))
	if err := os.MkdirAll(dir, 0o750); err != nil {
		panic(fmt.Errorf("replication: blob dir: %w", err))
	}
	return &blobDir{path: dir, store: bs}
}

func (bs *blobStore) pin() {
	bs.mu.Lock()
	bs.pins++
	bs.mu.Unlock()
}

func (bs *blobStore) unpin() {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	if bs.pins--; bs.pins > 0 {
		return
	}
	for _, p := range bs.doomed {
		_ = os.RemoveAll(p)
	}
	bs.doomed = nil
}

// removeLater removes path now, or once no snapshot is being persisted
// (a snapshot reads the files of the state it copied).
func (bs *blobStore) removeLater(path string) {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	if bs.pins > 0 {
		bs.doomed = append(bs.doomed, path)
		return
	}
	_ = os.RemoveAll(path)
}

// blobDir is one generation directory: a file per blob, named by its id.
type blobDir struct {
	path  string
	store *blobStore
	seq   atomic.Uint64 // newFile
}

func (d *blobDir) file(id BlobID, suffix string) string {
	return filepath.Join(d.path, id.String()+"."+suffix)
}

// newFile names the file of a blob created at log index idx; the counter
// keeps names unique even when one entry creates, drops and creates the
// same blob again.
func (d *blobDir) newFile(id BlobID, idx uint64) string {
	return d.file(id, fmt.Sprintf("%d.%d", idx, d.seq.Add(1)))
}

// writeBlob writes a chunk. An I/O error panics: a replica that applied
// the entry without its data would serve a different payload than the
// others.
func writeBlob(path string, id BlobID, off int64, data []byte) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o640)
	if err == nil {
		_, err = f.WriteAt(data, off)
		err = errors.Join(err, f.Close())
	}
	if err != nil {
		panic(fmt.Errorf("replication: write blob %s: %w", id, err))
	}
}

// OpenBlob opens a complete blob for reading. The file stays readable
// while open, even if the blob is dropped meanwhile.
func (f *FSM) OpenBlob(ref BlobRef) (*os.File, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	b := f.st.blobs[ref.ID]
	if b == nil || !b.complete() || b.size != ref.Size {
		return nil, fmt.Errorf("%w: %s", ErrBlobMissing, ref.ID)
	}
	return os.Open(b.file)
}

// ReadBlob returns the content of a complete blob this node holds.
func (n *Node) ReadBlob(ref BlobRef) ([]byte, error) {
	f, err := n.fsm.OpenBlob(ref)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, ref.Size)
	if _, err := io.ReadFull(f, buf); err != nil {
		return nil, fmt.Errorf("replication: read blob %s: %w", ref.ID, err)
	}
	return buf, nil
}

// Blobs reports this node's blob count and their total size.
func (f *FSM) Blobs() (count int, bytes int64) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	for _, b := range f.st.blobs {
		bytes += b.size
	}
	return len(f.st.blobs), bytes
}

// Blobs reports the blobs this node holds and their total size.
func (n *Node) Blobs() (count int, bytes int64) { return n.fsm.Blobs() }

// blobChunks returns which chunks of id this node holds (nil: none).
func (f *FSM) blobChunks(id BlobID, size int64) *blobEntry {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if b := f.st.blobs[id]; b != nil && b.size == size {
		return b.clone()
	}
	return nil
}

// BlobsAvailable reports whether every server applies log format 4
// (blobs); until then a payload over BlobThreshold cannot be stored. It
// waits (bounded) while that is not known yet.
func (n *Node) BlobsAvailable(ctx context.Context) bool { return n.awaitLogVersion(ctx, 4) }

// PutBlob writes payload as a blob, each chunk committed by a majority,
// and returns its reference for a WithBlob. Chunks this node already
// holds (a resend of the same message) are not written again. Up to
// blobWindow chunks are in flight at once; each is its own entry, so
// other clients' writes interleave.
//
// This node's state may lag the leader's: a blob it still holds may have
// been dropped meanwhile, and the WithBlob then fails with ErrBlobMissing.
// Write it again with RewriteBlob, which does not trust this node's view.
func (n *Node) PutBlob(ctx context.Context, payload []byte) (BlobRef, error) {
	return n.putBlob(ctx, payload, true)
}

// RewriteBlob is PutBlob writing every chunk (the leader skips applying
// the ones it holds): the retry after ErrBlobMissing.
func (n *Node) RewriteBlob(ctx context.Context, payload []byte) (BlobRef, error) {
	return n.putBlob(ctx, payload, false)
}

func (n *Node) putBlob(ctx context.Context, payload []byte, skipHeld bool) (BlobRef, error) {
	ref := BlobRef{ID: BlobIDOf(payload), Size: int64(len(payload))}
	if ref.Size == 0 || ref.Size > MaxBlobSize {
		return ref, fmt.Errorf("%w: blob of %d bytes", ErrTooLarge, ref.Size)
	}
	var have *blobEntry
	if skipHeld {
		have = n.fsm.blobChunks(ref.ID, ref.Size)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sem := make(chan struct{}, blobWindow)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	for i := range chunksOf(ref.Size) {
		if have != nil && have.has(i) {
			continue
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		off := int64(i) * BlobChunkSize
		c := &BlobChunk{ID: ref.ID, Size: ref.Size, Offset: off, Data: payload[off:min(off+BlobChunkSize, ref.Size)]}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := n.putChunk(ctx, c); err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
				cancel()
			}
		}()
	}
	wg.Wait()
	if first == nil && ctx.Err() != nil {
		first = fmt.Errorf("%w: blob upload: %w", ErrTimeout, ctx.Err())
	}
	if first != nil {
		return ref, fmt.Errorf("replication: blob %s: %w", ref.ID, first)
	}
	n.m.blobBytes.Add(float64(ref.Size))
	return ref, nil
}

// putChunk writes one chunk, again after an unknown outcome (a leader
// change while committing): a chunk written twice changes nothing.
func (n *Node) putChunk(ctx context.Context, c *BlobChunk) error {
	for {
		_, err := n.Apply(ctx, c)
		if err == nil || ctx.Err() != nil || !errors.Is(err, ErrUnknownOutcome) {
			return err
		}
		select {
		case <-time.After(20 * time.Millisecond):
		case <-ctx.Done():
			return err
		}
	}
}

// blobSweep is the leader's memory of unreferenced blobs: when it first
// saw each without references, and how many chunks it had then.
type blobSweep struct {
	seen map[BlobID]blobIdle
	term uint64 // the term seen was filled in: a new term starts afresh
}

type blobIdle struct {
	since time.Time
	n     int
}

// sweepBlobs drops blobs nothing has referred to for BlobGrace, measured
// on this leader's clock from when it saw them unreferenced and not
// growing (an upload in progress keeps its blob).
func (n *Node) sweepBlobs(now time.Time) {
	idle := n.fsm.unreferencedBlobs()
	if term := n.raft.CurrentTerm(); n.blobSweep.seen == nil || n.blobSweep.term != term {
		// Times seen in an earlier term (this node led before) say
		// nothing about an upload going on now.
		n.blobSweep.seen, n.blobSweep.term = map[BlobID]blobIdle{}, term
	}
	var drop []BlobID
	for id, chunks := range idle {
		was, ok := n.blobSweep.seen[id]
		if !ok || was.n != chunks {
			n.blobSweep.seen[id] = blobIdle{since: now, n: chunks}
			continue
		}
		if now.Sub(was.since) >= n.cfg.BlobGrace {
			drop = append(drop, id)
		}
	}
	for id := range n.blobSweep.seen {
		if _, ok := idle[id]; !ok {
			delete(n.blobSweep.seen, id)
		}
	}
	if len(drop) == 0 {
		return
	}
	if len(drop) > maxBlobDrop {
		drop = drop[:maxBlobDrop] // the rest next round; the command stays small
	}
	slices.SortFunc(drop, func(a, b BlobID) int { return slices.Compare(a[:], b[:]) })
	ctx, cancel := context.WithTimeout(n.life, n.cfg.IOTimeout)
	defer cancel()
	if _, err := n.Apply(ctx, &BlobDrop{IDs: drop}); err != nil {
		n.log.Warn("dropping unreferenced blobs failed", "count", len(drop), "err", err)
		return
	}
	for _, id := range drop {
		delete(n.blobSweep.seen, id)
	}
	n.log.Info("dropped unreferenced blobs", "count", len(drop))
}

// unreferencedBlobs returns the blobs nothing refers to, with their chunk
// counts.
func (f *FSM) unreferencedBlobs() map[BlobID]int {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if len(f.st.blobs) == 0 {
		return nil
	}
	refs := f.st.blobRefs()
	out := map[BlobID]int{}
	for id, b := range f.st.blobs {
		if !refs[id] {
			out[id] = b.n
		}
	}
	return out
}
