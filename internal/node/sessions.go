package node

import (
	"sort"
	"time"
)

// SessionInfo is one session as /api/sessions and `broker sessions` show it:
// every persistent session of the cluster (from the replicated state, the
// same on every node), plus the clean sessions connected to this node.
type SessionInfo struct {
	ClientID        string    `json:"client_id"`
	Owner           string    `json:"owner"` // node holding (or that last held) the connection
	State           string    `json:"state"` // connected or offline
	ProtocolVersion byte      `json:"protocol_version,omitempty"`
	Persistent      bool      `json:"persistent"`
	Subscriptions   int       `json:"subscriptions"`
	QueueDepth      int       `json:"queue_depth"` // QoS 1/2 messages queued or in flight
	HasWill         bool      `json:"has_will,omitempty"`
	ExpirySeconds   *uint32   `json:"expiry_seconds,omitempty"` // absent: never expires
	Remote          string    `json:"remote,omitempty"`
	DisconnectedAt  time.Time `json:"disconnected_at,omitzero"`
}

// Sessions lists the sessions, sorted by client id.
func (n *Node) Sessions() []SessionInfo {
	byID := map[string]*SessionInfo{}
	var out []SessionInfo
	if n.repl != nil {
		for _, s := range n.repl.Sessions() {
			full, ok := n.repl.SessionHead(s.ClientID)
			if !ok || (s.ExpiryInterval == 0 && len(full.Subscriptions) == 0 && !s.Connected) {
				continue // a clean session's will mirror, ended
			}
			si := SessionInfo{ClientID: s.ClientID, Owner: s.Owner, State: "offline",
				ProtocolVersion: full.ProtocolVersion, Persistent: s.ExpiryInterval > 0,
				Subscriptions: len(full.Subscriptions), QueueDepth: s.QueueDepth, HasWill: s.HasWill}
			if s.ExpiryInterval != 0xFFFFFFFF {
				e := s.ExpiryInterval
				si.ExpirySeconds = &e
			}
			if s.Connected {
				si.State = "connected"
			} else if s.DisconnectedAt > 0 {
				si.DisconnectedAt = time.UnixMilli(s.DisconnectedAt).UTC()
			}
			out = append(out, si)
		}
		for i := range out {
			byID[out[i].ClientID] = &out[i]
		}
	}
	for _, cl := range n.mqtt.Clients.GetAll() {
		if cl.Net.Inline || cl.Closed() {
			continue
		}
		if si, ok := byID[cl.ID]; ok {
			si.Remote = cl.Net.Remote
			continue
		}
		out = append(out, SessionInfo{ClientID: cl.ID, Owner: n.cfg.NodeID, State: "connected",
			ProtocolVersion: cl.Properties.ProtocolVersion, Subscriptions: cl.State.Subscriptions.Len(),
			QueueDepth: cl.State.Inflight.Len(), Remote: cl.Net.Remote})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ClientID < out[j].ClientID })
	return out
}
