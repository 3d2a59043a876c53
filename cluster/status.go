package cluster

import (
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"
)

// Status is a point-in-time view of the node for /api/cluster and
// `broker cluster status`. It is plain data and JSON-serialisable.
type Status struct {
	NodeID          string         `json:"node_id"`
	State           string         `json:"state"`
	ProtocolVersion int            `json:"protocol_version"` // the newest version this node speaks
	GossipAddr      string         `json:"gossip_addr"`
	ClusterAddr     string         `json:"cluster_addr"`
	Encrypted       bool           `json:"encrypted"`
	Incarnation     uint64         `json:"incarnation"`
	RouteVersion    uint64         `json:"route_version"`
	LocalRoutes     int            `json:"local_routes"`
	AliveMembers    int            `json:"alive_members"`
	Members         []MemberStatus `json:"members"`
}

// MemberStatus describes one member as this node sees it. Queue and
// connection fields are about this node's outgoing forwarding to it.
// ProtocolVersion is what the member announces in its metadata: the oldest
// version it speaks (a version-1 node's only one); the version two nodes
// talk at is agreed per connection and is not shown. For this node itself
// it is its newest version, as in Status.
type MemberStatus struct {
	ID              string    `json:"id"`
	Self            bool      `json:"self"`
	State           string    `json:"state"` // alive, suspect, dead, left
	Since           time.Time `json:"since"`
	GossipAddr      string    `json:"gossip_addr"`
	ClusterAddr     string    `json:"cluster_addr"`
	MQTTPort        int       `json:"mqtt_port"`
	ProtocolVersion int       `json:"protocol_version"`
	Routes          int       `json:"routes"`
	RouteVersion    uint64    `json:"route_version"`
	Connected       bool      `json:"connected"`
	QueueDepth      int       `json:"queue_depth"`
	QueueBytes      int       `json:"queue_bytes"`
	Forwarded       uint64    `json:"forwarded"`
	Dropped         uint64    `json:"dropped"`
	LastError       string    `json:"last_error,omitempty"`
	AppMeta         []byte    `json:"app_meta,omitempty"`
}

// Status returns the node's view of the cluster, members sorted by id.
func (n *Node) Status() Status {
	self, remote := n.routes.info()
	n.mu.RLock()
	ml := n.ml
	state := n.state
	if n.closing && state != StateClosed {
		state = "closing"
	}
	st := Status{
		NodeID: n.cfg.NodeID, State: state, ProtocolVersion: int(n.mux.maxVersion),
		GossipAddr: n.selfGossip, Encrypted: len(n.cfg.ClusterKey) > 0,
		Incarnation: self.Incarnation, RouteVersion: self.Version, LocalRoutes: self.Routes,
		AliveMembers: int(n.numAlive.Load()),
	}
	if a := n.mux.Addr(); a != nil {
		st.ClusterAddr = a.String()
	}
	type peerRef struct {
		i int
		p *peer
	}
	var refs []peerRef
	for id, m := range n.members {
		ms := MemberStatus{
			ID: id, Self: id == n.cfg.NodeID, State: m.state, Since: m.since,
			GossipAddr: m.gossipAddr, ClusterAddr: m.clusterAddr,
			MQTTPort: int(m.meta.MQTTPort), ProtocolVersion: int(m.meta.Proto), AppMeta: m.meta.App,
		}
		if ms.Self {
			ms.Routes, ms.RouteVersion = self.Routes, self.Version
			ms.ProtocolVersion = st.ProtocolVersion
		} else if ri, ok := remote[id]; ok {
			ms.Routes, ms.RouteVersion = ri.Routes, ri.Version
		}
		if m.metaErr != nil {
			ms.LastError = "metadata: " + m.metaErr.Error()
		}
		st.Members = append(st.Members, ms)
		if p := n.peers[id]; p != nil {
			refs = append(refs, peerRef{len(st.Members) - 1, p})
		}
	}
	n.mu.RUnlock()
	for _, r := range refs {
		ps := r.p.stats()
		ms := &st.Members[r.i]
		ms.Connected, ms.QueueDepth, ms.QueueBytes = ps.Connected, ps.QueueDepth, ps.QueueBytes
		ms.Forwarded, ms.Dropped = ps.Forwarded, ps.Dropped
		if ps.LastError != "" {
			ms.LastError = ps.LastError
		}
	}
	// memberlist knows about suspicion; our own records only see join/leave.
	// Only Name and State are read: memberlist rewrites other fields of
	// these shared *Node values (the address, on reclaim) without a lock.
	if ml != nil && state == StateRunning {
		suspect := make(map[string]bool)
		for _, m := range ml.Members() {
			if m.State == memberlist.StateSuspect {
				suspect[m.Name] = true
			}
		}
		for i := range st.Members {
			if suspect[st.Members[i].ID] && st.Members[i].State == "alive" {
				st.Members[i].State = "suspect"
			}
		}
	}
	slices.SortFunc(st.Members, func(a, b MemberStatus) int { return strings.Compare(a.ID, b.ID) })
	return st
}
