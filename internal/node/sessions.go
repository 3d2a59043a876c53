package node

import (
	"sort"
	"time"

	"github.com/mqtt-ha/broker/hooks"
)

// SessionInfo is one session as /api/sessions and `broker sessions` show it.
// Until persistent sessions are replicated, each node lists the sessions it
// holds itself (Owner is always this node).
type SessionInfo struct {
	ClientID        string    `json:"client_id"`
	Owner           string    `json:"owner"`
	State           string    `json:"state"` // connected or offline
	ProtocolVersion byte      `json:"protocol_version"`
	Persistent      bool      `json:"persistent"`
	Subscriptions   int       `json:"subscriptions"`
	QueueDepth      int       `json:"queue_depth"` // QoS 1/2 messages queued or in flight
	Remote          string    `json:"remote,omitempty"`
	DisconnectedAt  time.Time `json:"disconnected_at,omitzero"`
}

// Sessions lists the MQTT sessions this node holds, sorted by client id.
func (n *Node) Sessions() []SessionInfo {
	var out []SessionInfo
	for _, cl := range n.mqtt.Clients.GetAll() {
		if cl.Net.Inline {
			continue
		}
		si := SessionInfo{
			ClientID: cl.ID, Owner: n.cfg.NodeID, State: "connected",
			ProtocolVersion: cl.Properties.ProtocolVersion, Persistent: !hooks.CleanSession(cl),
			Subscriptions: cl.State.Subscriptions.Len(), QueueDepth: cl.State.Inflight.Len(), Remote: cl.Net.Remote,
		}
		if cl.Closed() {
			si.State, si.Remote = "offline", ""
			if t := cl.StopTime(); t > 0 {
				si.DisconnectedAt = time.Unix(t, 0).UTC()
			}
		}
		out = append(out, si)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ClientID < out[j].ClientID })
	return out
}
