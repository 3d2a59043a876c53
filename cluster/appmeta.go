package cluster

import (
	"fmt"
	"time"
)

// maxAppMeta bounds AppMeta so node metadata stays within memberlist's
// 512-byte limit together with the id and host.
const maxAppMeta = 64

// SetAppMeta replaces this node's opaque application metadata and gossips
// it (peers see a member update). The replication layer uses it to announce
// its bootstrap settings and whether it holds raft state.
func (n *Node) SetAppMeta(b []byte) error {
	if len(b) > maxAppMeta {
		return fmt.Errorf("app metadata is %d bytes; the limit is %d", len(b), maxAppMeta)
	}
	n.metaMu.Lock()
	n.meta.App = append([]byte(nil), b...)
	n.metaMu.Unlock()
	n.mu.RLock()
	ml := n.ml
	n.mu.RUnlock()
	if ml == nil {
		return nil // not started: the new value goes out with the first join
	}
	if err := ml.UpdateNode(5 * time.Second); err != nil {
		return fmt.Errorf("gossip app metadata: %w", err)
	}
	return nil
}
