package replication

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"time"

	"github.com/hashicorp/raft"
)

// Snapshot format (version 2), streamed record by record so neither Persist
// nor Restore needs the whole snapshot in memory twice:
//
//	"MQRS" | u8 version
//	record*: u8 kind | uvarint len | body
//	  kind 1 retained: uvarint index | RetainSet payload
//	  kind 2 owner:    str client_id | str node | uvarint epoch | varint since
//	  kind 3 session:  session record (session_snapshot.go), v2 only
//	  kind 4 queued:   str client_id | queued message, after its session, v2 only
//	  kind 0x81 synced: uvarint index of the last entry the state holds
//	                   (skippable; written when known)
//	  kind 0x82 session opened: varint opened_at | bool opened_present of
//	                   the session record before it (skippable)
//	  kind 0x83 departure: str server | varint at (skippable)
//	  kind 5 blob:     32 bytes id | uvarint size | uvarint n_chunks, v3 only;
//	                   its n_chunks data records follow it
//	  kind 6 blob data: uvarint offset | data (the rest of the record)
//	  kind 7 blob ref: 32 bytes id | uvarint size: the payload of the
//	                   retained or queued record before it
//	  kind 0 end:      uvarint epoch | uvarint n_retained | uvarint n_owners
//	                   [v2: | uvarint n_sessions | uvarint n_queued]
//	                   [v3: | uvarint n_blobs]
//
// Version 3 is written only when the state holds blobs (blob.go), so
// that nodes older than blobs still read the snapshots of a cluster that
// never stored one. Blob records come first: a reference must name a
// complete blob. Blob data streams from the files chunk by chunk.
//
// Version 1 (before persistent sessions) is still read: it is version 2
// without session records and without the two last end-record counts. A
// version bump rather than skippable record kinds, because an older node
// that skipped session records would silently diverge; an older node
// refuses a v2 snapshot loudly instead (upgrade all nodes before sessions
// are used). Queued messages are records of their own so that no record
// holds a whole queue (payloads up to MaxCommandBytes each).
//
// Record kinds are append-only like command types; kinds >= 0x80 may be
// skipped by a reader that does not know them. The end record's counts
// detect truncation.
const (
	snapMagic     = "MQRS"
	snapVersion   = 2
	snapVersionV1 = 1
	snapVersionV3 = 3

	recEnd      byte = 0
	recRetained byte = 1
	recOwner    byte = 2
	recSession  byte = 3
	recQueued   byte = 4
	recBlob     byte = 5
	recBlobData byte = 6
	recBlobRef  byte = 7
	// recOwedWill (8) and recOwedLate (12) are in owed_will.go;
	// recTouchFrom (9) and recTouched (10) in touched.go; recLogFormat
	// (11) in logformat.go.
	recSkip   byte = 0x80
	recSynced byte = 0x81
	// recSessionOpened follows a session record: its OpenedAt and
	// OpenedPresent (skippable: an older node only loses retried opens'
	// answers).
	recSessionOpened byte = 0x82

	maxSnapRecord = 1 << 30
)

// fsmSnapshot is a point-in-time copy of the state.
type fsmSnapshot struct {
	st *state
	m  *metrics
}

// Persist writes the copy to sink and cancels the sink on any error, so a
// partial snapshot is never promoted to the latest one.
func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	start := time.Now()
	n, err := writeSnapshot(sink, s.st)
	if err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("replication: persist snapshot: %w", err)
	}
	if err := sink.Close(); err != nil {
		return fmt.Errorf("replication: close snapshot: %w", err)
	}
	s.m.snapshotBytes.Set(float64(n))
	s.m.snapshotDuration.Observe(time.Since(start).Seconds())
	return nil
}

// Release drops the copy and lets blob files it could read go.
func (s *fsmSnapshot) Release() {
	if s.st != nil && s.st.store != nil {
		s.st.store.unpin()
	}
	s.st = nil
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// writeSnapshot encodes st in sorted order (snapshots of equal states are
// byte-identical) and returns the number of bytes written.
func writeSnapshot(w io.Writer, st *state) (int64, error) {
	cw := &countingWriter{w: w}
	bw := bufio.NewWriterSize(cw, 64<<10)
	bw.WriteString(snapMagic)
	version := byte(snapVersion)
	if len(st.blobs) > 0 {
		version = snapVersionV3
	}
	bw.WriteByte(version)
	var body []byte
	record := func(kind byte) {
		bw.WriteByte(kind)
		var hdr [binary.MaxVarintLen64]byte
		bw.Write(hdr[:binary.PutUvarint(hdr[:], uint64(len(body)))])
		bw.Write(body)
	}
	blobRef := func(ref *BlobRef) {
		if ref != nil {
			body = append(body[:0], ref.ID[:]...)
			body = appendUvarint(body, uint64(ref.Size))
			record(recBlobRef)
		}
	}
	for _, id := range st.sortedBlobs() {
		b := st.blobs[id]
		body = append(body[:0], id[:]...)
		body = appendUvarint(body, uint64(b.size))
		body = appendUvarint(body, uint64(b.n))
		record(recBlob)
		if err := writeBlobData(b, &body, record); err != nil {
			return cw.n, err
		}
	}
	for _, t := range st.sortedTopics() {
		m := st.retained[t]
		body = appendUvarint(body[:0], m.Index)
		body = (&RetainSet{Msg: m}).appendPayload(body)
		record(recRetained)
		blobRef(m.Blob)
	}
	for _, c := range st.sortedClients() {
		o := st.owners[c]
		body = appendString(body[:0], c)
		body = appendString(body, o.Node)
		body = appendUvarint(body, o.Epoch)
		body = appendVarint(body, o.Since)
		record(recOwner)
	}
	var nQueued uint64
	for _, c := range st.sortedSessions() {
		e := st.sessions[c]
		body = appendSessionRecord(body[:0], &e.Session)
		record(recSession)
		if e.OpenedAt != 0 {
			body = appendVarint(body[:0], e.OpenedAt)
			body = appendBool(body, e.OpenedPresent)
			record(recSessionOpened)
		}
		for i := range e.Queue {
			body = appendString(body[:0], c)
			body = appendQueued(body, &e.Queue[i])
			record(recQueued)
			blobRef(e.Queue[i].Blob)
		}
		nQueued += uint64(len(e.Queue))
	}
	if st.format != 0 {
		body = appendUvarint(body[:0], uint64(st.format))
		record(recLogFormat)
	}
	for _, k := range st.sortedOwed() {
		w := st.owed[k]
		body = appendOwedRecord(body[:0], &w)
		record(recOwedWill)
		if w.Replaced != 0 || w.Superseded {
			body = appendOwedLateRecord(body[:0], &w)
			record(recOwedLate)
		}
	}
	writeTouches(st, &body, record)
	for _, id := range slices.Sorted(maps.Keys(st.departed)) {
		body = appendString(body[:0], id)
		body = appendVarint(body, st.departed[id])
		record(recDeparture)
	}
	if st.synced != 0 {
		body = appendUvarint(body[:0], st.synced)
		record(recSynced)
	}
	body = appendUvarint(body[:0], st.epoch)
	body = appendUvarint(body, uint64(len(st.retained)))
	body = appendUvarint(body, uint64(len(st.owners)))
	body = appendUvarint(body, uint64(len(st.sessions)))
	body = appendUvarint(body, nQueued)
	if version == snapVersionV3 {
		body = appendUvarint(body, uint64(len(st.blobs)))
	}
	record(recEnd)
	// bufio.Writer errors are sticky: Flush reports the first one.
	if err := bw.Flush(); err != nil {
		return cw.n, err
	}
	return cw.n, nil
}

// writeBlobData writes a data record for every chunk of b present, read
// from its file one chunk at a time.
func writeBlobData(b *blobEntry, body *[]byte, record func(byte)) error {
	if b.n == 0 {
		return nil
	}
	f, err := os.Open(b.file)
	if err != nil {
		return fmt.Errorf("blob file: %w", err)
	}
	defer f.Close()
	for i := range chunksOf(b.size) {
		if !b.has(i) {
			continue
		}
		off := int64(i) * BlobChunkSize
		n := int(min(int64(BlobChunkSize), b.size-off))
		*body = appendUvarint((*body)[:0], uint64(off))
		start := len(*body)
		*body = slices.Grow(*body, n)[:start+n]
		if _, err := f.ReadAt((*body)[start:], off); err != nil {
			return fmt.Errorf("blob file %s at %d: %w", b.file, off, err)
		}
		record(recBlobData)
	}
	return nil
}

// readSnapshot decodes a snapshot into a new state, blob files in a
// temporary directory (tests).
func readSnapshot(r io.Reader) (*state, error) { return readSnapshotInto(r, nil) }

// readSnapshotInto decodes a snapshot into a new state whose blob files
// go to a new directory of store; on failure that directory is removed.
func readSnapshotInto(r io.Reader, store *blobStore) (_ *state, err error) {
	br := bufio.NewReaderSize(r, 64<<10)
	hdr := make([]byte, len(snapMagic)+1)
	if _, err := io.ReadFull(br, hdr); err != nil {
		return nil, fmt.Errorf("%w: header: %w", errCorrupt, err)
	}
	if string(hdr[:len(snapMagic)]) != snapMagic {
		return nil, fmt.Errorf("%w: bad magic %q", errCorrupt, hdr[:len(snapMagic)])
	}
	version := hdr[len(snapMagic)]
	if version != snapVersion && version != snapVersionV1 && version != snapVersionV3 {
		return nil, fmt.Errorf("%w: unsupported snapshot version %d", errCorrupt, version)
	}
	st := newState()
	st.store = store
	defer func() {
		if err != nil && st.dir != nil {
			st.dir.store.removeLater(st.dir.path)
		}
	}()
	var body []byte
	var nQueued uint64
	var last *sessionEntry // the session queued records belong to
	var blob *blobEntry    // the blob data records belong to
	var blobWant int       // its chunk count
	// ref sets the blob of the record before a blob ref record.
	var ref func(*BlobRef)
	blobDone := func() error {
		if blob != nil && blob.n != blobWant {
			return fmt.Errorf("%w: blob with %d of %d chunks", errCorrupt, blob.n, blobWant)
		}
		blob = nil
		return nil
	}
	for {
		kind, err := br.ReadByte()
		if err != nil {
			return nil, fmt.Errorf("%w: truncated (no end record): %w", errCorrupt, err)
		}
		n, err := binary.ReadUvarint(br)
		if err != nil || n > maxSnapRecord {
			return nil, fmt.Errorf("%w: record length: %v", errCorrupt, err)
		}
		if body, err = readN(br, body, int(n)); err != nil {
			return nil, fmt.Errorf("%w: record body: %w", errCorrupt, err)
		}
		rd := reader{b: body}
		if kind != recBlobData {
			if err := blobDone(); err != nil {
				return nil, err
			}
		}
		setRef := ref
		ref = nil
		switch kind {
		case recBlob, recBlobData, recBlobRef:
			if version < snapVersionV3 {
				return nil, fmt.Errorf("%w: blob record in a v%d snapshot", errCorrupt, version)
			}
			if err := readBlobRecord(kind, &rd, st, &blob, &blobWant, setRef); err != nil {
				return nil, err
			}
		case recRetained:
			idx := rd.uvarint()
			c, err := DecodeCommand(append([]byte{byte(CmdRetainSet)}, rd.b...))
			if rd.err != nil || err != nil {
				return nil, fmt.Errorf("retained record: %w", errors.Join(rd.err, err))
			}
			m := c.(*RetainSet).Msg
			m.Index = idx
			st.retained[m.Topic] = m
			ref = func(r *BlobRef) {
				m.Blob = r
				st.retained[m.Topic] = m
			}
		case recOwner:
			client := rd.str()
			o := Owner{Node: rd.str(), Epoch: rd.uvarint(), Since: rd.varint()}
			if err := rd.end(); err != nil {
				return nil, fmt.Errorf("owner record: %w", err)
			}
			st.owners[client] = o
		case recSession:
			if version < snapVersion {
				return nil, fmt.Errorf("%w: session record in a v%d snapshot", errCorrupt, version)
			}
			e, err := readSessionRecord(&rd)
			if err != nil {
				return nil, err
			}
			if _, dup := st.sessions[e.ClientID]; dup {
				return nil, fmt.Errorf("%w: duplicate session %q", errCorrupt, e.ClientID)
			}
			st.sessions[e.ClientID] = e
			last = e
		case recSessionOpened:
			if last == nil {
				return nil, fmt.Errorf("%w: session-opened record before any session", errCorrupt)
			}
			last.OpenedAt, last.OpenedPresent = rd.varint(), rd.bool()
			if err := rd.end(); err != nil {
				return nil, fmt.Errorf("session-opened record: %w", err)
			}
		case recQueued:
			if version < snapVersion {
				return nil, fmt.Errorf("%w: queued record in a v%d snapshot", errCorrupt, version)
			}
			if err := readQueuedRecord(&rd, last); err != nil {
				return nil, err
			}
			nQueued++
			q := &last.Queue[len(last.Queue)-1]
			ref = func(r *BlobRef) { q.Blob = r }
		case recEnd:
			st.epoch = rd.uvarint()
			nr, no := rd.uvarint(), rd.uvarint()
			var ns, nq uint64
			if version >= snapVersion {
				ns, nq = rd.uvarint(), rd.uvarint()
			}
			if version == snapVersionV3 && rd.uvarint() != uint64(len(st.blobs)) {
				return nil, fmt.Errorf("%w: blob count", errCorrupt)
			}
			if err := rd.end(); err != nil {
				return nil, fmt.Errorf("end record: %w", err)
			}
			if nr != uint64(len(st.retained)) || no != uint64(len(st.owners)) ||
				ns != uint64(len(st.sessions)) || nq != nQueued {
				return nil, fmt.Errorf("%w: counts %d/%d/%d/%d, end record says %d/%d/%d/%d", errCorrupt,
					len(st.retained), len(st.owners), len(st.sessions), nQueued, nr, no, ns, nq)
			}
			if _, err := br.ReadByte(); err != io.EOF {
				return nil, fmt.Errorf("%w: data after end record", errCorrupt)
			}
			st.indexOwed()
			return st, nil
		case recOwedWill:
			if err := readOwedRecord(&rd, st); err != nil {
				return nil, err
			}
		case recLogFormat:
			if err := readLogFormatRecord(&rd, st); err != nil {
				return nil, err
			}
		case recOwedLate:
			if err := readOwedLateRecord(&rd, st); err != nil {
				return nil, err
			}
		case recTouchFrom, recTouched:
			if err := readTouchRecord(kind, &rd, st); err != nil {
				return nil, err
			}
		case recDeparture:
			id, at := rd.str(), rd.varint()
			if err := rd.end(); err != nil || id == "" {
				return nil, fmt.Errorf("departure record: %w", errors.Join(err, errCorrupt))
			}
			st.departed[id] = at
		case recSynced:
			st.synced = rd.uvarint()
			if err := rd.end(); err != nil {
				return nil, fmt.Errorf("synced record: %w", err)
			}
		default:
			if kind&recSkip == 0 {
				return nil, fmt.Errorf("%w: unknown record kind %d", errCorrupt, kind)
			}
		}
	}
}

// readBlobRecord reads a blob, blob data or blob ref record into st.
func readBlobRecord(kind byte, rd *reader, st *state, blob **blobEntry, want *int, setRef func(*BlobRef)) error {
	switch kind {
	case recBlob:
		id, size, n := rd.blobID(), rd.size(), rd.uvarint()
		if err := rd.end(); err != nil || size == 0 || n > uint64(chunksOf(size)) {
			return fmt.Errorf("%w: blob record: %v", errCorrupt, err)
		}
		if st.blobs[id] != nil {
			return fmt.Errorf("%w: duplicate blob %s", errCorrupt, id)
		}
		b := newBlobEntry(size, st.files().file(id, "s"))
		st.blobs[id] = b
		*blob, *want = b, int(n)
	case recBlobData:
		off := rd.size()
		data := rd.b
		b := *blob
		if rd.err != nil || b == nil || off%BlobChunkSize != 0 || off >= b.size ||
			int64(len(data)) != min(int64(BlobChunkSize), b.size-off) || b.has(int(off/BlobChunkSize)) {
			return fmt.Errorf("%w: blob data record at %d", errCorrupt, off)
		}
		f, err := os.OpenFile(b.file, os.O_CREATE|os.O_WRONLY, 0o640)
		if err == nil {
			_, err = f.WriteAt(data, off)
			err = errors.Join(err, f.Close())
		}
		if err != nil {
			return fmt.Errorf("replication: restore blob: %w", err)
		}
		b.set(int(off / BlobChunkSize))
	case recBlobRef:
		r := BlobRef{ID: rd.blobID(), Size: rd.size()}
		b := st.blobs[r.ID]
		if err := rd.end(); err != nil || setRef == nil || b == nil || !b.complete() || b.size != r.Size {
			return fmt.Errorf("%w: blob ref %s: %v", errCorrupt, r.ID, err)
		}
		setRef(&r)
	}
	return nil
}
