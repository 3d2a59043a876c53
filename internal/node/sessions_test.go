package node

import (
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/eclipse/paho.golang/paho/session/state"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// In-process versions of the replicated-session guarantees (test/e2e has
// them with real processes): here they run under -race, hooks included.

// TestSessionResumesOnAnotherNodeAfterKill: a persistent QoS 2 subscriber
// on n2; a publisher on n1; n2 dies mid-stream; the subscriber resumes on
// n3 and gets every acknowledged message once, in order.
func TestSessionResumesOnAnotherNodeAfterKill(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	const total = 400
	st := state.NewInMemory()
	opts := testutil.ClientOptions{ID: "resumer", CleanStart: true, SessionExpiry: 600, Session: st, Buffer: total}
	sub := testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), opts)
	sub.Sub(t, 2, "resume/x")
	pub := tc.client("n1", "resume-pub")

	var got []int
	read := func(c *testutil.Client, until func() bool) {
		for !until() {
			select {
			case p := <-c.Msgs:
				n, err := strconv.Atoi(string(p.Payload))
				if err != nil {
					t.Fatalf("payload %q", p.Payload)
				}
				got = append(got, n)
			case <-c.Done():
				for { // what arrived before the connection ended
					select {
					case p := <-c.Msgs:
						n, _ := strconv.Atoi(string(p.Payload))
						got = append(got, n)
					default:
						return
					}
				}
			case <-time.After(wait):
				var q []uint64
				for _, m := range tc.nodes["n3"].repl.Queue("resumer", 0, 0) {
					q = append(q, m.Seq)
				}
				s, _ := tc.nodes["n3"].repl.Session("resumer")
				t.Fatalf("no message within %s (%d received, last %v); queue on n3: %v; connected %v owner %s", wait, len(got), got[max(0, len(got)-5):], q, s.Connected, s.Owner)
			}
		}
	}
	acked := make([]bool, total)
	for i := range total / 2 {
		if err := pub.TryPub("resume/x", 2, false, []byte(strconv.Itoa(i))); err == nil {
			acked[i] = true
		}
	}
	read(sub, func() bool { return len(got) >= total/4 })
	tc.nodes["n2"].Kill()
	delete(tc.nodes, "n2")
	read(sub, func() bool { return false }) // until the connection ends
	for i := total / 2; i < total; i++ {
		if err := pub.TryPub("resume/x", 2, false, []byte(strconv.Itoa(i))); err == nil {
			acked[i] = true
		}
	}
	opts.CleanStart = false
	again := testutil.Connect(t, tc.nodes["n3"].Addr("mqtt"), opts)
	if !again.Connack.SessionPresent {
		t.Fatal("session not present on n3")
	}
	want := 0
	for _, ok := range acked {
		if ok {
			want++
		}
	}
	// Until every acknowledged message is in (a count is not enough: a
	// publish that failed at the client may have committed all the same,
	// and its message arrives too: CI saw 399 still missing when the
	// count was reached).
	read(again, func() bool {
		seen := map[int]bool{}
		for _, n := range got {
			seen[n] = true
		}
		for i, ok := range acked {
			if ok && !seen[i] {
				return false
			}
		}
		return true
	})
	seen := map[int]bool{}
	last := -1
	for _, n := range got {
		if seen[n] {
			t.Fatalf("QoS 2 message %d delivered twice", n)
		}
		seen[n] = true
		if n < last {
			t.Fatalf("message %d after %d", n, last)
		}
		last = n
	}
	for i, ok := range acked {
		if ok && !seen[i] {
			t.Fatalf("acknowledged message %d lost", i)
		}
	}
	if want < total*9/10 {
		t.Fatalf("only %d of %d publishes acknowledged", want, total)
	}
}

// TestWillOfKilledNodePublishedOnce: a persistent session with a will on
// n2; n2 dies; a subscriber on n1 gets the will once.
func TestWillOfKilledNodePublishedOnce(t *testing.T) {
	tc := newTestCluster(t, "n1", "n2", "n3")
	tc.waitReady()
	watcher := tc.client("n1", "watcher")
	watcher.Sub(t, 1, "status/#", "marker")
	testutil.Connect(t, tc.nodes["n2"].Addr("mqtt"), testutil.ClientOptions{ID: "device", CleanStart: true,
		SessionExpiry: 600, Will: &paho.WillMessage{Topic: "status/device", QoS: 1, Payload: []byte("offline")}})
	tc.waitWillInLog(t, "n1", "device")
	tc.nodes["n2"].Kill()
	delete(tc.nodes, "n2")
	p := watcher.MustNext(t, 15*time.Second)
	if p.Topic != "status/device" || string(p.Payload) != "offline" {
		t.Fatalf("got %s %q, want the will", p.Topic, p.Payload)
	}
	testutil.Eventually(t, wait, func() error {
		if s, ok := tc.nodes["n1"].repl.Session("device"); !ok || s.Will != nil || s.Connected {
			return fmt.Errorf("session %+v: will still held", s)
		}
		return nil
	})
	tc.client("n3", "marker-pub").Pub(t, "marker", 1, false, []byte("end"))
	if p := watcher.MustNext(t, wait); p.Topic != "marker" {
		t.Fatalf("after the will: %s %q (a second will?)", p.Topic, p.Payload)
	}
}
