package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho/session/state"

	"github.com/mqtt-ha/broker/internal/testutil"
)

// Replicated persistent sessions (DESIGN.md guarantees 1, 3, 4) with real
// processes killed by SIGKILL.

// startVoters starts n nodes together (--bootstrap-expect n), so all n
// are voters from the start and any one may be killed without losing the
// quorum. A port taken between picking and binding restarts the attempt.
func startVoters(t *testing.T, n int) []*Broker { return startVotersSpec(t, n, brokerSpec{}) }

// startVotersBin is startVoters with another broker binary.
func startVotersBin(t *testing.T, n int, bin string) []*Broker {
	return startVotersSpec(t, n, brokerSpec{Bin: bin})
}

// startVotersSpec is startVoters with a binary, flags or environment of
// the test's (spec's ID is ignored).
func startVotersSpec(t *testing.T, n int, spec brokerSpec) []*Broker {
	t.Helper()
	for attempt := 1; ; attempt++ {
		nodes, err := launchTogetherSpec(t, n, spec)
		if err == nil {
			waitVoters(t, nodes, n)
			return nodes
		}
		portTaken := false
		for _, b := range nodes {
			if b.exited() && strings.Contains(b.log.String(), "address already in use") {
				portTaken = true
			}
		}
		if !portTaken || attempt == 3 {
			t.Fatal(err)
		}
		t.Logf("a port was taken before a node bound it; starting again (%v)", err)
		for _, b := range nodes {
			b.Kill()
		}
	}
}

// streamResult is what a subscriber saw of a numbered stream.
type streamResult struct {
	mu       sync.Mutex
	received []int // in arrival order, duplicates included
}

func (r *streamResult) add(n int) {
	r.mu.Lock()
	r.received = append(r.received, n)
	r.mu.Unlock()
}

func (r *streamResult) snapshot() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]int(nil), r.received...)
}

// collect moves c's messages into r until c's connection ends.
func collect(c *testutil.Client, r *streamResult) {
	for {
		select {
		case p := <-c.Msgs:
			n, err := strconv.Atoi(string(p.Payload))
			if err == nil {
				r.add(n)
			}
		case <-c.Done():
			// Drain what was delivered before the connection ended.
			for {
				select {
				case p := <-c.Msgs:
					if n, err := strconv.Atoi(string(p.Payload)); err == nil {
						r.add(n)
					}
				default:
					return
				}
			}
		}
	}
}

// allReceived reports the first acknowledged message not received yet.
func allReceived(acked []bool, got []int) error {
	seen := make(map[int]bool, len(got))
	for _, n := range got {
		seen[n] = true
	}
	for i, ok := range acked {
		if ok && !seen[i] {
			return fmt.Errorf("message %d acknowledged, not received yet (%d distinct received)", i, len(seen))
		}
	}
	return nil
}

// checkStream: every acknowledged message was received, first receipts are
// in publish order; returns the number of duplicates.
func checkStream(t *testing.T, acked []bool, got []int) int {
	t.Helper()
	seen := make(map[int]bool, len(got))
	dups, last := 0, -1
	for i, n := range got {
		if seen[n] {
			dups++
			continue
		}
		seen[n] = true
		if n < last {
			t.Fatalf("out of order: message %d received after %d (receipt #%d)", n, last, i)
		}
		last = n
	}
	var lost []int
	for n, ok := range acked {
		if ok && !seen[n] {
			lost = append(lost, n)
		}
	}
	if len(lost) > 0 {
		t.Fatalf("%d acknowledged messages never received, first %v", len(lost), lost[:min(len(lost), 10)])
	}
	return dups
}

// TestSessionFailover: a persistent subscriber on node 2 and a publisher on
// node 1 sending numbered messages; node 2 is SIGKILLed mid-stream; the
// subscriber resumes its session on node 3 and receives every message
// whose publish was acknowledged, in publish order. QoS 1 may duplicate
// (counted); QoS 2 must not (the client keeps its session state, as a real
// client does).
func TestSessionFailover(t *testing.T) {
	t.Parallel()
	const total = 10000
	for _, qos := range []byte{1, 2} {
		t.Run(fmt.Sprintf("qos%d", qos), func(t *testing.T) {
			t.Parallel()
			nodes := startVoters(t, 3)
			n1, n2, n3 := nodes[0], nodes[1], nodes[2]
			topic := fmt.Sprintf("failover/q%d", qos)
			id := fmt.Sprintf("failover-sub-q%d", qos)
			st := state.NewInMemory()
			sub := testutil.Connect(t, n2.MQTTAddr, testutil.ClientOptions{ID: id, CleanStart: true,
				SessionExpiry: 3600, Session: st, Buffer: total})
			sub.Sub(t, qos, topic)
			var res streamResult
			collected := make(chan struct{})
			go func() { collect(sub, &res); close(collected) }()

			pub := testutil.Connect(t, n1.MQTTAddr, testutil.ClientOptions{ID: fmt.Sprintf("failover-pub-q%d", qos), CleanStart: true})
			acked := make([]bool, total)
			pubDone := make(chan int) // number of refused publishes
			go func() {
				refused := 0
				for i := range total {
					if err := pub.TryPub(topic, qos, false, []byte(strconv.Itoa(i))); err != nil {
						refused++
						continue
					}
					acked[i] = true
				}
				pubDone <- refused
			}()

			// Kill the subscriber's node a third of the way through.
			eventually(t, 2*time.Minute, func() error {
				if n := len(res.snapshot()); n < total/3 {
					return fmt.Errorf("subscriber has %d messages", n)
				}
				return nil
			})
			n2.Kill()
			<-collected
			before := len(res.snapshot())

			sub2 := testutil.Connect(t, n3.MQTTAddr, testutil.ClientOptions{ID: id, CleanStart: false,
				SessionExpiry: 3600, Session: st, Buffer: total})
			if !sub2.Connack.SessionPresent {
				t.Fatal("resumed on node 3 without session present")
			}
			go collect(sub2, &res)
			refused := <-pubDone
			eventually(t, 2*time.Minute, func() error { return allReceived(acked, res.snapshot()) })
			got := res.snapshot()
			dups := checkStream(t, acked, got)
			t.Logf("QoS %d: %d published, %d refused (no quorum during election), %d received before the kill, %d receipts, %d duplicates",
				qos, total, refused, before, len(got), dups)
			if qos == 2 && dups > 0 {
				t.Fatalf("QoS 2: %d duplicates delivered", dups)
			}
		})
	}
}

// TestSessionOfflineWhileNodeDies: a persistent subscriber disconnects; its
// node is killed; messages published meanwhile on another node are all
// delivered, in order, when it reconnects to a third node (Debian
// mosquitto_sub, MQTT 3.1.1).
func TestSessionOfflineWhileNodeDies(t *testing.T) {
	t.Parallel()
	nodes := startVoters(t, 3)
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]
	session := []string{"-c", "-i", "offline-sub", "-q", "1"}
	n2.sub(t, append(session, "-t", "offline/#", "-E")...).wait(t)
	n2.Kill()
	var lines []string
	var want []message
	for i := range 200 {
		p := fmt.Sprintf("m-%03d", i)
		lines = append(lines, p)
		want = append(want, msg("offline/x", 1, false, p))
	}
	mustSucceed(t, mosquittoPub(t, strings.Join(lines, "\n")+"\n", append(n1.hostArgs(), "-q", "1", "-t", "offline/x", "-l")...))
	got := launchSub(t, n3.hostArgs(), append(session, "-t", "offline/unrelated", "-C", "200", "-W", "20")...).wait(t)
	if len(got) != len(want) {
		t.Fatalf("got %d of %d queued messages", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("message #%d: got %v, want %v (order or content)", i, got[i], want[i])
		}
	}
}

// TestWALLogStore: a cluster on the raft-wal log store
// (--raft-log-store=wal, given as BROKER_RAFT_LOG_STORE) keeps what it
// acknowledged when every node is SIGKILLed and started again: a
// persistent session's queued QoS 1 messages, delivered in order on
// another node, and a retained message (Debian mosquitto_pub and
// mosquitto_sub, MQTT 3.1.1). The data dirs hold the WAL, not raft.db.
func TestWALLogStore(t *testing.T) {
	t.Parallel()
	nodes := startVotersSpec(t, 3, brokerSpec{Env: []string{"BROKER_RAFT_LOG_STORE=wal"}})
	session := []string{"-c", "-i", "wal-sub", "-q", "1"}
	nodes[1].sub(t, append(session, "-t", "wal/#", "-E")...).wait(t)
	const total = 300
	var lines []string
	for i := range total {
		lines = append(lines, fmt.Sprintf("m-%03d", i))
	}
	mustSucceed(t, mosquittoPub(t, strings.Join(lines, "\n")+"\n", append(nodes[0].hostArgs(), "-q", "1", "-t", "wal/x", "-l")...))
	mustSucceed(t, mosquittoPub(t, "", append(nodes[2].hostArgs(), "-q", "1", "-r", "-t", "walr/kept", "-m", "kept")...))
	killAndRestartAll(t, nodes)
	for _, b := range nodes {
		dir := filepath.Join(b.DataDir, "raft")
		if _, err := os.Stat(filepath.Join(dir, "wal", "wal-meta.db")); err != nil {
			t.Fatalf("%s: no WAL: %v", b.ID, err)
		}
		if _, err := os.Stat(filepath.Join(dir, "raft.db")); err == nil {
			t.Fatalf("%s: a bolt raft.db beside the WAL", b.ID)
		}
	}
	got := launchSub(t, nodes[2].hostArgs(), append(session, "-t", "wal/unrelated", "-C", strconv.Itoa(total), "-W", "20")...).wait(t)
	if len(got) != total {
		t.Fatalf("got %d of %d queued messages", len(got), total)
	}
	for i := range got {
		if want := msg("wal/x", 1, false, lines[i]); got[i] != want {
			t.Fatalf("message #%d: got %v, want %v (order or content)", i, got[i], want)
		}
	}
	for _, b := range nodes {
		r := launchSub(t, b.hostArgs(), "-q", "1", "-t", "walr/#", "-C", "1", "-W", "10").wait(t)
		if len(r) != 1 || r[0] != msg("walr/kept", 1, true, "kept") {
			t.Fatalf("%s: retained after the restart: %v", b.ID, r)
		}
	}
}

// TestWillOfDeadNode: clients with a will (a clean session and a
// persistent one, Debian mosquitto_sub) are connected to node 2; node 2 is
// killed; a subscriber on node 1 receives each will exactly once, published
// by a survivor.
func TestWillOfDeadNode(t *testing.T) {
	t.Parallel()
	nodes := startVoters(t, 3)
	n1, n2 := nodes[0], nodes[1]
	watcher := testutil.Connect(t, n1.MQTTAddr, testutil.ClientOptions{ID: "will-watcher", CleanStart: true})
	watcher.Sub(t, 1, "devices/+/status", "marker")
	launchSub(t, n2.hostArgs(), "-i", "dev-clean", "-t", "devices/dev-clean/cmd",
		"--will-topic", "devices/dev-clean/status", "--will-payload", "offline", "--will-qos", "1")
	launchSub(t, n2.hostArgs(), "-c", "-i", "dev-persistent", "-q", "1", "-t", "devices/dev-persistent/cmd",
		"--will-topic", "devices/dev-persistent/status", "--will-payload", "offline", "--will-qos", "1")
	// Both connected and their wills in the log before the kill.
	eventually(t, 10*time.Second, func() error {
		ss, err := n1.sessions()
		if err != nil {
			return err
		}
		for _, id := range []string{"dev-clean", "dev-persistent"} {
			if s, ok := ss[id]; !ok || !s.HasWill || s.State != "connected" {
				return fmt.Errorf("%s: %+v", id, s)
			}
		}
		return nil
	})
	n2.Kill()

	wills := map[string]int{}
	deadline := time.Now().Add(30 * time.Second)
	for len(wills) < 2 && time.Now().Before(deadline) {
		if p, err := watcher.Next(time.Until(deadline)); err == nil {
			wills[p.Topic]++
		}
	}
	if len(wills) < 2 {
		t.Fatalf("wills received: %v; want one for each client of the dead node", wills)
	}
	// The wills are claimed in the log: once none is left there, a marker
	// published after them comes after any duplicate would have.
	eventually(t, 10*time.Second, func() error {
		ss, err := n1.sessions()
		if err != nil {
			return err
		}
		for _, id := range []string{"dev-clean", "dev-persistent"} {
			if s, ok := ss[id]; ok && s.HasWill {
				return fmt.Errorf("%s still holds a will", id)
			}
		}
		return nil
	})
	n1.mustPub(t, "-q", "1", "-t", "marker", "-m", "end")
	for {
		p := watcher.MustNext(t, 10*time.Second)
		if p.Topic == "marker" {
			break
		}
		wills[p.Topic]++
	}
	for topic, n := range wills {
		if n != 1 {
			t.Errorf("will on %s delivered %d times", topic, n)
		}
		if !strings.HasSuffix(topic, "/status") {
			t.Errorf("unexpected message on %s", topic)
		}
	}
}

// TestSessionExpiryAcrossNodeLoss: a persistent session with a 2 s expiry,
// whose node dies while it is offline, is removed by the cluster; the
// client then starts afresh (session present 0).
func TestSessionExpiryAcrossNodeLoss(t *testing.T) {
	t.Parallel()
	nodes := startVoters(t, 3)
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]
	c := testutil.Connect(t, n2.MQTTAddr, testutil.ClientOptions{ID: "expiring", CleanStart: true, SessionExpiry: 2})
	c.Sub(t, 1, "expiring/#")
	c.Close()
	n2.Kill()
	eventually(t, 20*time.Second, func() error {
		ss, err := n1.sessions()
		if err != nil {
			return err
		}
		if s, ok := ss["expiring"]; ok {
			return fmt.Errorf("session still there: %+v", s)
		}
		return nil
	})
	again := testutil.Connect(t, n3.MQTTAddr, testutil.ClientOptions{ID: "expiring", CleanStart: false, SessionExpiry: 2})
	if again.Connack.SessionPresent {
		t.Fatal("expired session resumed")
	}
}

// TestSessionTakeoverAcrossNodes: the same client id connecting on node 3
// while connected on node 1 takes the session over: the old connection
// gets DISCONNECT 0x8E, the new one session present and every queued
// message, in order; nothing published is lost across the two.
func TestSessionTakeoverAcrossNodes(t *testing.T) {
	t.Parallel()
	nodes := startVoters(t, 3)
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]
	const total = 400
	a := testutil.Connect(t, n1.MQTTAddr, testutil.ClientOptions{ID: "mover", CleanStart: true, SessionExpiry: 600, Buffer: total})
	a.Sub(t, 1, "takeover/x")
	var res streamResult
	done := make(chan struct{})
	go func() { collect(a, &res); close(done) }()
	pub := testutil.Connect(t, n2.MQTTAddr, testutil.ClientOptions{ID: "takeover-pub", CleanStart: true})
	acked := make([]bool, total)
	for i := range total {
		if i == total/2 {
			b := testutil.Connect(t, n3.MQTTAddr, testutil.ClientOptions{ID: "mover", CleanStart: false, SessionExpiry: 600, Buffer: total})
			if !b.Connack.SessionPresent {
				t.Fatal("takeover without session present")
			}
			select {
			case d := <-a.Disconnects:
				if d.ReasonCode != 0x8E {
					t.Fatalf("old connection: DISCONNECT 0x%02x, want 0x8E", d.ReasonCode)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("old connection not disconnected")
			}
			<-done
			go collect(b, &res)
		}
		if err := pub.TryPub("takeover/x", 1, false, []byte(strconv.Itoa(i))); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		acked[i] = true
	}
	eventually(t, 30*time.Second, func() error { return allReceived(acked, res.snapshot()) })
	dups := checkStream(t, acked, res.snapshot())
	t.Logf("%d messages across a takeover, %d duplicates", total, dups)
}

// TestSessionQueueLimit: an offline session queues at most
// --max-queued-messages; the rest are dropped (the oldest kept, as
// Mosquitto does) and counted.
func TestSessionQueueLimit(t *testing.T) {
	t.Parallel()
	b := startBroker(t, "--max-queued-messages", "50")
	b.sub(t, "-c", "-i", "limited", "-q", "1", "-t", "limit/x", "-E").wait(t)
	var lines []string
	for i := range 60 {
		lines = append(lines, fmt.Sprintf("m-%02d", i))
	}
	mustSucceed(t, mosquittoPub(t, strings.Join(lines, "\n")+"\n", append(b.hostArgs(), "-q", "1", "-t", "limit/x", "-l")...))
	b.eventuallyMetric(t, 10, "broker_sessions_queue_dropped_total")
	got := launchSub(t, b.hostArgs(), "-c", "-i", "limited", "-q", "1", "-t", "limit/unrelated", "-C", "50", "-W", "10").wait(t)
	if len(got) != 50 || got[0].Payload != "m-00" || got[49].Payload != "m-49" {
		t.Fatalf("got %d messages (%v ... ); want m-00..m-49", len(got), got[:min(len(got), 3)])
	}
}

// sessionView is one row of /api/sessions.
type sessionView struct {
	ClientID   string `json:"client_id"`
	Owner      string `json:"owner"`
	State      string `json:"state"`
	Persistent bool   `json:"persistent"`
	QueueDepth int    `json:"queue_depth"`
	HasWill    bool   `json:"has_will"`
}

func (b *Broker) sessions() (map[string]sessionView, error) {
	code, body, err := b.HTTPGet("/api/sessions")
	if err != nil {
		return nil, err
	}
	if code != 200 {
		return nil, fmt.Errorf("/api/sessions: HTTP %d", code)
	}
	var list []sessionView
	if err := json.Unmarshal([]byte(body), &list); err != nil {
		return nil, err
	}
	out := map[string]sessionView{}
	for _, s := range list {
		out[s.ClientID] = s
	}
	return out, nil
}
