package replication

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
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
//	  kind 0 end:      uvarint epoch | uvarint n_retained | uvarint n_owners
//	                   [v2: | uvarint n_sessions | uvarint n_queued]
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

	recEnd      byte = 0
	recRetained byte = 1
	recOwner    byte = 2
	recSession  byte = 3
	recQueued   byte = 4
	recSkip     byte = 0x80
	recSynced   byte = 0x81
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

// Release drops the copy.
func (s *fsmSnapshot) Release() { s.st = nil }

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
	bw.WriteByte(snapVersion)
	var body []byte
	record := func(kind byte) {
		bw.WriteByte(kind)
		var hdr [binary.MaxVarintLen64]byte
		bw.Write(hdr[:binary.PutUvarint(hdr[:], uint64(len(body)))])
		bw.Write(body)
	}
	for _, t := range st.sortedTopics() {
		m := st.retained[t]
		body = appendUvarint(body[:0], m.Index)
		body = (&RetainSet{Msg: m}).appendPayload(body)
		record(recRetained)
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
		}
		nQueued += uint64(len(e.Queue))
	}
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
	record(recEnd)
	// bufio.Writer errors are sticky: Flush reports the first one.
	if err := bw.Flush(); err != nil {
		return cw.n, err
	}
	return cw.n, nil
}

// readSnapshot decodes a snapshot into a new state.
func readSnapshot(r io.Reader) (*state, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	hdr := make([]byte, len(snapMagic)+1)
	if _, err := io.ReadFull(br, hdr); err != nil {
		return nil, fmt.Errorf("%w: header: %w", errCorrupt, err)
	}
	if string(hdr[:len(snapMagic)]) != snapMagic {
		return nil, fmt.Errorf("%w: bad magic %q", errCorrupt, hdr[:len(snapMagic)])
	}
	version := hdr[len(snapMagic)]
	if version != snapVersion && version != snapVersionV1 {
		return nil, fmt.Errorf("%w: unsupported snapshot version %d", errCorrupt, version)
	}
	st := newState()
	var body []byte
	var nQueued uint64
	var last *sessionEntry // the session queued records belong to
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
		switch kind {
		case recRetained:
			idx := rd.uvarint()
			c, err := DecodeCommand(append([]byte{byte(CmdRetainSet)}, rd.b...))
			if rd.err != nil || err != nil {
				return nil, fmt.Errorf("retained record: %w", errors.Join(rd.err, err))
			}
			m := c.(*RetainSet).Msg
			m.Index = idx
			st.retained[m.Topic] = m
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
		case recEnd:
			st.epoch = rd.uvarint()
			nr, no := rd.uvarint(), rd.uvarint()
			var ns, nq uint64
			if version >= snapVersion {
				ns, nq = rd.uvarint(), rd.uvarint()
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
			return st, nil
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
