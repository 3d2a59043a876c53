package node

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/replication"
)

// The admin API beyond /api/cluster and /api/sessions (issue 14, first
// part): clients connected to this node (list, disconnect one), retained
// messages (list by filter with paging, delete) and raft leadership
// transfer. Reads come from this node's state and never block the broker
// (copies under short read locks); writes go through the admin check.

// ClientInfo is one line of /api/clients.
type ClientInfo struct {
	ClientID        string `json:"client_id"`
	Node            string `json:"node"`
	Remote          string `json:"remote"`
	Listener        string `json:"listener"`
	ProtocolVersion byte   `json:"protocol_version"`
	Keepalive       uint16 `json:"keepalive"`
	CleanStart      bool   `json:"clean_start"`
	Username        string `json:"username,omitempty"`
	// Since is when the connection claimed its client id (cluster-wide
	// list).
	Since time.Time `json:"since,omitzero"`
}

// RetainedInfo is one line of /api/retained (the payload is not listed).
type RetainedInfo struct {
	Topic   string    `json:"topic"`
	QoS     byte      `json:"qos"`
	Bytes   int64     `json:"bytes"`
	Large   bool      `json:"large,omitempty"` // stored as a blob
	Created time.Time `json:"created"`
	Expires time.Time `json:"expires,omitzero"`
}

// RetainedPage is /api/retained: Next is the "after" of the next page,
// empty on the last one.
type RetainedPage struct {
	Messages []RetainedInfo `json:"messages"`
	Next     string         `json:"next,omitempty"`
}

const maxPage = 1000

// Page is one page of a list (?limit= and ?after= on /api/sessions and
// /api/clients): Next is the "after" of the next page, empty on the last.
type Page[T any] struct {
	Items []T    `json:"items"`
	Next  string `json:"next,omitempty"`
}

// pageOf pages items, sorted by key: those after `after`, at most limit.
func pageOf[T any](items []T, key func(T) string, after string, limit int) Page[T] {
	p := Page[T]{Items: []T{}}
	for _, it := range items {
		if after != "" && key(it) <= after {
			continue
		}
		if len(p.Items) == limit {
			p.Next = key(p.Items[limit-1])
			break
		}
		p.Items = append(p.Items, it)
	}
	return p
}

// pageParams reads ?limit= (default and most maxPage) and ?after=; paged
// is false when neither is given (the whole list, as before paging).
func pageParams(w http.ResponseWriter, r *http.Request) (after string, limit int, paged, ok bool) {
	q := r.URL.Query()
	after, limit = q.Get("after"), maxPage
	if v := q.Get("limit"); v != "" {
		l, err := strconv.Atoi(v)
		if err != nil || l <= 0 {
			http.Error(w, "limit must be a positive number", http.StatusBadRequest)
			return "", 0, false, false
		}
		limit = min(l, maxPage)
	}
	return after, limit, q.Has("limit") || q.Has("after"), true
}

// writeList writes items whole, or the page asked for.
func writeList[T any](w http.ResponseWriter, r *http.Request, items []T, key func(T) string) {
	after, limit, paged, ok := pageParams(w, r)
	if !ok {
		return
	}
	if !paged {
		writeJSON(w, items)
		return
	}
	writeJSON(w, pageOf(items, key, after, limit))
}

// operatorDisconnect is 0x98 (administrative action) with a reason of its
// own: the hooks take packets.ErrAdministrativeAction itself for "the
// leader closed this session already" and would write no close (found by
// review: a session delete right after the disconnect was refused as
// connected).
var operatorDisconnect = packets.Code{Code: packets.ErrAdministrativeAction.Code, Reason: "disconnected by an operator"}

func (n *Node) adminRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /api/clients", func(w http.ResponseWriter, r *http.Request) {
		cs := n.Clients()
		key := func(c ClientInfo) string { return c.ClientID }
		if r.URL.Query().Get("all") == "1" {
			// Sorted by node, then client id: the key keeps that order.
			cs, key = n.AllClients(), func(c ClientInfo) string { return c.Node + "\x00" + c.ClientID }
		}
		writeList(w, r, cs, key)
	})
	mux.HandleFunc("POST /api/clients/disconnect", n.adminOnly(n.serveDisconnect))
	mux.HandleFunc("GET /api/retained", n.serveRetained)
	mux.HandleFunc("POST /api/retained/delete", n.adminOnly(n.serveRetainedDelete))
	mux.HandleFunc("POST /api/cluster/transfer-leadership", n.adminOnly(n.serveTransfer))
	n.sessionRoutes(mux)
	n.backupRoutes(mux)
	n.importRoutes(mux)
	n.statusRoutes(mux)
	mux.HandleFunc("GET /api/subscriptions", func(w http.ResponseWriter, r *http.Request) {
		filter := r.URL.Query().Get("filter")
		if filter == "" || !mqtt.IsValidFilter(filter, false) {
			http.Error(w, fmt.Sprintf("missing or invalid ?filter= (%q)", filter), http.StatusBadRequest)
			return
		}
		nodes := n.cluster.RouteHolders(filter)
		if nodes == nil {
			nodes = []string{}
		}
		writeJSON(w, struct {
			Filter string   `json:"filter"`
			Nodes  []string `json:"nodes"`
		}{filter, nodes})
	})
}

// replReady answers 503 when replication is not running (yet).
func (n *Node) replReady(w http.ResponseWriter) bool {
	if n.repl == nil {
		http.Error(w, "replication not started", http.StatusServiceUnavailable)
		return false
	}
	return true
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// Clients lists the clients connected to this node, by client id.
func (n *Node) Clients() []ClientInfo {
	out := []ClientInfo{}
	for _, cl := range n.mqtt.Clients.GetAll() {
		if cl.Net.Inline || cl.Closed() {
			continue
		}
		out = append(out, ClientInfo{ClientID: cl.ID, Node: n.cfg.NodeID, Remote: cl.Net.Remote, Listener: cl.Net.Listener,
			ProtocolVersion: cl.Properties.ProtocolVersion, Keepalive: cl.State.Keepalive, CleanStart: cl.Properties.Clean,
			Username: string(cl.Properties.Username)})
	}
	slices.SortFunc(out, func(a, b ClientInfo) int { return cmp.Compare(a.ClientID, b.ClientID) })
	return out
}

// AllClients lists the clients connected anywhere in the cluster, from the
// replicated ownership table (every connection claims its client id
// there), with this node's details for its own. A node that died keeps
// its entries until the leader releases them (DeadAfter).
func (n *Node) AllClients() []ClientInfo {
	local := map[string]ClientInfo{}
	for _, c := range n.Clients() {
		local[c.ClientID] = c
	}
	if n.repl == nil {
		return n.Clients()
	}
	out := []ClientInfo{}
	for id, o := range n.repl.Owners() {
		c, ok := local[id]
		if !ok || o.Node != n.cfg.NodeID {
			c = ClientInfo{ClientID: id, Node: o.Node}
		}
		c.Since = time.UnixMilli(o.Since)
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b ClientInfo) int {
		return cmp.Or(cmp.Compare(a.Node, b.Node), cmp.Compare(a.ClientID, b.ClientID))
	})
	return out
}

// serveDisconnect closes the connection of ?id= on this node (MQTT 5:
// DISCONNECT 0x98, administrative action). A client connected elsewhere
// gets 404 naming the node that holds it.
func (n *Node) serveDisconnect(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("id")
	if id == "" {
		http.Error(w, "missing ?id=<client id>", http.StatusBadRequest)
		return
	}
	cl, ok := n.mqtt.Clients.Get(id)
	if !ok || cl.Net.Inline || cl.Closed() {
		msg := fmt.Sprintf("client %q is not connected to %s", id, n.cfg.NodeID)
		if n.repl != nil {
			if o, ok := n.repl.Owner(id); ok && o.Node != n.cfg.NodeID {
				msg += fmt.Sprintf("; node %s holds it: ask that node", o.Node)
			}
		}
		http.Error(w, msg, http.StatusNotFound)
		return
	}
	if cl.Properties.ProtocolVersion == 5 {
		_ = n.mqtt.DisconnectClient(cl, operatorDisconnect) // MQTT 3.1.1 has no server DISCONNECT
	}
	cl.Stop(operatorDisconnect)
	n.log.Warn("client disconnected by an operator", "client", id, "remote", r.RemoteAddr)
	fmt.Fprintf(w, "disconnected %s\n", id)
}

// serveRetained lists retained messages matching ?filter= (default #) in
// topic order, ?limit= (default and most 1000) per page, after ?after=.
func (n *Node) serveRetained(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	filter := cmp.Or(q.Get("filter"), "#")
	after, limit, _, ok := pageParams(w, r)
	if !ok {
		return
	}
	if !mqtt.IsValidFilter(filter, false) {
		http.Error(w, fmt.Sprintf("invalid topic filter %q", filter), http.StatusBadRequest)
		return
	}
	if !n.replReady(w) {
		return
	}
	writeJSON(w, retainedPage(n.repl.Retained(), filter, after, limit))
}

// retainedPage pages msgs (sorted by topic).
func retainedPage(msgs []replication.RetainedMessage, filter, after string, limit int) RetainedPage {
	page := RetainedPage{Messages: []RetainedInfo{}}
	now := time.Now()
	for _, m := range msgs {
		if m.Topic <= after && after != "" || !replication.MatchFilter(filter, m.Topic) || m.Expired(now) {
			continue
		}
		if len(page.Messages) == limit {
			page.Next = page.Messages[limit-1].Topic
			break
		}
		ri := RetainedInfo{Topic: m.Topic, QoS: m.QoS, Bytes: int64(len(m.Payload)), Created: time.UnixMilli(m.Created)}
		if m.Blob != nil {
			ri.Bytes, ri.Large = m.Blob.Size, true
		}
		if m.Expires != 0 {
			ri.Expires = time.UnixMilli(m.Expires)
		}
		page.Messages = append(page.Messages, ri)
	}
	return page
}

// serveRetainedDelete clears the retained message of ?topic= through the
// log (every node), as an empty retained publish would.
func (n *Node) serveRetainedDelete(w http.ResponseWriter, r *http.Request) {
	topic := r.URL.Query().Get("topic")
	if topic == "" {
		http.Error(w, "missing ?topic=<topic>", http.StatusBadRequest)
		return
	}
	if !n.replReady(w) {
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	res, err := n.repl.Apply(ctx, &replication.RetainClear{Topic: topic})
	if err != nil {
		http.Error(w, fmt.Sprintf("delete %q: %v", topic, err), http.StatusConflict)
		return
	}
	if !res.Changed {
		http.Error(w, fmt.Sprintf("no retained message on %q", topic), http.StatusNotFound)
		return
	}
	n.log.Warn("retained message deleted by an operator", "topic", topic, "remote", r.RemoteAddr)
	fmt.Fprintf(w, "deleted %s\n", topic)
}

// serveTransfer hands raft leadership to another voter (before
// maintenance of the leader's machine, say).
func (n *Node) serveTransfer(w http.ResponseWriter, r *http.Request) {
	if !n.replReady(w) {
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 15*time.Second)
	defer cancel()
	to, err := n.repl.TransferLeadership(ctx)
	if err != nil {
		http.Error(w, fmt.Sprintf("transfer leadership: %v", err), http.StatusConflict)
		return
	}
	n.log.Warn("raft leadership transferred by an operator", "to", to, "remote", r.RemoteAddr)
	fmt.Fprintf(w, "leader is now %s\n", to)
}

// SessionDetail is /api/sessions/{id}: one persistent session with its
// subscriptions and queue (messages listed without payloads).
type SessionDetail struct {
	SessionInfo
	Filters []string      `json:"filters"`
	Queue   []QueuedBrief `json:"queue"`
}

// QueuedBrief is a queued message without its payload.
type QueuedBrief struct {
	Seq      uint64 `json:"seq"`
	Topic    string `json:"topic"`
	QoS      byte   `json:"qos"`
	Bytes    int64  `json:"bytes"`
	Released bool   `json:"released,omitempty"` // PUBREC received: only PUBREL remains
}

func (n *Node) sessionRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /api/sessions/{id}", func(w http.ResponseWriter, r *http.Request) {
		d, ok := n.SessionDetail(r.PathValue("id"))
		if !ok {
			http.Error(w, fmt.Sprintf("no persistent session %q", r.PathValue("id")), http.StatusNotFound)
			return
		}
		writeJSON(w, d)
	})
	mux.HandleFunc("POST /api/sessions/delete", n.adminOnly(n.serveSessionDelete))
}

// SessionDetail returns the persistent session of id from the log.
func (n *Node) SessionDetail(id string) (SessionDetail, bool) {
	if n.repl == nil {
		return SessionDetail{}, false
	}
	s, ok := n.repl.Session(id)
	if !ok {
		return SessionDetail{}, false
	}
	var info SessionInfo
	for _, si := range n.Sessions() {
		if si.ClientID == id {
			info = si
		}
	}
	d := SessionDetail{SessionInfo: info, Filters: []string{}, Queue: []QueuedBrief{}}
	for f := range s.Subscriptions {
		d.Filters = append(d.Filters, f)
	}
	slices.Sort(d.Filters)
	for _, m := range s.Queue {
		q := QueuedBrief{Seq: m.Seq, Topic: m.Topic, QoS: m.QoS, Bytes: int64(len(m.Payload)), Released: m.Released}
		if m.Blob != nil {
			q.Bytes = m.Blob.Size
		}
		d.Queue = append(d.Queue, q)
	}
	return d, true
}

// serveSessionDelete deletes the persistent session of ?id= (its
// subscriptions and queue) through the log, fenced to the connection
// that last opened it. A connected session is refused: disconnect the
// client first (it would otherwise go on without its session).
func (n *Node) serveSessionDelete(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("id")
	if id == "" {
		http.Error(w, "missing ?id=<client id>", http.StatusBadRequest)
		return
	}
	if !n.replReady(w) {
		return
	}
	s, ok := n.repl.SessionHead(id)
	if !ok {
		http.Error(w, fmt.Sprintf("no persistent session %q", id), http.StatusNotFound)
		return
	}
	if s.Connected {
		http.Error(w, fmt.Sprintf("session %q is connected on %s: disconnect the client first (broker clients disconnect)", id, s.Owner),
			http.StatusConflict)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	res, err := n.repl.Apply(ctx, &replication.SessionDelete{ClientID: id, IfOpened: s.OpenedIndex})
	if err != nil {
		http.Error(w, fmt.Sprintf("delete session %q: %v", id, err), http.StatusConflict)
		return
	}
	if !res.Changed {
		http.Error(w, fmt.Sprintf("session %q changed meanwhile (reconnected or already gone); not deleted", id), http.StatusConflict)
		return
	}
	n.log.Warn("persistent session deleted by an operator", "client", id, "remote", r.RemoteAddr)
	fmt.Fprintf(w, "deleted session %s\n", id)
}

func (n *Node) backupRoutes(mux *http.ServeMux) {
	// The backup holds every payload: an admin read.
	mux.HandleFunc("GET /api/backup", n.adminOnly(func(w http.ResponseWriter, r *http.Request) {
		if !n.replReady(w) {
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		size, err := n.repl.Backup(r.Context(), w)
		if err != nil {
			if size == 0 {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
			}
			// Mid-stream: the connection ends early and the client's
			// checksum fails.
			n.log.Warn("backup failed", "error", err, "bytes", size, "remote", r.RemoteAddr)
			return
		}
		n.log.Info("backup taken", "bytes", size, "remote", r.RemoteAddr)
	}))
	mux.HandleFunc("POST /api/restore", n.adminOnly(func(w http.ResponseWriter, r *http.Request) {
		if !n.replReady(w) {
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Minute)
		defer cancel()
		err := n.repl.RestoreBackup(ctx, r.Body, r.URL.Query().Get("force") == "1")
		switch {
		case err == nil:
			n.log.Warn("cluster state replaced from a backup by an operator", "remote", r.RemoteAddr)
			fmt.Fprintln(w, "restored")
		case errors.Is(err, replication.ErrHasState), errors.Is(err, replication.ErrNotLeader):
			http.Error(w, err.Error(), http.StatusConflict)
		default:
			http.Error(w, err.Error(), http.StatusBadRequest)
		}
	}))
}
