package replication

import (
	"maps"
	"slices"
	"time"
)

// UserProperty is one MQTT 5 user property (order and duplicates matter).
type UserProperty struct {
	Key   string
	Value string
}

// RetainedMessage is a retained MQTT message as the cluster stores it. The
// type is this package's own (never mochi's), so the state machine is
// testable without a broker.
type RetainedMessage struct {
	Topic   string
	Payload []byte
	QoS     byte
	// MQTT 5 properties that a retained message carries to new subscribers.
	PayloadFormat   byte // 0 unspecified bytes, 1 UTF-8
	ContentType     string
	ResponseTopic   string
	CorrelationData []byte
	UserProperties  []UserProperty
	// Expires is the absolute expiry deadline in Unix milliseconds, 0 for
	// never. It is computed once by the publisher's node and travels in the
	// command, because Apply never reads the clock.
	Expires int64
	// Created is when the publishing node received the message (Unix ms).
	Created int64
	// Blob, when set, is the payload (Payload is then empty): a large
	// message stored as a blob (blob.go).
	Blob *BlobRef
	// Index is the raft log index that stored this value. The state machine
	// sets it (it is not part of RetainSet's encoding); it orders versions
	// of a topic and makes conditional clears (RetainClear.IfIndex) possible.
	Index uint64
}

// Expired reports whether the message's expiry deadline has passed at now.
// Readers filter with their own clock; the state machine never does.
func (m *RetainedMessage) Expired(now time.Time) bool {
	return m.Expires != 0 && now.UnixMilli() >= m.Expires
}

// ExpiryInterval returns the remaining MQTT 5 message expiry interval in
// whole seconds (rounded up) at now and whether the message has an expiry.
func (m *RetainedMessage) ExpiryInterval(now time.Time) (uint32, bool) {
	if m.Expires == 0 {
		return 0, false
	}
	left := m.Expires - now.UnixMilli()
	if left <= 0 {
		return 0, true
	}
	return uint32((left + 999) / 1000), true
}

// Owner is the node holding the live connection of a client id. Epoch is a
// cluster-wide fencing token: every claim of any client id takes the next
// value, so a stale release or a delayed takeover can always be recognised.
type Owner struct {
	Node  string
	Epoch uint64
	Since int64 // Unix ms, from the claim command
}

// RetainedChange is passed to Config.OnRetained after a retained message was
// set or cleared by an applied log entry.
type RetainedChange struct {
	Topic   string
	Cleared bool
	// Msg is the new value when !Cleared.
	Msg RetainedMessage
	// Index is the log index of the entry that made the change.
	Index uint64
}

// OwnerChange is passed to Config.OnOwner after a client id's owner changed.
type OwnerChange struct {
	ClientID string
	// Owner is the new owner; zero (Node == "") when the client id was
	// released.
	Owner Owner
	// Prev is the owner it replaced (zero if none).
	Prev  Owner
	Index uint64
}

// state is the replicated state. It is only mutated by applyCommand under
// FSM.mu, and never handed out: readers get copies.
type state struct {
	retained map[string]RetainedMessage
	owners   map[string]Owner
	// sessions are the persistent sessions (session_state.go); entries
	// are copy-on-write once a clone shares them.
	sessions map[string]*sessionEntry
	// epoch is the last ownership epoch issued.
	epoch uint64
	// departed are the servers recorded as gone on purpose (Departure),
	// with the Unix ms of their leave.
	departed map[string]int64
	// blobs are the large payloads (blob.go); their data is in files.
	blobs map[BlobID]*blobEntry
	// owed are the wills owed by replaced connections (owed_will.go).
	owed map[owedKey]OwedWill
	// touched: client id -> the last entry that deleted its session or
	// claimed or released it, recorded from entry touchFrom on and pruned
	// at touchPruned (touched.go).
	touched                map[string]touch
	touchFrom, touchPruned uint64
	// format is the log format recorded in the log (LogFormat), 0 before
	// format 7 was.
	format uint32
	// owedRetained indexes the owed wills with a retained will that no
	// newer retained write superseded yet, by the will's topic
	// (owed_will.go). Derived from owed: rebuilt on restore.
	owedRetained map[string][]owedKey
	// synced is the last log entry a snapshot of this state holds (set by
	// FSM.Snapshot; not part of the replicated state itself).
	synced uint64

	// store and dir hold the blob files (nil until needed: tests); blob is
	// the reference WithBlob applies its command with.
	store *blobStore
	dir   *blobDir
	blob  *BlobRef
}

func newState() *state {
	return &state{retained: make(map[string]RetainedMessage), owners: make(map[string]Owner),
		sessions: make(map[string]*sessionEntry), departed: make(map[string]int64), blobs: make(map[BlobID]*blobEntry),
		owed: make(map[owedKey]OwedWill), owedRetained: make(map[string][]owedKey), touched: make(map[string]touch)}
}

// clone copies the maps. Values are copied by value; their byte slices are
// shared, which is safe because stored messages are never mutated (the
// codec always decodes into fresh slices). Session entries are shared and
// frozen: the applier copies one before mutating it (copy-on-write), so a
// snapshot costs O(sessions), not O(queued messages).
func (s *state) clone() *state {
	blobs := make(map[BlobID]*blobEntry, len(s.blobs))
	for id, b := range s.blobs {
		blobs[id] = b.clone()
	}
	return &state{retained: maps.Clone(s.retained), owners: maps.Clone(s.owners),
		sessions: s.freezeSessions(), epoch: s.epoch, departed: maps.Clone(s.departed),
		blobs: blobs, owed: maps.Clone(s.owed), touched: maps.Clone(s.touched), touchFrom: s.touchFrom,
		touchPruned: s.touchPruned, format: s.format, owedRetained: cloneOwedIndex(s.owedRetained), store: s.store, dir: s.dir}
}

// event is an observer notification produced by applyCommand and delivered
// after the state lock is released.
type event struct {
	retained *RetainedChange
	owner    *OwnerChange
	session  *SessionChange
}

// applyCommand applies one decoded command at log index idx. It is
// deterministic: it reads nothing but s, cmd and idx (no clock, no
// randomness, no map iteration order). Domain errors are returned in the
// Result; the state is then unchanged.
func (s *state) applyCommand(cmd Command, idx uint64, evs []event) (Result, []event) {
	res := Result{Index: idx}
	if err := cmd.validate(); err != nil {
		res.Err = err
		return res, evs
	}
	switch c := cmd.(type) {
	case *RetainSet:
		evs = s.applyRetainSet(c.Msg, idx, &res, evs)
	case *RetainClear:
		if c.IfIndex == 0 {
			s.supersedeOwed(c.Topic, allOwed) // not an expiry sweep's (IfIndex): no news (owed_will.go)
		}
		cur, ok := s.retained[c.Topic]
		if !ok || (c.IfIndex != 0 && cur.Index != c.IfIndex) {
			return res, evs
		}
		delete(s.retained, c.Topic)
		res.Changed = true
		evs = append(evs, event{retained: &RetainedChange{Topic: c.Topic, Cleared: true, Index: idx}})
	case *ClaimOwner:
		prev := s.owners[c.ClientID]
		s.epoch++
		o := Owner{Node: c.Node, Epoch: s.epoch, Since: c.At}
		s.owners[c.ClientID] = o
		s.touch(c.ClientID, idx, &o)
		res.Changed, res.Epoch, res.Prev = true, o.Epoch, prev
		evs = append(evs, event{owner: &OwnerChange{ClientID: c.ClientID, Owner: o, Prev: prev, Index: idx}})
	case *ReclaimOwner:
		prev, ok := s.owners[c.ClientID]
		res.Prev = prev
		if ok && prev.Node != c.Node && prev.Since > c.At {
			return res, evs // a newer connection elsewhere holds it
		}
		s.epoch++
		o := Owner{Node: c.Node, Epoch: s.epoch, Since: c.At}
		s.owners[c.ClientID] = o
		s.touch(c.ClientID, idx, &o)
		res.Changed, res.Epoch = true, o.Epoch
		evs = append(evs, event{owner: &OwnerChange{ClientID: c.ClientID, Owner: o, Prev: prev, Index: idx}})
	case *ReleaseOwner:
		cur, ok := s.owners[c.ClientID]
		res.Prev = cur
		if !ok || cur.Node != c.Node || cur.Epoch != c.Epoch {
			return res, evs // stale: someone claimed it since
		}
		delete(s.owners, c.ClientID)
		s.touch(c.ClientID, idx, &cur)
		res.Changed, res.Epoch = true, cur.Epoch
		evs = append(evs, event{owner: &OwnerChange{ClientID: c.ClientID, Prev: cur, Index: idx}})
	case *Departure:
		s.applyDeparture(c, &res)
	case *BlobChunk:
		s.applyBlobChunk(c, idx, &res)
	case *WithBlob:
		evs = s.applyWithBlob(c, idx, &res, evs)
	case *BlobDrop:
		s.applyBlobDrop(c, &res)
	case *LogFormat:
		s.applyLogFormat(c, &res)
	case *Batch:
		res.Results = make([]Result, len(c.Commands))
		for i, sub := range c.Commands {
			res.Results[i], evs = s.applyCommand(sub, idx, evs)
			res.Changed = res.Changed || res.Results[i].Changed
		}
	default:
		var ok bool
		if evs, ok = s.applySession(cmd, &res, evs); !ok {
			// validate() rejects every type the switches do not know.
			res.Err = ErrInvalidCommand
		}
	}
	return res, evs
}

func (s *state) applyRetainSet(m RetainedMessage, idx uint64, res *Result, evs []event) []event {
	m.Index, m.Blob = idx, s.blob
	s.retained[m.Topic] = m
	s.supersedeOwed(m.Topic, allOwed)
	res.Changed = true
	return append(evs, event{retained: &RetainedChange{Topic: m.Topic, Msg: m, Index: idx}})
}

// sortedTopics returns the retained topics in order (deterministic
// snapshots and reads).
func (s *state) sortedTopics() []string {
	return slices.Sorted(maps.Keys(s.retained))
}

func (s *state) sortedClients() []string {
	return slices.Sorted(maps.Keys(s.owners))
}
