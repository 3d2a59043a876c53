package e2e

import (
	"testing"
)

// TestCleanSessionDiscardsPersistentSession is the reproduction with
// Debian's mosquitto clients (MQTT 3.1.1): a persistent session (-c) on
// node 1 gets a message queued; the same client id connects with a clean
// session on node 3; a persistent reconnect on node 1 then finds no
// session: nothing of the old queue arrives before a marker published
// after its new subscription. It used to get the old queue (a clean
// connect without a will wrote nothing to the log).
func TestCleanSessionDiscardsPersistentSession(t *testing.T) {
	t.Parallel()
	nodes := startVoters(t, 3)
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]
	const id = "clean-discard"
	n1.sub(t, "-c", "-i", id, "-q", "1", "-t", "discard/#", "-E").wait(t)
	n2.mustPub(t, "-q", "1", "-t", "discard/x", "-m", "old")
	n3.sub(t, "-i", id, "-q", "1", "-t", "discard/clean", "-E").wait(t) // clean session
	n2.mustPub(t, "-q", "1", "-t", "discard/x", "-m", "after-clean")
	// With the old session still there, its queue arrives before SUBACK
	// and this mosquitto_sub exits (-C 1) before subscribing: a failure.
	s := n1.sub(t, "-c", "-i", id, "-q", "1", "-t", "marker/discard", "-C", "1", "-W", "20")
	n2.mustPub(t, "-q", "1", "-t", "marker/discard", "-m", "marker")
	assertMessages(t, s.wait(t), msg("marker/discard", 1, false, "marker"))
}
