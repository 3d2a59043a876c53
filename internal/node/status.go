package node

import (
	"cmp"
	"embed"
	"maps"
	"net/http"
	"slices"
	"time"

	"github.com/mqtt-ha/broker/internal/logx"
	"github.com/mqtt-ha/broker/replication"
)

// The status page: ui/index.html, served at / from the binary, polls
// /api/overview. No build step, no external resources (a cluster's HTTP
// port is often reached through a port-forward with no internet).

//go:embed ui/index.html
var ui embed.FS

// Overview is /api/overview: what the status page shows, as this node
// sees it.
type Overview struct {
	Node    string              `json:"node"`
	Version string              `json:"version"`
	Started time.Time           `json:"started"`
	Now     time.Time           `json:"now"`
	Members []OverviewMember    `json:"members"`
	Raft    *replication.Status `json:"raft,omitempty"`
	// Messages this node received from clients and peers, and sent.
	MessagesReceived int64            `json:"messages_received"`
	MessagesSent     int64            `json:"messages_sent"`
	Retained         int64            `json:"retained"`
	Sessions         OverviewSessions `json:"sessions"`
	Warnings         []logx.Entry     `json:"warnings"`
}

// OverviewMember is one member of the cluster with its health and load.
type OverviewMember struct {
	ID        string `json:"id"`
	Self      bool   `json:"self"`
	State     string `json:"state"`     // gossip: alive, suspect, dead, left
	Connected bool   `json:"connected"` // this node's forwarding link to it
	Voter     bool   `json:"voter"`
	Leader    bool   `json:"leader"`
	// Clients connected to the member, from the replicated ownership
	// table (every connection claims its client id there).
	Clients    int    `json:"clients"`
	QueueDepth int    `json:"queue_depth"` // forwarding queue from this node
	Dropped    uint64 `json:"dropped"`
}

// OverviewSessions summarizes the persistent sessions, cluster-wide.
type OverviewSessions struct {
	Count     int `json:"count"`
	Connected int `json:"connected"`
	Queued    int `json:"queued"`
	// Deepest lists the longest queues, deepest first (at most 5).
	Deepest []SessionDepth `json:"deepest"`
}

// SessionDepth is a session's queue depth.
type SessionDepth struct {
	ClientID string `json:"client_id"`
	Depth    int    `json:"depth"`
}

func (n *Node) statusRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'")
		http.ServeFileFS(w, r, ui, "ui/index.html")
	})
	mux.HandleFunc("GET /api/overview", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, n.Overview()) })
}

// Overview gathers the status page's data from copies taken under short
// locks.
func (n *Node) Overview() Overview {
	info := n.mqtt.Info.Clone()
	o := Overview{Node: n.cfg.NodeID, Version: n.cfg.Version, Started: time.Unix(info.Started, 0), Now: time.Now(),
		MessagesReceived: info.MessagesReceived, MessagesSent: info.MessagesSent, Retained: info.Retained,
		Warnings: n.recent.Entries(), Members: []OverviewMember{}, Sessions: OverviewSessions{Deepest: []SessionDepth{}}}
	clients := map[string]int{}
	voters := map[string]bool{}
	if n.repl != nil {
		st := n.repl.Status()
		o.Raft = &st
		for _, v := range st.Voters {
			voters[v.ID] = true
		}
		for _, ow := range n.repl.Owners() {
			clients[ow.Node]++
		}
		var depths []SessionDepth
		for _, s := range n.repl.Sessions() {
			o.Sessions.Count++
			o.Sessions.Queued += s.QueueDepth
			if s.Connected {
				o.Sessions.Connected++
			}
			if s.QueueDepth > 0 {
				depths = append(depths, SessionDepth{s.ClientID, s.QueueDepth})
			}
		}
		slices.SortFunc(depths, func(a, b SessionDepth) int {
			return cmp.Or(cmp.Compare(b.Depth, a.Depth), cmp.Compare(a.ClientID, b.ClientID))
		})
		o.Sessions.Deepest = append(o.Sessions.Deepest, depths[:min(len(depths), 5)]...)
	}
	seen := map[string]bool{}
	for _, m := range n.cluster.Status().Members {
		seen[m.ID] = true
		om := OverviewMember{ID: m.ID, Self: m.Self, State: m.State, Connected: m.Connected || m.Self, Voter: voters[m.ID],
			Clients: clients[m.ID], QueueDepth: m.QueueDepth, Dropped: m.Dropped}
		if m.Self {
			om.Clients = len(n.Clients()) // exact, and known before raft has caught up
		}
		om.Leader = o.Raft != nil && o.Raft.LeaderID == m.ID
		o.Members = append(o.Members, om)
	}
	// A voter gossip does not know (down since before this node started).
	for _, id := range slices.Sorted(maps.Keys(voters)) {
		if !seen[id] {
			o.Members = append(o.Members, OverviewMember{ID: id, State: "unknown", Voter: true, Clients: clients[id]})
		}
	}
	return o
}
