package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

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
// they see every write committed before the request. A client that
// connects between the check and the write is not fenced out (its session
// would get the imported subscriptions and queue): import before clients
// move to the cluster, as the migration guide says.

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
	ClientID        string                     `json:"client_id"`
	ProtocolVersion byte                       `json:"protocol_version"`
	ExpiryInterval  uint32                     `json:"expiry_interval"`
	Subscriptions   []replication.Subscription `json:"subscriptions"`
	Queue           []ImportMessage            `json:"queue"`
}

// ImportResult answers one import request.
type ImportResult struct {
	// Imported is false when the cluster already held the topic's
	// retained message or the client's session (left as it was).
	Imported bool `json:"imported"`
	Queued   int  `json:"queued,omitempty"`
	Dropped  int  `json:"dropped,omitempty"` // over max_queued_messages
}

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
	if n.repl == nil {
		http.Error(w, "replication not started", http.StatusServiceUnavailable)
		return false
	}
	if err := json.NewDecoder(r.Body).Decode(v); err != nil {
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
	case err != nil:
		http.Error(w, fmt.Sprintf("import %s: %v", what, err), http.StatusServiceUnavailable)
	default:
		writeJSON(w, res)
	}
}

var errBadImport = errors.New("cannot import")

func validMessage(m ImportMessage) error {
	if m.Topic == "" || !mqtt.IsValidFilter(m.Topic, true) {
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

// ImportSession creates s, disconnected, with its subscriptions and queue,
// unless the cluster holds a session of that client id already. A small
// session is one entry (all or nothing); a larger one is several, and a
// failure part way deletes what was written, so that the import can be run
// again.
func (n *Node) ImportSession(ctx context.Context, s ImportSession) (ImportResult, error) {
	if err := validSession(s); err != nil {
		return ImportResult{}, err
	}
	if err := n.repl.ReadBarrier(ctx); err != nil {
		return ImportResult{}, err
	}
	if _, ok := n.repl.Session(s.ClientID); ok {
		return ImportResult{}, nil
	}
	now := time.Now().UnixMilli()
	self := n.cfg.NodeID
	// As for a CONNECT: MQTT 3.1.1 sessions get the server's maximum.
	expiry := session.ExpiryOf(s.ProtocolVersion, s.ExpiryInterval, n.mqtt.Options.Capabilities.MaximumSessionExpiryInterval)
	open := &replication.SessionOpen{ClientID: s.ClientID, ProtocolVersion: s.ProtocolVersion,
		ExpiryInterval: expiry, Owner: self, At: now, Fenced: true}
	head := []replication.Command{open}
	if len(s.Subscriptions) > 0 {
		head = append(head, &replication.Subscribe{ClientID: s.ClientID, Subscriptions: s.Subscriptions})
	}
	closing := &replication.SessionClose{ClientID: s.ClientID, Owner: self, At: now}
	var enqueues []*replication.Enqueue
	size, oneEntry := 0, true
	for _, m := range s.Queue {
		e := &replication.Enqueue{Topic: m.Topic, Payload: m.Payload, Properties: m.Properties, Expires: m.Expires,
			Created: now, MaxQueued: uint32(n.cfg.MaxQueuedMessages), Policy: replication.DropNewest,
			Targets: []replication.QueueTarget{{ClientID: s.ClientID, QoS: m.QoS, Retain: m.Retain}}}
		enqueues = append(enqueues, e)
		size += len(m.Topic) + len(m.Payload) + 64
		oneEntry = oneEntry && len(m.Payload) <= replication.BlobThreshold
	}
	var res ImportResult
	count := func(r replication.Result) {
		res.Dropped += int(r.Dropped)
		for _, seq := range r.Seqs {
			if seq != 0 {
				res.Queued++
			}
		}
	}
	if oneEntry && size <= importBatchBytes {
		cmds := head
		for _, e := range enqueues {
			cmds = append(cmds, e)
		}
		out, err := n.repl.Apply(ctx, &replication.Batch{Commands: append(cmds, closing)})
		if err != nil {
			return ImportResult{}, err
		}
		if len(out.Results) > 0 && errors.Is(out.Results[0].Err, replication.ErrReopened) {
			return ImportResult{}, nil // created since the check
		}
		for _, r := range out.Results[len(head) : len(head)+len(enqueues)] {
			count(r)
		}
		res.Imported = true
		return res, nil
	}
	out, err := n.repl.Apply(ctx, &replication.Batch{Commands: head})
	if err != nil {
		return ImportResult{}, err
	}
	if len(out.Results) > 0 && out.Results[0].Err != nil {
		if errors.Is(out.Results[0].Err, replication.ErrReopened) {
			return ImportResult{}, nil
		}
		return ImportResult{}, out.Results[0].Err
	}
	opened := out.Index
	if err := n.importQueue(ctx, enqueues, count); err != nil {
		undo, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, uerr := n.repl.Apply(undo, &replication.SessionDelete{ClientID: s.ClientID, IfOpened: opened}); uerr != nil {
			return ImportResult{}, fmt.Errorf("%w (and the part written could not be removed: %v; delete session %q before importing again)", err, uerr, s.ClientID)
		}
		return ImportResult{}, err
	}
	closing.IfOpened = opened
	if _, err := n.repl.Apply(ctx, closing); err != nil {
		return ImportResult{}, err
	}
	res.Imported = true
	return res, nil
}

func (n *Node) importQueue(ctx context.Context, enqueues []*replication.Enqueue, count func(replication.Result)) error {
	for _, e := range enqueues {
		payload := e.Payload
		r, err := hooks.ApplyDurable(ctx, n.repl, n.cfg.ReplicatedSizeLimit, payload, e, func() { e.Payload = nil })
		if err != nil {
			return fmt.Errorf("queued message on %q: %w", e.Topic, err)
		}
		count(r)
	}
	return nil
}

func validSession(s ImportSession) error {
	if s.ClientID == "" {
		return fmt.Errorf("%w: a session without a client id", errBadImport)
	}
	if s.ProtocolVersion < 3 || s.ProtocolVersion > 5 {
		return fmt.Errorf("%w: session %q: protocol version %d", errBadImport, s.ClientID, s.ProtocolVersion)
	}
	for _, sub := range s.Subscriptions {
		if !mqtt.IsValidFilter(sub.Filter, false) || sub.QoS > 2 || sub.RetainHandling > 2 {
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
