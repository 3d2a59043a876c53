package replication

import (
	"fmt"
	"maps"
	"slices"
)

// Opens fenced to the state as of a log index (log format 6).
//
// A fenced SessionOpen (IfOpened) applies only if the session is still
// the one its CONNECT read. When the CONNECT read no session (IfOpened 0)
// the fence cannot tell "no session" from "no session again": an open
// forwarded to the leader that commits late, after its CONNECT was
// refused (the outcome was unknown and the client gave up), used to
// create a session after the client's newer clean CONNECT had deleted it,
// or after that clean CONNECT (which writes nothing when it finds no
// session) had claimed the client id. The client's next resume then
// answered session present 1 (the chaos check clean-start-session-present
// found both).
//
// So the state remembers, per client id, the last entry that touched it:
// deleted its session, claimed or released its ownership. An open with
// AsOf (the index of the state its CONNECT read, type 30) and IfOpened 0
// fails with ErrReopened when the client id was touched after AsOf, by
// another entry: whatever happened since the CONNECT read is news to it,
// and the CONNECT decides again on the newer state (hooks: applyOpen).
// An open of an existing session needs no more: OpenedIndex changes on
// every open, so IfOpened cannot match again once the session was
// replaced or deleted.
//
// Touches are recorded from the first type 30 open on (touchFrom): nodes
// that applied older entries with older code, or restored an older
// snapshot, then agree on what is recorded. They are dropped touchKeep
// entries later (an open cannot stay in flight that long: it commits
// within a leader's term or is lost), at deterministic points of the log.

// CmdSessionOpenAsOf (30) is a fenced SessionOpen with AsOf; log format 6.
//
//	type 24 payload | bool owe_will | uvarint as_of
const CmdSessionOpenAsOf CommandType = 30

const (
	touchKeep       = 1 << 18
	touchPruneEvery = touchKeep / 4
)

// touch records that the entry at idx changed clientID's session or
// ownership.
func (s *state) touch(clientID string, idx uint64) {
	if s.touchFrom == 0 {
		return
	}
	s.touched[clientID] = idx
	if idx-s.touchPruned < touchPruneEvery {
		return
	}
	s.touchPruned = idx
	maps.DeleteFunc(s.touched, func(_ string, at uint64) bool { return idx-at > touchKeep })
}

// touchedSince reports whether an entry other than idx touched clientID
// after index asOf.
func (s *state) touchedSince(clientID string, asOf, idx uint64) (uint64, bool) {
	at := s.touched[clientID]
	return at, at > asOf && at != idx
}

// OpenAsOfSupported reports whether every server applies SessionOpen.AsOf
// (type 30); until then the hooks propose opens without it.
func (n *Node) OpenAsOfSupported() bool { return n.logVers.min.Load() >= 6 }

// SyncedIndex is the index of the last entry whose effects this node's
// state shows: a state read after this call is at least that recent.
func (n *Node) SyncedIndex() uint64 { return n.fsm.synced.Load() }

// Snapshot records (not skippable: a node that does not fence opens by
// touches must not load a state that has them). recTouchFrom, written
// once touches are recorded, comes before the recTouched ones.
//
//	kind 9 touch from: uvarint touch_from | uvarint touch_pruned
//	kind 10 touched:   str client_id | uvarint index
const (
	recTouchFrom byte = 9
	recTouched   byte = 10
)

func writeTouches(st *state, body *[]byte, record func(kind byte)) {
	if st.touchFrom == 0 {
		return
	}
	*body = appendUvarint(appendUvarint((*body)[:0], st.touchFrom), st.touchPruned)
	record(recTouchFrom)
	for _, id := range slices.Sorted(maps.Keys(st.touched)) {
		*body = appendUvarint(appendString((*body)[:0], id), st.touched[id])
		record(recTouched)
	}
}

func readTouchRecord(kind byte, rd *reader, st *state) error {
	switch kind {
	case recTouchFrom:
		st.touchFrom, st.touchPruned = rd.uvarint(), rd.uvarint()
		if err := rd.end(); err != nil || st.touchFrom == 0 {
			return fmt.Errorf("%w: touch-from record: %v", errCorrupt, err)
		}
	case recTouched:
		id, at := rd.str(), rd.uvarint()
		if err := rd.end(); err != nil || st.touchFrom == 0 || id == "" {
			return fmt.Errorf("%w: touched record: %v", errCorrupt, err)
		}
		st.touched[id] = at
	}
	return nil
}
