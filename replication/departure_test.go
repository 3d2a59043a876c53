package replication

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"io"
	"slices"
	"testing"
	"time"
)

// TestDepartureGolden pins the departure command's type (skippable, so
// older nodes ignore it; its bytes are in goldenCommands) and its snapshot
// record.
func TestDepartureGolden(t *testing.T) {
	if CmdDeparture&cmdSkippable == 0 {
		t.Fatal("departure must be skippable")
	}
	f := testFSM(observers{})
	f.Apply(entry(2, &Departure{Server: "n2", At: 7}))
	f.Apply(entry(3, &Departure{Server: "n1", At: 5}))
	snap := hex.EncodeToString(snapshotBytes(t, f))
	want := "4d515253" + "02" +
		"83" + "04" + "026e31" + "0a" + // departure n1 at 5 (sorted)
		"83" + "04" + "026e32" + "0e" + // departure n2 at 7
		"81" + "01" + "03" +
		"00" + "05" + "00" + "00" + "00" + "00" + "00"
	if snap != want {
		t.Fatalf("snapshot changed\n got %s\nwant %s", snap, want)
	}
}

// TestDepartureApplyAndRestore: a record is set, moved, cleared, and
// survives a snapshot round trip; an invalid one changes nothing.
func TestDepartureApplyAndRestore(t *testing.T) {
	f := testFSM(observers{})
	res := f.Apply(entry(1, &Departure{Server: "n3", At: 1000})).(Result)
	if !res.Changed {
		t.Fatal("first record not a change")
	}
	if res := f.Apply(entry(2, &Departure{Server: "n3", At: 1000})).(Result); res.Changed {
		t.Fatal("same record again is a change")
	}
	f.Apply(entry(3, &Departure{Server: "n4", At: 2000}))
	f.Apply(entry(4, &Departure{Server: "n4"})) // back
	if res := f.Apply(entry(5, &Departure{Server: ""})).(Result); res.Err == nil {
		t.Fatal("departure without a server accepted")
	}
	g := testFSM(observers{})
	if err := g.Restore(io.NopCloser(bytes.NewReader(snapshotBytes(t, f)))); err != nil {
		t.Fatal(err)
	}
	for _, fsm := range []*FSM{f, g} {
		fsm.mu.RLock()
		got := fmt.Sprint(fsm.st.departed)
		fsm.mu.RUnlock()
		if got != "map[n3:1000]" {
			t.Fatalf("departed %s, want map[n3:1000]", got)
		}
	}
}

// TestLeaveRecordedInTheLogIsActedOnByAnyLeader: no leader saw the two
// nodes leave (membership shows nothing: the leader was elected or
// restarted after the leave, or gossip lost it). Their own departure
// records in the log are enough for the scale-down. A node that records
// its leave and comes back (a rolling restart) has its record cleared and
// stays a voter past RemoveLeftAfter.
func TestLeaveRecordedInTheLogIsActedOnByAnyLeader(t *testing.T) {
	c := newTestCluster(t, 5)
	newDepartures(c, 1500*time.Millisecond) // membership never reports a leave
	all := []string{"n1", "n2", "n3", "n4", "n5"}
	c.startNew(all...)
	lead := c.leader()
	waitConfig(t, lead, all, nil)
	var others []string
	for _, id := range all {
		if id != lead.id {
			others = append(others, id)
		}
	}
	ctx := ctxT(t, waitFor)
	leave := func(id string) {
		t.Helper()
		if err := c.nodes[id].node().RecordDeparture(ctx); err != nil {
			t.Fatal(err)
		}
		c.nodes[id].stop(false)
	}
	// A restart: recorded, back, cleared, kept.
	leave(others[0])
	if err := c.nodes[others[0]].start(); err != nil {
		t.Fatal(err)
	}
	eventually(t, waitFor, func() error {
		if d := c.leader().node().Departures(); len(d) != 0 {
			return fmt.Errorf("departures %v, want none once the node is back", d)
		}
		return nil
	})
	time.Sleep(2 * 1500 * time.Millisecond)
	waitConfig(t, c.leader(), all, nil)
	// Scale down by two.
	gone := others[2:]
	for _, id := range gone {
		leave(id)
	}
	var rest []string
	for _, id := range all {
		if !slices.Contains(gone, id) {
			rest = append(rest, id)
		}
	}
	waitConfig(t, c.leader(), rest, nil)
	// Removed servers' records are dropped (the state stays bounded).
	eventually(t, waitFor, func() error {
		for _, tn := range c.up() {
			if d := tn.node().Departures(); len(d) != 0 {
				return fmt.Errorf("%s: departures %v, want none after the removal", tn.id, d)
			}
		}
		return nil
	})
}

// TestLeaveSeenByTheLeaderIsRecordedForTheNext: a leave that only
// membership reported (the leaving node could not write) is written to
// the log by the leader, so every node, a future leader included, knows.
func TestLeaveSeenByTheLeaderIsRecordedForTheNext(t *testing.T) {
	c := newTestCluster(t, 3)
	departed := newDepartures(c, time.Hour) // recorded, never acted on here
	c.startNew("n1", "n2", "n3")
	lead := c.leader()
	var gone string
	for _, id := range []string{"n1", "n2", "n3"} {
		if id != lead.id {
			gone = id
			break
		}
	}
	c.nodes[gone].stop(false)
	departed.leave(gone)
	eventually(t, waitFor, func() error {
		for _, tn := range c.up() {
			if _, ok := tn.node().Departures()[gone]; !ok {
				return fmt.Errorf("%s: no departure of %s in its state", tn.id, gone)
			}
		}
		return nil
	})
}
