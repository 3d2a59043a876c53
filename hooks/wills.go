package hooks

import (
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/mqtt-ha/broker/replication"
)

// Wills the leader publishes (persistent sessions, and the clean sessions
// of nodes that are gone: see Sessions.publishDueWills).
//
// The claim is the publication: replication.PublishWill clears the will
// and, in the same log entry, queues it for every matching persistent
// session and stores it as the retained value when it is retained. What
// is left to the claiming node afterwards is best effort: the live copies
// for connected clean sessions and QoS 0 subscribers, here and (through
// the cluster hook) on the other nodes. If the leader dies between the
// commit and that live publication, those copies are lost, never the
// queued ones nor the retained value. The will publisher's own publish is
// therefore skipped by the hooks that would write it to the log again
// (Sessions.OnPublish, Retained.OnPublish).

// claimWill is the command that claims (and publishes in the log) the will
// of the session opened at index opened.
func (h *Sessions) claimWill(id string, opened uint64) replication.Command {
	return &replication.PublishWill{ClientID: id, IfOpened: opened, At: time.Now().UnixMilli(),
		MaxQueued: uint32(max(h.cfg.MaxQueued, 0))}
}

// isWillPublisher reports whether cl is the inline client that publishes
// the wills claimed in the log.
func isWillPublisher(cl *mqtt.Client) bool {
	return cl.Net.Inline && cl.ID == willClientID
}
