package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/mqtt-ha/broker/hooks"
	"github.com/mqtt-ha/broker/internal/session"
	"github.com/mqtt-ha/broker/replication"
)

// Importing state from another broker (`broker import-mosquitto`): the
// command reads the file and sends one retained message or one session per
// request; the node writes it through the log like a client's write.
//
// Nothing present is overwritten, so running an import twice changes
// nothing the second time: a topic that has a retained message here keeps
// it, and a client id that has a session here keeps it (its subscriptions
// and queue are not merged). Both checks read after a read barrier, so
// they see every write committed before the request. Import before the
// clients move to the cluster: a run after they did brings back what they
// have deleted since (a retained message cleared, a session ended).

// ImportMessage is a retained or queued message to import.
type ImportMessage struct {
	Topic      string                 `json:"topic"`
	Payload    []byte                 `json:"payload"`
	QoS        byte                   `json:"qos"`
	Retain     bool                   `json:"retain,omitempty"`  // queued: the retain flag it is delivered with
	Expires    int64                  `json:"expires,omitempty"` // Unix ms, 0 for never
	Properties replication.Properties `json:"properties"`
}

// ImportSession is a persistent session to import, disconnected.
type ImportSession struct {
	ClientID        string `json:"client_id"`
	ProtocolVersion byte   `json:"protocol_version"`
	ExpiryInterval  uint32 `json:"expiry_interval"`
	// Username is the one the client logged in with at Mosquitto: the ACL
	// decides on the imported subscriptions as for its SUBSCRIBE.
	Username      string                     `json:"username,omitempty"`
	Subscriptions []replication.Subscription `json:"subscriptions"`
	Queue         []ImportMessage            `json:"queue"`
}

// ImportResult answers one import request.
type ImportResult struct {
	// Imported is false when the cluster already held the topic's
	// retained message or the client's session (left as it was).
	Imported bool `json:"imported"`
	Queued   int  `json:"queued,omitempty"`
	Dropped  int  `json:"dropped,omitempty"` // over max_queued_messages
	// Skipped lists what was left out (subscriptions the ACL denies).
	Skipped []string `json:"skipped,omitempty"`
}

// maxImportRequest bounds one import request's body.
const maxImportRequest = 1 << 30

// importBatchBytes bounds a session written in one entry; a larger one is
// written in several (its open first, its close last).
const importBatchBytes = 512 << 10

func (n *Node) importRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST /api/import/retained", n.adminOnly(func(w http.ResponseWriter, r *http.Request) {
		var m ImportMessage
		if !n.decodeImport(w, r, &m) {
			return
		}
		n.answerImport(w, r, "retained "+m.Topic, func(ctx context.Context) (ImportResult, error) { return n.ImportRetained(ctx, m) })
	}))
	mux.HandleFunc("POST /api/import/session", n.adminOnly(func(w http.ResponseWriter, r *http.Request) {
		var s ImportSession
		if !n.decodeImport(w, r, &s) {
			return
		}
		n.answerImport(w, r, "session "+s.ClientID, func(ctx context.Context) (ImportResult, error) { return n.ImportSession(ctx, s) })
	}))
}

func (n *Node) decodeImport(w http.ResponseWriter, r *http.Request, v any) bool {
	if !n.replReady(w) {
		return false
	}
	// A session comes whole, queue included: bounded all the same.
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxImportRequest)).Decode(v); err != nil {
		http.Error(w, fmt.Sprintf("bad import request: %v", err), http.StatusBadRequest)
		return false
	}
	return true
}

func (n *Node) answerImport(w http.ResponseWriter, r *http.Request, what string, do func(context.Context) (ImportResult, error)) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Minute)
	defer cancel()
	res, err := do(ctx)
	switch {
	case errors.Is(err, errBadImport):
		http.Error(w, err.Error(), http.StatusBadRequest)
	case errors.Is(err, replication.ErrTooLarge):
		http.Error(w, fmt.Sprintf("import %s: %v", what, err), http.StatusRequestEntityTooLarge)
	case err != nil:
		http.Error(w, fmt.Sprintf("import %s: %v", what, err), http.StatusServiceUnavailable)
	default:
		writeJSON(w, res)
	}
}

var errBadImport = errors.New("cannot import")

// maxSubscriptionID is the largest MQTT 5 subscription identifier.
const maxSubscriptionID = 268435455

// validString: UTF-8 without U+0000, as MQTT requires of every string.
func validString(v string) bool { return utf8.ValidString(v) && !strings.ContainsRune(v, 0) }

func validMessage(m ImportMessage) error {
	if m.Topic == "" || !validString(m.Topic) || !mqtt.IsValidFilter(m.Topic, true) {
		return fmt.Errorf("%w: invalid topic name %q", errBadImport, m.Topic)
	}
	if m.QoS > 2 {
		return fmt.Errorf("%w: QoS %d on %q", errBadImport, m.QoS, m.Topic)
	}
	return nil
}

// ImportRetained stores m as its topic's retained message unless the
// cluster holds one there already.
func (n *Node) ImportRetained(ctx context.Context, m ImportMessage) (ImportResult, error) {
	if err := validMessage(m); err != nil {
		return ImportResult{}, err
	}
	if len(m.Payload) == 0 {
		return ImportResult{}, fmt.Errorf("%w: an empty retained message on %q (it would clear the topic)", errBadImport, m.Topic)
	}
	if err := n.repl.ReadBarrier(ctx); err != nil {
		return ImportResult{}, err
	}
	if _, ok := n.repl.RetainedMessage(m.Topic); ok {
		return ImportResult{}, nil
	}
	p := m.Properties
	rs := &replication.RetainSet{Msg: replication.RetainedMessage{Topic: m.Topic, Payload: m.Payload, QoS: m.QoS,
		PayloadFormat: p.PayloadFormat, ContentType: p.ContentType, ResponseTopic: p.ResponseTopic,
		CorrelationData: p.CorrelationData, UserProperties: p.UserProperties,
		Expires: m.Expires, Created: time.Now().UnixMilli()}}
	if _, err := hooks.ApplyDurable(ctx, n.repl, n.cfg.ReplicatedSizeLimit, m.Payload, rs, func() { rs.Msg.Payload = nil }); err != nil {
		return ImportResult{}, err
	}
	return ImportResult{Imported: true}, nil
}

// ImportSession creates s, disconnected, with its subscriptions (those
// the ACL allows its client) and queue, unless the cluster holds a session
// of that client id already. It is written in several entries: the open
// under session.ImportOwner (fenced: only where no session exists), the
// subscriptions and queue, then the close. A session still open under
// ImportOwner is an import that did not finish; it is deleted and written
// again. A client that connects meanwhile resumes the session being
// imported (it gets what is written after its CONNECT too).
func (n *Node) ImportSession(ctx context.Context, s ImportSession) (ImportResult, error) {
	if err := validSession(s); err != nil {
		return ImportResult{}, err
	}
	if err := n.repl.ReadBarrier(ctx); err != nil {
		return ImportResult{}, err
	}
	if cur, ok := n.repl.SessionHead(s.ClientID); ok {
		if cur.Owner != session.ImportOwner || !cur.Connected {
			return ImportResult{}, nil
		}
		del, err := n.repl.Apply(ctx, &replication.SessionDelete{ClientID: s.ClientID, IfOpened: cur.OpenedIndex})
		if err != nil {
			return ImportResult{}, fmt.Errorf("removing an unfinished import: %w", err)
		}
		if !del.Changed {
			return ImportResult{}, nil // resumed by its client meanwhile
		}
	}
	var res ImportResult
	var subs []replication.Subscription
	for _, sub := range s.Subscriptions {
		if n.auth.SubscribeAllowed(s.ClientID, s.Username, sub.Filter) {
			subs = append(subs, sub)
		} else {
			res.Skipped = append(res.Skipped, fmt.Sprintf("session %q: subscription %q: denied by the ACL", s.ClientID, sub.Filter))
		}
	}
	// As for a CONNECT: MQTT 3.1.1 sessions get the server's maximum.
	expiry := session.ExpiryOf(s.ProtocolVersion, s.ExpiryInterval, n.mqtt.Options.Capabilities.MaximumSessionExpiryInterval)
	out, err := n.repl.Apply(ctx, &replication.SessionOpen{ClientID: s.ClientID, ProtocolVersion: s.ProtocolVersion,
		ExpiryInterval: expiry, Owner: session.ImportOwner, At: time.Now().UnixMilli(), Fenced: true})
	if errors.Is(err, replication.ErrReopened) {
		return ImportResult{}, nil // created since the check
	}
	if err != nil {
		return ImportResult{}, err
	}
	opened := out.Index
	if err := n.importContent(ctx, s, subs, &res); err != nil {
		// Best effort: the next run deletes an unfinished import anyway.
		undo, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, _ = n.repl.Apply(undo, &replication.SessionDelete{ClientID: s.ClientID, IfOpened: opened})
		return ImportResult{}, err
	}
	closing := &replication.SessionClose{ClientID: s.ClientID, Owner: session.ImportOwner, IfOpened: opened, At: time.Now().UnixMilli()}
	if _, err := n.repl.Apply(ctx, closing); err != nil {
		return ImportResult{}, err
	}
	res.Imported = true
	return res, nil
}

// importSubsPerEntry bounds one Subscribe (a client may hold tens of
// thousands of subscriptions; an entry is at most MaxBatchBytes).
const importSubsPerEntry = 1000

// importContent writes the subscriptions, then the queue in order: small
// messages batched into entries of at most importBatchBytes, large ones
// as blobs, one at a time.
func (n *Node) importContent(ctx context.Context, s ImportSession, subs []replication.Subscription, res *ImportResult) error {
	var pending []replication.Command
	for len(subs) > 0 {
		k := min(len(subs), importSubsPerEntry)
		pending = append(pending, &replication.Subscribe{ClientID: s.ClientID, Subscriptions: subs[:k]})
		subs = subs[k:]
	}
	count := func(r replication.Result) {
		res.Dropped += int(r.Dropped)
		for _, seq := range r.Seqs {
			if seq != 0 {
				res.Queued++
			}
		}
	}
	flush := func() error {
		for _, chunk := range session.ChunkCommands(pending, importBatchBytes) {
			out, err := n.repl.Apply(ctx, &replication.Batch{Commands: chunk})
			if err != nil {
				return err
			}
			for _, r := range out.Results {
				if r.Err != nil {
					return r.Err
				}
				count(r)
			}
		}
		pending = nil
		return nil
	}
	now := time.Now().UnixMilli()
	for _, m := range s.Queue {
		e := &replication.Enqueue{Topic: m.Topic, Payload: m.Payload, Properties: m.Properties, Expires: m.Expires,
			Created: now, MaxQueued: uint32(n.cfg.MaxQueuedMessages), Policy: replication.DropNewest,
			Targets: []replication.QueueTarget{{ClientID: s.ClientID, QoS: m.QoS, Retain: m.Retain,
				SubscriptionIDs: subscriptionIDsFor(s.Subscriptions, m.Topic)}}}
		if len(m.Payload) <= replication.BlobThreshold {
			pending = append(pending, e)
			continue
		}
		if err := flush(); err != nil {
			return err
		}
		r, err := hooks.ApplyDurable(ctx, n.repl, n.cfg.ReplicatedSizeLimit, m.Payload, e, func() { e.Payload = nil })
		if err != nil {
			return fmt.Errorf("queued message on %q: %w", m.Topic, err)
		}
		count(r)
	}
	return flush()
}

// subscriptionIDsFor is what a publish on topic would carry to the
// session: the identifiers of its matching subscriptions.
func subscriptionIDsFor(subs []replication.Subscription, topic string) []uint32 {
	var ids []uint32
	for _, sub := range subs {
		if sub.Identifier != 0 && replication.MatchFilter(sub.Filter, topic) && !slices.Contains(ids, sub.Identifier) {
			ids = append(ids, sub.Identifier)
		}
	}
	slices.Sort(ids)
	return ids
}

func validSession(s ImportSession) error {
	if !validString(s.ClientID) || s.ClientID == "" || !validString(s.Username) {
		return fmt.Errorf("%w: session %q: client id or username empty or not UTF-8", errBadImport, s.ClientID)
	}
	if s.ProtocolVersion < 3 || s.ProtocolVersion > 5 {
		return fmt.Errorf("%w: session %q: protocol version %d", errBadImport, s.ClientID, s.ProtocolVersion)
	}
	if s.ProtocolVersion == 5 && s.ExpiryInterval == 0 {
		return fmt.Errorf("%w: session %q: session expiry 0 (it would end at once)", errBadImport, s.ClientID)
	}
	for _, sub := range s.Subscriptions {
		if !validString(sub.Filter) || !mqtt.IsValidFilter(sub.Filter, false) || sub.QoS > 2 || sub.RetainHandling > 2 ||
			sub.Identifier > maxSubscriptionID {
			return fmt.Errorf("%w: session %q: subscription %+v", errBadImport, s.ClientID, sub)
		}
		if mqtt.IsSharedFilter(sub.Filter) {
			return fmt.Errorf("%w: session %q: shared subscription %q (shared subscriptions end with their connection here)", errBadImport, s.ClientID, sub.Filter)
		}
	}
	for _, m := range s.Queue {
		if err := validMessage(m); err != nil {
			return fmt.Errorf("session %q: %w", s.ClientID, err)
		}
		if m.QoS == 0 {
			return fmt.Errorf("%w: session %q: a queued QoS 0 message (persistent sessions queue QoS 1 and 2 here)", errBadImport, s.ClientID)
		}
	}
	return nil
}
