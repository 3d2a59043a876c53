// Package backoff holds the pause the accept loops (MQTT listeners, the
// cluster port, the replication port) take after a failed Accept.
package backoff

import "time"

// Accept is the pause between failed Accepts on a listener that is still
// open (EMFILE in a connection storm, ENOBUFS): 5 ms, doubling up to 1 s,
// and none again after a success. Retrying at once would spin on a core;
// giving up would leave the port dead while the process lives on.
type Accept struct{ d time.Duration }

// Failed returns how long to wait before the next Accept.
func (a *Accept) Failed() time.Duration {
	a.d = min(max(2*a.d, 5*time.Millisecond), time.Second)
	return a.d
}

// Succeeded resets the pause.
func (a *Accept) Succeeded() { a.d = 0 }
