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
// fails with ErrReopened when the client id was touched after AsOf by
// another entry, or when touches that far back are not known: whatever
// happened since the CONNECT read is news to it, and the CONNECT decides
// again on the newer state (hooks: applyOpen), told the last ownership
// claim of the id (Result.Prev), which may have been released since.
// An open of an existing session needs no more: OpenedIndex changes on
// every open, so IfOpened cannot match again once the session was
// replaced or deleted.
//
// Touches are recorded from the first type 30 open on (touchFrom): nodes
// that applied older entries with older code, or restored an older
// snapshot, then agree on what is recorded. They are dropped touchKeep
// entries later, at deterministic points of the log. An open read before
// either horizon is refused (its CONNECT reads again): the first open
// after format 6 is agreed, or after a backup restore, costs one more
// write.

// CmdSessionOpenAsOf (30) is a fenced SessionOpen with AsOf; log format 6.
//
//	type 24 payload | bool owe_will | uvarint as_of
const CmdSessionOpenAsOf CommandType = 30

const (
	touchKeep       = 1 << 18
	touchPruneEvery = touchKeep / 4
)

// touch is the last entry that touched a client id, and the last
// ownership claim known for it then (zero if none): a refused open
// reports it (Result.Prev), so that a CONNECT can tell that a newer
// connection elsewhere came and went since it read.
type touch struct {
	at    uint64
	owner Owner // Node and Since
}

// touch records that the entry at idx changed clientID's session or
// ownership; claim, if not nil, is the claim it made or released.
func (s *state) touch(clientID string, idx uint64, claim *Owner) {
	if s.touchFrom == 0 {
		return
	}
	t := touch{at: idx, owner: s.touched[clientID].owner}
	if claim != nil {
		t.owner = Owner{Node: claim.Node, Since: claim.Since}
	}
	s.touched[clientID] = t
	if idx-s.touchPruned < touchPruneEvery {
		return
	}
	s.touchPruned = idx
	maps.DeleteFunc(s.touched, func(_ string, t touch) bool { return idx-t.at > touchKeep })
}

// openTouched reports why an open of clientID that read no session as of
// asOf must not open: an entry touched the id after asOf (the open's own
// included: the leader's group commit puts other clients' requests in
// it, so the hooks delete an expired session in a write of their own), or
// touches that far back are not known (before touchFrom, or pruned). ""
// if it may.
func (s *state) openTouched(clientID string, asOf uint64) (touch, string) {
	t := s.touched[clientID]
	switch {
	case t.at > asOf:
		return t, fmt.Sprintf("changed at %d, after %d", t.at, asOf)
	case asOf < s.touchFrom:
		return t, fmt.Sprintf("read at %d, before touches were recorded (%d)", asOf, s.touchFrom)
	case s.touchPruned > touchKeep && asOf < s.touchPruned-touchKeep:
		return t, fmt.Sprintf("read at %d, before the touches kept (%d)", asOf, s.touchPruned-touchKeep)
	}
	return t, ""
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
//	kind 10 touched:   str client_id | uvarint index | str owner_node |
//	                   varint owner_since
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
		t := st.touched[id]
		*body = appendUvarint(appendString((*body)[:0], id), t.at)
		*body = appendVarint(appendString(*body, t.owner.Node), t.owner.Since)
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
		id, t := rd.str(), touch{at: rd.uvarint(), owner: Owner{Node: rd.str(), Since: rd.varint()}}
		if err := rd.end(); err != nil || st.touchFrom == 0 || id == "" {
			return fmt.Errorf("%w: touched record: %v", errCorrupt, err)
		}
		st.touched[id] = t
	}
	return nil
}
